"""Data-parallel lm-eval: processes started by ``accelerate launch`` (or ``torchrun``) each build the same
variant and score a share of the requests through lm-eval's own sharding.

HFLM shards requests by rank only when it builds the model itself; given a
model object it assumes one process. ``InvariantHFLM`` therefore joins the
process group itself (accelerate's ``Accelerator``, gloo on CPU, NCCL on GPUs)
and gives HFLM the rank and world size; lm-eval then builds each rank's share
of the requests (``rank::world_size``), pads the shares to equal length, and
gathers the per-question results on rank 0, which alone writes them.

Every rank builds its variant independently (same seed, calibration text and
located sites), so the ranks must hold bit-identical weights: each hashes its
model's state (weights, calibrated ranges, buffers) and the run stops when any
rank differs.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta

import torch

from massquant.errors import UserError

# lm-eval's own setting: ranks wait for each other across the whole evaluation
PROCESS_GROUP_TIMEOUT = timedelta(weeks=52)


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 outside a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE must be an integer; got '{os.environ['WORLD_SIZE']}'") from None


def join_processes(cpu: bool):
    """accelerate's ``Accelerator`` for this launch, its process group initialised: gloo when the model runs
    on the ``cpu`` (accelerate otherwise treats CPU processes started by torchrun as unrelated), else this
    process's GPU made current, so a model loaded afterwards lands on it. None for a single process."""
    if launched_processes() <= 1:
        return None
    from accelerate import Accelerator, InitProcessGroupKwargs

    return Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)])


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's state_dict: every name, dtype, shape and byte, in order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def gathered(value) -> list:
    """``value`` from every rank, in rank order, on every rank (``torch.distributed.all_gather_object``)."""
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def check_identical_weights(model: torch.nn.Module) -> list[str]:
    """Every rank's weight hash, in rank order; raises UserError on every rank when any two differ."""
    hashes = gathered(state_sha256(model))
    if len(set(hashes)) > 1:
        listed = ", ".join(f"rank {rank}: {digest[:16]}" for rank, digest in enumerate(hashes))
        raise UserError(f"the processes built different variants of the model ({listed}); their scores cannot be pooled")
    return hashes
