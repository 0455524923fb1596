"""Token-level perplexity over fixed windows of a text.

Windows are built once per (tokenizer, text, settings) and reused for every
configuration compared in one run, so rows differ only by the model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from massquant.data.text import BOS_POLICIES, text_fingerprint
from massquant.models.loss import token_nll
from massquant.errors import UserError
from massquant.evaluation.numerics import first_non_finite_module

DEFAULT_SEQ_LEN = 2048


@dataclass
class PerplexityConfig:
    """What text to score and how; the same fields are CLI flags and recipe keys."""

    data: str = "enwiki-sample"
    seq_len: int | None = None  # None: 2048 or the model's maximum, whichever is smaller
    stride: int | None = None  # None: non-overlapping windows
    max_tokens: int | None = None
    bos: str = "auto"
    batch_size: int = 1

    def validate(self) -> None:
        if self.bos not in BOS_POLICIES:
            raise UserError(f"unknown BOS policy '{self.bos}'; accepted: {', '.join(BOS_POLICIES)}")
        for name in ("seq_len", "stride", "max_tokens", "batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{name.replace('_', '-')} must be a positive integer; got {value}")


@dataclass
class TokenWindows:
    """Equal-length model inputs; in row i, targets at positions >= first_scored[i] count."""

    input_ids: torch.Tensor  # [windows, length]
    first_scored: torch.Tensor  # [windows]
    bos_token_id: int | None
    text_tokens: int

    @property
    def scored_tokens(self) -> int:
        return int((self.input_ids.shape[1] - self.first_scored).sum())

    def record(self, config: "PerplexityConfig", text: str) -> dict:
        """What a results file says about the text and windows: the settings, what they came to, the text's hash."""
        return {
            **vars(config),
            "seq_len": self.input_ids.shape[1],
            "bos_token_id": self.bos_token_id,
            "text_fingerprint": text_fingerprint(text),
            "text_tokens": self.text_tokens,
        }


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    tokens: int
    windows: int
    seconds: float
    non_finite_windows: int
    first_non_finite: str | None = None  # module where the first non-finite window's values broke

    def as_dict(self) -> dict:
        return dict(vars(self))


def _bos_to_prepend(tokenizer, policy: str) -> int | None:
    bos = tokenizer.bos_token_id
    if policy == "never":
        return None
    if bos is None:
        if policy == "always":
            raise UserError("--bos always: this tokenizer has no BOS token; use --bos never or auto")
        return None
    return bos


def _tokenize_prefix(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    """Tokenize only as much text as needed; the margin keeps the cut away from the last kept token."""
    if max_tokens is None:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    chars = max_tokens * 6
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens + 64 or chars >= len(text):
            return ids[:max_tokens]
        chars *= 2


def build_windows(tokenizer, text: str, config: PerplexityConfig, model_max_length: int | None) -> TokenWindows:
    config.validate()
    seq_len = config.seq_len or min(DEFAULT_SEQ_LEN, model_max_length or DEFAULT_SEQ_LEN)
    if model_max_length and seq_len > model_max_length:
        raise UserError(f"seq-len {seq_len} exceeds the model's maximum of {model_max_length} tokens")
    bos = _bos_to_prepend(tokenizer, config.bos)
    text_per_window = seq_len - (bos is not None)
    if text_per_window < 2:
        raise UserError(f"seq-len {seq_len} is too short; it must leave at least 2 text tokens per window")
    ids = torch.tensor(_tokenize_prefix(tokenizer, text, config.max_tokens), dtype=torch.long)
    if len(ids) < text_per_window:
        raise UserError(
            f"the text has {len(ids)} tokens, fewer than one window of {text_per_window}; "
            "use a longer text or a smaller --seq-len"
        )
    stride = config.stride
    if stride is not None and stride > text_per_window:
        raise UserError(f"stride {stride} is larger than the window's {text_per_window} text tokens")
    # first: index within each chunk of the first text token not scored by an earlier window
    if stride is None:  # non-overlapping; a trailing remainder shorter than a window is dropped
        count = len(ids) // text_per_window
        chunks = ids[: count * text_per_window].view(count, text_per_window)
        first = torch.zeros(count, dtype=torch.long)
    else:  # sliding: the last window is aligned to the end of the text
        starts = list(range(0, len(ids) - text_per_window + 1, stride))
        if starts[-1] + text_per_window < len(ids):
            starts.append(len(ids) - text_per_window)
        chunks = torch.stack([ids[s : s + text_per_window] for s in starts])
        ends = [s + text_per_window for s in starts]
        first = torch.tensor([0] + [previous_end - start for previous_end, start in zip(ends, starts[1:])])
    if bos is not None:
        chunks = torch.cat([torch.full((len(chunks), 1), bos), chunks], dim=1)
        first = first + 1
    # as a target position (predicted from the position before it), the very first token cannot count
    first = first.clamp(min=1)
    return TokenWindows(chunks, first, bos, len(ids))


@torch.inference_mode()
def window_nll(model, windows: TokenWindows, batch_size: int = 1, description: str = "perplexity"):
    """Summed NLL per window (float64) over its scored targets."""
    device = next(model.parameters()).device
    length = windows.input_ids.shape[1]
    positions = torch.arange(1, length)
    sums = torch.empty(len(windows.input_ids), dtype=torch.float64)
    for begin in tqdm(range(0, len(sums), batch_size), desc=description, unit="batch", leave=False):
        batch = windows.input_ids[begin : begin + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = token_nll(logits, batch[:, 1:]).cpu().double()
        mask = positions[None, :] >= windows.first_scored[begin : begin + batch_size, None]
        sums[begin : begin + batch_size] = (nll * mask).sum(dim=1)
    return sums


def perplexity(model, windows: TokenWindows, batch_size: int = 1, description: str = "perplexity") -> PerplexityResult:
    started = time.perf_counter()
    sums = window_nll(model, windows, batch_size, description)
    finite = torch.isfinite(sums)
    first_non_finite = None
    if not finite.all():
        device = next(model.parameters()).device
        broken = windows.input_ids[int((~finite).nonzero()[0])][None].to(device)
        first_non_finite = first_non_finite_module(model, broken)
    tokens = int((windows.input_ids.shape[1] - windows.first_scored)[finite].sum())
    mean = float(sums[finite].sum() / tokens) if tokens else math.nan
    return PerplexityResult(
        ppl=math.exp(mean) if finite.all() else math.nan,
        mean_nll=mean,
        tokens=tokens,
        windows=len(sums),
        seconds=time.perf_counter() - started,
        non_finite_windows=int((~finite).sum()),
        first_non_finite=first_non_finite,
    )
