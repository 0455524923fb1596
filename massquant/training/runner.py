"""One training run from a recipe: evaluate, operate, train, checkpoint, reload, evaluate again.

Stages of the evaluation (each row of the results carries its ``stage``):
``before`` (the model as loaded), ``surgery`` (with the new modules, before
any training step; full precision only) and ``after`` (the checkpoint as
reloaded from disk, so the numbers describe the saved files).
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict
from pathlib import Path

import torch

from massquant.data.calibration import calibration_batch
from massquant.data.text import load_text, text_fingerprint
from massquant.errors import UserError
from massquant.evaluation.perplexity import PerplexityConfig, build_windows
from massquant.evaluation.runner import evaluate_variant
from massquant.mitigations import check_applicable, get_mitigation, variant_label
from massquant.models.architectures import architecture_of
from massquant.models.loading import DTYPES, LoadedModel, load_model, max_sequence_length, resolve_reference
from massquant.quantizers.spec import parse_spec
from massquant.reporting.results import environment, write_json_atomic
from massquant.training.checkpoint import save_checkpoint
from massquant.training.loop import train, training_windows
from massquant.training.recipe import TrainRecipe
from massquant.training.surgery import apply_surgery, training_choices
from massquant.variants import Variant

CHECKPOINT = "checkpoint"
RESULTS = "results.json"


def _read_for_scratch(recipe, auto_class, what: str):
    """``auto_class.from_pretrained`` on ``recipe.model.model``'s reference (a GGUF file too); a failure is one line."""
    resolved = resolve_reference(recipe.model.model)
    source = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        return auto_class.from_pretrained(resolved.path_or_id, **source)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the {what} of '{recipe.model.model}' for from_scratch: {str(error).splitlines()[0]}") from error


def scratch_config(recipe: TrainRecipe):
    """``recipe.model.model``'s config with the ``from_scratch`` overrides, checked by building the model on the
    meta device (no memory, no weights): a size transformers cannot build is refused before anything runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _read_for_scratch(recipe, AutoConfig, "config")
    for key, value in recipe.from_scratch.items():
        if not hasattr(config, str(key)):
            raise UserError(
                f"recipe from_scratch: '{key}' is not a {type(config).__name__} setting; e.g. hidden_size, "
                "intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim"
            )
        setattr(config, key, value)
    if getattr(config, "quantization_config", None) is not None:  # GGUF metadata; a fresh model is not quantized
        del config.quantization_config
    overrides = ", ".join(f"{key}={value!r}" for key, value in recipe.from_scratch.items())
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, attn_implementation=recipe.model.attn_implementation)
    except Exception as error:  # transformers reports bad sizes as many exception types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"recipe from_scratch ({overrides}) does not make a model: {first}") from None
    bad = [name for name, parameter in skeleton.named_parameters() if parameter.numel() == 0]
    if bad:
        raise UserError(f"recipe from_scratch ({overrides}) makes empty weights ({bad[0]}); sizes must be positive")
    return config, skeleton


def build_from_scratch(recipe: TrainRecipe) -> LoadedModel:
    """A randomly initialised model: ``recipe.model.model``'s architecture and tokenizer, its config overridden."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, _ = scratch_config(recipe)
    tokenizer = _read_for_scratch(recipe, AutoTokenizer, "tokenizer")
    torch.manual_seed(recipe.train.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[recipe.model.dtype], attn_implementation=recipe.model.attn_implementation)
    if recipe.model.device == "cuda" or (recipe.model.device == "auto" and torch.cuda.is_available()):
        model.to("cuda")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model.eval(), tokenizer=tokenizer, config=recipe.model,
        source=f"{recipe.model.model} (from scratch)", fingerprint=f"scratch:seed={recipe.train.seed}",
    )


class TrainingRun:
    """The state one ``massquant train`` run accumulates, saved as JSON after every stage."""

    def __init__(self, recipe: TrainRecipe, out: Path):
        self.recipe = recipe
        self.out = out
        self.choices = training_choices(recipe.mitigation)
        self.specs = [parse_spec(text) for text in (recipe.eval.spec if recipe.eval else [])]
        self.payload = {
            "command": "train",
            "recipe": asdict(recipe),
            "mitigation": variant_label(self.choices),
            "rows": [],
            "massive": {},
            "environment": environment(),
        }

    def check(self) -> None:
        """Before the output folder is made or a weight loads: the mitigations against the architecture, the
        evaluation specs against the model's shapes (from its config, or the from_scratch skeleton)."""
        from massquant.validation import ModelFacts, model_facts

        facts = ModelFacts(scratch_config(self.recipe)[1]) if self.recipe.from_scratch is not None else model_facts(self.recipe.model)
        if facts is None:
            return  # checked on the loaded model in run(), before any forward
        self._check_on(facts)

    def _check_on(self, target) -> None:
        from massquant.validation import not_applicable

        check_applicable(target.model, self.choices)
        if self.choices:  # every training-time mitigation works on decoder layers named in architectures.py
            try:
                architecture_of(target.model)
            except UserError as error:
                raise UserError(f"mitigation '{variant_label(self.choices)}': {error}") from None
        for reason in not_applicable(target, [Variant(spec) for spec in self.specs]):
            if reason:
                raise UserError(f"recipe eval.spec: {reason}")

    def save(self) -> None:
        write_json_atomic(self.out / RESULTS, self.payload)

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(self, stage: str, loaded: LoadedModel, windows, calibration, specs) -> None:
        """Perplexity of the unquantized model and each spec; the mitigation is in the model from ``surgery`` on."""
        settings = self.recipe.eval
        located = settings.n_seqs if settings.locate else 0
        rows = [evaluate_variant(loaded, Variant(spec), windows, calibration, settings.batch_size, outlier_windows=located) for spec in [None, *specs]]
        for row in rows:
            row.update(stage=stage, mitigation=self.payload["mitigation"] if stage != "before" else "none")
            row["delta_ppl"] = row["ppl"] - rows[0]["ppl"]
        self.payload["rows"].extend(rows)
        if located:
            self.payload["massive"][stage] = rows[0]["outliers"]
        self.save()

    def _needs_calibration(self) -> bool:
        fitted = any(get_mitigation(c.name).kind == "training" and get_mitigation(c.name).needs_calibration for c in self.choices)
        return fitted or any(Variant(spec).needs_calibration for spec in self.specs)

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> dict:
        recipe, started = self.recipe, time.perf_counter()
        torch.manual_seed(recipe.train.seed)
        loaded = build_from_scratch(recipe) if recipe.from_scratch is not None else load_model(recipe.model)
        self.payload["model"] = {"reference": recipe.model.model, "source": loaded.source, "fingerprint": loaded.fingerprint}
        self._check_on(loaded)
        tokenizer, model_max = loaded.tokenizer, max_sequence_length(loaded.model)

        windows, skip = None, 0
        if recipe.eval is not None:
            eval_text = load_text(recipe.eval.data)
            config = PerplexityConfig(data=recipe.eval.data, seq_len=recipe.eval.seq_len, max_tokens=recipe.eval.max_tokens, bos=recipe.eval.bos)
            windows = build_windows(tokenizer, eval_text, config, model_max)
            skip = windows.text_tokens if recipe.eval.data == recipe.train.data else 0
            self.payload["eval_data"] = {**asdict(recipe.eval), "text_fingerprint": text_fingerprint(eval_text), "windows": len(windows.input_ids)}
        bos = windows.bos_token_id is not None if windows is not None else tokenizer.bos_token_id is not None
        calibration = None
        if self._needs_calibration():
            settings = recipe.calibration
            calibration = calibration_batch(tokenizer, settings.data, settings.samples, settings.seq_len, recipe.train.seed, bos=bos)

        train_text = load_text(recipe.train.data)
        train_windows = training_windows(tokenizer, train_text, recipe.train, skip, model_max)  # too little text fails here

        if windows is not None:
            self.evaluate("before", loaded, windows, calibration, self.specs)
        self.payload["surgery"] = apply_surgery(loaded.model, self.choices, calibration)
        if windows is not None and self.choices:
            self.evaluate("surgery", loaded, windows, calibration, [])

        checkpoints = self.out / CHECKPOINT
        trained_at = time.perf_counter()
        history = train(
            loaded.model, train_windows, recipe.train, self.choices,
            on_checkpoint=lambda step: save_checkpoint(loaded.model, tokenizer, self.out / f"{CHECKPOINT}-{step}"),
        )
        self.payload["training"] = {
            "windows": len(train_windows),
            "tokens_per_step": recipe.train.batch_size * recipe.train.seq_len,
            "skipped_tokens": skip,
            "text_fingerprint": text_fingerprint(train_text),
            "seconds": time.perf_counter() - trained_at,
            "first_loss": history[0]["loss"],
            "final_loss": history[-1]["loss"],
            "history": history,
        }
        save_checkpoint(loaded.model, tokenizer, checkpoints)
        self.payload["checkpoint"] = str(checkpoints)
        self.save()

        if windows is not None:
            del loaded
            gc.collect()
            reloaded = load_model(recipe.model, model=str(checkpoints))
            self.evaluate("after", reloaded, windows, calibration, self.specs)
        self.payload["seconds"] = time.perf_counter() - started
        self.save()
        return self.payload
