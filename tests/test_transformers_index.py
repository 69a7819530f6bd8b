"""transformers' models index from the user's cache (hpcft.transformers_index): the same index as
transformers' own scan, built once for all processes, and never cached for a source checkout."""
import json
import os
import pickle
import subprocess
import sys

from hpcft.paths import transformers_index
from hpcft.transformers_index import _read, _write, cache_key

PROBE = """
import json, os, sys
from hpcft import transformers_index
assert "transformers" not in sys.modules
transformers_index.install()
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM  # what a rank imports
stats = dict(transformers_index.stats)
import transformers.utils.import_utils as iu
scan = iu.create_import_structure_from_path
models = os.path.join(os.path.dirname(iu.__file__), os.pardir, "models")
own = scan.__wrapped__.__wrapped__(models)  # transformers' own scan, uncached, right now
print(json.dumps({"stats": stats, "same": scan(models) == own,
                  "same_via_init": scan(os.path.join(models, "__init__.py")) == own,
                  "files": sorted(os.listdir(os.path.join(os.environ["XDG_CACHE_HOME"], "hpcft")))}))
"""


def probe(cache):
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_first_process_builds_the_index_once_and_the_next_reads_it(tmp_path):
    first = probe(tmp_path)
    assert first["same"] and first["same_via_init"]  # the index transformers itself builds
    # `import transformers` and `transformers.models` both ask: one build (it was two), then the copy
    assert first["stats"] == {"asked": 2, "scanned": 1, "read": 0}
    assert len(first["files"]) == 1 and first["files"][0].startswith("transformers-index-")
    second = probe(tmp_path)
    assert second["stats"] == {"asked": 2, "scanned": 0, "read": 1} and second["same"] and second["same_via_init"]


def test_a_damaged_index_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _write("k", pickle.dumps({frozenset(): {"m": {"A"}}}))
    assert pickle.loads(_read("k")) == {frozenset(): {"m": {"A"}}}
    transformers_index("k").write_bytes(b"torn")  # a partial copy, a full disk: transformers scans again
    assert _read("k") is None and _read(None) is None


def test_the_key_names_the_install_and_a_source_checkout_has_none(tmp_path):
    models = tmp_path / "lib" / "site-packages" / "transformers" / "models"
    models.mkdir(parents=True)
    (models / "__init__.py").write_text("")
    key = cache_key(str(models))
    assert key is not None and cache_key(str(models)) == key
    os.utime(models / "__init__.py", ns=(1, 1))  # reinstalled: other files, other times
    assert cache_key(str(models)) not in (None, key)
    checkout = tmp_path / "src" / "transformers" / "src" / "transformers" / "models"
    checkout.mkdir(parents=True)
    (checkout / "__init__.py").write_text("")
    assert cache_key(str(checkout)) is None
