"""This rank's data: the job's tokenized cache (hpcft.prepare: one process per job tokenizes, every
rank memory-maps the result), split into train/eval, made into rows (padding or packing,
hpcft.train.packing) and laid out in global samples (GlobalBatchSampler)."""
from __future__ import annotations

import datetime
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from hpcft.datasource import describe
from hpcft.errors import SpecError
from hpcft.prepare import Prepared, lookup, prepare
from hpcft.train.packing import ConcatRows, Examples, MaskedFiller, PackedRows, TokenStore


# ---------------------------------------------------------------------------------------------
# Tokenized once per job.


# Data up to this size is tokenized by rank 0 itself in one process (unless dataset_num_proc asks for
# workers); larger data by a child process with its own workers. Forking workers out of a rank that
# holds CUDA and the process group's threads is unsafe; a clean child costs ~5 s of imports, which
# only small data would notice.
IN_PROCESS_BYTES = 64 << 20


def prepare_once(cfg, rt, cache_root: Path) -> Prepared:
    """The job's tokenized data, tokenized by one process for the whole job: rank 0 looks it up in the
    cache and on a miss tokenizes small data itself (no workers) or runs `python -m hpcft.prepare` (a
    clean child process, which forks its own tokenizing workers); the other ranks wait for rank 0's
    answer in a gloo group of their own whose timeout is data_timeout_s, so a long tokenization never
    trips the collective timeout."""
    answer: list = [None]
    if rt.is_main:
        try:
            answer[0] = lookup(cfg, cache_root)
            if answer[0] is None and cfg.dataset_num_proc <= 1 and _data_bytes(cfg) <= IN_PROCESS_BYTES:
                answer[0] = prepare(cfg, cache_root, num_proc=1, log=lambda line: print(line, flush=True))
            elif answer[0] is None:
                answer[0] = _prepare_in_child(cfg, cache_root)
        except SpecError as exc:
            answer[0] = exc
    if dist.is_initialized():
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.data_timeout_s))
        dist.broadcast_object_list(answer, src=0, group=group)
        dist.destroy_process_group(group)
    if isinstance(answer[0], SpecError):
        raise answer[0]
    prepared: Prepared = answer[0]
    if rt.is_main and not prepared.built:
        print(f"hpcft.train: tokenized data from the cache: {prepared.train.path.parent}", flush=True)
    return prepared


def _data_bytes(cfg) -> float:
    """Size of the data files (a custom loader reads what it likes: counted as large, so its code runs
    in the child process rather than in the rank)."""
    if cfg.dataset == "custom":
        return float("inf")
    paths = [("train.data_path", cfg.data_path)] + ([("train.eval_data_path", cfg.eval_data_path)]
                                                    if cfg.eval_data_path else [])
    return sum(f.stat().st_size for field, path in paths for f in describe(path, field).files)


def _prepare_in_child(cfg, cache_root: Path) -> Prepared:
    argv = [sys.executable, "-m", "hpcft.prepare", f"--cache-dir={cache_root}", *cfg.to_args()]
    proc = subprocess.run(argv, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        if proc.returncode == 2 and last.startswith("hpcft.prepare: error: "):
            field, _, message = last.removeprefix("hpcft.prepare: error: ").partition(": ")
            raise SpecError(field, message)
        raise RuntimeError(f"tokenizing the data failed (python -m hpcft.prepare exited {proc.returncode}): {last}")
    prepared = lookup(cfg, cache_root)
    if prepared is None:
        raise RuntimeError(f"python -m hpcft.prepare finished but left no complete cache entry in {cache_root}")
    return Prepared(prepared.train, prepared.eval, prepared.form, built=True)


# ---------------------------------------------------------------------------------------------
# Splits and rows.


@dataclass(frozen=True)
class Splits:
    train: torch.utils.data.Dataset  # rows: Examples, PackedRows or ConcatRows
    eval: torch.utils.data.Dataset | None
    form: str


def make_rows(cfg, store: TokenStore, index: np.ndarray, *, for_eval: bool = False):
    if cfg.batching_strategy == "padding" or (for_eval and cfg.packing_mode == "concat"):
        return Examples(store, index)
    if cfg.packing_mode == "isolated":
        return PackedRows(store, index, cfg.context_length)
    return ConcatRows(store, index, cfg.context_length)


def load_splits(cfg, prepared: Prepared, *, seq2seq: bool = False) -> Splits:
    """Train and eval rows over the memory-mapped cache. Eval is eval_data_path, else data_path's own
    validation split, else val_fraction of data_path held out (a fixed draw from seed)."""
    if seq2seq and cfg.batching_strategy == "packing":
        raise SpecError("train.batching_strategy", "packing is for decoder-only models; use padding with seq2seq")
    store = TokenStore(prepared.train.path)
    train_index = np.arange(len(store), dtype=np.int64)
    eval_rows = None
    if prepared.eval is not None:
        ev = TokenStore(prepared.eval.path)
        eval_rows = make_rows(cfg, ev, np.arange(len(ev), dtype=np.int64), for_eval=True)
    elif cfg.run_validation and cfg.val_fraction > 0:
        order = torch.randperm(len(store), generator=torch.Generator().manual_seed(cfg.seed)).numpy()
        n_eval = max(1, int(len(store) * cfg.val_fraction))
        if n_eval >= len(store):
            raise SpecError("train.val_fraction", f"holds out all {len(store)} example(s); lower it or set "
                                                  "eval_data_path")
        eval_rows = make_rows(cfg, store, np.sort(order[:n_eval]), for_eval=True)
        train_index = np.sort(order[n_eval:])
    train = make_rows(cfg, store, train_index)
    if len(train) == 0:
        raise SpecError("train.context_length", f"the data holds fewer than {cfg.context_length} tokens; "
                                                "lower context_length or use batching_strategy: padding")
    return Splits(train=train, eval=eval_rows, form=prepared.form)


# ---------------------------------------------------------------------------------------------
# The layout in global samples.


class _Steps:
    """One rank's micro-batches of an epoch, step by step, computed when asked (nothing per example
    is materialised beyond the epoch's permutation)."""

    def __init__(self, sampler: "GlobalBatchSampler", order: np.ndarray, start: int):
        self.s, self.order, self.start = sampler, order, start

    def __len__(self) -> int:
        return -(-(self.s.n - self.start) // self.s.global_batch) if self.s.n > self.start else 0

    def _shape(self, k: int) -> tuple[int, int, int, int]:
        """Step k's first global sample, its size, its micro-batch chunks, and micro-steps per rank."""
        s = self.s
        base = self.start + k * s.global_batch
        size = min(s.global_batch, s.n - base)
        chunks = -(-size // s.micro)
        return base, size, chunks, -(-chunks // s.world)

    def micro_count(self, k: int) -> int:
        """Micro-steps every rank makes in step k (the accumulation, fewer in a short last step)."""
        return self._shape(k)[3]

    def __getitem__(self, k: int) -> list[list[int]]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        s = self.s
        base, size, chunks, per_rank = self._shape(k)
        mine = [self.order[base + j * s.micro: base + min((j + 1) * s.micro, size)].tolist()
                for j in range(s.rank, chunks, s.world)]
        filler = [-1 - int(self.order[base])]  # masked copy of a real example: same shapes, no gradient
        return mine + [filler] * (per_rank - len(mine))

    def __iter__(self):
        return (self[k] for k in range(len(self)))


class GlobalBatchSampler:
    """Micro-batches for one rank, laid out in global samples so that the world size does not change
    what is learned. Epoch e's order is one permutation of all examples (seed + e) whatever the world
    size; optimizer step s of the epoch takes the global samples [s*G, (s+1)*G) of it (G = micro x
    accum x world), cut into micro-batch chunks, chunk j going to rank j % world as its micro-step
    j // world. Every rank makes the same number of micro-steps per step: where the epoch's last
    global batch runs short, a rank without a chunk gets a filler (an example with every label
    masked, index -1-i) that adds nothing to the gradient. No example is repeated or skipped within
    an epoch, and a resume at global sample k on any world size continues exactly there. The epoch
    is held as one int64 permutation; steps are computed from it when the loop asks."""

    def __init__(self, n: int, *, micro: int, accum: int, world: int, rank: int, seed: int, shuffle: bool = True):
        self.n, self.micro, self.accum, self.world, self.rank = n, micro, accum, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = micro * accum * world
        self.set_epoch(0)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.global_batch)

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Lay out epoch `epoch` from global sample `start_sample` (a multiple of the global batch)."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).numpy()
        else:
            order = np.arange(self.n, dtype=np.int64)
        self.epoch = epoch
        self.steps = _Steps(self, order, start_sample)  # this rank's micro-batches, step by step

    def __iter__(self):
        return (mb for step in self.steps for mb in step)

    def __len__(self) -> int:
        return sum(self.steps.micro_count(k) for k in range(len(self.steps)))


def make_loader(rows, *, batch_size: int, accum: int, rank: int, world_size: int, shuffle: bool, seed: int,
                pad_id: int, num_workers: int, attn_implementation: str = "sdpa") -> DataLoader:
    """This rank's micro-batches (GlobalBatchSampler); loader.batch_sampler positions the epoch."""
    sampler = GlobalBatchSampler(len(rows), micro=batch_size, accum=accum, world=world_size, rank=rank, seed=seed,
                                 shuffle=shuffle)
    return DataLoader(MaskedFiller(rows), batch_sampler=sampler, collate_fn=rows.collate(pad_id, attn_implementation),
                      num_workers=num_workers)


def make_eval_loader(rows, *, batch_size: int, rank: int, world_size: int, pad_id: int,
                     attn_implementation: str = "sdpa") -> DataLoader:
    """Every eval row exactly once over all ranks (no padding duplicates, unlike DistributedSampler),
    so the eval loss does not depend on the number of ranks."""
    return DataLoader(rows, batch_size=batch_size, sampler=range(rank, len(rows), world_size),
                      collate_fn=rows.collate(pad_id, attn_implementation))
