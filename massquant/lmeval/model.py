"""The ``massquant`` model type for lm-eval: a model loaded, mitigated and quantized by massquant, scored by HFLM.

``lm_eval --model massquant --model_args pretrained=smollm2-135m,spec=w8a8,...``
builds the model through ``massquant.variants.apply_variant`` (the code path
``massquant eval`` uses) and hands it to lm-eval's own ``HFLM``, so every
lm-eval flag (batch size, limit, few-shot, chat template, logging) works as
for ``--model hf``.
"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import torch
from lm_eval.api.registry import register_model

from massquant import options
from massquant.config import check_int, coerce, unknown_key_error
from massquant.errors import UserError
from massquant.data.text import BOS_POLICIES
from massquant.lmeval.hflm import WHERE, InvariantHFLM, bos_tokenizer, context_token
from massquant.lmeval.parallel import join_processes
from massquant.mitigations import get_mitigation, parse_mitigations
from massquant.models.loading import DEFAULT_MODEL, LoadedModel, ModelConfig, load_model
from massquant.options import settings
from massquant.variants import Variant, apply_variant

log = logging.getLogger(__name__)

# model_args are the declared options of these groups (massquant.options: the same keys as recipes, the flags
# without dashes), plus lm-eval's own names: pretrained (the model), device (lm-eval's --device, cuda:0 too) and
# add_bos_token (true = bos=always, false = bos=never).
MODEL_ARGS_GROUPS = ("model", "quantization", "calibration", "massive", "mitigation", "run")
LOADING_ARGS = ("dtype", "attn_implementation", "trust_remote_code", "device")
# HFLM settings that still mean something for a model already in memory; passed through as lm-eval typed them.
HFLM_ARGS = (
    "batch_size", "max_batch_size", "max_length", "truncation", "logits_cache", "softmax_dtype",
    "mixed_precision_dtype", "prefix_token_id", "think_end_token", "enable_thinking", "chat_template_args",
)


def declared_keys() -> tuple[str, ...]:
    """The declared options model_args take (read when called: an option declared later is accepted too)."""
    return (*(key for key in options.keys(*MODEL_ARGS_GROUPS) if key not in ("model", "device")), "bos")


def accepted_keys() -> tuple[str, ...]:
    return ("pretrained", *declared_keys(), "device", "add_bos_token", *HFLM_ARGS)


def _mitigation_hint(key: str, mitigation) -> str:
    """lm-eval splits model_args on every comma, so a mitigation's second parameter arrives as a key of its own."""
    if not isinstance(mitigation, str) or mitigation in ("", "none"):
        return ""
    try:
        variants = parse_mitigations(mitigation.replace(";", ","))
    except UserError:
        return ""
    if not any(key in get_mitigation(choice.name).parameters for variant in variants for choice in variant):
        return ""
    return (
        f"; '{key}' is a mitigation parameter: lm-eval splits model_args on commas, so separate a mitigation's "
        "parameters with ';' (mitigation=smoothquant:alpha=0.8;projections=qkv:up)"
    )


def model_options(arguments: dict) -> SimpleNamespace:
    """lm-eval's model_args (already split and loosely typed by lm-eval) as typed option values.

    lm-eval turns 'none' into None, so None means the default. Unknown keys are
    errors that list the accepted ones.
    """
    given = {key: value for key, value in arguments.items() if value is not None}
    accepted = accepted_keys()
    for key in given:
        if key not in accepted:
            hint = _mitigation_hint(key, arguments.get("mitigation"))
            raise UserError(f"{unknown_key_error(key, accepted, WHERE)}{hint}")
    declared = {key: given[key] for key in declared_keys() if key in given}
    if "mitigation" in declared:  # one variant, in the registry syntax with ';' for lm-eval's commas
        declared["mitigation"] = [str(declared["mitigation"]).replace(";", ",")]
    values = options.from_mapping(
        {key: value for key, value in declared.items() if key != "bos"}, MODEL_ARGS_GROUPS, WHERE, skip=("model", "device"),
    )
    values.bos = options.OPTIONS["bos"].parse(declared.get("bos", "auto"), f"{WHERE}: bos")
    values.add_bos_token = coerce(given["add_bos_token"], False, "add_bos_token", WHERE) if "add_bos_token" in given else None
    values.device = given.get("device")
    values.hflm = {key: given[key] for key in HFLM_ARGS if key in given}
    values.loading = [key for key in LOADING_ARGS if key in given]
    pretrained = given.get("pretrained", DEFAULT_MODEL)
    if not isinstance(pretrained, (str, LoadedModel)):
        raise UserError(
            f"{WHERE}: pretrained is a model reference or a massquant LoadedModel; got {type(pretrained).__name__} "
            "(a transformers model object goes to lm-eval's HFLM(pretrained=model) directly)"
        )
    values.pretrained = pretrained
    return values


def variant_from_options(values) -> Variant:
    """The one variant the options describe, checked before any model is loaded."""
    specs = settings.quant_specs(values)
    policies = settings.massive_policies(values)
    mitigations = settings.mitigation_variants(values)
    if len(specs) > 1 or len(policies) != 1 or len(mitigations) != 1:
        raise UserError(
            f"{WHERE}: a model is one variant; these options name {max(len(specs), 1) * len(policies) * len(mitigations)} "
            "(one spec, one massive policy, one mitigation; combine mitigations with '+'; compare variants with massquant eval)"
        )
    return Variant(specs[0] if specs else None, policies[0], mitigations[0])


def check_option_values(values) -> ModelConfig | None:
    """lm-eval's own settings, and the loading config (None for a model already loaded)."""
    for key in ("max_length", "batch_size", "max_batch_size"):
        value = values.hflm.get(key)
        if value is not None and not (key.endswith("batch_size") and str(value).startswith("auto")):
            check_int(coerce(value, 0, key, WHERE), f"{WHERE}: {key}")
    if isinstance(values.pretrained, LoadedModel):
        if values.loading:
            raise UserError(f"{WHERE}: {', '.join(values.loading)} apply when loading; pretrained is an already loaded model")
        return None
    config = settings.model_config(SimpleNamespace(**{**vars(values), "device": _device(values.device)}), values.pretrained)
    config.validate()
    return config


def check_model_args(arguments: dict) -> tuple[SimpleNamespace, ModelConfig | None, Variant, str]:
    """Everything in model_args that can be wrong, checked before lm-eval starts and before the model loads:
    keys, values and their ranges, and the variant against the model's config and shapes.

    Returns what the checks built: the option values, the loading config (None for a loaded model), the
    variant and the BOS policy."""
    from massquant.validation import Plan, not_applicable, require_runnable

    values = model_options(arguments)
    config = check_option_values(values)
    variant = variant_from_options(values)
    policy = bos_policy(values.bos, values.add_bos_token)
    if config is not None:
        Plan(config, [variant])
    else:
        require_runnable([variant], not_applicable(values.pretrained, [variant]))
    return values, config, variant, policy


def bos_policy(bos: str, add_bos_token: bool | None) -> str:
    """massquant's bos=auto|always|never, with lm-eval's add_bos_token accepted as the same choice."""
    if bos not in BOS_POLICIES:
        raise UserError(f"{WHERE}: unknown bos '{bos}'; accepted: {', '.join(BOS_POLICIES)}")
    if add_bos_token is None:
        return bos
    implied = "always" if add_bos_token else "never"
    if bos not in ("auto", implied):
        raise UserError(f"{WHERE}: add_bos_token={add_bos_token} contradicts bos={bos}; give one of them")
    return implied


def _device(requested: str | None) -> str:
    """lm-eval's --device (default cuda:0) as massquant's loading device; like HFLM, CPU when there is no GPU."""
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested in ("cpu", "auto"):
        return requested
    if requested in ("cuda", "cuda:0"):
        if not torch.cuda.is_available():
            log.warning("device '%s' requested but no CUDA GPU is available; using the CPU", requested)
            return "cpu"
        return "cuda"
    raise UserError(f"{WHERE}: device '{requested}' is not supported; accepted: cpu, cuda, cuda:0, auto")


@register_model("massquant")
class MassquantLM(InvariantHFLM):
    """HFLM over a massquant variant of a model: ``MassquantLM(pretrained="smollm2-135m", spec="w8a8")``.

    ``pretrained`` is a massquant model reference (alias, .gguf, directory, hub
    id) or an already loaded ``LoadedModel``, which is then changed in place
    until ``restore()``.
    """

    def __init__(self, pretrained: str | LoadedModel = DEFAULT_MODEL, **model_args) -> None:
        # the one validation pass, before loading
        values, config, variant, policy = check_model_args({"pretrained": pretrained, **model_args})
        if config is not None:
            join_processes(cpu=config.device == "cpu")  # launched: this rank's GPU becomes the current one before loading
        loaded = values.pretrained if config is None else load_model(config)
        context_token(loaded.tokenizer, policy, model_args.get("prefix_token_id"))  # refused before any calibration
        prepends = bos_tokenizer(loaded.tokenizer, policy)[1]
        calibration = None
        if variant.needs_calibration:
            calibration = settings.calibration(values).batch(loaded.tokenizer, values.seed, bos=prepends)
        self.quantization = apply_variant(loaded, variant, calibration)
        try:
            super().__init__(self.quantization.model, loaded.tokenizer, policy, **values.hflm)
        except BaseException:
            self.quantization.undo()
            raise
        self.massquant = {
            "model": loaded.config.model,
            "source": loaded.source,
            "fingerprint": loaded.fingerprint,
            "config": variant.name,
            **variant.describe(),
            "quantization": self.quantization.summary,
            **self.bos_tokens,
            "calibration": {**dataclasses.asdict(settings.calibration(values)), "seed": values.seed} if calibration is not None else None,
        }

    def restore(self) -> None:
        """Undo the mitigation and quantization applied to the model (matters when it was passed in loaded)."""
        self.quantization.undo()

    def get_model_info(self) -> dict:
        """lm-eval stores this under results['config']: what massquant did to the model, BOS policy included."""
        return {**super().get_model_info(), "model_sha": self.massquant["fingerprint"], "massquant": self.massquant}
