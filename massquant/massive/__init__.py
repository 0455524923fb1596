"""Massive activations (Sun et al. 2024): find them, explain them, and decide what quantization does with them.

- ``locate``: streaming statistics per layer, the massive sites, super weights;
- ``handling``: the ``--massive`` policies applied around quantization
  (keep in high precision, suppress to zero / mean, clip);
- ``plots``: the figures ``massquant locate`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from massquant.errors import UserError

MASSIVE_POLICIES = ("none", "keep", "suppress-zero", "suppress-mean", "clip")
DETECTION_MODES = ("calibrated", "dynamic")


@dataclass(frozen=True)
class MassiveCriteria:
    """A value is massive when |a| > abs_threshold and |a| > median_ratio x the median |a| of its tensor."""

    abs_threshold: float = 100.0
    median_ratio: float = 1000.0

    def validate(self) -> "MassiveCriteria":
        if not self.abs_threshold >= 0 or not self.median_ratio >= 1:
            raise UserError(
                f"massive criteria need abs_threshold >= 0 and median_ratio >= 1; got {self.abs_threshold}, {self.median_ratio}"
            )
        return self


@dataclass(frozen=True)
class MassivePolicy:
    """What happens to massive activations while the rest is quantized."""

    mode: str = "none"  # one of MASSIVE_POLICIES
    detection: str = "calibrated"  # sites found once on calibration data, or per forward
    criteria: MassiveCriteria = field(default_factory=MassiveCriteria)

    def validate(self) -> "MassivePolicy":
        if self.mode not in MASSIVE_POLICIES:
            raise UserError(f"unknown massive policy '{self.mode}'; accepted: {', '.join(MASSIVE_POLICIES)}")
        if self.detection not in DETECTION_MODES:
            raise UserError(f"unknown massive detection '{self.detection}'; accepted: {', '.join(DETECTION_MODES)}")
        self.criteria.validate()
        return self

    @property
    def label(self) -> str:
        if self.mode == "none":
            return "none"
        return self.mode + ("" if self.detection == "calibrated" else "@dynamic")
