"""Calibration sequences: seeded random windows of a text, as token ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from massquant.data.text import load_text
from massquant.errors import UserError

DEFAULT_CALIBRATION_TEXT = "lee-news"  # a different corpus from the default evaluation text


@dataclass(frozen=True)
class CalibrationSettings:
    """Sequences for static ranges, GPTQ, massive-site detection and mitigations that calibrate
    (``calib_data``, ``calib_samples``, ``calib_seq_len`` on every surface)."""

    data: str = DEFAULT_CALIBRATION_TEXT
    samples: int = 16
    seq_len: int = 512

    def batch(self, tokenizer, seed: int = 0, bos: bool = True) -> torch.Tensor:
        """``[samples, seq_len]`` token ids (see ``calibration_batch``)."""
        return calibration_batch(tokenizer, self.data, self.samples, self.seq_len, seed, bos=bos)


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
