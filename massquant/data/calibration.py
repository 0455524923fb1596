"""Calibration sequences: seeded random windows of a text, as token ids."""

from __future__ import annotations

import torch

from massquant.data.text import load_text
from massquant.errors import UserError

DEFAULT_CALIBRATION_TEXT = "lee-news"  # a different corpus from the default evaluation text


def calibration_batch(tokenizer, data: str, samples: int, seq_len: int, seed: int = 0, bos: bool = True) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens ([samples, seq_len]), BOS first when asked and available."""
    ids = tokenizer(load_text(data), add_special_tokens=False)["input_ids"]
    prepend = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    body = seq_len - len(prepend)
    if len(ids) < body + 1:
        raise UserError(f"calibration text '{data}' has {len(ids)} tokens; {body} are needed for one sequence")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - body + 1, (samples,), generator=generator).tolist()
    return torch.tensor([prepend + ids[start : start + body] for start in starts], dtype=torch.long)
