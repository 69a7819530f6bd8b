"""Rows a model trains on, built from memory-mapped tokenized examples (TokenStore) without copying
the data set: one example per row (padding), several whole examples per row with positions restarting
and attention kept inside each example (packing, isolated), or llama-recipes' token stream cut into
rows (packing, concat). Packing plans work on the examples' lengths (numpy, one pass over examples,
none over tokens); rows are assembled when a batch asks for them.

    rows = PackedRows(store, np.arange(len(store)), context_length=512)
    loader = DataLoader(rows, batch_size=4, collate_fn=rows.collate(pad_id))
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from hpcft.dataformat import IGNORE_INDEX

# Attention implementations that read packed sequences from position_ids only in a single flattened
# row (varlen kernels): packed batches are sent to them as [1, total tokens].
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


def read_saved_arrow(path: Path) -> list:
    """The tables of a `Dataset.save_to_disk` directory, memory-mapped with pyarrow alone: state.json lists
    its Arrow stream files. A rank that only reads the cache then never imports datasets (and pandas),
    seconds of start-up per rank."""
    import pyarrow as pa

    state = json.loads((path / "state.json").read_text())
    if state.get("_indices_data_files"):  # save_to_disk writes flattened data; anything else is not ours
        raise ValueError(f"{path}: a dataset with an indices mapping; expected hpcft's own cache entry")
    return [pa.ipc.open_stream(pa.memory_map(str(path / f["filename"]))).read_all() for f in state["_data_files"]]


def zero_copy(arr) -> np.ndarray:
    """A numpy view of a primitive Arrow array without nulls (pyarrow's own to_numpy imports pandas)."""
    if arr.null_count:
        raise ValueError(f"tokenized column with {arr.null_count} nulls: the data cache entry is damaged")
    dtype = np.dtype(str(arr.type))  # int32 / int64
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


class TokenStore:
    """The input_ids/labels rows of one cache entry split (save_to_disk), memory-mapped: example i is a
    pair of numpy views into the Arrow buffers, nothing is read until a batch asks for it."""

    def __init__(self, path: str | Path):
        self._tables = read_saved_arrow(Path(path))  # keeps the memory maps alive
        self._ids: list[tuple[np.ndarray, np.ndarray]] = []  # per record batch: (values, offsets)
        self._labels: list[tuple[np.ndarray, np.ndarray]] = []
        starts, lengths = [0], []
        for batch in (b for table in self._tables for b in table.to_batches()):
            for name, out in (("input_ids", self._ids), ("labels", self._labels)):
                col = batch.column(name)
                out.append((zero_copy(col.values), zero_copy(col.offsets)))
            lengths.append(np.diff(self._ids[-1][1]))
            starts.append(starts[-1] + len(batch))
        self._starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.concatenate(lengths).astype(np.int32) if lengths else np.zeros(0, np.int32)

    def __len__(self) -> int:
        return len(self.lengths)

    def _get(self, parts: list[tuple[np.ndarray, np.ndarray]], i: int) -> np.ndarray:
        c = int(np.searchsorted(self._starts, i, side="right")) - 1
        values, offsets = parts[c]
        k = i - int(self._starts[c])
        return values[offsets[k]:offsets[k + 1]]

    def ids(self, i: int) -> np.ndarray:
        return self._get(self._ids, i)

    def labels(self, i: int) -> np.ndarray:
        return self._get(self._labels, i)


def fill_rows(lengths: np.ndarray, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole examples into rows of at most context_length tokens, rows nearly full: longest first, each
    row topped up with the shortest examples left while they fit. Returns (order, bounds): row r holds
    the examples order[bounds[r]:bounds[r+1]] (positions into `lengths`). One sort (numpy) and one pass
    over the examples, never over tokens; ~90% full rows on SAMSum-like lengths where packing in
    order fills ~82%. An example longer than a row gets a row of its own."""
    by_length = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    sizes = np.asarray(lengths, dtype=np.int64)[by_length].tolist()
    picked = np.empty(len(sizes), dtype=np.int64)
    bounds = [0]
    lo, hi, k = 0, len(sizes) - 1, 0
    while lo <= hi:
        room = context_length - sizes[lo]
        picked[k] = lo
        lo, k = lo + 1, k + 1
        while lo <= hi and sizes[hi] <= room:
            room -= sizes[hi]
            picked[k] = hi
            hi, k = hi - 1, k + 1
        bounds.append(k)
    return by_length[picked], np.asarray(bounds, dtype=np.int64)


class Examples(TorchDataset):
    """One example per row (batching_strategy: padding), examples `index` of the store."""

    def __init__(self, store: TokenStore, index: np.ndarray):
        self.store, self.index = store, np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, r: int) -> dict:
        i = int(self.index[r])
        return {"input_ids": self.store.ids(i), "labels": self.store.labels(i)}

    @property
    def examples(self) -> int:
        return len(self.index)

    def collate(self, pad_id: int, attn_implementation: str = "sdpa"):
        return pad_collate(pad_id)


class PackedRows(TorchDataset):
    """Whole examples packed into rows of at most context_length tokens (fill_rows; batching_strategy:
    packing, packing_mode: isolated). Each example keeps its own positions (position_ids restart at 0)
    and its first label is masked, so with the attention kept inside each example (the model builds a
    block-diagonal mask from the position_ids; varlen flash-attention reads them directly) a packed row
    computes exactly what its examples would one by one."""

    def __init__(self, store: TokenStore, index: np.ndarray, context_length: int):
        self.store = store
        order, self.bounds = fill_rows(store.lengths[np.asarray(index, dtype=np.int64)], context_length)
        self.index = np.asarray(index, dtype=np.int64)[order]  # examples in row order

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @property
    def examples(self) -> int:
        return len(self.index)

    def __getitem__(self, r: int) -> dict:
        members = self.index[self.bounds[r]:self.bounds[r + 1]]
        ids = [self.store.ids(int(i)) for i in members]
        labels = [self.store.labels(int(i)).astype(np.int64) for i in members]
        for lab in labels:
            lab[0] = IGNORE_INDEX  # predicted from the previous example's last token otherwise
        return {"input_ids": np.concatenate(ids), "labels": np.concatenate(labels),
                "position_ids": np.concatenate([np.arange(len(x)) for x in ids])}

    def collate(self, pad_id: int, attn_implementation: str = "sdpa"):
        return packed_collate(pad_id, flatten=attn_implementation in VARLEN_ATTENTION)


class ConcatRows(TorchDataset):
    """llama-recipes' packing (packing_mode: concat): the examples' tokens as one stream, cut into rows
    of exactly context_length (the tail that does not fill a row is dropped). Examples attend to their
    neighbours in a row and may be cut between rows."""

    def __init__(self, store: TokenStore, index: np.ndarray, context_length: int):
        self.store, self.index, self.ctx = store, np.asarray(index, dtype=np.int64), context_length
        self.cum = np.zeros(len(self.index) + 1, dtype=np.int64)
        np.cumsum(store.lengths[self.index], out=self.cum[1:])

    def __len__(self) -> int:
        return int(self.cum[-1] // self.ctx)

    @property
    def examples(self) -> int:
        return len(self.index)

    def __getitem__(self, r: int) -> dict:
        lo, hi = r * self.ctx, (r + 1) * self.ctx
        first = int(np.searchsorted(self.cum, lo, side="right")) - 1
        last = int(np.searchsorted(self.cum, hi, side="left"))
        ids, labels = [], []
        for k in range(first, last):
            i, start = int(self.index[k]), int(self.cum[k])
            a, b = max(lo - start, 0), min(hi - start, int(self.cum[k + 1]) - start)
            ids.append(self.store.ids(i)[a:b])
            labels.append(self.store.labels(i)[a:b])
        return {"input_ids": np.concatenate(ids), "labels": np.concatenate(labels)}

    def collate(self, pad_id: int, attn_implementation: str = "sdpa"):
        return pad_collate(pad_id)


class MaskedFiller(TorchDataset):
    """Rows where index -1-i is row i with every label masked (GlobalBatchSampler's filler)."""

    def __init__(self, rows: TorchDataset):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        if i >= 0:
            return self.rows[i]
        row = self.rows[-1 - i]
        return {**row, "labels": np.full(len(row["labels"]), IGNORE_INDEX, dtype=np.int64)}


def _padded(batch: list[dict], key: str, width: int, fill: int) -> np.ndarray:
    out = np.full((len(batch), width), fill, dtype=np.int64)
    for i, ex in enumerate(batch):
        out[i, :len(ex[key])] = ex[key]
    return out


def pad_collate(pad_id: int):
    """Pad input_ids (pad id) and labels (ignored) each to their longest in the batch; for decoder-only
    data both have the same length, for seq2seq the labels are the decoder side. num_tokens: the
    batch's real (non-pad) tokens, not a model input."""

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        lengths = np.array([len(ex["input_ids"]) for ex in batch])
        n, m = int(lengths.max()), max(len(ex["labels"]) for ex in batch)
        mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.int64)
        return {"input_ids": torch.from_numpy(_padded(batch, "input_ids", n, pad_id)),
                "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(_padded(batch, "labels", m, IGNORE_INDEX)),
                "num_tokens": torch.tensor(int(lengths.sum()))}

    return collate


def packed_collate(pad_id: int, *, flatten: bool):
    """Packed rows -> input_ids, labels, position_ids and no attention mask (the model derives the
    per-example causal mask from where position_ids restart). Rows shorter than the longest are padded
    as one more masked example of their own; flatten=True sends the whole batch as one row, the layout
    varlen flash-attention reads."""

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(ex["input_ids"]) for ex in batch]
        if flatten:
            ids, labels, pos = (np.concatenate([ex[k] for ex in batch])[None].astype(np.int64)
                                for k in ("input_ids", "labels", "position_ids"))
        else:
            n = max(lengths)
            ids, labels = _padded(batch, "input_ids", n, pad_id), _padded(batch, "labels", n, IGNORE_INDEX)
            pos = _padded(batch, "position_ids", n, 0)
            for i, k in enumerate(lengths):
                pos[i, k:] = np.arange(n - k)
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(pos), "num_tokens": torch.tensor(sum(lengths))}

    return collate
