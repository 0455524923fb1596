"""The one ``key=value`` syntax, parsed here for the CLI, lm-eval ``model_args`` and recipes.

``parse_options("alpha=0.5,fit=true", {"alpha": 0.5, "fit": False}, "smoothquant")``
types each value after its default and names the accepted keys when one is
unknown. ``from_mapping`` does the same for a YAML mapping onto a dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing

from massquant.errors import UserError

_TRUE = ("1", "true", "yes", "on")
# Upper bounds of user-typed numbers: beyond them torch overflows (seeds) or allocates without end (counts).
MAX_SIZE = 2**31 - 1  # tokens, windows, batch sizes
MAX_SEQUENCES = 1_000_000  # calibration / sampled sequences: more is a typo, and would not fit in memory
MAX_SEED = 2**32 - 1


def check_int(value, name: str, low: int = 1, high: int = MAX_SIZE) -> int:
    """``value`` as an integer in [low, high], or a UserError naming ``name`` and the accepted range."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{name} must be an integer from {low} to {high}; got {value!r}")
    return value


def read_yaml(path, where: str):
    """A YAML file's content; unreadable, not UTF-8 or not YAML is one line naming the file."""
    import yaml
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8"
        raise UserError(f"cannot read {where}: {reason}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{where} is not valid YAML{line}: {problem}") from None
    except RecursionError:  # deeply nested flow collections
        raise UserError(f"{where} is nested too deeply to read") from None
_FALSE = ("0", "false", "no", "off")


def _suggestion(key: str, accepted) -> str:
    close = difflib.get_close_matches(key, list(accepted), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_key_error(key: str, accepted, where: str) -> UserError:
    return UserError(f"{where}: unknown key '{key}'{_suggestion(key, accepted)}; accepted: {', '.join(accepted)}")


def coerce(value, default, key: str, where: str):
    """``value`` (text, or a YAML scalar/list) as the type of ``default``: bool, int, float, str or tuple of str."""
    kind = type(default)
    if kind is tuple:
        items = value.split(":") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        return tuple(str(item) for item in items if str(item))
    if default is None or kind is str:
        return value
    if not isinstance(value, str):
        if kind is bool and isinstance(value, bool):
            return value
        if kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if kind is float or float(value).is_integer():
                return kind(value)
        value = str(value)
    try:
        if kind is bool:
            lowered = value.strip().lower()
            if lowered not in _TRUE + _FALSE:
                raise ValueError
            return lowered in _TRUE
        return kind(value)
    except ValueError:
        expected = {bool: "true/false", int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise UserError(f"{where}: '{key}' expects {expected}; got {value!r}") from None


def parse_options(text: str, defaults: dict, where: str) -> dict:
    """``"k=v,k=v"`` -> ``{**defaults, k: typed v}``; unknown keys and untyped values are UserErrors."""
    values = dict(defaults)
    for item in filter(None, (piece.strip() for piece in text.split(","))):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals:
            raise UserError(f"{where}: expected key=value, got '{item}'; accepted keys: {', '.join(defaults) or 'none'}")
        if key not in defaults:
            raise unknown_key_error(key, defaults, where)
        values[key] = coerce(value.strip(), defaults[key], key, where)
    return values


def _field_default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def from_mapping(cls, mapping, where: str):
    """A dataclass from a YAML mapping: unknown keys are named with the accepted ones."""
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}; got {type(mapping).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in mapping:
        if key not in fields:
            raise unknown_key_error(str(key), fields, where)
    missing = [name for name, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in mapping]
    if missing:
        raise UserError(f"{where}: missing required key(s): {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in mapping.items():
        values[key] = _check_type(value, hints.get(key), key, where)
    return cls(**values)


def _check_type(value, hint, key: str, where: str):
    """Light structural checks (list vs scalar, numbers, strings); deep shapes are the dataclass's to check."""
    if hint is None or value is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        arguments = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(arguments) == 1:
            return _check_type(value, arguments[0], key, where)
        return value
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        return list(items) if origin is list else tuple(items)
    if hint is bool and not isinstance(value, bool):
        raise UserError(f"{where}: '{key}' expects true/false; got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{where}: '{key}' expects an integer; got {value!r}")
    if hint is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UserError(f"{where}: '{key}' expects a number; got {value!r}")
    if hint is str and not isinstance(value, str):
        raise UserError(f"{where}: '{key}' expects a string; got {value!r}")
    return float(value) if hint is float else value
