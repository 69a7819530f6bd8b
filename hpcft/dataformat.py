"""The data forms hpcft reads, without torch or datasets: JSONL parsing, column detection, prompt
templates, and the submit-time check of a data file against the model's tokenizer (the `tokenizers`
library alone when the model ships a tokenizer.json, so `hpcft submit` stays fast).

Two forms, as the seed guides use them:
  samsum: {"dialogue": ..., "summary": ...}
  alpaca: {"instruction": ..., "input": ..., "output": ...}
"""
from __future__ import annotations

import json
from pathlib import Path

from hpcft.errors import SpecError

IGNORE_INDEX = -100
COLUMNS = {"samsum": ("dialogue", "summary"), "alpaca": ("instruction", "output")}

SAMSUM_PROMPT = "Summarize this dialog:\n{dialogue}\n---\nSummary:\n"
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def read_jsonl(path: str | Path, field: str = "train.data_path", limit: int = 0) -> list[dict]:
    """Parse a JSONL file (the first `limit` examples when limit > 0), naming the line of any error."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(field, f"no such file {str(p)!r}; point it at a local JSONL file")
    rows = []
    offset = 0
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit and len(rows) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise not_utf8(field, p, lineno, offset + exc.start, raw[exc.start]) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpecError(field, f"{p}:{lineno} is not valid JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise SpecError(field, f"{p}:{lineno} must be a JSON object with the example's fields")
            rows.append(row)
    if not rows:
        raise SpecError(field, f"{p} holds no examples; add JSONL lines")
    return rows


def not_utf8(field: str, path: Path, lineno: int, offset: int, byte: int) -> SpecError:
    return SpecError(field, f"{path}:{lineno} is not UTF-8 (byte 0x{byte:02x} at offset {offset}); convert the file, "
                            f"e.g. iconv -f latin1 -t utf-8 {path} > {path.with_name(path.stem + '.utf8' + path.suffix)}")


def check_utf8(path: str | Path, field: str, block: int = 1 << 20) -> None:
    """The whole file decodes as UTF-8, read in `block`-byte pieces (data files can be GBs); the first
    bad byte is named with its line and byte offset."""
    p = Path(path)
    done = 0  # bytes before `pending`, all valid
    lines = 1  # line number at `done`
    pending = b""  # a multi-byte character cut by the block boundary, carried into the next block
    with p.open("rb") as f:
        while True:
            chunk = f.read(block)
            data = pending + chunk
            try:
                data.decode("utf-8")
                good = len(data)
            except UnicodeDecodeError as exc:
                # A character cut at the end of a block is completed by the next one; anything else is bad.
                if not chunk or exc.reason != "unexpected end of data" or exc.end != len(data):
                    lines += data.count(b"\n", 0, exc.start)
                    raise not_utf8(field, p, lines, done + exc.start, data[exc.start]) from None
                good = exc.start
            lines += data.count(b"\n", 0, good)
            done += good
            pending = data[good:]
            if not chunk:
                return


def detect_format(rows: list[dict], wanted: str, field: str) -> str:
    if wanted != "auto":
        fmt = wanted
    else:
        keys = set(rows[0])
        fmt = next((f for f, cols in COLUMNS.items() if set(cols) <= keys), "")
        if not fmt:
            raise SpecError(field, f"cannot tell the data form from columns {sorted(keys)}; "
                                   "use dialogue/summary (samsum) or instruction/input/output (alpaca)")
    for lineno, row in enumerate(rows, 1):
        missing = [c for c in COLUMNS[fmt] if not isinstance(row.get(c), str)]
        if missing:
            raise SpecError(field, f"example {lineno} lacks text column(s) {', '.join(missing)} needed by dataset={fmt}")
    return fmt


def check_data_file(path: str, cfg, tokenizer, *, field: str, limit: int = 2000) -> str:
    """Submit-time check of a data file's first `limit` examples: JSON, columns, and prompts that fit
    context_length. Returns the data form."""
    rows = read_jsonl(path, field, limit=limit)
    form = detect_format(rows, cfg.dataset, field)
    for lineno, row in enumerate(rows, 1):
        prompt, _ = prompt_and_target(row, form)
        n = len(tokenizer.encode(prompt, add_special_tokens=False)) + 1
        if n >= cfg.context_length:
            raise SpecError("train.context_length", f"example {lineno} of {path} has a {n}-token prompt, no room "
                                                    f"for its answer in context_length {cfg.context_length}; "
                                                    "raise context_length or shorten that example")
    return form


def prompt_and_target(row: dict, fmt: str) -> tuple[str, str]:
    if fmt == "samsum":
        return SAMSUM_PROMPT.format(dialogue=row["dialogue"]), row["summary"]
    template = ALPACA_PROMPT_INPUT if row.get("input") else ALPACA_PROMPT
    return template.format(instruction=row["instruction"], input=row.get("input", "")), row["output"]


class TokenizerLoadError(ValueError):
    """No tokenizer loads from the given directory; the message is the library's first line."""


class FastCounter:
    """Token counts from a tokenizer.json through the `tokenizers` library: the same ids a transformers
    fast tokenizer gives, without importing transformers and torch (seconds on a login node)."""

    def __init__(self, tokenizer_json: Path):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:
            # The Rust binding raises the bare Exception class for unreadable or malformed files;
            # anything more specific (TypeError, AttributeError, ...) is a bug and propagates.
            if type(exc) is not Exception:
                raise
            raise TokenizerLoadError(_first_line(exc)) from None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids


def token_counter(directory: str):
    """What check_data_file counts prompts with: tokenizer.json through `tokenizers` when there is one,
    else the transformers tokenizer (sentencepiece-only models)."""
    tj = Path(directory) / "tokenizer.json"
    if tj.is_file():
        return FastCounter(tj)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:  # missing files, unknown tokenizer class, bad config
        raise TokenizerLoadError(_first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
