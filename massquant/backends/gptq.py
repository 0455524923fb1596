"""GPTQ through transformers' GPTQConfig (optimum + gptqmodel, torch kernel on CPU).

GPTQ quantizes while loading, so the in-memory float model (which may come from a
GGUF file or carry in-memory changes) is saved to a temporary directory and loaded
again from there with a GPTQConfig. The result is a new model; the loaded one is
left untouched, so ``undo`` only has to drop the new model's files.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict

import torch
from optimum.gptq.utils import get_block_name_with_pattern
from transformers import AutoModelForCausalLM, GPTQConfig

from massquant.backends import AppliedQuantization
from massquant.wrapping.selection import check_group_divides, select_linears
from massquant.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED = "integer weights only, w2/w3/w4/w8 with gN (N dividing every selected layer's input width) or -channel, -sym/-asym"


def _unsupported(spec, reason: str) -> UserError:
    return UserError(f"backend gptq cannot do '{spec.name}' ({reason}); supported: {SUPPORTED}")


def _group_size(spec) -> int:
    """GPTQConfig's group_size: the spec's group, or -1 (one group per output channel)."""
    weights = spec.weights
    if spec.activations is not None or spec.kv_cache is not None:
        raise _unsupported(spec, "GPTQ quantizes weights only")
    if weights is None:
        raise _unsupported(spec, "no weight quantization requested")
    if weights.format != "int" or weights.bits not in SUPPORTED_BITS:
        raise _unsupported(spec, f"{weights.format} {weights.bits}-bit weights")
    if weights.clip_search:
        raise _unsupported(spec, "GPTQ chooses its own rounding; no -mse clip search")
    if weights.granularity == "tensor":
        raise _unsupported(spec, "per-tensor scales")
    return weights.group_size if weights.granularity == "group" else -1


def _selected_linears(model, spec, group_size: int) -> list:
    if spec.quantize_lm_head:
        raise UserError("backend gptq cannot quantize the lm_head (optimum's GPTQ only quantizes decoder blocks); drop --quantize-lm-head or use another backend")
    selected = select_linears(model, spec)
    check_group_divides(spec, selected, group_size, "try g64 or g32")
    return selected


def _modules_in_block(model, selected) -> list[list[str]] | None:
    """The selection as GPTQConfig's per-block module list (None = every linear of every block).

    optimum quantizes only the linears inside the repeated decoder blocks and applies one
    list of block-relative names to every block; selections it cannot express are refused.
    """
    block_prefix = get_block_name_with_pattern(model) + "."
    outside = [name for name, _ in selected if not name.startswith(block_prefix)]
    if outside:
        raise UserError(f"backend gptq only quantizes linears inside '{block_prefix[:-1]}'; the spec also selects {outside}")
    per_block = defaultdict(list)
    for name, _ in selected:
        block_index, _, relative_name = name[len(block_prefix):].partition(".")
        per_block[block_index].append(relative_name)
    block_count = len(model.get_submodule(block_prefix[:-1]))
    first = next(iter(per_block.values()))
    if len(per_block) != block_count or any(names != first for names in per_block.values()):
        raise UserError(
            "backend gptq applies one module list to every block; the spec's include/exclude select "
            "different modules in different blocks (use patterns that ignore the block index, e.g. 'mlp\\.')"
        )
    every_linear = [
        relative_name
        for relative_name, module in model.get_submodule(block_prefix + "0").named_modules()
        if type(module) is torch.nn.Linear
    ]
    return None if first == every_linear else [[relative_name] for relative_name in first]


def _calibration_texts(tokenizer, calibration: torch.Tensor | None) -> list[str]:
    if calibration is None or len(calibration) == 0:
        raise UserError("backend gptq needs calibration text: pass a calibration data set (GPTQ fits weights to its activations)")
    return tokenizer.batch_decode(calibration.tolist(), skip_special_tokens=True)


def _plan(loaded, spec) -> tuple[int, list, list | None]:
    """The group size, the selected linears and gptqmodel's per-block module list."""
    group_size = _group_size(spec)
    selected = _selected_linears(loaded.model, spec, group_size)
    return group_size, selected, _modules_in_block(loaded.model, selected)


def check(loaded, spec) -> None:
    """Refuse what GPTQ cannot do before any work."""
    _plan(loaded, spec)


def apply(loaded, spec, calibration: torch.Tensor | None) -> AppliedQuantization:
    group_size, selected, modules_in_block = _plan(loaded, spec)
    texts = _calibration_texts(loaded.tokenizer, calibration)
    config = GPTQConfig(
        bits=spec.weights.bits,
        group_size=group_size,
        dataset=texts,
        tokenizer=loaded.tokenizer,
        desc_act=False,
        # Group-aware activation ordering needs groups; gptqmodel refuses it per channel.
        act_group_aware=group_size > 0,
        sym=spec.weights.symmetric,
        # "torch" checkpoints reload and run on CPU; "auto" picks kernels that do not.
        backend="torch",
        modules_in_block_to_quantize=modules_in_block,
    )
    directory = tempfile.mkdtemp(prefix="massquant-gptq-")
    try:
        loaded.model.save_pretrained(directory)
        loaded.tokenizer.save_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            quantization_config=config,
            dtype=torch.float32,
            device_map="cpu",
            attn_implementation=loaded.config.attn_implementation,
            trust_remote_code=loaded.config.trust_remote_code,
        )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    model.eval()

    def undo() -> None:
        shutil.rmtree(directory, ignore_errors=True)

    return AppliedQuantization(
        model=model,
        undo=undo,
        summary={
            "backend": "gptq",
            "modules": len(selected),
            "bits": spec.weights.bits,
            "group_size": group_size,
            "symmetric": spec.weights.symmetric,
            "calibration_sequences": len(texts),
        },
    )
