"""Checkpoints of trained models: ordinary Hugging Face directories that rebuild their extra modules on load.

Two ways back in, both running the same ``reapply_recorded_surgery`` inside
the model's ``__init__`` (so the new parameters exist when the weights load):

- ``massquant.models.loading.load_model(DIR)`` (and every massquant command's
  ``--model DIR``) picks ``model_class_with_surgery(<base class>)`` for a
  directory whose config records mitigations; massquant's installed code
  runs, so no ``trust_remote_code`` is needed;
- ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` finds
  ``auto_map`` in config.json and imports ``modeling_massquant.py``, a
  five-line subclass written into the checkpoint (massquant must be installed).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from massquant.models.loading import CHECKPOINT_CLASS_READERS
from massquant.training.surgery import RECORD_KEY, reapply_recorded_surgery

REMOTE_MODULE = "modeling_massquant"
_REMOTE_SOURCE = '''"""Written by massquant: rebuilds this checkpoint's training-time mitigations (config.json
"{record_key}") before the weights load. Needs massquant installed."""
from {base_module} import {base}

from massquant.training.checkpoint import reapply_recorded_surgery


class {name}({base}):
    massquant_base = {base}

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        reapply_recorded_surgery(self)
'''


def _class_name(base: type) -> str:
    return f"Massquant{base.__name__}"


@cache
def model_class_with_surgery(base: type) -> type:
    """A subclass of ``base`` (e.g. LlamaForCausalLM) whose ``__init__`` re-applies the recorded surgery."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        reapply_recorded_surgery(self)

    return type(_class_name(base), (base,), {"__init__": __init__, "__module__": __name__, "massquant_base": base})


def recorded_model_class(directory: str | Path) -> type | None:
    """For a directory whose config.json records mitigations: the class that rebuilds them; otherwise None."""
    config_file = Path(directory) / "config.json"
    if RECORD_KEY not in json.loads(config_file.read_text()):
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    return model_class_with_surgery(AutoModelForCausalLM._model_mapping[type(config)])


CHECKPOINT_CLASS_READERS.append(recorded_model_class)  # load_model(DIR) rebuilds trained checkpoints


def save_checkpoint(model, tokenizer, directory: str | Path) -> Path:
    """``save_pretrained`` of model and tokenizer, plus the remote-code module named in ``auto_map``."""
    from massquant.reporting.results import writing

    directory = Path(directory)
    with writing(directory / "config.json"):  # a full disk is one line, not a traceback
        return _save_checkpoint(model, tokenizer, directory)


def _save_checkpoint(model, tokenizer, directory: Path) -> Path:
    base = getattr(type(model), "massquant_base", type(model))
    recorded = getattr(model.config, RECORD_KEY, None)
    if recorded:
        model.config.auto_map = {"AutoModelForCausalLM": f"{REMOTE_MODULE}.{_class_name(base)}"}
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if recorded:
        source = _REMOTE_SOURCE.format(record_key=RECORD_KEY, base_module=base.__module__, base=base.__name__, name=_class_name(base))
        (directory / f"{REMOTE_MODULE}.py").write_text(source)
    return directory
