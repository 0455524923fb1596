"""The one validation pass before any forward, shared by every command and the lm-eval model.

Each configuration (a ``Variant``: mitigation + massive policy + spec) is
checked against the model's architecture and real shapes *before the weights
load*: the config comes from ``config.json`` (or, for a GGUF file, the config
remembered from its header the first time it was loaded, keyed by path, size
and mtime), and a skeleton of the model is built on PyTorch's meta device, so
module names, layer widths and head sizes are the real ones at no memory cost.
Where no config can be read before loading (a hub id, a GGUF never loaded,
remote code), the same checks run on the loaded model, still before any
forward pass.

In a grid, a configuration that cannot run on this model is a row marked
"not applicable: <why>"; only when no requested configuration can run is it an
error. What is wrong whatever the model (a training-time mitigation in eval, a
missing backend library) is an error at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from massquant.errors import UserError
from massquant.models import cache
from massquant.models.loading import ModelConfig, _Resolved, checkpoint_model_class, resolve_reference
from massquant.variants import Variant, check_variant_on_model, check_variant_settings

NOT_APPLICABLE = "not applicable"


@dataclass
class ModelFacts:
    """What checks need of a model, without its weights: the config and a meta-device skeleton."""

    model: torch.nn.Module  # parameters on the meta device: shapes and module names only
    tokenizer: object = None

    @property
    def config(self):
        return self.model.config


def _read_config(resolved: _Resolved, trust_remote_code: bool):
    from transformers import AutoConfig

    if resolved.kind == "directory":
        try:
            return AutoConfig.from_pretrained(resolved.path_or_id, trust_remote_code=trust_remote_code)
        except Exception:  # unreadable here: loading says why, in its own words
            return None
    if resolved.gguf_file:
        # transformers parses a GGUF's whole header (tokenizer included) to build a config: seconds per read.
        try:
            mapping = json.loads(cache.config_file(Path(resolved.path_or_id) / resolved.gguf_file).read_text(encoding="utf-8"))
            return AutoConfig.for_model(**mapping)
        except Exception:
            return None
    return None  # a hub id: offline there is nothing to read before loading


def model_facts(config: ModelConfig) -> ModelFacts | None:
    """The model's skeleton before its weights load; None when it cannot be had cheaply (checks then run after loading)."""
    resolved = resolve_reference(config.model)
    hf_config = _read_config(resolved, config.trust_remote_code)
    if hf_config is None:
        return None
    from transformers import AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM
        if resolved.kind == "directory":
            model_class = checkpoint_model_class(resolved.path_or_id) or AutoModelForCausalLM
        with torch.device("meta"):
            skeleton = (
                model_class.from_config(hf_config, trust_remote_code=config.trust_remote_code)
                if model_class is AutoModelForCausalLM else model_class._from_config(hf_config)
            )
    except Exception:  # a config transformers cannot build: loading reports it
        return None
    return ModelFacts(skeleton)


def named(variant: Variant, message: str) -> str:
    """``message`` naming the configuration it is about (most checks already name the spec or mitigation)."""
    names = [f"'{choice.name}'" for choice in variant.mitigation]
    if variant.spec is not None:
        names.append(f"'{variant.spec.name}'")
    return message if any(name in message for name in names) else f"{variant.name}: {message}"


def not_applicable(target, variants: list[Variant]) -> list[str | None]:
    """For each variant: None when it can run on ``target`` (a loaded model or ModelFacts), else why not."""
    for variant in variants:
        check_variant_settings(variant)
    reasons = []
    for variant in variants:
        try:
            check_variant_on_model(target, variant)
        except UserError as error:
            reasons.append(named(variant, str(error)))
        else:
            reasons.append(None)
    return reasons


def require_runnable(variants: list[Variant], reasons: list[str | None]) -> None:
    """A grid where no requested configuration (the baseline aside) can run is an error, naming why."""
    requested = [reason for variant, reason in zip(variants, reasons) if not variant.is_baseline]
    if requested and all(requested):
        unique = list(dict.fromkeys(requested))
        raise UserError(unique[0] if len(unique) == 1 else f"no configuration can run on this model: {'; '.join(unique)}")


class Plan:
    """Which of ``variants`` can run on a model: decided before its weights load when the config allows,
    otherwise by ``settle(loaded)`` right after loading; either way before any forward."""

    def __init__(self, model_config: ModelConfig, variants: list[Variant]):
        self.variants = variants
        for variant in variants:  # model-independent errors first, before reading anything
            check_variant_settings(variant)
        self.facts = model_facts(model_config)
        self.reasons = self._decide(self.facts) if self.facts is not None else None

    def _decide(self, target) -> list[str | None]:
        reasons = not_applicable(target, self.variants)
        require_runnable(self.variants, reasons)
        return reasons

    def settle(self, loaded) -> list[str | None]:
        if self.reasons is None:
            self.reasons = self._decide(loaded)
        return self.reasons

    def target(self, loaded=None):
        """The skeleton when there is one, else the loaded model: what other before-forward checks read."""
        return self.facts if self.facts is not None else loaded


def not_applicable_row(variant: Variant, reason: str) -> dict:
    """The row of a configuration that cannot run on this model: what it was, and why not."""
    return {"config": variant.name, **variant.describe(), "not_applicable": reason}
