"""Embedding projection (Park et al. 2025, "Outlier-Safe Pre-Training", OSP): a learnable
[hidden, hidden] linear map right after the input embedding, initialised to the identity.

OSP adds it so that the outliers an embedding table develops (some channels
large for every token) can be undone before they enter the residual stream,
instead of being carried through every layer. The projection hangs under the
input embedding module (``model.get_input_embeddings()``, so
``model.embed_tokens.projection.weight`` for LLaMA) and acts through a forward
hook on it: the embedding's own weight keeps its name, so an output head tied
to it stays tied. ``inputs_embeds`` passed by the caller bypass it.

Identity at step 0 (``x @ I`` is exact in floating point), so the model is
unchanged bit for bit by the surgery. It is not an ``nn.Linear``: the
quantizers, which replace linears, leave it in full precision like the
embedding table it belongs to (without a tied head it folds into the table:
``E' = E Wᵀ``).
"""

from __future__ import annotations

import torch
from torch import nn

from massquant.mitigations import Mitigation

MITIGATION = Mitigation(
    name="embproj",
    kind="training",
    description="embedding projection (OSP): a learnable hidden x hidden map after the input embedding, identity at init",
)
SUBMODULE = "projection"


class EmbeddingProjection(nn.Module):
    """``y = x Wᵀ`` with ``weight`` W: [hidden, hidden], the identity at init; x: [..., hidden]."""

    def __init__(self, hidden_size: int, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(hidden_size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype))

    def hook(self, embedding, inputs, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the embedding module: project its output."""
        return self(output)


@torch.no_grad()
def surgery(model, params: dict) -> dict:
    """Attach the identity projection to the input embedding."""
    embedding = model.get_input_embeddings()
    like = embedding.weight
    projection = EmbeddingProjection(like.shape[1], dtype=like.dtype, device=like.device)
    embedding.add_module(SUBMODULE, projection)
    embedding.register_forward_hook(projection.hook)
    return {"initialised": "identity", "hidden_size": like.shape[1]}
