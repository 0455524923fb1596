"""Option values (a parsed command line, a recipe section, lm-eval model_args) as massquant's objects.

One function per object, shared by every surface, so ``--spec w8a8
--act-granularity tensor``, ``spec: w8a8`` + ``act_granularity: tensor`` and
``spec=w8a8,act_granularity=tensor`` build the same ``QuantSpec``.
"""

from __future__ import annotations

from massquant.backends import get_backend
from massquant.data.calibration import CalibrationSettings
from massquant.errors import UserError
from massquant.evaluation.perplexity import PerplexityConfig
from massquant.evaluation.tasks import TaskSettings
from massquant.massive import MassiveCriteria, MassivePolicy
from massquant.mitigations import MitigationChoice, parse_mitigations
from massquant.models.loading import ModelConfig
from massquant.quantizers.spec import QuantSpec, parse_spec, spec_text_from_flags, with_granularity
from massquant.variants import Variant, variant_grid


def model_config(values, model: str | None = None) -> ModelConfig:
    """``model`` overrides ``values.model`` (a recipe's model axis)."""
    return ModelConfig(
        model=model or values.model, dtype=values.dtype, device=values.device,
        trust_remote_code=values.trust_remote_code, attn_implementation=values.attn_implementation,
    )


def perplexity_config(values, data: str | None = None, seq_len: int | None = None) -> PerplexityConfig:
    return PerplexityConfig(
        data=data or values.data, seq_len=seq_len or values.seq_len, stride=values.stride,
        max_tokens=values.max_tokens, bos=values.bos, batch_size=values.batch_size,
    )


def calibration(values) -> CalibrationSettings:
    return CalibrationSettings(values.calib_data, values.calib_samples, values.calib_seq_len)


def quant_specs(values) -> list[QuantSpec]:
    """Every spec named by ``spec`` and by the explicit flags (bits, act_bits, ...), on every backend;
    full-precision entries are dropped (the baseline is always there)."""
    for backend in values.backend:
        get_backend(backend)
    texts = list(values.spec)
    from_flags = spec_text_from_flags(
        values.bits, values.format, values.group_size, not values.asym, values.act_bits,
        values.act_granularity, values.kv_bits, values.kv_granularity,
    )
    if from_flags:
        texts.append(from_flags)
    settings = dict(
        include=tuple(values.include), exclude=tuple(values.exclude), quantize_lm_head=values.quantize_lm_head,
        bnb_threshold=values.bnb_threshold, calibration_samples=values.calib_samples,
    )
    specs = [parse_spec(text, backend=backend, **settings) for text in texts for backend in values.backend]
    specs = [spec for spec in specs if not spec.is_identity]
    # The granularity options also apply to the named specs: spec w8a8 with act_granularity tensor is w8a8-tensor.
    for target, granularity, key, example in (
        ("a", values.act_granularity, "act_granularity", "spec w8a8 or act_bits 8"),
        ("kv", values.kv_granularity, "kv_granularity", "spec w8kv8 or kv_bits 8"),
    ):
        if granularity is None:
            continue
        if not any(spec.part(target) for spec in specs):
            raise UserError(f"{key} {granularity} needs a spec that quantizes that tensor ({example})")
        specs = [with_granularity(spec, target, granularity) for spec in specs]
    return specs


def massive_criteria(values) -> MassiveCriteria:
    """Sun et al.'s rule with the given threshold and ratio (quantization-time handling uses only it)."""
    return MassiveCriteria.named("sun", values.massive_threshold, values.massive_ratio)


def massive_policies(values) -> list[MassivePolicy]:
    criteria = massive_criteria(values)
    return [MassivePolicy(mode, values.massive_detection, criteria).validate() for mode in dict.fromkeys(values.massive or ["none"])]


def mitigation_variants(values) -> list[tuple[MitigationChoice, ...]]:
    """Each entry in the registry syntax may name several variants; ``()`` is no mitigation."""
    return [tuple(variant) for text in values.mitigation for variant in parse_mitigations(text)] or [()]


def variants(values) -> list[Variant]:
    """The evaluated grid the options name (``variant_grid``: the baseline first)."""
    return variant_grid(quant_specs(values), massive_policies(values), mitigation_variants(values))


def task_settings(values) -> TaskSettings | None:
    """The lm-eval tasks to score besides perplexity, checked; None when no task is named."""
    names = tuple(dict.fromkeys(values.tasks))
    if not names:
        return None
    return TaskSettings(
        names, values.limit, values.num_fewshot, values.task_batch_size, values.bos, values.bootstrap, seed=values.seed,
    ).validate()
