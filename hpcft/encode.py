"""Rows of each data form -> token ids and labels (IGNORE_INDEX where nothing is learned), one batch at a
time: the function hpcft.prepare hands to datasets.map(batched=True) in its worker processes.

    out = encode_batch(batch, indices, form="chat", tok=tokenizer, ctx=512, seq2seq=False,
                       text_field="text", source="data/chat.jsonl [train]", field="train.data_path")
"""
from __future__ import annotations

import numpy as np

from hpcft.dataformat import IGNORE_INDEX, PROMPT_FORMS, chat_messages, check_example, prompt_and_target
from hpcft.errors import SpecError


def _specials(tok) -> tuple[list[int], list[int]]:
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return bos, eos


def _rows(batch: dict) -> list[dict]:
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def encode_prompts(rows: list[dict], where: list[str], form: str, tok, ctx: int, seq2seq: bool):
    """Prompt masked from the loss, target (+ eos) learned; seq2seq: encoder reads the prompt."""
    pairs = [prompt_and_target(r, form, w) for r, w in zip(rows, where)]
    prompts = tok([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    targets = tok([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    bos, eos = _specials(tok)
    for p, t in zip(prompts, targets):
        if seq2seq:
            yield (bos + p + eos)[:ctx], (t + eos)[:ctx]
        else:
            p, t = bos + p, t + eos
            yield (p + t)[:ctx], ([IGNORE_INDEX] * len(p) + t)[:ctx]


def _render(tok, messages: list[dict], where: str = "", **kw) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, **kw)
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError, or a template's raise_exception(...)
        raise SpecError("train.chat_template", f"{where}: the chat template refused this conversation "
                                               f"({type(exc).__name__}: {exc}); fix the data or set a template "
                                               "that renders it") from None


def assistant_spans(tok, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (each from where the
    generation prompt ends to the end of the turn, end-of-turn tokens included), found by rendering
    each prefix of the conversation: a template must render earlier turns the same once later ones follow."""
    full = _render(tok, messages, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = _render(tok, messages[:i + 1], where)
        try:
            before = _render(tok, messages[:i], add_generation_prompt=True) if i else ""
            start, ok = len(before), full.startswith(upto) and upto.startswith(before)
        except SpecError:  # a template may refuse a prefix (say, one ending in a system turn):
            start = upto.rfind(m["content"])  # the turn then starts where its content does
            ok = full.startswith(upto) and start >= 0
        if not ok:
            raise SpecError("train.chat_template", f"{where}: the chat template renders earlier turns differently "
                                                   "once later turns follow, so assistant turns cannot be found for "
                                                   "the loss; use a template that renders each turn the same way")
        spans.append((start, len(upto)))
    return full, spans


def encode_chat(rows: list[dict], where: list[str], tok, ctx: int):
    texts, all_spans = [], []
    for r, w in zip(rows, where):
        text, spans = assistant_spans(tok, chat_messages(r, w), w)
        texts.append(text)
        all_spans.append(spans)
    # The template writes the special tokens itself (bos, turn markers): none are added again.
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    for ids, offsets, spans in zip(enc["input_ids"], enc["offset_mapping"], all_spans):
        ids = np.asarray(ids[:ctx], dtype=np.int64)
        starts = np.asarray([o[0] for o in offsets[:ctx]], dtype=np.int64)
        learned = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            learned |= (starts >= a) & (starts < b)
        yield ids.tolist(), np.where(learned, ids, IGNORE_INDEX).tolist()


def encode_text(rows: list[dict], where: list[str], tok, ctx: int, field: str):
    """Continued pre-training: bos + text + eos, every token learned; a text longer than the context is
    cut into context-length pieces (none of it is dropped)."""
    for r, w in zip(rows, where):
        check_example(r, "text", w, field)
    bos, eos = _specials(tok)
    for ids in tok([r[field] for r in rows], add_special_tokens=False)["input_ids"]:
        ids = bos + ids + eos
        for i in range(0, len(ids), ctx):
            piece = ids[i:i + ctx]
            if len(piece) > 1:
                yield piece, piece


def encode_tokens(rows: list[dict], where: list[str], ctx: int, vocab: int, field: str):
    """Already tokenized rows: input_ids and optional labels (default: every token learned)."""
    for r, w in zip(rows, where):
        check_example(r, "tokens", w)
        ids = list(r["input_ids"])
        labels = r.get("labels")
        labels = list(ids) if labels is None else [int(x) for x in labels]
        if len(labels) != len(ids):
            raise SpecError(field, f"{w}: labels has {len(labels)} entries for {len(ids)} input_ids")
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            raise SpecError(field, f"{w}: token id {max(ids) if max(ids) >= vocab else min(ids)} is "
                                               f"outside the tokenizer's vocabulary (0..{vocab - 1})")
        yield ids[:ctx], labels[:ctx]


def encode_batch(batch: dict, indices: list[int], *, form: str, tok, ctx: int, seq2seq: bool, text_field: str,
                 source: str, field: str) -> dict:
    """datasets.map(batched=True) function: rows -> input_ids/labels, dropping examples with nothing
    to learn (a target cut off entirely by context_length)."""
    rows = _rows(batch)
    where = [f"example {i + 1} of {source}" for i in indices]
    try:
        if form in PROMPT_FORMS:
            pairs = encode_prompts(rows, where, form, tok, ctx, seq2seq)
        elif form == "chat":
            pairs = encode_chat(rows, where, tok, ctx)
        elif form == "text":
            pairs = encode_text(rows, where, tok, ctx, text_field)
        else:
            pairs = encode_tokens(rows, where, ctx, len(tok), field)
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for ids, labels in pairs:
            if any(x != IGNORE_INDEX for x in labels):
                out["input_ids"].append(ids)
                out["labels"].append(labels)
    except SpecError as exc:
        if exc.field.startswith("train."):
            raise
        raise SpecError(field, str(exc)) from None  # "example N of SOURCE: what is wrong"
    return out


