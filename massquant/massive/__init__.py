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
# Which massive activations a policy or intervention acts on (massquant.massive.targets); "channel:N" names one.
TARGETS = ("first-layer", "dominant", "all", "channel:N")
DEFAULT_TARGET = "first-layer"


def target_channel(target: str) -> int | None:
    """N of ``channel:N``; None for the other targets. Raises UserError for anything not in ``TARGETS``."""
    name, colon, number = target.partition(":")
    if colon and name == "channel" and number.isdigit():
        return int(number)
    if target in TARGETS and not colon:
        return None
    raise UserError(f"unknown massive target '{target}'; accepted: {', '.join(TARGETS)} (N: a residual channel index)")


def check_target(target: str, detection: str = "calibrated") -> str:
    """``target`` if it is valid with ``detection``: dominant and all need the phenomena located on calibration data."""
    target_channel(target)
    if detection == "dynamic" and target in ("dominant", "all"):
        raise UserError(
            f"massive target '{target}' needs --massive-detection calibrated (phenomena are found on calibration "
            "sequences); dynamic detection takes first-layer or channel:N"
        )
    return target


# What counts as massive, after the paper each rule comes from; every rule also needs |a| > abs_threshold.
CRITERIA = {
    "sun": "Sun et al. 2024: |a| > ratio x the median |a| of the layer's tensor (ratio 1000)",
    "prefixquant": "Chen et al. 2024 (PrefixQuant): |a| > ratio x the median over tokens of each token's max |a| (ratio 64)",
    "top-k": "the k largest |a| of each layer's tensor per sequence (k 4): the top-1/2/3 curves of Sun et al. 2024, Fig. 2, used as a detector",
}
DEFAULT_RATIOS = {"sun": 1000.0, "prefixquant": 64.0}


@dataclass(frozen=True)
class MassiveCriteria:
    """When a value counts as massive: |a| > abs_threshold, and the rule's relative test (``CRITERIA``).

    ``rule`` ``sun`` (Sun et al. 2024, the default everywhere): |a| >
    median_ratio x the median |a| of its tensor. ``prefixquant`` (Chen et al.
    2024): |a| > median_ratio x the median over tokens of each token's max |a|.
    ``top-k``: among the k largest |a| of the tensor. Only ``locate`` offers
    the other rules; quantization-time handling uses ``sun``.
    """

    abs_threshold: float = 100.0
    median_ratio: float = 1000.0
    rule: str = "sun"
    k: int = 4  # top-k only

    @classmethod
    def named(cls, rule: str = "sun", abs_threshold: float | None = None, ratio: float | None = None, k: int | None = None) -> "MassiveCriteria":
        """A rule with its literature defaults for whatever is not given (ratio 1000 for sun, 64 for prefixquant)."""
        if rule not in CRITERIA:
            raise UserError(f"unknown massive criterion '{rule}'; accepted: {', '.join(CRITERIA)}")
        if ratio is not None and rule == "top-k":
            raise UserError("the top-k criterion takes no ratio (it keeps the k largest values); use --k")
        if k is not None and rule != "top-k":
            raise UserError(f"--k applies to the top-k criterion only, not to '{rule}'")
        return cls(
            abs_threshold=cls.abs_threshold if abs_threshold is None else abs_threshold,
            median_ratio=DEFAULT_RATIOS.get(rule, cls.median_ratio) if ratio is None else ratio,
            rule=rule,
            k=cls.k if k is None else k,
        ).validate()

    def validate(self) -> "MassiveCriteria":
        if self.rule not in CRITERIA:
            raise UserError(f"unknown massive criterion '{self.rule}'; accepted: {', '.join(CRITERIA)}")
        if not self.abs_threshold >= 0 or not self.median_ratio >= 1:
            raise UserError(
                f"massive criteria need abs_threshold >= 0 and median_ratio >= 1; got {self.abs_threshold}, {self.median_ratio}"
            )
        if self.k < 1:
            raise UserError(f"the top-k criterion needs k >= 1; got {self.k}")
        return self

    def sun(self) -> "MassiveCriteria":
        """These criteria if they are Sun et al.'s, else Sun et al.'s with the same absolute threshold."""
        return self if self.rule == "sun" else MassiveCriteria(abs_threshold=self.abs_threshold)

    def describe(self) -> str:
        """One line naming the rule and its parameters, e.g. for a table heading."""
        relative = {
            "sun": f"> {self.median_ratio:g} x the layer's median |a| (Sun et al. 2024)",
            "prefixquant": f"> {self.median_ratio:g} x the median of the tokens' max |a| (PrefixQuant, Chen et al. 2024)",
            "top-k": f"among the {self.k} largest |a| of the layer per sequence (top-k)",
        }[self.rule]
        return f"|a| > {self.abs_threshold:g} and {relative}"


@dataclass(frozen=True)
class MassivePolicy:
    """What happens to massive activations while the rest is quantized."""

    mode: str = "none"  # one of MASSIVE_POLICIES
    detection: str = "calibrated"  # sites found once on calibration data, or per forward
    criteria: MassiveCriteria = field(default_factory=MassiveCriteria)
    target: str = DEFAULT_TARGET  # which massive activations: one of TARGETS

    def validate(self) -> "MassivePolicy":
        if self.mode not in MASSIVE_POLICIES:
            raise UserError(f"unknown massive policy '{self.mode}'; accepted: {', '.join(MASSIVE_POLICIES)}")
        if self.detection not in DETECTION_MODES:
            raise UserError(f"unknown massive detection '{self.detection}'; accepted: {', '.join(DETECTION_MODES)}")
        self.criteria.validate()
        check_target(self.target, self.detection)
        return self

    @property
    def label(self) -> str:
        if self.mode == "none":
            return "none"
        target = "" if self.target == DEFAULT_TARGET else f":{self.target}"
        return self.mode + target + ("" if self.detection == "calibrated" else "@dynamic")
