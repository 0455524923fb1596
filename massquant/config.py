"""The one ``key=value,key=value`` syntax, turned into dataclasses.

Used for lm-eval ``model_args``, ``--mitigation NAME:k=v`` parameters and recipe
mappings, so every entry point reports a typo the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from massquant.errors import UserError

T = TypeVar("T")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_key_values(text: str, context: str) -> dict[str, str]:
    """``"a=1,b=x"`` -> ``{"a": "1", "b": "x"}``; an empty string gives ``{}``."""
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{context}: '{item}' is not key=value")
        result[key.strip()] = value.strip()
    return result


def _convert(value: Any, annotation: Any, name: str, context: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        annotation = options[0]
        origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (str,)
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split("+") if v]
        return [_convert(item, item_type, name, context) for item in items]
    if not isinstance(value, str):
        if annotation is float and isinstance(value, int):
            return float(value)
        return value
    try:
        if annotation is bool:
            lowered = value.lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError
            return lowered in _TRUE
        if annotation in (int, float):
            return annotation(value)
    except ValueError:
        raise UserError(f"{context}: {name}={value!r} is not a valid {annotation.__name__}") from None
    return value


def build(cls: type[T], values: Mapping[str, Any], context: str) -> T:
    """Instantiate dataclass ``cls`` from ``values``; unknown keys name the valid ones."""
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{context}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{key: _convert(value, hints[key], key, context) for key, value in values.items()})
