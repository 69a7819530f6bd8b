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
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit and len(rows) >= limit:
                break
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
