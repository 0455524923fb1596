"""A variant = mitigation(s) + massive-activation policy + quantization spec, applied in that order.

This is the one place where the three compose. ``apply_variant`` changes the
loaded model in place (or hands back a new one, for real backends) and returns
how to undo everything, so one loaded model serves a whole grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from massquant.backends import AppliedQuantization, get_backend
from massquant.massive import MassivePolicy
from massquant.errors import UserError
from massquant.mitigations import MitigationChoice, apply_post_hoc, check_applicable, get_mitigation, variant_label
from massquant.models.architectures import architecture_of
from massquant.quantizers.spec import QuantSpec


@dataclass(frozen=True)
class Variant:
    spec: QuantSpec | None = None  # None or identity: full precision
    massive: MassivePolicy = field(default_factory=MassivePolicy)
    mitigation: tuple[MitigationChoice, ...] = ()

    @property
    def spec_name(self) -> str:
        return self.spec.name if self.spec is not None else "fp"

    @property
    def mitigation_name(self) -> str:
        return variant_label(list(self.mitigation))

    @property
    def name(self) -> str:
        parts = [self.spec_name]
        if self.massive.mode != "none":
            parts.append(f"massive={self.massive.label}")
        if self.mitigation:
            parts.append(f"mitigation={self.mitigation_name}")
        return " ".join(parts)

    @property
    def is_baseline(self) -> bool:
        return (self.spec is None or self.spec.is_identity) and self.massive.mode == "none" and not self.mitigation

    @property
    def needs_calibration(self) -> bool:
        parts = [p for p in (self.spec.activations, self.spec.kv_cache) if p is not None] if self.spec else []
        return (
            any(not p.dynamic for p in parts)
            or (self.spec is not None and self.spec.backend == "gptq")
            or (self.massive.mode != "none" and self.massive.detection == "calibrated")
            or self.massive.mode == "suppress-mean"
            or any(get_mitigation(c.name).needs_calibration for c in self.mitigation)
        )

    def describe(self) -> dict:
        """What a result row records about the variant."""
        return {
            "spec": self.spec_name,
            "backend": self.spec.backend if self.spec is not None else None,
            "massive": self.massive.mode,
            "massive_detection": self.massive.detection if self.massive.mode != "none" else None,
            "massive_criteria": vars(self.massive.criteria) if self.massive.mode != "none" else None,
            "mitigation": self.mitigation_name,
            "mitigation_params": [{"name": c.name, **c.params} for c in self.mitigation],
        }


def check_variant_settings(variant: Variant) -> None:
    """What is wrong with ``variant`` whatever the model: refused at once, never turned into a row."""
    for choice in variant.mitigation:
        if get_mitigation(choice.name).kind != "post-hoc":
            raise UserError(
                f"mitigation '{choice.name}' is applied at training time: run 'massquant train' with a recipe "
                "(see recipes/) and evaluate the checkpoint it writes"
            )
    if variant.spec is not None and not variant.spec.is_identity:
        get_backend(variant.spec.backend).require()
        if variant.massive.mode == "keep" and variant.spec.backend != "fake":
            raise UserError(
                f"--massive keep needs the fake backend's activation quantizers; '{variant.spec.backend}' "
                "has none (suppress-zero, suppress-mean and clip work with every backend)"
            )


def check_variant_on_model(loaded, variant: Variant) -> None:
    """What this model's architecture and shapes refuse about ``variant``. ``loaded`` may be a loaded model or
    ``massquant.validation.ModelFacts`` (the architecture and shapes, read before the weights load)."""
    check_applicable(loaded.model, list(variant.mitigation))
    if variant.spec is not None and not variant.spec.is_identity:
        get_backend(variant.spec.backend).check(loaded, variant.spec)
    if (variant.spec is not None and variant.spec.kv_cache is not None) or variant.massive.mode != "none":
        architecture_of(loaded.model)  # KV hooks and massive hooks need to know where layers live


def check_variant(loaded, variant: Variant) -> None:
    """Refuse, before any evaluation runs, what applying ``variant`` to this model would refuse later."""
    check_variant_settings(variant)
    check_variant_on_model(loaded, variant)


def apply_variant(loaded, variant: Variant, calibration: torch.Tensor | None) -> AppliedQuantization:
    """Mitigations first (they change weights/structure), then massive handling around quantization."""
    check_variant(loaded, variant)
    undo_mitigation = apply_post_hoc(loaded, list(variant.mitigation), calibration) if variant.mitigation else (lambda: None)
    try:
        spec = variant.spec

        def quantize() -> AppliedQuantization:
            if spec is None or spec.is_identity:
                return AppliedQuantization(loaded.model, lambda: None, {})
            return get_backend(spec.backend).apply(loaded, spec, calibration)

        if variant.massive.mode == "none":
            applied = quantize()
        else:
            from massquant.massive.handling import handle_massive

            applied = handle_massive(loaded, variant.massive, calibration, quantize)
    except BaseException:
        undo_mitigation()
        raise

    def undo() -> None:
        try:
            applied.undo()
        finally:
            undo_mitigation()

    summary = dict(applied.summary)
    if variant.mitigation:
        summary["mitigation"] = variant.mitigation_name
    return AppliedQuantization(applied.model, undo, summary)


def variant_grid(specs: list, policies: list, mitigations: list[tuple]) -> list[Variant]:
    """The baseline first, then every mitigation x massive policy x spec (mitigated rows unquantized too)."""
    grid = [Variant()]
    for mitigation in _unique(mitigations):
        if mitigation:
            grid.append(Variant(mitigation=mitigation))
        for policy in policies:
            grid.extend(Variant(spec, policy, mitigation) for spec in specs)
    return _unique(grid)


def _unique(items: list) -> list:
    """First occurrences, by equality: mitigation parameters are dicts, so variants cannot be hashed."""
    kept: list = []
    for item in items:
        if item not in kept:
            kept.append(item)
    return kept
