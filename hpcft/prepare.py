"""Tokenize a job's data once into the shared cache (hpcft.datacache); every rank then memory-maps it.

    hpcft prepare jobs/SPEC.yaml                    # on a login node, or anywhere with the data
    hpcft submit --prepare jobs/SPEC.yaml           # as its own CPU job that the training job waits for
    python -m hpcft.prepare --cache-dir=DIR --model_name=... --data_path=...   # what both run

The training entrypoint runs the same step: rank 0 looks the entry up and, on a miss, runs this
module in a child process while the other ranks wait (hpcft.train.data.prepare_once).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from hpcft.datacache import cache_key, ensure_entry, read_meta, source_digest
from hpcft.dataformat import PROMPT_FORMS, chat_template_text, check_chat_template, detect_form, split_custom
from hpcft.datasource import describe, eval_split, load_splits, train_split
from hpcft.encode import encode_batch
from hpcft.errors import SpecError
from hpcft.memstat import PrivateMemoryPeak
from hpcft.paths import DataCachePaths

MIN_ROWS_PER_PROC = 2000  # below this, another tokenizing process costs more than it saves


@dataclass(frozen=True)
class Entry:
    """One split of a cache entry: a save_to_disk directory of input_ids/labels rows."""

    path: Path
    examples: int
    tokens: int


@dataclass(frozen=True)
class Prepared:
    """Where a job's tokenized data is: train, and eval when the data brings it (eval_data_path, or a
    validation split of data_path); None means hold out val_fraction of train."""

    train: Entry
    eval: Entry | None
    form: str
    built: bool  # tokenized by this call (False: found in the cache)


def is_seq2seq(cfg) -> bool:
    """Encoder-decoder model? From train.model_type, else the model's config.json (no transformers)."""
    if cfg.model_type != "auto":
        return cfg.model_type == "seq2seq"
    try:
        return bool(json.loads((Path(cfg.model_name) / "config.json").read_text()).get("is_encoder_decoder", False))
    except (OSError, ValueError):
        return False


def default_num_proc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Sources -> a cache entry.


def load_tokenizer(cfg):
    """The training tokenizer (transformers), with train.chat_template applied when set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer_name or cfg.model_name, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    template = chat_template_text(cfg.chat_template)
    if template is not None:
        tok.chat_template = template
    return tok


def load_custom(cfg, tokenizer, split: str, staging: Path):
    """Rows from the user's loader (llama-recipes' signature: fn(dataset_config, tokenizer, split)) as a
    datasets.Dataset; None when it returns nothing for that split."""
    import datasets

    path, func = split_custom(cfg.custom_dataset)
    spec = importlib.util.spec_from_file_location(f"hpcft_custom_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = SimpleNamespace(dataset="custom_dataset", file=cfg.custom_dataset, data_path=cfg.data_path,
                             eval_data_path=cfg.eval_data_path, train_split="train", test_split="validation",
                             context_length=cfg.context_length, input_length=cfg.context_length)
    try:
        out = getattr(module, func)(config, tokenizer, split)
    except Exception as exc:  # noqa: BLE001 - the user's code; its error goes to the user with the place
        raise SpecError("train.custom_dataset", f"{path}:{func}(..., split={split!r}) raised "
                                                f"{type(exc).__name__}: {exc}; return None for a split you do not have") from None
    if out is None:
        return None
    if isinstance(out, datasets.Dataset):
        return out if len(out) else None
    if isinstance(out, (datasets.DatasetDict, dict)):
        raise SpecError("train.custom_dataset", f"{func} returned a DatasetDict; return the rows of the split it is asked for")

    def rows():
        items = (out[i] for i in range(len(out))) if hasattr(out, "__getitem__") and hasattr(out, "__len__") else out
        for item in items:
            if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
                yield {"prompt": item[0], "target": item[1]}
            elif isinstance(item, dict):
                yield {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in item.items()}
            else:
                raise SpecError("train.custom_dataset", f"{func} must yield dicts (any form's columns, or input_ids) "
                                                        f"or (prompt, target) pairs; got {type(item).__name__}")

    ds = datasets.Dataset.from_generator(rows, cache_dir=str(staging / ".hf"))
    return ds if len(ds) else None


def source_splits(cfg, path: str | None, field: str, tokenizer, staging: Path) -> dict:
    if cfg.dataset == "custom" and field == "train.data_path":
        splits = {"train": load_custom(cfg, tokenizer, "train", staging),
                  "validation": load_custom(cfg, tokenizer, "validation", staging)}
        if splits["train"] is None:
            raise SpecError("train.custom_dataset", "returned no training rows")
        return {k: v for k, v in splits.items() if v is not None}
    return load_splits(describe(path, field), staging / ".hf", field)


def tokenize_source(cfg, path: str | None, field: str, *, seq2seq: bool, num_proc: int, staging: Path, digest: str,
                    log: Callable[[str], None]) -> dict:
    """Every split of the source tokenized into staging/<split>/; returns the entry's meta."""
    from datasets import Features, List, Value

    t0 = time.perf_counter()
    tok = load_tokenizer(cfg)
    if num_proc > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the worker processes are the parallelism
    splits = source_splits(cfg, path, field, tok, staging)
    name = path if cfg.dataset != "custom" or field != "train.data_path" else cfg.custom_dataset
    meta: dict = {"source": name, "splits": {}}
    features = Features({"input_ids": List(Value("int32")), "labels": List(Value("int32"))})
    for split, ds in splits.items():
        form = detect_form(ds.column_names, "auto" if cfg.dataset == "custom" else cfg.dataset, field,
                           cfg.dataset_text_field)
        if form == "chat" and tok.chat_template is None:
            check_chat_template(cfg)  # names train.chat_template
        if seq2seq and form not in PROMPT_FORMS:
            raise SpecError("train.dataset", f"{form} data trains decoder-only models; this model is seq2seq "
                                             "(use a prompt/target form, or a causal model)")
        procs = max(1, min(num_proc, len(ds) // MIN_ROWS_PER_PROC))
        log(f"hpcft.prepare: tokenizing {name} [{split}]: {len(ds):,} rows, form {form}, "
            f"{procs} process{'es' if procs > 1 else ''}")
        out = ds.map(encode_batch, batched=True, with_indices=True, batch_size=256, num_proc=procs,
                     remove_columns=ds.column_names, features=features, new_fingerprint=f"{digest}-{split}",
                     cache_file_name=str(staging / ".hf" / f"tokenized-{split}.arrow"),
                     fn_kwargs=dict(form=form, tok=tok, ctx=cfg.context_length, seq2seq=seq2seq,
                                    text_field=cfg.dataset_text_field, source=f"{name} [{split}]", field=field))
        if len(out) == 0:
            raise SpecError("train.context_length", f"every example of {name} [{split}] is longer than "
                                                    f"{cfg.context_length} tokens before its answer starts (or has "
                                                    "nothing to learn); raise context_length")
        out.save_to_disk(str(staging / split))
        tokens = _total_tokens(out)
        meta["splits"][split] = {"examples": len(out), "rows": len(ds), "tokens": tokens, "form": form}
        meta["form"] = meta.get("form", form)
    shutil.rmtree(staging / ".hf", ignore_errors=True)
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    return meta


def _total_tokens(ds) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py() or 0)


def _entry_split(entry: Path, meta: dict, split: str) -> Entry:
    info = meta["splits"][split]
    return Entry(entry / split, info["examples"], info["tokens"])


def _keys(cfg, cache: DataCachePaths, seq2seq: bool):
    memo = cache.fingerprints
    sources = [("train.data_path", cfg.data_path)]
    if cfg.eval_data_path:
        sources.append(("train.eval_data_path", cfg.eval_data_path))
    return [(field, path, cache_key(cfg, source_digest(cfg, path, memo, field), seq2seq=seq2seq, memo_dir=memo))
            for field, path in sources]


def _assemble(cfg, entries: list[tuple[str, Path]], built: bool) -> Prepared:
    (_, train_entry), *rest = entries
    meta = read_meta(train_entry)
    names = list(meta["splits"])
    train = _entry_split(train_entry, meta, train_split(names, "train.data_path", meta["source"]))
    ev = None
    if rest:
        eval_entry = rest[0][1]
        emeta = read_meta(eval_entry)
        ev = _entry_split(eval_entry, emeta, eval_split(list(emeta["splits"]), own=True))
    elif (name := eval_split(names, own=False)) is not None:
        ev = _entry_split(train_entry, meta, name)
    return Prepared(train, ev, meta.get("form", cfg.dataset), built)


def lookup(cfg, root: Path) -> Prepared | None:
    """The job's tokenized data if every entry it needs is complete in the cache (hashing only: no
    tokenizer or datasets import); None on a miss."""
    cache = DataCachePaths(Path(root))
    entries = []
    for field, _path, key in _keys(cfg, cache, is_seq2seq(cfg)):
        if not cache.complete(key.digest):
            return None
        entries.append((field, cache.entry(key.digest)))
    return _assemble(cfg, entries, built=False)


def prepare(cfg, root: Path, *, num_proc: int = 0, log: Callable[[str], None] = print, rebuild: bool = False,
            timeout_s: float | None = None) -> Prepared:
    """Tokenize what the cache lacks (once, however many processes ask at the same time) and return
    where the job's data is."""
    import datasets

    datasets.disable_progress_bars()
    cache = DataCachePaths(Path(root))
    seq2seq = is_seq2seq(cfg)
    num_proc = num_proc or default_num_proc()
    entries, built = [], False
    for field, path, key in _keys(cfg, cache, seq2seq):
        def build(staging: Path, field=field, path=path, key=key) -> dict:
            with PrivateMemoryPeak(workers=True) as memory:
                meta = tokenize_source(cfg, path, field, seq2seq=seq2seq, num_proc=num_proc, staging=staging,
                                       digest=key.digest, log=log)
            return {**meta, "private_memory_mib": memory.report()}

        entry, here = ensure_entry(cache, key, build, log=log, rebuild=rebuild,
                                   timeout_s=timeout_s if timeout_s is not None else cfg.data_timeout_s)
        meta = read_meta(entry)
        if here:
            mem = meta["private_memory_mib"]
            workers = (f", {mem['workers']} child process(es) up to {mem['largest_worker']:,} MiB each"
                       if "largest_worker" in mem else "")
            log(f"hpcft.prepare: tokenized {meta['source']} in {meta['seconds']:.1f} s -> {entry} ("
                + ", ".join(f"{s}: {v['examples']:,} examples, {v['tokens']:,} tokens" for s, v in meta["splits"].items())
                + f"; peak private memory {mem['process']:,} MiB{workers})")
        else:
            log(f"hpcft.prepare: cache hit for {meta['source']}: {entry}")
        entries.append((field, entry))
        built = built or here
    return _assemble(cfg, entries, built)


def main(argv: list[str] | None = None) -> int:
    """python -m hpcft.prepare [--cache-dir=DIR] [--num-proc=N] [--rebuild] <training flags>"""
    from hpcft.train.config import parse_args
    from hpcft.transformers_index import install

    install()  # the tokenizer imports transformers: its models index from the user's cache

    argv = list(sys.argv[1:] if argv is None else argv)
    own: dict[str, str] = {}
    rest = []
    for arg in argv:
        name, _, value = arg.partition("=")
        if name in ("--cache-dir", "--num-proc", "--rebuild"):
            own[name] = value
        else:
            rest.append(arg)
    try:
        cfg = parse_args(rest)
        cfg.validate()
        root = Path(own.get("--cache-dir") or cfg.data_cache_dir or "runs/data-cache")
        prepared = prepare(cfg, root, num_proc=int(own.get("--num-proc") or 0), rebuild="--rebuild" in own)
    except SpecError as exc:
        print(f"hpcft.prepare: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"hpcft.prepare: ready {json.dumps({'train': str(prepared.train.path), 'eval': str(prepared.eval.path) if prepared.eval else None, 'built': prepared.built})}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
