"""The tokenized-data cache: a second job on the same inputs hits it, a change to any input misses it,
and processes asking for the same entry at once tokenize it exactly once."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcft import datacache
from hpcft.paths import DataCachePaths
from hpcft.prepare import lookup, prepare
from hpcft.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"instruction": f"Add {a} and {a + 1}.", "input": "", "output": str(2 * a + 1)} for a in range(40)]


@pytest.fixture
def setup(tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    return TrainConfig(model_name=str(model), data_path=str(data)), tmp_path / "cache"


def run(cfg, cache, **kw):
    lines: list[str] = []
    done = prepare(cfg, cache, log=lines.append, **kw)
    return done, lines


def test_hit_then_a_miss_for_each_part_of_the_key(setup, tmp_path):
    cfg, cache = setup
    first, lines = run(cfg, cache)
    assert first.built and any("tokenizing" in x for x in lines)
    again, lines = run(cfg, cache)
    assert not again.built and again.train.path == first.train.path and not any("tokenizing" in x for x in lines)
    assert lookup(cfg, cache) is not None
    # everything that decides the tokens, changed one at a time, makes a new entry
    import dataclasses

    seen = {first.train.path}
    variants = [
        dataclasses.replace(cfg, context_length=64),
        dataclasses.replace(cfg, dataset="alpaca"),
        dataclasses.replace(cfg, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"),
        dataclasses.replace(cfg, model_type="seq2seq"),
    ]
    for variant in variants:
        assert lookup(variant, cache) is None
        done, _ = run(variant, cache)
        assert done.built and done.train.path not in seen
        seen.add(done.train.path)
    # the data's content (same path, same size: the memo is keyed by mtime too)
    data = Path(cfg.data_path)
    text = data.read_text()
    data.write_text(text.replace("Add 1 ", "Add 9 "))
    assert len(data.read_text()) == len(text)
    assert lookup(cfg, cache) is None
    done, _ = run(cfg, cache)
    assert done.built and done.train.path not in seen
    seen.add(done.train.path)
    # a tokenizer file (the model's weights are not part of the key)
    tok_cfg = Path(cfg.model_name) / "tokenizer_config.json"
    conf = json.loads(tok_cfg.read_text())
    tok_cfg.write_text(json.dumps({**conf, "model_max_length": 4096}))
    assert lookup(cfg, cache) is None
    (Path(cfg.model_name) / "model.safetensors").touch()
    done, _ = run(cfg, cache)
    assert done.built and done.train.path not in seen
    # the same content under another path is the same entry
    copy = tmp_path / "copy.jsonl"
    shutil.copy(data, copy)
    assert lookup(dataclasses.replace(cfg, data_path=str(copy)), cache).train.path == done.train.path


CONCURRENT = """
import sys, time
from pathlib import Path
from hpcft.prepare import prepare
from hpcft.train.config import TrainConfig
cfg = TrainConfig(model_name=sys.argv[1], data_path=sys.argv[2])
barrier, me = Path(sys.argv[4]), sys.argv[5]
(barrier / me).touch()  # imported: now wait for the others, however long their imports took under load
while len(list(barrier.iterdir())) < int(sys.argv[6]):
    time.sleep(0.005)
done = prepare(cfg, Path(sys.argv[3]), log=lambda line: print(line, flush=True))
print("ENTRY", done.train.path, done.built, flush=True)
"""


def test_processes_asking_at_once_tokenize_once(setup, tmp_path):
    cfg, cache = setup
    barrier = tmp_path / "imported"  # every process imports first, then all ask at the same moment
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, cfg.model_name, cfg.data_path, str(cache),
                               str(barrier), str(i), "4"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    entries = {line.split()[1] for out in outs for line in out.splitlines() if line.startswith("ENTRY")}
    built = [line.split()[2] for out in outs for line in out.splitlines() if line.startswith("ENTRY")]
    assert len(entries) == 1 and built.count("True") == 1, outs
    assert sum(out.count("hpcft.prepare: tokenizing") for out in outs) == 1, outs
    assert sum("waiting for" in out for out in outs) >= 1, outs
    leftovers = [p.name for p in cache.iterdir() if p.name.endswith(".lock") or ".tmp-" in p.name]
    assert leftovers == []


def test_a_stale_lock_of_a_dead_holder_is_taken_over(setup, monkeypatch):
    cfg, cache = setup
    from hpcft.datacache import cache_key, source_digest
    from hpcft.prepare import is_seq2seq

    paths = DataCachePaths(cache)
    key = cache_key(cfg, source_digest(cfg, cfg.data_path, None), seq2seq=is_seq2seq(cfg))
    cache.mkdir(parents=True)
    lock = paths.lock(key.digest)
    lock.write_text(json.dumps({"host": "node9", "pid": 4242, "since": 0}))
    old = time.time() - datacache.LOCK_STALE_S - 5
    os.utime(lock, (old, old))
    done, lines = run(cfg, cache)
    assert done.built and any("node9 pid 4242" in x and "taking over" in x for x in lines)
    assert not lock.exists()


def test_a_failed_tokenization_leaves_no_entry_and_no_lock(setup):
    cfg, cache = setup
    Path(cfg.data_path).write_text('{"question": "no known columns"}\n')
    from hpcft.errors import SpecError

    with pytest.raises(SpecError, match="cannot tell the data form"):
        run(cfg, cache)
    assert [p.name for p in cache.iterdir() if p.name != "fingerprints"] == []


def test_an_unwritable_cache_is_one_line_naming_data_cache_dir(setup, tmp_path):
    cfg, _ = setup
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    from hpcft.errors import SpecError

    with pytest.raises(SpecError, match=r"^train.data_cache_dir: cannot write the data cache .*file/cache"):
        run(cfg, blocker / "cache")
