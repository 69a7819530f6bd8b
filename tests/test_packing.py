"""Packing without cross-contamination: a packed batch computes what its examples compute one by one,
packed and padded eval give the same loss, the plans are right, and data memory stays flat."""
import contextlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcft.dataformat import IGNORE_INDEX
from hpcft.prepare import prepare
from hpcft.train.config import TrainConfig
from hpcft.train.data import load_splits, make_eval_loader
from hpcft.train.loop import to_device
from hpcft.train.packing import ConcatRows, Examples, PackedRows, fill_rows, packed_collate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat(tiny_model, tmp_path_factory):
    """The shipped chat data, tokenized (masks on assistant turns only), and the tiny model in fp32."""
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(model_name=str(tiny_model), data_path=str(ROOT / "data/chat_tiny.jsonl"), context_length=160,
                      batching_strategy="packing")
    done = prepare(cfg, tmp_path_factory.mktemp("cache"), log=lambda _: None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    return cfg, done, model


def one_by_one(model, rows: Examples) -> tuple[float, int]:
    """Token-weighted mean loss of examples run alone (the model's loss is a mean over predicted tokens)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(len(rows)):
            ex = rows[k]
            ids = torch.tensor(ex["input_ids"], dtype=torch.long)[None]
            labels = torch.tensor(ex["labels"], dtype=torch.long)[None]
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += float(model(input_ids=ids, labels=labels, use_cache=False).loss) * n
            count += n
    return total / count, count


@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "flattened"])
def test_a_packed_batch_equals_its_examples_one_by_one(chat, flatten):
    cfg, done, model = chat
    from hpcft.train.packing import TokenStore

    store = TokenStore(done.train.path)
    index = np.arange(24)
    packed = PackedRows(store, index, cfg.context_length)
    assert len(packed) < len(index)  # several examples share a row
    batch = packed_collate(0, flatten=flatten)([packed[r] for r in range(len(packed))])
    assert batch["input_ids"].shape[0] == (1 if flatten else len(packed))
    with torch.no_grad():
        loss = float(model(**to_device(batch, torch.device("cpu"))).loss)
    ref, count = one_by_one(model, Examples(store, index))
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == count
    assert loss == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # the old, contaminating layout (no position restarts) does not: the test can tell them apart
    plain = {k: v for k, v in batch.items() if k not in ("position_ids", "num_tokens")}
    with torch.no_grad():
        contaminated = float(model(**plain, use_cache=False).loss)
    assert abs(contaminated - ref) > 1e-3


def test_eval_loss_packed_equals_padded(chat):
    cfg, done, model = chat
    from types import SimpleNamespace

    from hpcft.distenv import DistEnv
    from hpcft.train.dist import Runtime
    from hpcft.train.loop import evaluate

    rt = Runtime(env=DistEnv(), device=torch.device("cpu"), backend="gloo")
    engine = SimpleNamespace(model=model, autocast=contextlib.nullcontext)
    losses = {}
    for batching in ("padding", "packing"):
        splits = load_splits(TrainConfig(**{**cfg.__dict__, "batching_strategy": batching}), done)
        loader = make_eval_loader(splits.eval, batch_size=3, rank=0, world_size=1, pad_id=0)
        losses[batching] = evaluate(engine, loader, rt)
    assert isinstance(splits.eval, PackedRows)
    assert losses["packing"] == pytest.approx(losses["padding"], rel=1e-5)


def test_rows_hold_whole_examples_once_and_are_nearly_full():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.geometric(1 / 130, size=20000) + 30, 512).astype(np.int32)  # a long tail
    order, bounds = fill_rows(lengths, 512)
    assert sorted(order.tolist()) == list(range(len(lengths)))  # every example exactly once
    assert bounds[0] == 0 and bounds[-1] == len(lengths) and (np.diff(bounds) > 0).all()
    sums = np.add.reduceat(lengths[order], bounds[:-1])
    assert (sums <= 512).all()
    in_order = np.add.reduceat(lengths, _in_order_bounds(lengths, 512)[:-1])  # packing in order, for scale
    assert len(sums) < 0.95 * len(in_order) and sums.mean() / 512 > 0.88
    order, bounds = fill_rows(np.array([300, 5, 5, 600]), 256)  # too long: a row of its own
    assert order.tolist() == [3, 0, 1, 2] and bounds.tolist() == [0, 1, 2, 4]


def _in_order_bounds(lengths, ctx):
    bounds, total = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if total + n > ctx:
            bounds.append(i)
            total = 0
        total += n
    return np.array(bounds + [len(lengths)])


def test_concat_rows_are_the_token_stream_cut_into_context_lengths(chat):
    cfg, done, _ = chat
    from hpcft.train.packing import TokenStore

    store = TokenStore(done.train.path)
    index = np.arange(30)
    rows = ConcatRows(store, index, 100)
    stream = np.concatenate([store.ids(i) for i in index])
    assert len(rows) == len(stream) // 100
    got = np.concatenate([rows[r]["input_ids"] for r in range(len(rows))])
    assert (got == stream[:len(rows) * 100]).all() and all(len(rows[r]["input_ids"]) == 100 for r in range(len(rows)))


MEASURE = """
import sys, numpy as np
def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) * 1024
from hpcft.train.config import TrainConfig
from hpcft.train.data import make_loader, make_rows
from hpcft.train.packing import TokenStore
import datasets, torch  # noqa: F401,E401 - the libraries are imported before the baseline
before = anon()
store = TokenStore(sys.argv[1])
cfg = TrainConfig(batching_strategy="packing", context_length=512)
rows = make_rows(cfg, store, np.arange(len(store)))
loader = make_loader(rows, batch_size=4, accum=2, rank=1, world_size=4, shuffle=True, seed=0, pad_id=0, num_workers=0)
sampler = loader.batch_sampler
sampler.set_epoch(1, 64 * 1000)
it = iter(loader)
for _ in range(50):
    next(it)
print(len(store), len(rows), anon() - before)
"""


def test_data_memory_stays_flat_in_the_data_size(tmp_path):
    """A million memory-mapped examples (~350 MB of tokens): packing plan, sampler and batches add a few
    int arrays per example, not the data (the old path held every token in Python lists: ~GBs)."""
    import datasets
    import pyarrow as pa

    n = 1_000_000
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 80, size=n).astype(np.int32)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(rng.integers(0, 4000, size=int(offsets[-1])).astype(np.int32))
    col = pa.ListArray.from_arrays(pa.array(offsets), values)
    datasets.Dataset(pa.table({"input_ids": col, "labels": col})).save_to_disk(str(tmp_path / "big"))
    data_bytes = sum(f.stat().st_size for f in (tmp_path / "big").glob("*.arrow"))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big")], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    examples, rows, grown = map(int, out.stdout.split())
    assert examples == n and rows < n
    # ~20 MiB of int arrays (lengths, the index, the packing plan), the rest allocator slack
    assert grown < 64 * 2**20, f"{grown / 2**20:.0f} MiB for {data_bytes / 2**20:.0f} MiB of tokens"
