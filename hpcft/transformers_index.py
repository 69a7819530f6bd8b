"""transformers' index of its models, read from the user's cache instead of rebuilt by every process.

transformers 5 builds, as it is imported, an index of what each of its ~570 model folders exports, by
reading every source file under transformers/models (some 3,400 files), and builds it twice in a process
(`import transformers`, then `transformers.models`: the lru_cache of 128 folders it keeps cannot hold 570).
That is ~1.3 CPU-s of every rank's start on an idle 2-core machine, and thousands of file reads per rank on
a shared filesystem, from every node of a job at once. The index depends on those files alone, so the first
process writes it to ${XDG_CACHE_HOME:-~/.cache}/hpcft/, named by the installed transformers' version, path
and install times, and every later process (and the second build in the same process) reads it back.

Only for a transformers installed as a distribution (under site-packages): a source checkout can change a
model's exports without changing what the name is made of, so it keeps its own scan. Anything unexpected
(another transformers layout, an unreadable cache) leaves transformers' own code to do its work.
"""
from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import os
import pickle
import sys

from hpcft.paths import transformers_index

TARGET = "transformers.utils.import_utils"
SCANNER = "create_import_structure_from_path"
stats = {"asked": 0, "scanned": 0, "read": 0}  # this process: index requests, builds, cache reads


def install() -> None:
    """Before transformers is imported: serve its models index from the cache from then on."""
    module = sys.modules.get(TARGET)
    if module is not None:  # imported already: the first build is done, the second can still be saved
        patch(module)
    elif not any(isinstance(f, _PatchOnLoad) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnLoad())


class _PatchOnLoad(importlib.abc.MetaPathFinder):
    """Finds transformers.utils.import_utils as Python would, and patches it right after it runs, before
    transformers' __init__ goes on to build the index with it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        loader.exec_module = exec_module
        return spec


def cache_key(models: str) -> str | None:
    """What names the index of the transformers installed at `models` (its models folder): None for a
    transformers that is not an installed distribution."""
    if os.path.basename(os.path.dirname(os.path.dirname(models))) not in ("site-packages", "dist-packages"):
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("transformers")
    except PackageNotFoundError:
        return None
    folder, init = os.stat(models), os.stat(os.path.join(models, "__init__.py"))
    made_of = f"{installed}|{models}|{folder.st_ino}|{folder.st_mtime_ns}|{init.st_mtime_ns}|{sys.version_info[:2]}"
    return f"{installed}-{hashlib.sha256(made_of.encode()).hexdigest()[:16]}"


def patch(module) -> None:
    original = getattr(module, SCANNER, None)
    if original is None or getattr(original, "_hpcft", False):
        return
    try:
        models = os.path.realpath(os.path.join(os.path.dirname(module.__file__), os.pardir, "models"))
        key = cache_key(models)
    except (OSError, TypeError, ValueError):
        return
    blob: list[bytes] = []

    def scan(module_path):
        try:
            path = os.fspath(module_path)
            folder = os.path.dirname(path) if os.path.isfile(path) else path
            if os.path.realpath(folder) != models:
                return original(module_path)
        except (OSError, TypeError):
            return original(module_path)
        stats["asked"] += 1
        if not blob:
            cached = _read(key)
            if cached is not None:
                stats["read"] += 1
                blob.append(cached)
            else:
                stats["scanned"] += 1
                blob.append(pickle.dumps(original(module_path), protocol=pickle.HIGHEST_PROTOCOL))
                _write(key, blob[0])
        return pickle.loads(blob[0])  # a fresh copy for each caller, as transformers' own scan gives

    scan._hpcft = True
    scan.__wrapped__ = original
    setattr(module, SCANNER, scan)


def _read(key: str | None) -> bytes | None:
    if key is None:
        return None
    try:
        data = transformers_index(key).read_bytes()
        pickle.loads(data)  # a torn or foreign file is rebuilt, not trusted
        return data
    except Exception:  # noqa: BLE001 - any unreadable cache means: build it as transformers does
        return None


def _write(key: str | None, data: bytes) -> None:
    if key is None:
        return
    path = transformers_index(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # ranks that start together each write a whole file; the last one stays
    except OSError:
        pass  # a read-only or full home: every process builds the index, as without the cache
