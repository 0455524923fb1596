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
import lm_eval.models.huggingface as hflm_module
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from massquant.backends import get_backend
from massquant.config import MAX_SEED, MAX_SEQUENCES, check_int, coerce, unknown_key_error
from massquant.data.calibration import DEFAULT_CALIBRATION_TEXT, calibration_batch
from massquant.errors import UserError
from massquant.evaluation.perplexity import BOS_POLICIES
from massquant.lmeval.parallel import check_identical_weights, gathered, join_processes
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


def context_token(tokenizer, policy: str, requested: int | None) -> int:
    """The token lm-eval conditions a rolling window's first token (and an empty context) on.

    With BOS (auto/always) it is BOS, so a rolling window is exactly a
    perplexity window ``[BOS, text...]``. Under ``never`` no BOS may appear, so
    it is ``requested`` (HFLM's ``prefix_token_id``) or else the tokenizer's
    EOS, the document boundary GPT-style models are trained on.

    Raises UserError when the policy cannot be honoured (no such token, or it is BOS).
    """
    bos = tokenizer.bos_token_id
    if policy != "never" and bos is not None:
        if requested is not None and requested != bos:
            raise UserError(f"{WHERE}: prefix_token_id={requested} contradicts bos={policy} (BOS is id {bos}); use bos=never")
        return bos
    chosen = tokenizer.eos_token_id if requested is None else requested
    if chosen is None or (bos is not None and chosen == bos):
        raise UserError(
            f"{WHERE}: bos={policy} cannot be honoured: rolling and empty-context requests need a first token that is "
            f"not BOS (id {bos}) and this tokenizer's EOS is {tokenizer.eos_token_id}; pass prefix_token_id=ID"
            + (" or use bos=auto" if bos is not None else "")
        )
    return chosen


@contextlib.contextmanager
def input_lengths_recorded(lengths: list[list[int]]):
    """While HFLM pads a loglikelihood batch (right padding, in ``pad_and_concat``), append the
    rows' real lengths to ``lengths``: ``_model_call`` receives only the padded tensor."""
    original = hflm_module.pad_and_concat

    def recording(max_length, tensors, padding_side="right"):
        lengths.append([len(tensor) for tensor in tensors])
        return original(max_length, tensors, padding_side=padding_side)

    hflm_module.pad_and_concat = recording
    try:
        yield
    finally:
        hflm_module.pad_and_concat = original


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


class InvariantHFLM(HFLM):
    """lm-eval's HFLM over a model in memory that feeds exactly the tokens a BOS policy names and scores
    every request on its own, so no score depends on the batch a request came in.

    ``policy`` is auto|always|never (see ``bos_tokenizer`` and ``context_token``);
    ``hflm_settings`` are HFLM's (``batch_size``, ``max_length``, ``prefix_token_id``, ...).
    ``bos_tokens`` records the token ids used. Each request runs alone because a
    padded batch changes GEMM shapes, hence float rounding, which flips int8
    rounding ties in quantized rows; the price is the throughput batching would
    buy (not measured here; it matters most on a GPU).
    """

    def __init__(self, model, tokenizer, policy: str, **hflm_settings) -> None:
        configured, prepends = bos_tokenizer(tokenizer, policy)
        prefix = context_token(tokenizer, policy, hflm_settings.pop("prefix_token_id", None))
        self._input_lengths: list[list[int]] = []
        self._rolling = False
        with weights_left_as_they_are(model):
            super().__init__(pretrained=model, tokenizer=configured, add_bos_token=prepends, prefix_token_id=prefix, **hflm_settings)
        self.bos_tokens = {
            "bos": policy,
            "bos_token_id": configured.bos_token_id if prepends else None,
            "prefix_token_id": prefix,
            "requests_per_forward": 1,
        }
        self.requests_scored: dict[str, int] = {}
        self.data_parallel = self._join_processes(model)

    def _join_processes(self, model) -> dict | None:
        """Under ``accelerate launch``: take this process's rank so lm-eval shards the requests (see
        ``massquant.lmeval.parallel``), after checking every rank holds the same weights."""
        accelerator = join_processes(cpu=model.device.type == "cpu")
        if accelerator is None:
            return None
        self.accelerator = accelerator
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        hashes = check_identical_weights(model)
        log.info("rank %d of %d: weights sha256 %s", self._rank, self._world_size, hashes[self._rank])
        return {"processes": self._world_size, "weights_sha256_per_rank": hashes, "requests_per_rank": None}

    def barrier(self) -> None:
        """lm-eval's wait after each request type, on every rank; the ranks also share how many requests each scored."""
        super().barrier()
        if self.data_parallel is not None:
            self.data_parallel["requests_per_rank"] = gathered(dict(self.requests_scored))

    def _count(self, kind: str, requests) -> None:
        self.requests_scored[kind] = self.requests_scored.get(kind, 0) + len(requests)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._count("loglikelihood", requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        self._count("generate_until", requests)
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def get_model_info(self) -> dict:
        """HFLM's, plus, under data parallelism, each rank's weight hash and request counts."""
        info = super().get_model_info()
        return info if self.data_parallel is None else {**info, "data_parallel": self.data_parallel}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As HFLM's, except that a rolling request's text gets no BOS of its own: its windows start with
        the context token (BOS under auto/always), so the model sees ``[BOS, text...]``, never ``[BOS, BOS, ...]``."""
        if self._rolling and add_special_tokens is None:
            add_special_tokens = False
        return super().tok_encode(string, add_special_tokens=add_special_tokens, **kwargs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._count("loglikelihood_rolling", requests)
        self._rolling = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self._rolling = False

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        self._input_lengths.clear()
        with input_lengths_recorded(self._input_lengths):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits ``[batch, padded length, vocab]``, each request run alone at its own length.

        A request's numbers then never depend on the batch it came in (other
        requests, padding, the GEMM shapes they make); positions past a
        request's end are zero and HFLM never reads them.
        """
        if attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask, labels)
        lengths = self._input_lengths.pop(0) if self._input_lengths else None
        if lengths is None or len(lengths) != len(inps):  # e.g. HFLM's batch-size probe: no padding
            lengths = [inps.shape[1]] * len(inps)
        call = super()._model_call
        rows = [call(inps[index : index + 1, :length]) for index, length in enumerate(lengths)]
        logits = rows[0].new_zeros(len(inps), inps.shape[1], rows[0].shape[-1])
        for index, (row, length) in enumerate(zip(rows, lengths)):
            logits[index, :length] = row[0]
        return logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """Greedy continuations ``[batch, context length + new tokens]``, each request generated alone from its
        unpadded context, then laid out as HFLM expects (contexts left-padded, continuations padded after)."""
        mask = generation_kwargs.pop("attention_mask", None)
        mask = torch.ones_like(context) if mask is None else mask.bool()
        pad = self.tokenizer.pad_token_id
        rows = []
        for row, real in zip(context, mask):
            alone = row[real][None]
            generated = super()._model_generate(
                alone, max_length - (context.shape[1] - alone.shape[1]), stop, attention_mask=torch.ones_like(alone), **dict(generation_kwargs)
            )
            rows.append(generated[0, alone.shape[1] :])
        width = context.shape[1] + max(len(row) for row in rows)
        output = context.new_full((len(rows), width), pad)
        output[:, : context.shape[1]] = context
        for index, row in enumerate(rows):
            output[index, context.shape[1] : context.shape[1] + len(row)] = row
        return output


@register_model("massquant")
class MassquantLM(InvariantHFLM):
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
            join_processes(cpu=config.device == "cpu")  # launched: this rank's GPU becomes the current one before loading
            loaded = load_model(config)
        context_token(loaded.tokenizer, policy, model_args.get("prefix_token_id"))  # refused before any calibration
        prepends = bos_tokenizer(loaded.tokenizer, policy)[1]
        calibration = None
        if variant.needs_calibration:
            calibration = calibration_batch(
                loaded.tokenizer, options["calib_data"], options["calib_samples"], options["calib_seq_len"],
                options["seed"], bos=prepends,
            )
        self.quantization = apply_variant(loaded, variant, calibration)
        hflm_settings = {key: options[key] for key in HFLM_ARGS if options.get(key) is not None}
        try:
            super().__init__(self.quantization.model, loaded.tokenizer, policy, **hflm_settings)
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
