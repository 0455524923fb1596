"""The training loop: plain PyTorch AdamW (or Muon for hidden matrices) on next-token loss, warm-up then cosine/linear decay, clipping.

Deterministic for a seed: the batch order comes from a seeded generator and
nothing else draws random numbers (no dropout in the supported models).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from massquant.errors import UserError
from massquant.evaluation.perplexity import PerplexityConfig, build_windows
from massquant.models.loss import token_nll
from massquant.mitigations import MitigationChoice, get_mitigation
from massquant.training.recipe import TrainSettings


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Multiplier of the base learning rate for the update after ``step`` finished updates (0-based).

    Linear warm-up over ``warmup_steps`` to 1, then cosine or linear decay to
    ``min_lr_ratio`` at the last step (or constant).
    """
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "constant":
        return 1.0
    decay_steps = max(1, settings.steps - settings.warmup_steps - 1)
    progress = min(1.0, (step - settings.warmup_steps) / decay_steps)
    floor = settings.min_lr_ratio
    if settings.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_order(windows: int, batch_size: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """[steps, batch_size] window indices: seeded permutations, one epoch after another."""
    needed = steps * batch_size
    epochs = [torch.randperm(windows, generator=generator) for _ in range(math.ceil(needed / windows))]
    return torch.cat(epochs)[:needed].view(steps, batch_size)


def training_windows(tokenizer, text: str, settings: TrainSettings, skip_tokens: int, model_max_length: int | None) -> torch.Tensor:
    """Non-overlapping windows of ``settings.seq_len`` tokens (BOS first per ``settings.bos``) that start
    after the first ``skip_tokens`` text tokens (the evaluation's, when both read the same text)."""
    needed = settings.steps * settings.batch_size * settings.seq_len
    config = PerplexityConfig(data=settings.data, seq_len=settings.seq_len, max_tokens=skip_tokens + needed, bos=settings.bos)
    windows = build_windows(tokenizer, text, config, model_max_length)
    text_per_window = settings.seq_len - (windows.bos_token_id is not None)
    usable = windows.input_ids[math.ceil(skip_tokens / text_per_window):]
    if len(usable) < settings.batch_size:
        raise UserError(
            f"training text '{settings.data}' has {len(usable)} windows of {settings.seq_len} tokens after the "
            f"{skip_tokens} held out for evaluation; batch_size {settings.batch_size} needs more text or a shorter seq_len"
        )
    return usable


def _optimizers(model, settings: TrainSettings) -> list[torch.optim.Optimizer]:
    """AdamW over every trainable parameter, or (``optimizer: muon``) Muon over the 2-D hidden matrices and AdamW
    over the rest: input embedding, output head, norms, biases, scalars (Park et al. 2025, OSP, after Jordan et al.).

    Muon uses Moonshot's ``match_rms_adamw`` step size, so one ``lr`` and ``weight_decay`` serve both. Weight
    decay applies to matrices only."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    hidden = [p for p in trainable if p.ndim == 2 and id(p) not in embeddings] if settings.optimizer == "muon" else []
    muon_ids = {id(p) for p in hidden}
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2 and id(p) not in muon_ids], "weight_decay": settings.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizers = [torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr, betas=(settings.beta1, settings.beta2))]
    if hidden:
        optimizers.append(torch.optim.Muon(hidden, lr=settings.lr, weight_decay=settings.weight_decay, adjust_lr_fn="match_rms_adamw"))
    return optimizers


def train(
    model, windows: torch.Tensor, settings: TrainSettings, choices: list[MitigationChoice],
    on_checkpoint: Callable[[int], None] | None = None, on_step: Callable[[int], None] | None = None,
) -> list[dict]:
    """Fine-tune ``model`` in place on ``windows`` ([count, seq_len] token ids); returns one record per step.

    After each optimizer step, every choice's ``on_step(model, params, step)``
    runs (TVR rescales there); what it returns is kept in that step's record. ``on_step(step)`` runs
    after that (the statistics of ``record_every``).
    """
    device = next(model.parameters()).device
    optimizers = _optimizers(model, settings)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, settings)) for optimizer in optimizers]
    order = batch_order(len(windows), settings.batch_size, settings.steps, torch.Generator().manual_seed(settings.seed))
    step_hooks = [
        (choice, hook) for choice in choices
        if (hook := get_mitigation(choice.name).hook("on_step")) is not None
    ]
    trainable = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
    history = []
    model.train()
    try:
        with tqdm(total=settings.steps, desc="train", unit="step", leave=False) as bar:
            for step, rows in enumerate(order, start=1):
                batch = windows[rows].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                    logits = model(input_ids=batch, use_cache=False).logits
                loss = token_nll(logits[:, :-1].float(), batch[:, 1:]).mean()
                if not torch.isfinite(loss):
                    raise UserError(f"training diverged at step {step} (loss {float(loss)}); lower train.lr or raise warmup_steps")
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip = settings.grad_clip if settings.grad_clip > 0 else math.inf
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
                lr = optimizers[0].param_groups[0]["lr"]
                for optimizer, scheduler in zip(optimizers, schedulers):
                    optimizer.step()
                    scheduler.step()
                record = {"step": step, "loss": float(loss.detach()), "lr": lr, "grad_norm": grad_norm}
                for choice, hook in step_hooks:
                    event = hook(model, choice.params, step)
                    if event:
                        record[choice.name] = event
                history.append(record)
                if on_step:
                    on_step(step)
                bar.update()
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                if on_checkpoint and settings.save_every and step % settings.save_every == 0 and step < settings.steps:
                    on_checkpoint(step)
    finally:
        model.eval()
    return history
