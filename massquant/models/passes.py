"""The one "hooks over calibration rows" pass: forward passes, one sequence at a time, with hooks attached."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

# (module, "forward" | "pre", hook): torch's forward hook (module, inputs, output) or pre-hook (module, inputs)
Hook = tuple[torch.nn.Module, str, Callable]


@contextlib.contextmanager
def hooks_attached(hooks: Iterable[Hook]):
    """Attach ``hooks`` for the duration of the block; every one is removed, also on error."""
    handles = []
    try:
        for module, kind, hook in hooks:
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handles.append(register(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def run_sequences(
    model: torch.nn.Module, sequences: torch.Tensor, hooks: Iterable[Hook] = (), description: str = "calibration",
    before_each: Callable[[int, torch.Tensor], None] | None = None, progress: bool = True,
) -> None:
    """One forward pass per row of ``sequences`` ([n, seq_len] token ids) with ``hooks`` attached.

    A row alone is a batch of one, so no statistic a hook gathers sees padding or another sequence.
    ``before_each(index, row)`` runs before each pass (a hook's per-sequence state). Shows a tqdm bar.
    """
    device = next(model.parameters()).device
    with hooks_attached(hooks):
        for index, row in enumerate(tqdm(sequences, desc=description, unit="seq", leave=False, disable=not progress)):
            if before_each is not None:
                before_each(index, row)
            model(input_ids=row[None].to(device), use_cache=False)
