"""The ``massquant`` model type for lm-eval: a model loaded, mitigated and quantized by massquant, scored by HFLM.

``lm_eval --model massquant --model_args pretrained=smollm2-135m,spec=w8a8,...``
builds the model through ``massquant.variants.apply_variant`` (the code path
``massquant eval`` uses) and hands it to lm-eval's own ``HFLM``, so every
lm-eval flag (batch size, limit, few-shot, chat template, logging) works as
for ``--model hf``.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from massquant.backends import get_backend
from massquant.config import MAX_SEED, MAX_SEQUENCES, check_int, coerce, unknown_key_error
from massquant.data.calibration import DEFAULT_CALIBRATION_TEXT, calibration_batch
from massquant.errors import UserError
from massquant.evaluation.perplexity import BOS_POLICIES
from massquant.massive import MassiveCriteria, MassivePolicy
from massquant.mitigations import get_mitigation, parse_mitigations
from massquant.models.loading import DEFAULT_MODEL, LoadedModel, ModelConfig, load_model
from massquant.quantizers.spec import parse_spec
from massquant.variants import Variant, apply_variant

log = logging.getLogger(__name__)

WHERE = "massquant model_args"
# model_args -> default; the default's type is the value's type. The names are
# massquant eval's flags with underscores (attn_implementation is --attn).
LOADING_ARGS = {"dtype": "float32", "attn_implementation": "sdpa", "trust_remote_code": False, "device": None}
VARIANT_ARGS = {
    "spec": "fp",
    "backend": "fake",
    "include": (),  # regexes, ':'-separated
    "exclude": (),
    "quantize_lm_head": False,
    "bnb_threshold": 6.0,
    "massive": "none",
    "massive_detection": "calibrated",
    "massive_threshold": MassiveCriteria.abs_threshold,
    "massive_ratio": MassiveCriteria.median_ratio,
    "mitigation": "none",  # one variant; ';' separates a mitigation's parameters
    "calib_data": DEFAULT_CALIBRATION_TEXT,
    "calib_samples": 16,
    "calib_seq_len": 512,
    "seed": 0,
    "bos": "auto",
    "add_bos_token": None,  # lm-eval's name: true = bos=always, false = bos=never
}
# HFLM settings that still mean something for a model already in memory; passed through as lm-eval typed them.
HFLM_ARGS = (
    "batch_size", "max_batch_size", "max_length", "truncation", "logits_cache", "softmax_dtype",
    "mixed_precision_dtype", "prefix_token_id", "think_end_token", "enable_thinking", "chat_template_args",
)
ACCEPTED = ("pretrained", *LOADING_ARGS, *VARIANT_ARGS, *HFLM_ARGS)


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


def model_options(arguments: dict) -> dict:
    """lm-eval's model_args (already split and loosely typed by lm-eval) as typed massquant options.

    lm-eval turns 'none' into None, so None means the default. Unknown keys are
    errors that list the accepted ones.
    """
    defaults = {"pretrained": DEFAULT_MODEL, **LOADING_ARGS, **VARIANT_ARGS}
    options = dict(defaults)
    for key, value in arguments.items():
        if key not in ACCEPTED:
            hint = _mitigation_hint(key, arguments.get("mitigation"))
            raise UserError(f"{unknown_key_error(key, ACCEPTED, WHERE)}{hint}")
        if value is None:
            continue
        if key in HFLM_ARGS:
            options[key] = value
        elif key == "add_bos_token":
            options[key] = coerce(value, False, key, WHERE)
        elif key == "pretrained" and not isinstance(value, str):
            if not isinstance(value, LoadedModel):
                raise UserError(
                    f"{WHERE}: pretrained is a model reference or a massquant LoadedModel; got {type(value).__name__} "
                    "(a transformers model object goes to lm-eval's HFLM(pretrained=model) directly)"
                )
            options[key] = value
        else:
            options[key] = coerce(value, defaults[key], key, WHERE)
    return options


def variant_from_options(options: dict) -> Variant:
    """The variant the options describe, checked before any model is loaded."""
    get_backend(options["backend"])
    spec = parse_spec(
        str(options["spec"]), backend=options["backend"], include=options["include"], exclude=options["exclude"],
        quantize_lm_head=options["quantize_lm_head"], bnb_threshold=options["bnb_threshold"],
        calibration_samples=options["calib_samples"],
    )
    policy = MassivePolicy(
        options["massive"], options["massive_detection"],
        MassiveCriteria(options["massive_threshold"], options["massive_ratio"]),
    ).validate()
    mitigations = parse_mitigations(options["mitigation"].replace(";", ","))
    if len(mitigations) != 1:
        raise UserError(
            f"{WHERE}: mitigation='{options['mitigation']}' names {len(mitigations)} variants; a model is one variant "
            "(combine mitigations with '+'; compare variants with massquant eval --mitigation)"
        )
    return Variant(None if spec.is_identity else spec, policy, tuple(mitigations[0]))


def check_option_values(options: dict) -> ModelConfig | None:
    """The ranges ``massquant eval`` enforces on the same flags; returns the loading config (None for a loaded model)."""
    check_int(options["calib_samples"], f"{WHERE}: calib_samples", high=MAX_SEQUENCES)
    check_int(options["calib_seq_len"], f"{WHERE}: calib_seq_len")
    check_int(options["seed"], f"{WHERE}: seed", low=0, high=MAX_SEED)
    if not 0 <= options["bnb_threshold"] < float("inf"):
        raise UserError(f"{WHERE}: bnb_threshold must be a finite number >= 0; got {options['bnb_threshold']}")
    for key in ("max_length", "batch_size", "max_batch_size"):
        value = options.get(key)
        if value is not None and not (key.endswith("batch_size") and str(value).startswith("auto")):
            check_int(coerce(value, 0, key, WHERE), f"{WHERE}: {key}")
    if isinstance(options["pretrained"], LoadedModel):
        return None
    config = ModelConfig(
        model=str(options["pretrained"]), dtype=options["dtype"], device=_device(options["device"]),
        trust_remote_code=options["trust_remote_code"], attn_implementation=options["attn_implementation"],
    )
    config.validate()
    return config


def check_model_args(arguments: dict) -> None:
    """Everything in model_args that can be wrong, checked before lm-eval starts and before the model loads:
    keys, values and their ranges, and the variant against the model's config and shapes."""
    from massquant.validation import Plan, not_applicable, require_runnable

    options = model_options(arguments)
    config = check_option_values(options)
    variant = variant_from_options(options)
    bos_policy(options["bos"], options["add_bos_token"])
    if config is not None:
        Plan(config, [variant])
    else:
        require_runnable([variant], not_applicable(options["pretrained"], [variant]))


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


def bos_tokenizer(tokenizer, policy: str):
    """A copy of ``tokenizer`` that prepends BOS to lm-eval's prompts exactly when ``policy`` says.

    ``auto`` prepends the tokenizer's BOS when it has one, as massquant's
    perplexity windows do (SmolLM2's tokenizer adds none by itself, so lm-eval's
    plain ``hf`` model scores it without). Returns (tokenizer, prepends) where
    ``prepends`` is HFLM's ``add_bos_token``.
    """
    if policy not in BOS_POLICIES:
        raise UserError(f"unknown BOS policy '{policy}'; accepted: {', '.join(BOS_POLICIES)}")
    bos = tokenizer.bos_token_id
    if policy == "always" and bos is None:
        raise UserError("bos=always: this tokenizer has no BOS token; use bos=never or auto")
    prepends = policy != "never" and bos is not None
    configured = copy.deepcopy(tokenizer)  # the loaded tokenizer keeps its own behaviour for perplexity windows
    configured.add_bos_token = prepends
    if prepends and configured("BOS check").input_ids[:1] != [bos]:
        raise UserError(f"cannot make the tokenizer {type(tokenizer).__name__} prepend its BOS token; use bos=never")
    return configured, prepends


@contextlib.contextmanager
def weights_left_as_they_are(model):
    """While HFLM wraps ``model``: HFLM re-ties the output projection to the input embedding, which would
    put the full-precision embedding back in place of an output projection massquant quantized
    (--quantize-lm-head on a model with tied embeddings). A loaded model is tied already."""
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights


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
class MassquantLM(HFLM):
    """HFLM over a massquant variant of a model: ``MassquantLM(pretrained="smollm2-135m", spec="w8a8")``.

    ``pretrained`` is a massquant model reference (alias, .gguf, directory, hub
    id) or an already loaded ``LoadedModel``, which is then changed in place
    until ``restore()``.
    """

    def __init__(self, pretrained: str | LoadedModel = DEFAULT_MODEL, **model_args) -> None:
        check_model_args({"pretrained": pretrained, **model_args})  # the one validation pass, before loading
        options = model_options({"pretrained": pretrained, **model_args})
        variant = variant_from_options(options)
        policy = bos_policy(options["bos"], options["add_bos_token"])
        if isinstance(options["pretrained"], LoadedModel):
            given = [key for key in LOADING_ARGS if key in model_args]
            if given:
                raise UserError(f"{WHERE}: {', '.join(given)} apply when loading; pretrained is an already loaded model")
            loaded = options["pretrained"]
        else:
            config = ModelConfig(
                model=str(options["pretrained"]), dtype=options["dtype"], device=_device(options["device"]),
                trust_remote_code=options["trust_remote_code"], attn_implementation=options["attn_implementation"],
            )
            config.validate()
            loaded = load_model(config)
        tokenizer, prepends = bos_tokenizer(loaded.tokenizer, policy)
        calibration = None
        if variant.needs_calibration:
            calibration = calibration_batch(
                loaded.tokenizer, options["calib_data"], options["calib_samples"], options["calib_seq_len"],
                options["seed"], bos=prepends,
            )
        self.quantization = apply_variant(loaded, variant, calibration)
        hflm_settings = {key: options[key] for key in HFLM_ARGS if options.get(key) is not None}
        try:
            with weights_left_as_they_are(self.quantization.model):
                super().__init__(pretrained=self.quantization.model, tokenizer=tokenizer, add_bos_token=prepends, **hflm_settings)
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
            "bos": policy,
            "bos_token_id": tokenizer.bos_token_id if prepends else None,
            "calibration": (
                {"data": options["calib_data"], "samples": options["calib_samples"], "seq_len": options["calib_seq_len"], "seed": options["seed"]}
                if calibration is not None else None
            ),
        }

    def restore(self) -> None:
        """Undo the mitigation and quantization applied to the model (matters when it was passed in loaded)."""
        self.quantization.undo()

    def get_model_info(self) -> dict:
        """lm-eval stores this under results['config']: what massquant did to the model, BOS policy included."""
        return {**super().get_model_info(), "model_sha": self.massquant["fingerprint"], "massquant": self.massquant}
