"""Plain data (YAML mappings, command-line flags) -> frozen dataclasses, strictly: unknown keys and
wrong types are SpecErrors naming the dotted field. Used by the job spec (hpcft.spec) and by the
training entrypoint's flags (hpcft.train.config), so neither imports the other for it.

    build_dataclass(Resources, {"nodes": "2"}, "resources")  ->  Resources(nodes=2, ...)
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from hpcft.errors import SpecError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, non_none[0], where)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise SpecError(where, f"must be a mapping of {tp.__name__} fields (got {value!r})")
        return build_dataclass(tp, value, where)
    if origin is tuple:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise SpecError(where, f"must be a list (got {value!r})")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise SpecError(where, f"must be a mapping NAME: value (got {value!r})")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise SpecError(where, f"must be true or false (got {value!r})")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise SpecError(where, f"must be an integer (got {value!r})")
        try:
            return int(value)
        except ValueError:
            raise SpecError(where, f"must be an integer (got {value!r})") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise SpecError(where, f"must be a number (got {value!r})")
        try:
            return float(value)
        except ValueError:
            raise SpecError(where, f"must be a number (got {value!r})") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise SpecError(where, f"must be a string (got {value!r})")
        return str(value)
    raise SpecError(where, f"unsupported type {_type_name(tp)}")


def build_dataclass(cls: type, data: dict, where: str = "") -> Any:
    """Build `cls` from a plain dict, naming the first unknown key or bad value."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key).replace("-", "_"), sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
            raise SpecError(dotted, f"unknown key ({hint})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)
