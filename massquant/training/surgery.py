"""Training-time mitigations on a model: choose, apply, record in its config, re-apply on load.

A model trained with a mitigation carries new modules (DyT norms, head gates,
k′/v′). ``apply_surgery`` adds them and records the choices under
``config.massquant_mitigations``, so the saved ``config.json`` says how to
rebuild the module tree before the weights load (``reapply_recorded_surgery``).
"""

from __future__ import annotations

import torch

from massquant.config import coerce, unknown_key_error
from massquant.errors import UserError
from massquant.mitigations import MitigationChoice, check_applicable, get_mitigation, parse_mitigations, registry

RECORD_KEY = "massquant_mitigations"


def trainable_names() -> list[str]:
    """Mitigations usable by ``massquant train``: those whose module defines ``surgery``."""
    return [name for name, entry in registry().items() if entry.trainable]


def training_choices(text: str) -> list[MitigationChoice]:
    """``"tvr+dyt:alpha=0.8"`` -> the choices applied together; ``"none"`` -> []."""
    variants = parse_mitigations(text)
    if len(variants) != 1:
        raise UserError(
            f"recipe mitigation '{text}' names {len(variants)} variants; train one combination at a time (join with '+')"
        )
    for choice in variants[0]:
        entry = get_mitigation(choice.name)
        if not entry.trainable:
            raise UserError(
                f"mitigation '{choice.name}' has no training-time form; accepted: none, {', '.join(trainable_names())}"
            )
        if (check := entry.hook("check_params")) is not None:  # bad values fail before any model loads
            check(choice.params)
    return variants[0]


def recorded_choices(config) -> list[MitigationChoice]:
    """The choices a model's config records (``[]`` for a plain model)."""
    choices = []
    for record in getattr(config, RECORD_KEY, None) or []:
        entry = get_mitigation(record["name"])
        where = f"{RECORD_KEY} entry '{entry.name}'"
        params = dict(entry.parameters)
        for key, value in record.get("params", {}).items():
            if key not in params:
                raise unknown_key_error(key, entry.parameters, where)
            params[key] = coerce(value, entry.parameters[key], key, where)
        choices.append(MitigationChoice(entry.name, params))
    return choices


def _record(config, choices: list[MitigationChoice]) -> None:
    setattr(config, RECORD_KEY, [{"name": c.name, "params": {k: list(v) if isinstance(v, tuple) else v for k, v in c.params.items()}} for c in choices])


def _surgery(model, choice: MitigationChoice, calibration: torch.Tensor | None):
    """One choice's surgery; a mitigation that fits its start from data (``needs_calibration``) gets the sequences."""
    entry = get_mitigation(choice.name)
    if entry.kind == "training" and entry.needs_calibration:
        return entry.implementation().surgery(model, choice.params, calibration=calibration)
    return entry.implementation().surgery(model, choice.params)


def apply_surgery(model, choices: list[MitigationChoice], calibration: torch.Tensor | None = None) -> dict:
    """Add each choice's modules, in order, and record them (after any the model already carries).

    Returns what each surgery reported (e.g. DyT's fitted alphas), by name.
    """
    check_applicable(model, choices)
    carried = recorded_choices(model.config)
    repeated = {c.name for c in carried} & {c.name for c in choices}
    if repeated:
        raise UserError(f"the model already carries mitigation(s) {', '.join(sorted(repeated))}; a surgery cannot be applied twice")
    reports = {}
    for choice in choices:
        report = _surgery(model, choice, calibration)
        if report:
            reports[choice.name] = report
    _record(model.config, carried + choices)
    return reports


def reapply_recorded_surgery(model) -> None:
    """Rebuild the modules a checkpoint's config records, on a freshly built model, before its weights load."""
    for choice in recorded_choices(model.config):
        _surgery(model, choice, None)
