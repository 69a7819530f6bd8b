"""The tokenized-data cache on the shared output filesystem (no torch): its key, and publishing an
entry exactly once however many processes ask for it at the same time.

An entry is keyed by the content of everything that decides the tokens: the data files (or the custom
loader and its data), the tokenizer's files, the form, the chat template, the context length, the
model kind (seq2seq) and the version of hpcft's tokenizing code. A second job on the same inputs finds
the entry; a change to any of them makes a new one.

    key = cache_key(cfg, source_digest, seq2seq=False)
    entry = ensure_entry(DataCachePaths(root), key, build=lambda staging: ..., log=print)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hpcft.dataformat import TEMPLATES, chat_template_text, split_custom
from hpcft.errors import SpecError
from hpcft.paths import DataCachePaths

# Bump when the tokenized output of the same inputs changes (tokenizing code, features, filtering).
TOKENIZE_VERSION = 1
# Files of a tokenizer directory that decide its tokens (weights and model config do not).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
                   "*.tiktoken", "chat_template*", "spiece*")
LOCK_STALE_S = 120  # a lock whose holder stopped refreshing it for this long is taken over
LOCK_REFRESH_S = 10


def file_digest(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file's content. With memo_dir, remembered by (path, size, mtime, inode): a 1 GB file
    is read once, not at every job start; any change to the file changes the memo's name."""
    st = path.stat()
    memo = None
    if memo_dir is not None:
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        memo = memo_dir / hashlib.sha256(ident.encode()).hexdigest()[:32]
        try:
            return memo.read_text().strip()
        except OSError:
            pass
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        try:
            _write_atomic(memo, digest)
        except OSError:  # a memo is only a shortcut; an unwritable cache is reported where it is written
            pass
    return digest


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def files_digest(files: list[Path] | tuple[Path, ...], base: Path | None, memo_dir: Path | None) -> str:
    """One digest over files, in order: each one's content and, inside a directory (base), its relative
    name (it names the split); outside one only its type, so a copy elsewhere is the same data."""
    h = hashlib.sha256()
    for f in files:
        name = str(f.relative_to(base)) if base is not None and f.is_relative_to(base) else f.suffix.lower()
        h.update(f"{name}\0{file_digest(f, memo_dir)}\n".encode())
    return h.hexdigest()


def tokenizer_files(directory: str | Path) -> list[Path]:
    d = Path(directory)
    return sorted({p for pattern in TOKENIZER_FILES for p in d.glob(pattern) if p.is_file()})


def _text_digest(text: str | None) -> str:
    return hashlib.sha256(text.encode()).hexdigest() if text else ""


@dataclass(frozen=True)
class CacheKey:
    """Everything that decides the tokens of one data source."""

    source: str  # content digest of the data files (and, for dataset: custom, of the loader file)
    tokenizer: str  # content digest of the tokenizer's files (its own chat template included)
    dataset: str  # train.dataset as asked (auto resolves the same way for the same content)
    text_field: str
    chat_template: str  # digest of train.chat_template, "" when the tokenizer's own is used
    prompt_templates: str  # digest of hpcft's prompt templates
    context_length: int
    seq2seq: bool
    version: int = TOKENIZE_VERSION

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:24]


def source_digest(cfg, path: str | None, memo_dir: Path | None, field: str = "train.data_path") -> str:
    """Content digest of a data source: its files, or for dataset: custom the loader file, its function
    name and the data_path it is given (when that exists)."""
    from hpcft.datasource import describe

    if cfg.dataset == "custom" and field == "train.data_path":
        loader, func = split_custom(cfg.custom_dataset)
        parts = [file_digest(loader, memo_dir), func]
        if path and (Path(path).exists() or any(c in path for c in "*?[")):
            src = describe(path, field)
            parts.append(files_digest(src.files, Path(path) if Path(path).is_dir() else None, memo_dir))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()
    src = describe(path, field)
    return files_digest(src.files, Path(path) if Path(path).is_dir() else None, memo_dir)


def cache_key(cfg, source: str, *, seq2seq: bool, memo_dir: Path | None = None) -> CacheKey:
    tokenizer_dir = cfg.tokenizer_name or cfg.model_name
    files = tokenizer_files(tokenizer_dir)
    if not files:
        raise SpecError("train.tokenizer_name" if cfg.tokenizer_name else "train.model_name",
                        f"no tokenizer files in {tokenizer_dir}; point it at a directory with tokenizer.json or "
                        "tokenizer_config.json")
    return CacheKey(source=source, tokenizer=files_digest(files, Path(tokenizer_dir), memo_dir),
                    dataset=cfg.dataset, text_field=cfg.dataset_text_field,
                    chat_template=_text_digest(chat_template_text(cfg.chat_template)),
                    prompt_templates=_text_digest("\0".join(TEMPLATES)), context_length=cfg.context_length,
                    seq2seq=seq2seq)


# ---------------------------------------------------------------------------------------------
# Publishing an entry once.


class EntryLock:
    """An O_EXCL lock file next to the entry, refreshed by a thread while its holder works (so a holder
    that died leaves a lock others can take over after LOCK_STALE_S)."""

    def __init__(self, path: Path):
        self.path = path
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        self._thread = threading.Thread(target=self._refresh, name="hpcft-cache-lock", daemon=True)
        self._thread.start()
        return True

    def _refresh(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"{info['host']} pid {info['pid']}"
        except (OSError, ValueError, KeyError):
            return "another process"

    def stale(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime > LOCK_STALE_S
        except FileNotFoundError:
            return False

    def break_stale(self) -> None:
        """Move a stale lock aside (rename is atomic, so of two processes breaking it only one succeeds)."""
        aside = self.path.with_name(f"{self.path.name}.stale.{socket.gethostname()}.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)


def ensure_entry(cache: DataCachePaths, key: CacheKey, build: Callable[[Path], dict], *,
                 log: Callable[[str], None] = print, timeout_s: float = 24 * 3600, rebuild: bool = False) -> tuple[Path, bool]:
    """The complete entry for `key`, built by `build(staging_dir) -> meta` if nobody has: exactly one
    process builds (the lock); the others wait for the entry to appear. Returns (entry, built_here)."""
    entry = cache.entry(key.digest)
    try:
        if rebuild and entry.exists():
            shutil.rmtree(entry)
        cache.root.mkdir(parents=True, exist_ok=True)
        probe = cache.root / f".probe-{socket.gethostname()}-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise SpecError("train.data_cache_dir", f"cannot write the data cache {cache.root} ({exc.strerror}); set "
                                                "data_cache_dir to a directory on a filesystem every node shares "
                                                "and you can write") from None
    lock = EntryLock(cache.lock(key.digest))
    start = last_note = time.monotonic()
    while not cache.complete(key.digest):
        if lock.try_acquire():
            try:
                if cache.complete(key.digest):  # published between our check and the lock
                    return entry, False
                return _build(cache, key, build), True
            finally:
                lock.release()
        if lock.stale():
            log(f"hpcft.prepare: the lock on {entry.name} was last refreshed over {LOCK_STALE_S} s ago "
                f"({lock.holder()}); taking over")
            lock.break_stale()
            continue
        if time.monotonic() - start > timeout_s:
            raise SpecError("train.data_timeout_s", f"waited {timeout_s:.0f} s for {lock.holder()} to tokenize "
                                                    f"{entry}; raise data_timeout_s or remove {lock.path}")
        if time.monotonic() - last_note > 30 or last_note == start:
            log(f"hpcft.prepare: waiting for {lock.holder()}, which is tokenizing the same data into {entry}")
            last_note = time.monotonic()
        time.sleep(1.0)
    return entry, False


def _build(cache: DataCachePaths, key: CacheKey, build: Callable[[Path], dict]) -> Path:
    """Build under the lock. Any other staging directory of this entry belongs to a holder that died
    (only the lock's holder writes one): removed first."""
    for dead in cache.root.glob(cache.staging(key.digest, "*").name):
        shutil.rmtree(dead, ignore_errors=True)
    staging = cache.staging(key.digest, f"{socket.gethostname()}-{os.getpid()}")
    staging.mkdir(parents=True)
    try:
        meta = build(staging)
        meta = {"key": dataclasses.asdict(key), "digest": key.digest, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "host": socket.gethostname(), **meta}
        (staging / DataCachePaths.META).write_text(json.dumps(meta, indent=1) + "\n")
        entry = cache.entry(key.digest)
        os.rename(staging, entry)  # atomic: an entry that exists is complete
        return entry
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_meta(entry: Path) -> dict:
    return json.loads((entry / DataCachePaths.META).read_text())
