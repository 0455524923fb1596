"""Quantization configurations and the one compact spec syntax, parsed here only.

A spec names what is quantized and how, e.g. ``w4g128``, ``w8a8``,
``w4a8-token``, ``w8a8kv8``, ``wfp8afp8``, ``wmxfp4amxfp4``, ``w4g64-asym-mse``::

    spec    := part+
    part    := ("w" | "a" | "kv") format ["g" GROUP] ("-" modifier)*
    format  := BITS (2..8, integer) | a registered spelling: fp8 | fp8e4m3 | fp8e5m2 | mxfp4 | nvfp4 | nf4 | fp4 | ...
    modifier:= tensor | channel | token | head | group | sym | asym
             | dynamic | static | minmax | pNN.N (percentile) | mse (weight clip search)

Format tokens come from the registry (``quantizers/formats``): a format registered
there is a spec token everywhere. ``nf4``/``fp4`` are bitsandbytes' 4-bit weight
formats (``--backend bnb``).
The CLI flags, recipes and lm-eval ``model_args`` all end up in ``QuantSpec``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from massquant.errors import UserError
from massquant.quantizers.formats import format_named, get_format, spellings, validate

WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
ACTIVATION_GRANULARITIES = ("tensor", "token")
KV_GRANULARITIES = ("tensor", "token", "head", "group")
GRANULARITIES_BY_TARGET = {"w": WEIGHT_GRANULARITIES, "a": ACTIVATION_GRANULARITIES, "kv": KV_GRANULARITIES}
DEFAULT_4BIT_GROUP = 128
_PART_FIELDS = {"w": "weights", "a": "activations", "kv": "kv_cache"}
_MODIFIERS = r"(?P<modifiers>(?:-(?:tensor|channel|token|head|group|sym|asym|dynamic|static|minmax|mse|p\d+(?:\.\d+)?))*)"


def _part_pattern() -> re.Pattern:
    """One part of a spec; the format tokens are read from the registry, so a registered format parses."""
    tokens = "|".join(re.escape(token) for token in spellings() if not token.isdigit())
    return re.compile(rf"(?P<target>kv|w|a)(?P<format>\d+|{tokens})(?:g(?P<group>\d+))?{_MODIFIERS}")


@dataclass(frozen=True)
class TensorQuantSpec:
    """How one kind of tensor (weights, activations or KV cache) is quantized."""

    format: str = "int"  # a registered format's name (quantizers/formats)
    bits: int = 8
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    dynamic: bool = True  # activations / KV: scale per forward (True) or calibrated once (False)
    calibration: str = "minmax"  # static scales: "minmax" or "p99.9"-style percentile
    clip_search: bool = False  # weights: per-block clip ratio minimising MSE

    def label(self, target: str) -> str:
        """Canonical spec text of this part, e.g. ``w4g128`` or ``a8-token``."""
        fmt = get_format(self.format)
        text = f"{target}{self.bits if self.format == 'int' else fmt.label}"
        if self.group_size and fmt.layout == "scaled" and fmt.quantize is not None:
            text += f"g{self.group_size}"
        default = default_part(target, self.format, self.bits)
        if self.granularity != default.granularity and not self.group_size:
            text += f"-{self.granularity}"
        if not self.symmetric:
            text += "-asym"
        if not self.dynamic:
            text += "-static" + ("" if self.calibration == "minmax" else f"-{self.calibration}")
        if self.clip_search:
            text += "-mse"
        return text


@dataclass(frozen=True)
class QuantSpec:
    """Everything quantized in one configuration; ``None`` parts stay in full precision."""

    weights: TensorQuantSpec | None = None
    activations: TensorQuantSpec | None = None
    kv_cache: TensorQuantSpec | None = None
    backend: str = "fake"
    include: tuple[str, ...] = ()  # module-name regexes; empty = every decoder linear
    exclude: tuple[str, ...] = ()
    quantize_lm_head: bool = False
    bnb_threshold: float = 6.0  # LLM.int8 outlier threshold (backend bnb, 8-bit weights)
    calibration_samples: int = 16  # sequences for static activation / KV scales and GPTQ

    @property
    def name(self) -> str:
        parts = [
            part.label(target)
            for target, part in (("w", self.weights), ("a", self.activations), ("kv", self.kv_cache))
            if part is not None
        ]
        text = "".join(parts) or "fp"
        return text if self.backend == "fake" else f"{text}@{self.backend}"

    @property
    def is_identity(self) -> bool:
        return self.weights is None and self.activations is None and self.kv_cache is None

    def part(self, target: str) -> TensorQuantSpec | None:
        """The part for a spec-string target: ``"w"``, ``"a"`` or ``"kv"``."""
        return getattr(self, _PART_FIELDS[target])


def default_part(target: str, fmt: str, bits: int) -> TensorQuantSpec:
    """Defaults users expect: per-channel weights (g128 at 4 bits and below), per-token activations and KV heads."""
    if target == "w":
        grouped = fmt == "int" and bits <= 4
        return TensorQuantSpec(fmt, bits, "group" if grouped else "channel", DEFAULT_4BIT_GROUP if grouped else None)
    return TensorQuantSpec(fmt, bits, "token" if target == "a" else "head")


def _format_and_bits(token: str, target: str, spec_text: str) -> tuple[str, int]:
    if token.isdigit():
        fmt, bits = "int", int(token)
    else:
        entry = format_named(token)
        if entry.weight_only and target != "w":
            raise UserError(f"spec '{spec_text}': {token} is a weight-only format (runs on --backend {entry.backend})")
        fmt, bits = entry.name, entry.default_bits
    try:
        validate(fmt, bits)
    except UserError as error:
        raise UserError(f"spec '{spec_text}': {error}") from None
    return fmt, bits


def _apply_modifiers(part: TensorQuantSpec, modifiers: list[str], target: str, spec_text: str) -> TensorQuantSpec:
    valid_granularities = GRANULARITIES_BY_TARGET[target]
    for modifier in modifiers:
        if modifier in ("tensor", "channel", "token", "head", "group"):
            if modifier not in valid_granularities:
                raise UserError(
                    f"spec '{spec_text}': granularity '{modifier}' is not valid for "
                    f"{ {'w': 'weights', 'a': 'activations', 'kv': 'the KV cache'}[target]}; "
                    f"valid: {', '.join(valid_granularities)}"
                )
            part = replace(part, granularity=modifier, group_size=part.group_size if modifier == "group" else None)
        elif modifier in ("sym", "asym"):
            part = replace(part, symmetric=modifier == "sym")
        elif modifier in ("dynamic", "static", "minmax") or modifier.startswith("p"):
            if target == "w":
                raise UserError(f"spec '{spec_text}': weights are always quantized once; '{modifier}' applies to a/kv")
            if modifier.startswith("p") and not 0 < float(modifier[1:]) <= 100:
                raise UserError(f"spec '{spec_text}': percentile {modifier[1:]} must be in (0, 100]")
            if modifier == "dynamic":
                part = replace(part, dynamic=True)
            else:  # a calibrated range is one per tensor: token positions change from input to input
                calibration = part.calibration if modifier == "static" else modifier
                part = replace(part, dynamic=False, granularity="tensor", calibration=calibration)
        elif modifier == "mse":
            if target != "w":
                raise UserError(f"spec '{spec_text}': '-mse' clip search applies to weights only")
            part = replace(part, clip_search=True)
    return part


def validate_part(part: TensorQuantSpec, target: str, context: str) -> TensorQuantSpec:
    """Checks shared by the spec parser and the explicit flags."""
    try:
        fmt = validate(part.format, part.bits)
    except UserError as error:
        raise UserError(f"{context}: {error}") from None
    if not part.symmetric and not fmt.asymmetric:
        raise UserError(f"{context}: asymmetric quantization is only available for integer formats")
    if part.granularity == "group" and not part.group_size:
        raise UserError(f"{context}: group granularity needs a group size (e.g. g128)")
    if part.group_size is not None and part.group_size <= 0:
        raise UserError(f"{context}: group size must be positive; got {part.group_size}")
    if not part.dynamic and part.granularity != "tensor":
        raise UserError(f"{context}: static (calibrated) scales are per tensor; got granularity '{part.granularity}'")
    if part.granularity not in GRANULARITIES_BY_TARGET[target]:
        raise UserError(
            f"{context}: granularity '{part.granularity}' is not valid here; "
            f"valid: {', '.join(GRANULARITIES_BY_TARGET[target])}"
        )
    return part


def with_granularity(spec: QuantSpec, target: str, granularity: str) -> QuantSpec:
    """``spec`` with the scales of its ``target`` part (``"a"`` or ``"kv"``) at ``granularity``; an absent part stays absent."""
    part = spec.part(target)
    if part is None:
        return spec
    context = f"spec '{spec.name}' with {target} granularity {granularity}"
    part = validate_part(_apply_modifiers(part, [granularity], target, context), target, context)
    return replace(spec, **{_PART_FIELDS[target]: part})


def parse_spec(text: str, **settings) -> QuantSpec:
    """``"w4g128a8-token"`` -> QuantSpec; ``settings`` fill the non-format fields (backend, include, ...)."""
    for flag in ("include", "exclude"):  # a bad regex is refused with the spec, not when layers are selected
        for pattern in settings.get(flag, ()):
            try:
                re.compile(pattern)
            except re.error as error:
                raise UserError(f"{flag} pattern '{pattern}' is not a regular expression ({error})") from None
    spec_text = text.strip().lower()
    if spec_text in ("", "fp", "none", "fp32", "bf16", "fp16"):
        return QuantSpec(**settings)
    parts: dict[str, TensorQuantSpec] = {}
    pattern = _part_pattern()
    position = 0
    while position < len(spec_text):
        match = pattern.match(spec_text, position)
        if not match:
            raise UserError(
                f"cannot parse spec '{text}' at '{spec_text[position:]}'; expected parts like w4g128, a8-token, "
                f"kv8, wfp8, amxfp4 (formats: 2..8 bits, {', '.join(sorted(token for token in spellings() if token != 'int'))})"
            )
        target = match["target"]
        if target in parts:
            raise UserError(f"spec '{text}' sets '{target}' twice")
        fmt, bits = _format_and_bits(match["format"], target, text)
        part = default_part(target, fmt, bits)
        if match["group"]:
            part = replace(part, granularity="group", group_size=int(match["group"]))
        modifiers = [m for m in match["modifiers"].split("-") if m]
        parts[target] = validate_part(_apply_modifiers(part, modifiers, target, text), target, f"spec '{text}'")
        position = match.end()
    return QuantSpec(weights=parts.get("w"), activations=parts.get("a"), kv_cache=parts.get("kv"), **settings)


def spec_text_from_flags(
    bits: int | None = None,
    fmt: str = "int",
    group_size: int | None = None,
    symmetric: bool = True,
    act_bits: int | None = None,
    act_granularity: str | None = None,
    kv_bits: int | None = None,
    kv_granularity: str | None = None,
) -> str:
    """The explicit flags (``--bits 4 --group-size 64 --act-bits 8``) written as a spec string.

    ``fmt`` applies to the weights and activations; ``bits`` alone means weights
    only. Writing the flags as a spec keeps one parser and one set of checks.
    """
    entry = format_named(fmt)

    def body(width: int | None) -> str:
        if entry.name == "int":
            return str(width or 8)
        if width not in (None, *entry.bits):
            raise UserError(f"format {fmt} is {entry.default_bits}-bit only; got --bits/--act-bits {width}")
        return entry.label

    suffix = "" if symmetric else "-asym"
    text = ""
    if bits is not None or entry.name != "int":
        text += f"w{body(bits)}" + (f"g{group_size}" if group_size else "") + suffix
    elif group_size:
        raise UserError("--group-size needs --bits (weight quantization)")
    if act_bits is not None:
        text += f"a{body(act_bits)}" + (f"-{act_granularity}" if act_granularity else "") + suffix
    if kv_bits is not None:
        text += f"kv{kv_bits}" + (f"-{kv_granularity}" if kv_granularity else "") + suffix
    return text
