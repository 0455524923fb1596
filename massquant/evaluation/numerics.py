"""Where a forward pass first goes non-finite: named, so a NaN perplexity comes with its cause."""

from __future__ import annotations

import torch


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((t for t in output if isinstance(t, torch.Tensor)), None)
    return getattr(output, "logits", None) if hasattr(output, "logits") else None


@torch.inference_mode()
def first_non_finite_module(model: torch.nn.Module, input_ids: torch.Tensor) -> str | None:
    """Name of the first module (in execution order) whose output holds NaN or inf for ``input_ids``.

    Forward hooks fire when a module finishes, children before their parent, so
    the first hit is the innermost module where the values broke.
    """
    found: list[str] = []

    def hook(name):
        def check(_module, _inputs, output):
            tensor = _first_tensor(output)
            if not found and tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                found.append(name)

        return check

    handles = [module.register_forward_hook(hook(name or "model")) for name, module in model.named_modules()]
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None
