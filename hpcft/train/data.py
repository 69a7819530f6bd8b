"""Local JSONL -> `datasets.Dataset` -> tokenized examples with the prompt masked from the loss.
The forms and prompt templates live in hpcft.dataformat (no torch there)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from hpcft.dataformat import IGNORE_INDEX, detect_format, prompt_and_target, read_jsonl
from hpcft.errors import SpecError


def tokenize_example(tokenizer, prompt: str, target: str, context_length: int) -> dict:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    p = bos + tokenizer.encode(prompt, add_special_tokens=False)
    t = tokenizer.encode(target, add_special_tokens=False) + eos
    ids = (p + t)[:context_length]
    labels = ([IGNORE_INDEX] * len(p) + t)[:context_length]
    return {"input_ids": ids, "labels": labels}


def tokenize_seq2seq(tokenizer, prompt: str, target: str, context_length: int) -> dict:
    """Encoder reads the prompt, decoder learns the target: nothing to mask."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = (bos + tokenizer.encode(prompt, add_special_tokens=False) + eos)[:context_length]
    labels = (tokenizer.encode(target, add_special_tokens=False) + eos)[:context_length]
    return {"input_ids": ids, "labels": labels}


def build_dataset(rows: list[dict], fmt: str, tokenizer, context_length: int, *, seq2seq: bool = False) -> Dataset:
    ds = Dataset.from_list([{"prompt": a, "target": b} for a, b in (prompt_and_target(r, fmt) for r in rows)])
    tok = tokenize_seq2seq if seq2seq else tokenize_example
    ds = ds.map(lambda ex: tok(tokenizer, ex["prompt"], ex["target"], context_length),
                remove_columns=["prompt", "target"], keep_in_memory=True)
    # An example whose summary was cut off entirely teaches nothing: drop it.
    return ds.filter(lambda ex: any(x != IGNORE_INDEX for x in ex["labels"]), keep_in_memory=True)


def pack(ds: Dataset, context_length: int) -> Dataset:
    """Concatenate examples (prompt masks kept) and cut into rows of exactly context_length tokens,
    as llama-recipes' packing does: no padding, so every token computed is a real one."""
    ids: list[int] = []
    labels: list[int] = []
    for ex in ds:
        ids.extend(ex["input_ids"])
        labels.extend(ex["labels"])
    n = len(ids) // context_length
    rows = [{"input_ids": ids[i * context_length:(i + 1) * context_length],
             "labels": labels[i * context_length:(i + 1) * context_length]} for i in range(n)]
    return Dataset.from_list(rows)


@dataclass(frozen=True)
class Splits:
    train: Dataset
    eval: Dataset | None
    form: str


def load_splits(cfg, tokenizer, *, seq2seq: bool = False) -> Splits:
    rows = read_jsonl(cfg.data_path)
    form = detect_format(rows, cfg.dataset, "train.data_path")
    eval_rows: list[dict] | None = None
    if cfg.eval_data_path:
        eval_rows = read_jsonl(cfg.eval_data_path, "train.eval_data_path")
        detect_format(eval_rows, form, "train.eval_data_path")
    elif cfg.run_validation and cfg.val_fraction > 0:
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(rows), generator=g).tolist()
        n_eval = max(1, int(len(rows) * cfg.val_fraction))
        eval_rows = [rows[i] for i in order[:n_eval]]
        rows = [rows[i] for i in order[n_eval:]]
    if seq2seq and cfg.batching_strategy == "packing":
        raise SpecError("train.batching_strategy", "packing is for decoder-only models; use padding with seq2seq")
    train = build_dataset(rows, form, tokenizer, cfg.context_length, seq2seq=seq2seq)
    if len(train) == 0:
        raise SpecError("train.context_length", f"every example is longer than {cfg.context_length} tokens "
                                                "before its answer starts; raise context_length")
    ev = build_dataset(eval_rows, form, tokenizer, cfg.context_length, seq2seq=seq2seq) if eval_rows else None
    if cfg.batching_strategy == "packing":
        train = pack(train, cfg.context_length)
        if len(train) == 0:
            raise SpecError("train.context_length", f"the data holds fewer than {cfg.context_length} tokens; "
                                                    "lower context_length or use batching_strategy: padding")
    return Splits(train=train, eval=ev, form=form)


def make_collate(pad_id: int):
    """Pad input_ids (pad id) and labels (ignored) each to their longest in the batch; for decoder-only
    data both have the same length, for seq2seq the labels are the decoder side."""

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(ex["input_ids"]) for ex in batch)
        m = max(len(ex["labels"]) for ex in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), m), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, ex in enumerate(batch):
            k = len(ex["input_ids"])
            ids[i, :k] = torch.tensor(ex["input_ids"])
            labels[i, :len(ex["labels"])] = torch.tensor(ex["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


class GlobalBatchSampler:
    """Micro-batches for one rank, laid out in global samples so that the world size does not change
    what is learned. Epoch e's order is one permutation of all examples (seed + e) whatever the world
    size; optimizer step s of the epoch takes the global samples [s*G, (s+1)*G) of it (G = micro x
    accum x world), cut into micro-batch chunks, chunk j going to rank j % world as its micro-step
    j // world. Every rank makes the same number of micro-steps per step: where the epoch's last
    global batch runs short, a rank without a chunk gets a filler (an example with every label
    masked, index -1-i) that adds nothing to the gradient. No example is repeated or skipped within
    an epoch, and a resume at global sample k on any world size continues exactly there."""

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
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.n))
        self.epoch = epoch
        self.steps: list[list[list[int]]] = []  # this rank's micro-batches, step by step
        for base in range(start_sample, self.n, self.global_batch):
            batch = order[base:base + self.global_batch]
            chunks = [batch[i:i + self.micro] for i in range(0, len(batch), self.micro)]
            per_rank = -(-len(chunks) // self.world)
            mine = [chunks[j] for j in range(self.rank, len(chunks), self.world)]
            filler = [-1 - chunks[0][0]]  # masked copy of a real example: same shapes, no gradient
            self.steps.append(mine + [filler] * (per_rank - len(mine)))

    def __iter__(self):
        return (mb for step in self.steps for mb in step)

    def __len__(self) -> int:
        return sum(len(step) for step in self.steps)


class MaskedFiller(TorchDataset):
    """The train split, where index -1-i is example i with every label masked (GlobalBatchSampler's filler)."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        if i >= 0:
            return self.ds[i]
        ex = self.ds[-1 - i]
        return {"input_ids": ex["input_ids"], "labels": [IGNORE_INDEX] * len(ex["labels"])}


def make_loader(ds: Dataset, *, batch_size: int, accum: int, rank: int, world_size: int, shuffle: bool, seed: int,
                pad_id: int, num_workers: int) -> DataLoader:
    """This rank's micro-batches (GlobalBatchSampler); loader.batch_sampler positions the epoch."""
    sampler = GlobalBatchSampler(len(ds), micro=batch_size, accum=accum, world=world_size, rank=rank, seed=seed,
                                 shuffle=shuffle)
    return DataLoader(MaskedFiller(ds), batch_sampler=sampler, collate_fn=make_collate(pad_id),
                      num_workers=num_workers)


def make_eval_loader(ds: Dataset, *, batch_size: int, rank: int, world_size: int, pad_id: int) -> DataLoader:
    """Every eval example exactly once over all ranks (no padding duplicates, unlike DistributedSampler),
    so the eval loss does not depend on the number of ranks."""
    return DataLoader(ds, batch_size=batch_size, sampler=list(range(rank, len(ds), world_size)),
                      collate_fn=make_collate(pad_id))
