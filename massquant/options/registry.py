"""What an option is, and the three surfaces generated from it: argparse flags, recipe keys, lm-eval model_args.

An option is declared once (``declarations.py``): its key, type, default,
help and accepted values. The key is the recipe key and the lm-eval
``model_args`` key; the flag is the key with dashes (``calib_samples`` ->
``--calib-samples``). Every surface parses a value with the same
``Option.parse``, so a value accepted in one is accepted in all.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterable

from massquant.config import unknown_key_error
from massquant.errors import UserError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_EXPECTED = {bool: "true/false", int: "an integer", float: "a number", str: "text"}


@dataclass(frozen=True)
class Option:
    """One setting. ``many``: several values (repeat the flag or comma-separate; a list in recipes); ``axis``:
    a recipe may list several values, one grid cell each (the CLI takes one)."""

    key: str
    type: type  # bool, int, float or str
    default: object
    help: str
    choices: tuple[str, ...] | Callable[[], Iterable[str]] | None = None  # a callable for registries filled late
    low: float | None = None
    high: float | None = None
    many: bool = False
    axis: bool = False
    metavar: str | None = None
    split: bool = True  # many: comma-separated values; False where the value's own syntax uses commas

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def accepted(self) -> tuple[str, ...] | None:
        return tuple(self.choices()) if callable(self.choices) else self.choices

    def parse(self, value, where: str):
        """``value`` (command-line text, a YAML scalar or list, a model_args value) typed and checked.

        Raises UserError naming ``where`` and what is accepted. ``many`` options return a list, split on commas."""
        if self.many:
            items = value if isinstance(value, (list, tuple)) else [value]
            pieces = [piece for item in items for piece in (item.split(",") if self.split and isinstance(item, str) else [item])]
            return [self._one(piece.strip() if isinstance(piece, str) else piece, where)
                    for piece in pieces if not (isinstance(piece, str) and not piece.strip())]
        return self._one(value, where)

    def _one(self, value, where: str):
        if value is None:
            if self.default is None:
                return None
            raise UserError(f"{where}: expected {self.describe()}; got nothing")
        typed = self._typed(value, where)
        accepted = self.accepted()
        if accepted is not None and typed not in accepted:
            raise UserError(f"{where}: unknown value '{typed}'; accepted: {', '.join(accepted)}")
        if (self.low is not None and typed < self.low) or (self.high is not None and typed > self.high):
            raise UserError(f"{where}: expected {self.describe()}; got {typed}")
        return typed

    def _typed(self, value, where: str):
        kind = self.type
        if isinstance(value, str) and kind is not str:
            text = value.strip().lower()
            try:
                if kind is bool:
                    if text not in _TRUE + _FALSE:
                        raise ValueError
                    return text in _TRUE
                number = kind(text)
            except ValueError:
                raise UserError(f"{where}: expected {self.describe()}; got {value!r}") from None
            if kind is float and not math.isfinite(number):
                raise UserError(f"{where}: expected a finite number; got {value!r}")
            return number
        if kind is bool and isinstance(value, bool):
            return value
        if kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if kind is float and math.isfinite(value):
                return float(value)
            if kind is int and float(value).is_integer():
                return int(value)
        if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)  # lm-eval types model_args values loosely (spec=8 arrives as 8)
        raise UserError(f"{where}: expected {self.describe()}; got {value!r}")

    def describe(self) -> str:
        """What the option accepts, e.g. 'an integer from 1 to 1000000'."""
        accepted = self.accepted()
        if accepted is not None:
            return "one of " + ", ".join(accepted)
        text = _EXPECTED[self.type]
        if self.type is int and self.low == 1:
            return "a positive integer" + (f" (at most {_number(self.high)})" if self.high is not None else "")
        if self.low is not None and self.high is not None:
            return f"{text} from {_number(self.low)} to {_number(self.high)}"
        if self.low is not None:
            return f"{text} >= {_number(self.low)}"
        return text

    def help_text(self, default=None) -> str:
        shown = self.default if default is None else default
        text = self.help
        if self.many and not callable(self.choices) and self.choices:  # a list's metavar cannot show them
            text += f"; one or more of {', '.join(self.choices)}"
        if shown in (None, False, [], ()):
            return text
        if isinstance(shown, (list, tuple)):
            shown = ",".join(map(str, shown))
        return f"{text} (default: {shown})"


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


@dataclass(frozen=True)
class Group:
    name: str
    title: str
    options: tuple[Option, ...]
    description: str | None = None


GROUPS: dict[str, Group] = {}
OPTIONS: dict[str, Option] = {}


def declare(name: str, title: str, *options: Option, description: str | None = None) -> Group:
    """Register a group of options; a key may be declared only once across all groups."""
    for option in options:
        if option.key in OPTIONS:
            raise ValueError(f"option '{option.key}' is declared twice")
        OPTIONS[option.key] = option
    GROUPS[name] = Group(name, title, options, description)
    return GROUPS[name]


def extend(name: str, *options: Option) -> Group:
    """Add options to a declared group (a plugin's option, or a test's); every surface of the group takes them."""
    group = GROUPS[name]
    declare(name, group.title, *options, description=group.description)
    GROUPS[name] = Group(name, group.title, group.options + tuple(options), group.description)
    return GROUPS[name]


def keys(*groups: str) -> list[str]:
    return [option.key for name in groups for option in GROUPS[name].options]


class _Values(argparse.Action):
    """Parses with the option's own ``parse``; a list option's values replace its default, then accumulate."""

    def __init__(self, option_strings, dest, option: Option, several: bool, **kwargs):
        self.option, self.several = option, several
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            parsed = self.option.parse(values, f"argument {option_string}")
        except UserError as error:
            raise argparse.ArgumentError(None, str(error)) from None
        if self.several:
            current = getattr(namespace, self.dest, None)
            given = [] if current is self.default or current is None else current
            parsed = given + (parsed if self.option.many else [parsed])
        setattr(namespace, self.dest, parsed)


def add_arguments(parser: argparse.ArgumentParser, *groups: str, only: Iterable[str] | None = None,
                  defaults: dict | None = None, skip: Iterable[str] = (), axes: bool = False) -> None:
    """argparse flags for the options of ``groups`` (or just the keys in ``only``), one argument group each.

    ``defaults`` changes an option's default for this command (e.g. 4 sequences for errors, 8 for locate);
    ``axes``: axis options take several values too (massquant run's overrides of a recipe's models)."""
    defaults = defaults or {}
    wanted = None if only is None else set(only)
    for name in groups:
        group = GROUPS[name]
        chosen = [o for o in group.options if (wanted is None or o.key in wanted) and o.key not in skip]
        if not chosen:
            continue
        arguments = parser.add_argument_group(group.title, group.description)
        for option in chosen:
            default = defaults.get(option.key, option.default)
            metavar = option.metavar or ("|".join(option.accepted()) if option.accepted() and not option.many else None)
            if option.type is bool:
                arguments.add_argument(
                    option.flag, dest=option.key, action=argparse.BooleanOptionalAction if default else "store_true",
                    default=default, help=option.help_text(default),
                )
            else:
                several = option.many or (axes and option.axis)
                arguments.add_argument(
                    option.flag, dest=option.key, action=_Values, option=option, several=several,
                    default=[] if several and axes and option.axis else default,
                    metavar=metavar or option.key.upper(), help=option.help_text(default),
                )


def from_mapping(mapping: dict, groups: Iterable[str], where: str, extra: Iterable[str] = (),
                 defaults: dict | None = None, skip: Iterable[str] = ()) -> SimpleNamespace:
    """A recipe section or model_args as option values: every key of ``groups`` (defaults filled in),
    typed by its declaration. ``extra``: keys the caller handles itself. Unknown keys are errors that
    list the accepted ones. Axis options keep a list of values (one per grid cell)."""
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping of keys such as {', '.join(keys(*groups)[:4])}; got {type(mapping).__name__}")
    options = {option.key: option for name in groups for option in GROUPS[name].options if option.key not in skip}
    accepted = [*options, *extra]
    for key in mapping:
        if key not in accepted:
            raise unknown_key_error(str(key), accepted, where)
    values = {key: (defaults or {}).get(key, option.default) for key, option in options.items()}
    for key, option in options.items():
        if key not in mapping:
            if option.axis:
                values[key] = [values[key]]
            continue
        value = mapping[key]
        if option.axis and isinstance(value, list):
            if not value:
                raise UserError(f"{where}: '{key}' is empty; list at least one (or leave the key out for the default)")
            values[key] = [_axis_value(option, item, f"{where}: {key}") for item in value]
        elif option.axis:
            values[key] = [_axis_value(option, value, f"{where}: {key}")]
        else:
            values[key] = option.parse(value, f"{where}: {key}")
    return SimpleNamespace(**values)


def _axis_value(option: Option, value, where: str):
    # A model entry may be a mapping of loading options (a model with its own dtype, ...).
    return value if isinstance(value, dict) else option.parse(value, where)
