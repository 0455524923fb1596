"""lm-eval's HFLM over a model already in memory, scoring every request alone and feeding exactly the
tokens a BOS policy names (``InvariantHFLM``); ``massquant eval --tasks`` and the ``massquant`` model type
(``model.py``) both score through it."""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
import lm_eval.models.huggingface as hflm_module
from lm_eval.models.huggingface import HFLM

from massquant.data.text import BOS_POLICIES
from massquant.errors import UserError
from massquant.lmeval.parallel import check_identical_weights, gathered, join_processes

log = logging.getLogger(__name__)
WHERE = "massquant model_args"  # the settings these helpers check arrive as lm-eval model_args


def bos_tokenizer(tokenizer, policy: str):
    """A copy of ``tokenizer`` that prepends BOS to lm-eval's prompts exactly when ``policy`` says.

    ``auto`` prepends the tokenizer's BOS when it has one, as massquant's
    perplexity windows do (SmolLM2's tokenizer adds none by itself, so lm-eval's
    plain ``hf`` model scores it without). Returns (tokenizer, prepends) where
    ``prepends`` is HFLM's ``add_bos_token``.
    """
    if policy not in BOS_POLICIES:
        raise UserError(f"unknown BOS policy '{policy}'; accepted: {', '.join(BOS_POLICIES)}")
    bos = tokenizer.bos_token_id
    if policy == "always" and bos is None:
        raise UserError("bos=always: this tokenizer has no BOS token; use bos=never or auto")
    prepends = policy != "never" and bos is not None
    configured = copy.deepcopy(tokenizer)  # the loaded tokenizer keeps its own behaviour for perplexity windows
    configured.add_bos_token = prepends
    if prepends and configured("BOS check").input_ids[:1] != [bos]:
        raise UserError(f"cannot make the tokenizer {type(tokenizer).__name__} prepend its BOS token; use bos=never")
    return configured, prepends


def context_token(tokenizer, policy: str, requested: int | None) -> int:
    """The token lm-eval conditions a rolling window's first token (and an empty context) on.

    With BOS (auto/always) it is BOS, so a rolling window is exactly a
    perplexity window ``[BOS, text...]``. Under ``never`` no BOS may appear, so
    it is ``requested`` (HFLM's ``prefix_token_id``) or else the tokenizer's
    EOS, the document boundary GPT-style models are trained on.

    Raises UserError when the policy cannot be honoured (no such token, or it is BOS).
    """
    bos = tokenizer.bos_token_id
    if policy != "never" and bos is not None:
        if requested is not None and requested != bos:
            raise UserError(f"{WHERE}: prefix_token_id={requested} contradicts bos={policy} (BOS is id {bos}); use bos=never")
        return bos
    chosen = tokenizer.eos_token_id if requested is None else requested
    if chosen is None or (bos is not None and chosen == bos):
        raise UserError(
            f"{WHERE}: bos={policy} cannot be honoured: rolling and empty-context requests need a first token that is "
            f"not BOS (id {bos}) and this tokenizer's EOS is {tokenizer.eos_token_id}; pass prefix_token_id=ID"
            + (" or use bos=auto" if bos is not None else "")
        )
    return chosen


@contextlib.contextmanager
def input_lengths_recorded(lengths: list[list[int]]):
    """While HFLM pads a loglikelihood batch (right padding, in ``pad_and_concat``), append the
    rows' real lengths to ``lengths``: ``_model_call`` receives only the padded tensor."""
    original = hflm_module.pad_and_concat

    def recording(max_length, tensors, padding_side="right"):
        lengths.append([len(tensor) for tensor in tensors])
        return original(max_length, tensors, padding_side=padding_side)

    hflm_module.pad_and_concat = recording
    try:
        yield
    finally:
        hflm_module.pad_and_concat = original


@contextlib.contextmanager
def weights_left_as_they_are(model):
    """While HFLM wraps ``model``: HFLM re-ties the output projection to the input embedding, which would
    put the full-precision embedding back in place of an output projection massquant quantized
    (--quantize-lm-head on a model with tied embeddings). A loaded model is tied already."""
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights


class InvariantHFLM(HFLM):
    """lm-eval's HFLM over a model in memory that feeds exactly the tokens a BOS policy names and scores
    every request on its own, so no score depends on the batch a request came in.

    ``policy`` is auto|always|never (see ``bos_tokenizer`` and ``context_token``);
    ``hflm_settings`` are HFLM's (``batch_size``, ``max_length``, ``prefix_token_id``, ...).
    ``bos_tokens`` records the token ids used. Each request runs alone because a
    padded batch changes GEMM shapes, hence float rounding, which flips int8
    rounding ties in quantized rows; the price is the throughput batching would
    buy (not measured here; it matters most on a GPU).
    """

    def __init__(self, model, tokenizer, policy: str, **hflm_settings) -> None:
        configured, prepends = bos_tokenizer(tokenizer, policy)
        prefix = context_token(tokenizer, policy, hflm_settings.pop("prefix_token_id", None))
        self._input_lengths: list[list[int]] = []
        self._rolling = False
        with weights_left_as_they_are(model):
            super().__init__(pretrained=model, tokenizer=configured, add_bos_token=prepends, prefix_token_id=prefix, **hflm_settings)
        self.bos_tokens = {
            "bos": policy,
            "bos_token_id": configured.bos_token_id if prepends else None,
            "prefix_token_id": prefix,
            "requests_per_forward": 1,
        }
        self.requests_scored: dict[str, int] = {}
        self.data_parallel = self._join_processes(model)

    def _join_processes(self, model) -> dict | None:
        """Under ``torchrun`` or ``accelerate launch``: take this process's rank so lm-eval shards the requests
        (see ``massquant.lmeval.parallel``), after checking every rank holds the same weights."""
        accelerator = join_processes(cpu=model.device.type == "cpu")
        if accelerator is None:
            return None
        self.accelerator = accelerator
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        hashes = check_identical_weights(model)
        log.info("rank %d of %d: weights sha256 %s", self._rank, self._world_size, hashes[self._rank])
        return {"processes": self._world_size, "weights_sha256_per_rank": hashes, "requests_per_rank": None}

    def barrier(self) -> None:
        """lm-eval's wait after each request type, on every rank; the ranks also share how many requests each scored."""
        super().barrier()
        if self.data_parallel is not None:
            self.data_parallel["requests_per_rank"] = gathered(dict(self.requests_scored))

    def _count(self, kind: str, requests) -> None:
        self.requests_scored[kind] = self.requests_scored.get(kind, 0) + len(requests)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._count("loglikelihood", requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        self._count("generate_until", requests)
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def get_model_info(self) -> dict:
        """HFLM's, plus, under data parallelism, each rank's weight hash and request counts."""
        info = super().get_model_info()
        return info if self.data_parallel is None else {**info, "data_parallel": self.data_parallel}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As HFLM's, except that a rolling request's text gets no BOS of its own: its windows start with
        the context token (BOS under auto/always), so the model sees ``[BOS, text...]``, never ``[BOS, BOS, ...]``."""
        if self._rolling and add_special_tokens is None:
            add_special_tokens = False
        return super().tok_encode(string, add_special_tokens=add_special_tokens, **kwargs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._count("loglikelihood_rolling", requests)
        self._rolling = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self._rolling = False

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        self._input_lengths.clear()
        with input_lengths_recorded(self._input_lengths):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits ``[batch, padded length, vocab]``, each request run alone at its own length.

        A request's numbers then never depend on the batch it came in (other
        requests, padding, the GEMM shapes they make); positions past a
        request's end are zero and HFLM never reads them.
        """
        if attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask, labels)
        lengths = self._input_lengths.pop(0) if self._input_lengths else None
        if lengths is None or len(lengths) != len(inps):  # e.g. HFLM's batch-size probe: no padding
            lengths = [inps.shape[1]] * len(inps)
        call = super()._model_call
        rows = [call(inps[index : index + 1, :length]) for index, length in enumerate(lengths)]
        logits = rows[0].new_zeros(len(inps), inps.shape[1], rows[0].shape[-1])
        for index, (row, length) in enumerate(zip(rows, lengths)):
            logits[index, :length] = row[0]
        return logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """Greedy continuations ``[batch, context length + new tokens]``, each request generated alone from its
        unpadded context, then laid out as HFLM expects (contexts left-padded, continuations padded after)."""
        mask = generation_kwargs.pop("attention_mask", None)
        mask = torch.ones_like(context) if mask is None else mask.bool()
        pad = self.tokenizer.pad_token_id
        rows = []
        for row, real in zip(context, mask):
            alone = row[real][None]
            generated = super()._model_generate(
                alone, max_length - (context.shape[1] - alone.shape[1]), stop, attention_mask=torch.ones_like(alone), **dict(generation_kwargs)
            )
            rows.append(generated[0, alone.shape[1] :])
        width = context.shape[1] + max(len(row) for row in rows)
        output = context.new_full((len(rows), width), pad)
        output[:, : context.shape[1]] = context
        for index, row in enumerate(rows):
            output[index, context.shape[1] : context.shape[1] + len(row)] = row
        return output
