"""The data forms hpcft trains on, without torch or datasets: which columns make which form, the
prompt templates, chat messages, and the submit-time check of a data source against the model's
tokenizer (the `tokenizers` library alone when the model ships a tokenizer.json, so `hpcft submit`
stays fast).

    samsum      {"dialogue", "summary"}                        llama-recipes' samsum prompt, loss on the summary
    alpaca      {"instruction", "input", "output"}             the Alpaca prompt, loss on the output
    grammar     {"input", "target"}                            llama-recipes' grammar prompt, loss on the target
    completion  {"prompt", "completion"} (or "target")         TRL's prompt-completion: loss on the completion
    chat        {"messages": [{"role", "content"}, ...]}       the tokenizer's chat template, loss on assistant turns
                (ShareGPT's {"conversations": [{"from", "value"}, ...]} too)
    text        {"text"} (train.dataset_text_field)            continued pre-training, loss on every token
    tokens      {"input_ids"[, "labels"]}                      already tokenized
    custom      train.custom_dataset: file.py:function, returning rows in any form above
"""
from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Iterable

from hpcft.errors import SpecError

IGNORE_INDEX = -100

# form -> column alternatives it needs (each inner tuple: one of these names). `auto` tries them in
# this order, so a chat file with a stray "text" column is still chat.
FORMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "chat": (("messages", "conversations"),),
    "tokens": (("input_ids",),),
    "samsum": (("dialogue",), ("summary",)),
    "alpaca": (("instruction",), ("output",)),
    "grammar": (("input",), ("target",)),
    "completion": (("prompt",), ("completion", "target")),
    "text": (("text",),),
}
PROMPT_FORMS = ("samsum", "alpaca", "grammar", "completion")  # a prompt (masked) and a target
DATASETS = ("auto", *FORMS, "custom")

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
GRAMMAR_PROMPT = "Correct this to standard English: {input}\n---\nCorrected: "
TEMPLATES = (SAMSUM_PROMPT, ALPACA_PROMPT, ALPACA_PROMPT_INPUT, GRAMMAR_PROMPT)  # part of the cache key

# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool", "function_call": "assistant", "observation": "tool"}


def _columns_for(form: str, text_field: str) -> tuple[tuple[str, ...], ...]:
    return ((text_field,),) if form == "text" else FORMS[form]


def detect_form(columns: Iterable[str], wanted: str, field: str, text_field: str = "text") -> str:
    """The form of data with these columns: `wanted` checked, or found (`auto`) by FORMS' order."""
    cols = set(columns)
    if wanted not in ("auto", "custom"):
        missing = [" or ".join(alt) for alt in _columns_for(wanted, text_field) if not cols & set(alt)]
        if missing:
            raise SpecError(field, f"dataset={wanted} needs column(s) {', '.join(missing)}; the data has "
                                   f"{', '.join(sorted(cols)) or 'no columns'} (set train.dataset to auto or to its form)")
        return wanted
    for form in FORMS:
        if all(cols & set(alt) for alt in _columns_for(form, text_field)):
            return form
    known = "; ".join(f"{f}: {' + '.join('/'.join(a) for a in _columns_for(f, text_field))}" for f in FORMS)
    raise SpecError(field, f"cannot tell the data form from columns {sorted(cols)}; rename them to one of ({known}), "
                           "or load the data with train.dataset: custom")


def _text(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if value is None:
        raise SpecError(where, f"lacks the text column {name}")
    if not isinstance(value, str):
        raise SpecError(where, f"column {name!r} must be text (got {type(value).__name__})")
    return value


def prompt_and_target(row: dict, form: str, where: str = "data") -> tuple[str, str]:
    """The prompt (masked from the loss) and the target of one example of a PROMPT_FORMS form."""
    if form == "samsum":
        return SAMSUM_PROMPT.format(dialogue=_text(row, "dialogue", where)), _text(row, "summary", where)
    if form == "alpaca":
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise SpecError(where, f"column 'input' must be text or empty (got {type(extra).__name__})")
        template = ALPACA_PROMPT_INPUT if extra else ALPACA_PROMPT
        return template.format(instruction=_text(row, "instruction", where), input=extra or ""), _text(row, "output", where)
    if form == "grammar":
        return GRAMMAR_PROMPT.format(input=_text(row, "input", where)), _text(row, "target", where)
    if form == "completion":
        return _text(row, "prompt", where), _text(row, "completion" if "completion" in row else "target", where)
    raise ValueError(f"{form} has no prompt and target")


def chat_messages(row: dict, where: str = "data") -> list[dict[str, str]]:
    """[{"role", "content"}, ...] from `messages`, or from ShareGPT's `conversations` ({"from", "value"});
    at least one assistant turn, every content text."""
    turns = row.get("messages") if row.get("messages") is not None else row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SpecError(where, "messages must be a non-empty list of {role, content} turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SpecError(where, f"turn {i + 1} must be an object with role and content")
        if "role" in turn:
            role, content = turn.get("role"), turn.get("content")
        else:
            role, content = SHAREGPT_ROLES.get(str(turn.get("from")), turn.get("from")), turn.get("value")
        if not isinstance(role, str) or not isinstance(content, str):
            raise SpecError(where, f"turn {i + 1} needs a text role and text content (got {sorted(turn)})")
        out.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise SpecError(where, "has no assistant turn, so nothing to learn; chat loss is taken on assistant turns")
    return out


def check_example(row: dict, form: str, where: str, text_field: str = "text") -> None:
    """The example has what its form needs, of the right types (SpecError naming `where` if not)."""
    if form in PROMPT_FORMS:
        prompt_and_target(row, form, where)
    elif form == "chat":
        chat_messages(row, where)
    elif form == "text":
        _text(row, text_field, where)
    elif form == "tokens":
        ids = row.get("input_ids")
        if not isinstance(ids, list) or not all(isinstance(x, int) for x in ids):
            raise SpecError(where, "input_ids must be a list of token ids")


# ---------------------------------------------------------------------------------------------
# Reading JSONL with line numbers (the login-node preview of .jsonl files) and UTF-8 checks.


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


# ---------------------------------------------------------------------------------------------
# Chat templates and custom loaders, found without importing transformers or the user's code.


def find_chat_template(tokenizer_dir: str | Path) -> str | None:
    """The tokenizer's own chat template: chat_template.jinja, chat_template.json or the chat_template
    key of tokenizer_config.json (a string, or a list of named templates: "default" or the first)."""
    d = Path(tokenizer_dir)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            template = json.loads((d / name).read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str) and template:
            return template
    return None


def chat_template_text(value: str | None) -> str | None:
    """train.chat_template as a template: the text of the file it names, or the template written inline."""
    if value is None:
        return None
    if "{" in value:
        return value
    p = Path(value)
    if not p.is_file():
        raise SpecError("train.chat_template", f"no such file {value}; give a Jinja template inline or a file holding one")
    return p.read_text(encoding="utf-8")


def check_chat_template(cfg) -> None:
    """Chat data needs a chat template: the spec's, or the tokenizer's own."""
    if chat_template_text(cfg.chat_template) is None and find_chat_template(cfg.tokenizer_name or cfg.model_name) is None:
        raise SpecError("train.chat_template", f"the tokenizer in {cfg.tokenizer_name or cfg.model_name} has no chat "
                                               "template; set train.chat_template to a Jinja template (or a .jinja "
                                               "file) that renders messages")


def split_custom(value: str) -> tuple[Path, str]:
    """train.custom_dataset 'path/file.py[:function]' -> (file, function); llama-recipes' default name."""
    path, sep, func = value.rpartition(":")
    if not sep or "/" in func or func.endswith(".py"):
        path, func = value, "get_custom_dataset"
    return Path(path), func


def check_custom_dataset(value: str | None) -> None:
    """The loader file exists, parses, and defines the function (read, not run, on the login node)."""
    if not value:
        raise SpecError("train.custom_dataset", "dataset: custom needs custom_dataset: path/to/file.py[:function]")
    path, func = split_custom(value)
    if path.suffix != ".py" or not path.is_file():
        raise SpecError("train.custom_dataset", f"no Python file {path}; write it as path/to/file.py[:function]")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (SyntaxError, UnicodeDecodeError) as exc:
        raise SpecError("train.custom_dataset", f"{path} does not parse ({exc}); fix it") from None
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if func not in defined:
        raise SpecError("train.custom_dataset", f"{path} defines no function {func}(dataset_config, tokenizer, "
                                                f"split); it has {', '.join(sorted(defined)) or 'no functions'}")


# ---------------------------------------------------------------------------------------------
# The submit-time check of the data against the tokenizer.


def check_data_rows(rows: list[dict], columns: Iterable[str], cfg, tokenizer, *, field: str, source: str) -> str:
    """Submit-time check of a source's first examples: columns, types, and prompts that fit
    context_length. Returns the data form."""
    form = detect_form(columns, cfg.dataset, field, cfg.dataset_text_field)
    if form == "chat":
        check_chat_template(cfg)
    for i, row in enumerate(rows, 1):
        try:
            check_example(row, form, f"example {i} of {source}", cfg.dataset_text_field)
        except SpecError as exc:
            raise SpecError(field, str(exc)) from None
        if form not in PROMPT_FORMS:
            continue
        prompt, _ = prompt_and_target(row, form)
        n = len(tokenizer.encode(prompt, add_special_tokens=False)) + 1
        if n >= cfg.context_length:
            raise SpecError("train.context_length", f"example {i} of {source} has a {n}-token prompt, no room "
                                                    f"for its answer in context_length {cfg.context_length}; "
                                                    "raise context_length or shorten that example")
    return form


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
    """What the submit-time check counts prompts with: tokenizer.json through `tokenizers` when there
    is one, else the transformers tokenizer (sentencepiece-only models)."""
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
