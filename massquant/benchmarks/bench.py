"""``python -m massquant.benchmarks``: massquant's speed, agreement and memory figures against their goals.

Everything is measured in one process on the embedded SmolLM2-135M. A timing is
the median of N repeats after one warm-up round; when two things are compared
their runs alternate within each round, so load from other processes on the
machine falls on both alike. The printed table gives each figure and its goal;
``DIR/bench.json`` keeps every raw timing.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import math
import re
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from tqdm.auto import tqdm

from massquant.backends import get_backend
from massquant.wrapping.selection import select_linears
from massquant.cli.common import ArgumentParser, positive_int
from massquant.data.text import DEFAULT_TEXT, load_text, text_fingerprint
from massquant.errors import UserError
from massquant.evaluation.perplexity import PerplexityConfig, build_windows, perplexity
from massquant.massive.locate import locate
from massquant.massive.observers import run_without_logits
from massquant.massive.report import LocateConfig
from massquant.models.loading import DEFAULT_MODEL, load_model, max_sequence_length
from massquant.quantizers.spec import parse_spec
from massquant.reporting.results import ensure_writable_dir, environment, write_json_atomic
from massquant.reporting.tables import format_cell, render
from massquant.wrapping.quantize import quantize_

COLUMNS = {"figure": "figure", "measured": "measured", "goal": "goal", "holds": "holds", "note": "note"}


@dataclass(frozen=True)
class Sizes:
    repeats: int
    forward_tokens: int  # figures 1-2: one sequence, batch 1
    window: int  # figure 3: lm-eval's max_length; figure 5 reuses massquant's runs of figure 3
    document_tokens: int  # not a multiple of the window, so lm-eval's shorter last window is compared too
    matmul_size: int  # figure 5: side of the square fp32 matmul timed as the machine's peak
    memory_tokens: int  # figure 4b: one sequence, batch 1


FULL = Sizes(repeats=5, forward_tokens=512, window=512, document_tokens=1792, matmul_size=2048, memory_tokens=2048)
QUICK = Sizes(repeats=2, forward_tokens=128, window=128, document_tokens=320, matmul_size=1024, memory_tokens=256)


@dataclass
class Figure:
    key: str
    name: str
    unit: str
    goal: float | None  # None: measured for reference only
    goal_direction: str  # "<=" or ">="
    value: float | None = None
    unavailable: str | None = None  # why there is no value
    goal_applies: bool = True  # False when the measurement is not the one the goal is about
    note: str = ""
    details: dict = field(default_factory=dict)

    @property
    def holds(self) -> bool | None:
        if self.goal is None or not self.goal_applies or self.value is None or not math.isfinite(self.value):
            return None
        return self.value <= self.goal if self.goal_direction == "<=" else self.value >= self.goal

    def as_dict(self) -> dict:
        return {
            "key": self.key,
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "goal": self.goal,
            "goal_direction": self.goal_direction,
            "goal_applies": self.goal_applies,
            "holds": self.holds,
            "unavailable": self.unavailable,
            "note": self.note,
            "details": self.details,
        }

    def table_row(self) -> dict:
        measured = "unavailable" if self.value is None else f"{format_cell(self.value)} {self.unit}".rstrip()
        return {
            "figure": f"{self.key}. {self.name}",
            "measured": measured,
            "goal": "none" if self.goal is None else f"{self.goal_direction} {format_cell(self.goal)}",
            "holds": {True: "yes", False: "no", None: "n/a"}[self.holds],
            "note": self.unavailable or self.note,
        }


# ---- timing


def seconds_of(run: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def alternating_timings(
    runs: dict[str, Callable[[], tuple[float, object]]], repeats: int, description: str
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Seconds of every run per round, and each run's last result.

    Each round calls every run once; round 0 is the warm-up and is not kept. The
    order rotates from round to round, so no run always follows the same other one.
    A run returns (seconds, result) itself, so it can leave set-up work out of its time.
    """
    names = list(runs)
    timings: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, object] = {}
    for round_index in tqdm(range(repeats + 1), desc=description, unit="round"):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, results[name] = runs[name]()
            if round_index:
                timings[name].append(seconds)
    return timings, results


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of per-round ratios: pairing runs of the same round cancels slow drifts in machine load."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def fastest_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Ratio of the fastest runs: a cross-check that other processes' load inflates least."""
    return min(numerators) / min(denominators)


# ---- model bytes

# LLM.int8 keeps its int8 matrix (CB) and row scales (SCB) on the weight until the first
# forward, which moves them onto the module's ``state``.
_BNB_INT8_TENSORS = ("CB", "SCB")


def _module_tensors(module: nn.Module) -> Iterator[Tensor]:
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)
    for holder in (getattr(module, "weight", None), getattr(module, "state", None)):
        for name in _BNB_INT8_TENSORS:
            value = getattr(holder, name, None)
            if isinstance(value, Tensor):
                yield value


def _storage_tensors(tensor: Tensor) -> Iterator[Tensor]:
    """The plain tensors whose storage holds ``tensor``'s data and quantization scales."""
    if is_traceable_wrapper_subclass(tensor):  # torchao: the wrapper's own storage is not real memory
        inner_names, _ = tensor.__tensor_flatten__()
        for name in inner_names:
            yield from _storage_tensors(getattr(tensor, name))
        return
    yield tensor
    state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: block absmax, code book, nested state
    while state is not None:
        for value in (state.absmax, state.code, state.offset):
            if isinstance(value, Tensor):
                yield value
        state = state.state2


def model_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind a model's parameters and buffers.

    Tied weights count once; quantized weights count their real storage (int8 or
    packed 4-bit data plus scales), not the size of the float tensor they stand for.
    """
    storages: dict[int, int] = {}
    for module in model.modules():
        for tensor in _module_tensors(module):
            for plain in _storage_tensors(tensor):
                storage = plain.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# ---- text


def leading_tokens(tokenizer, text: str, count: int) -> Tensor:
    ids = tokenizer(text[: count * 10], add_special_tokens=False)["input_ids"]
    if len(ids) < count:
        raise UserError(f"the benchmark text has fewer than {count} tokens")
    return torch.tensor([ids[:count]])


def leading_text(tokenizer, text: str, tokens: int) -> str:
    """The start of ``text`` that ends where its ``tokens``-th token ends."""
    encoding = tokenizer(text[: tokens * 10], add_special_tokens=False, return_offsets_mapping=True)
    if len(encoding["input_ids"]) < tokens:
        raise UserError(f"the benchmark text has fewer than {tokens} tokens")
    return text[: encoding["offset_mapping"][tokens - 1][1]]


# ---- figures 1-2: fake-quantization overhead of a forward pass


def forward_figures(model, input_ids: Tensor, repeats: int) -> list[Figure]:
    # Each spec quantizes its own copy of the model once, so the forward passes of a
    # round run back to back instead of around an untimed quantize_/undo.
    variants = {"fp32": model}
    for spec in ("w8", "w8a8"):
        variants[spec] = copy.deepcopy(model)
        quantize_(variants[spec], spec)

    def forward(variant) -> Callable[[], tuple[float, None]]:
        def run() -> tuple[float, None]:
            with torch.inference_mode():
                seconds, _ = seconds_of(lambda: variant(input_ids=input_ids, use_cache=False))
            return seconds, None

        return run

    timings, _ = alternating_timings(
        {name: forward(variant) for name, variant in variants.items()}, repeats, "forward fp32 / w8 / w8a8"
    )
    figures = []
    for key, spec, name, goal in (
        ("1", "w8", "w8 weight-only fake-quant forward / fp32 forward", 1.02),
        ("2", "w8a8", "w8a8 dynamic per-token fake-quant forward / fp32 forward", 1.25),
    ):
        figures.append(
            Figure(
                key, name, "x", goal, "<=", value=median_ratio(timings[spec], timings["fp32"]),
                note=f"fastest runs: {fastest_ratio(timings[spec], timings['fp32']):.3f}",
                details={
                    "spec": spec,
                    "tokens": input_ids.shape[1],
                    "batch": 1,
                    "statistic": "median over rounds of (quantized forward seconds / fp32 forward seconds of the same round)",
                    "method": f"quantize_(copy of the model, '{spec}') once before timing; each round times one forward "
                    "of the fp32 model and of each quantized copy, back to back",
                    "fp32_seconds": timings["fp32"],
                    "quantized_seconds": timings[spec],
                    "median_fp32_seconds": statistics.median(timings["fp32"]),
                    "median_quantized_seconds": statistics.median(timings[spec]),
                    "ratio_of_fastest_runs": fastest_ratio(timings[spec], timings["fp32"]),
                },
            )
        )
    return figures


# ---- figure 3: massquant perplexity against lm-eval's rolling loglikelihood


def lm_eval_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(model input, scored targets) of each window lm-eval's loglikelihood_rolling evaluates.

    As lm-eval does it: rolling windows, made disjoint, then context + continuation
    cut to the last max_length + 1 tokens, less the last.
    """
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    pairs = map(make_disjoint_window, get_rolling_token_windows(tokens, prefix_token, max_length, context_len=1))
    return [((context + continuation)[-(max_length + 1) :][:-1], continuation) for context, continuation in pairs]


def windows_agree(windows, expected: list[tuple[list[int], list[int]]], max_length: int) -> bool:
    """True when every massquant window predicts the same targets from the same inputs as lm-eval's."""
    if len(expected) != len(windows.input_ids):
        return False
    for (inputs, targets), row, first in zip(expected, windows.input_ids.tolist(), windows.first_scored.tolist()):
        # causal attention: a massquant window's extra last input token predicts nothing scored
        if row[:max_length] != inputs or row[first:] != targets:
            return False
    return True


def perplexity_rounds(loaded, text: str, sizes: Sizes) -> dict:
    """Alternating runs of massquant's perplexity, lm-eval's rolling loglikelihood and a plain matmul.

    lm-eval conditions the document's first token on its prefix token and every later
    window on the token before it. massquant does the same with the prefix token written
    before the text, no BOS, windows of window + 1 tokens and stride window: each window
    starts at the last token the previous one scored, and the last one is aligned to the
    text's end. The matmul runs in the same rounds, so figure 5's peak sees the same load.
    """
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, length = loaded.model, loaded.tokenizer, sizes.window
    document = leading_text(tokenizer, text, sizes.document_tokens)
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=length)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(document,), idx=0)
    prefix_text = tokenizer.decode([harness.prefix_token_id])
    config = PerplexityConfig(seq_len=length + 1, stride=length, bos="never")
    left, right = torch.randn(sizes.matmul_size, sizes.matmul_size), torch.randn(sizes.matmul_size, sizes.matmul_size)

    def massquant_run():
        def evaluate():
            windows = build_windows(tokenizer, prefix_text + document, config, max_sequence_length(model))
            return windows, perplexity(model, windows)

        return seconds_of(evaluate)

    def lm_eval_run():
        with torch.inference_mode():
            return seconds_of(lambda: harness.loglikelihood_rolling([request], disable_tqdm=True)[0])

    def matmul_run():
        return seconds_of(lambda: torch.matmul(left, right))

    timings, results = alternating_timings(
        {"massquant": massquant_run, "lm_eval": lm_eval_run, "matmul": matmul_run},
        sizes.repeats, "perplexity massquant / lm-eval / matmul",
    )
    windows, result = results["massquant"]
    tokens = harness.tok_encode(document)
    return {
        "timings": timings,
        "windows": windows,
        "result": result,
        "lm_eval_loglikelihood": results["lm_eval"],
        "tokens": tokens,
        "windows_match": windows_agree(windows, lm_eval_windows(tokens, harness.prefix_token_id, length), length),
        "common": {
            "document_tokens": len(tokens),
            "document_sha": text_fingerprint(document),
            "max_length": length,
            "windows": len(windows.input_ids),
            "window_correspondence": (
                f"lm-eval HFLM(batch_size=1, max_length={length}).loglikelihood_rolling on one document; massquant "
                f"build_windows(prefix token text + document, seq_len={length + 1}, stride={length}, bos=never) + "
                "perplexity(): the same targets predicted from the same inputs (checked token by token against "
                "lm_eval.utils' windows); massquant's windows carry one extra trailing input token whose "
                "prediction is not scored"
            ),
        },
    }


def harness_figures(rounds: dict) -> list[Figure]:
    """3a: throughput against lm-eval; 3b: agreement of the two perplexities.

    3a's goal is parity (>= 1.0), not a speed-up: on identical windows both sides
    run the same GEMM-bound forward passes of the same model on the CPU, so
    neither can be much faster; the figure guards against massquant adding cost."""
    timings, result, tokens, match = rounds["timings"], rounds["result"], rounds["tokens"], rounds["windows_match"]
    common = {**rounds["common"], "windows_match": match}
    lm_eval_ppl = math.exp(-rounds["lm_eval_loglikelihood"] / len(tokens))
    throughput = Figure(
        "3a", "massquant perplexity tokens/s / lm-eval rolling loglikelihood tokens/s", "x", 1.0, ">=",
        value=median_ratio(timings["lm_eval"], timings["massquant"]),
        note=f"fastest runs: {fastest_ratio(timings['lm_eval'], timings['massquant']):.3f}; goal is parity: both run "
        "the same GEMM-bound forwards on the same windows",
        details={
            **common,
            "statistic": "median over rounds of (lm-eval seconds / massquant seconds of the same round); both score "
            "every document token",
            "massquant_seconds": timings["massquant"],
            "lm_eval_seconds": timings["lm_eval"],
            "median_massquant_tokens_per_second": statistics.median(result.tokens / t for t in timings["massquant"]),
            "median_lm_eval_tokens_per_second": statistics.median(len(tokens) / t for t in timings["lm_eval"]),
            "ratio_of_fastest_runs": fastest_ratio(timings["lm_eval"], timings["massquant"]),
        },
    )
    agreement = Figure(
        "3b", "|massquant ppl - lm-eval ppl| / lm-eval ppl, same windows", "", 1e-4, "<=",
        value=abs(result.ppl - lm_eval_ppl) / lm_eval_ppl, goal_applies=match,
        note="" if match else "windows differ from lm-eval's, so the goal does not apply",
        details={
            **common,
            "massquant_ppl": result.ppl,
            "lm_eval_ppl": lm_eval_ppl,
            "massquant_scored_tokens": result.tokens,
            "lm_eval_loglikelihood": rounds["lm_eval_loglikelihood"],
        },
    )
    return [throughput, agreement]


# ---- figure 4: cost of locating massive activations


def locate_time_figure(model, input_ids: Tensor, repeats: int) -> Figure:
    """locate against the forward pass it hooks: the same call (logits of the last token only), one sequence."""

    def forward() -> tuple[float, None]:
        with torch.inference_mode():
            return seconds_of(lambda: run_without_logits(model, input_ids))

    def full_forward() -> tuple[float, None]:
        with torch.inference_mode():
            return seconds_of(lambda: model(input_ids=input_ids, use_cache=False))

    def locate_run(config: LocateConfig) -> Callable[[], tuple[float, object]]:
        return lambda: seconds_of(lambda: locate(model, input_ids, config, progress=False))

    timings, _ = alternating_timings(
        {
            "forward": forward, "full_forward": full_forward,
            "locate": locate_run(LocateConfig()), "locate_entropy": locate_run(LocateConfig(entropy=True)),
        },
        repeats, "forward / all logits / locate / locate with entropy",
    )
    with_entropy = median_ratio(timings["locate_entropy"], timings["forward"])
    return Figure(
        "4a", "locate / the forward pass it hooks", "x", 1.1, "<=",
        value=median_ratio(timings["locate"], timings["forward"]),
        note=f"fastest runs: {fastest_ratio(timings['locate'], timings['forward']):.3f}; with entropy (massquant "
        f"locate): {with_entropy:.3f}; / forward with all logits: {median_ratio(timings['locate'], timings['full_forward']):.3f}",
        details={
            "tokens": input_ids.shape[1],
            "batch": 1,
            "statistic": "median over rounds of (locate seconds / forward seconds of the same round)",
            "method": "locate(model, ids, LocateConfig()) (massive sites, top-k, median, kurtosis, token norms, "
            "down-projection inputs, super weights) against run_without_logits(model, ids), the same forward call "
            "(logits_to_keep=1) without hooks; in the same rounds: a forward with all logits, and locate with "
            "entropy=True as the massquant locate command runs it",
            "locate_seconds": timings["locate"],
            "locate_with_entropy_seconds": timings["locate_entropy"],
            "forward_seconds": timings["forward"],
            "full_forward_seconds": timings["full_forward"],
            "ratio_with_entropy": with_entropy,
            "ratio_to_full_forward": median_ratio(timings["locate"], timings["full_forward"]),
            "ratio_of_fastest_runs": fastest_ratio(timings["locate"], timings["forward"]),
        },
    )


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _status_bytes(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024


def settled_resident_bytes() -> int:
    """VmRSS after collecting garbage and returning glibc's free heap to the system."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    return _status_bytes("VmRSS")


def extra_peak_bytes(run: Callable[[], object]) -> int:
    """Resident memory a call adds at its peak: VmHWM after it, reset to the resident size before it.

    Garbage is collected and glibc's free heap returned to the system first:
    cycles freed inside the call, or free pages already resident, would
    offset what the call allocates."""
    settled_resident_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_bytes("VmRSS")
    run()
    return _status_bytes("VmHWM") - before


def locate_memory_figure(model, input_ids: Tensor) -> Figure:
    """Extra peak memory of locate and of output_hidden_states=True, each over the same forward without them.

    Peak resident memory, with glibc told to serve every allocation above 64 KiB
    by its own mapping: freed tensors then leave the process at once, and the
    high-water mark counts live tensors rather than the allocator's cache. That
    setting stays for the rest of the process, so this figure is measured last.
    """
    figure = Figure("4b", f"locate extra peak memory / output_hidden_states extra, {input_ids.shape[1]} tokens", "x", 0.05, "<=")
    try:
        if ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 16) != 1:
            raise OSError("mallopt refused M_MMAP_THRESHOLD")
        extra_peak_bytes(lambda: None)
    except (OSError, AttributeError) as error:
        figure.unavailable = f"needs Linux /proc and glibc malloc: {error}"
        return figure

    def forward() -> None:
        with torch.inference_mode():
            run_without_logits(model, input_ids)

    def hidden_states() -> None:
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)

    runs = {"forward": forward, "hidden_states": hidden_states, "locate": lambda: locate(model, input_ids, progress=False)}
    runs["locate"]()  # warm-up: first-call allocations (caches, lazy imports) are not locate's
    # Two rounds in opposite orders; each call's smaller peak, so what ran before weighs on none of them.
    peaks: dict[str, list[int]] = {name: [] for name in runs}
    for order in tqdm((list(runs), list(runs)[::-1]), desc="peak memory", unit="round"):
        for name in order:
            peaks[name].append(extra_peak_bytes(runs[name]))
    extra = {name: min(values) for name, values in peaks.items()}
    hidden_extra = extra["hidden_states"] - extra["forward"]
    figure.value = (extra["locate"] - extra["forward"]) / hidden_extra
    figure.note = f"locate adds {(extra['locate'] - extra['forward']) / 2**20:+.1f} MiB, hidden states {hidden_extra / 2**20:+.1f} MiB"
    figure.details = {
        "tokens": input_ids.shape[1],
        "batch": 1,
        "peak_bytes_over_start": peaks,
        "formula": "(peak(locate) - peak(forward)) / (peak(forward with output_hidden_states=True) - peak(forward)); "
        "peak = VmHWM - VmRSS before the call, the smaller of two rounds, all three with logits_to_keep=1",
    }
    return figure


# ---- figure 5: share of the machine's matmul peak during a perplexity evaluation


def linear_parameters(model: nn.Module) -> int:
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))


def gemm_figure(model, rounds: dict, matmul_size: int) -> Figure:
    parameters = linear_parameters(model)
    input_tokens = rounds["windows"].input_ids.numel()
    massquant_seconds, matmul_seconds = rounds["timings"]["massquant"], rounds["timings"]["matmul"]
    achieved = [2 * parameters * input_tokens / seconds for seconds in massquant_seconds]
    peak = [2 * matmul_size**3 / seconds for seconds in matmul_seconds]
    fastest = max(achieved) / max(peak)
    return Figure(
        "5", "GEMM FLOP/s in a massquant perplexity evaluation / fp32 matmul peak", "x", 0.5, ">=",
        value=statistics.median(a / p for a, p in zip(achieved, peak)),
        note=f"fastest runs: {fastest:.3f}",
        details={
            "formula": "achieved = 2 * params_in_linears_incl_lm_head * input_tokens / seconds of massquant's "
            "perplexity run (build_windows + perplexity) in figure 3; attention products are not counted",
            "peak_formula": f"2 * {matmul_size}^3 / seconds of torch.matmul of two fp32 {matmul_size}x{matmul_size} "
            "matrices, timed in the same rounds",
            "statistic": "median over rounds of achieved / peak",
            "params_in_linears_incl_lm_head": parameters,
            "input_tokens": input_tokens,
            "massquant_seconds": massquant_seconds,
            "matmul_seconds": matmul_seconds,
            "median_achieved_flops": statistics.median(achieved),
            "median_peak_flops": statistics.median(peak),
            "ratio_of_fastest_runs": fastest,
            "threads": torch.get_num_threads(),
        },
    )


# ---- figure 6: memory of the real low-bit backends


@dataclass(frozen=True)
class MemoryCase:
    key: str
    name: str
    backend: str
    spec: str
    weight_bits: int
    goal: float | None


MEMORY_CASES = (
    MemoryCase("6a", "bitsandbytes int8 (LLM.int8) model bytes / fp32", "bnb", "w8", 8, 0.35),
    MemoryCase("6b", "bitsandbytes nf4 model bytes / fp32", "bnb", "wnf4", 4, 0.20),
    MemoryCase("6c", "torchao int8 weight-only model bytes / fp32", "torchao", "w8", 8, None),
)


def memory_note(model, case: MemoryCase, fp32_bytes: int) -> str:
    """What stays fp32 and the best ratio this backend could reach with it."""
    spec = parse_spec(case.spec, backend=case.backend)
    selected = sum(linear.weight.nbytes for _, linear in select_linears(model, spec))
    bound = (fp32_bytes - selected + selected * case.weight_bits / 32) / fp32_bytes
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    shape = "x".join(map(str, embedding.shape))
    note = (
        f"embedding {shape}{' (tied lm_head)' if tied else ''} stays fp32: {embedding.nbytes / fp32_bytes:.3f} of fp32 bytes; "
        f"{case.weight_bits}-bit linears without scales bound the ratio at >= {bound:.3f}"
    )
    if case.goal is not None and bound > case.goal:
        note += " - the goal cannot hold while the embedding stays fp32"
    return note


def memory_figures(loaded, probe_ids: Tensor) -> list[Figure]:
    model = loaded.model
    fp32_bytes = model_bytes(model)
    figures = []
    for case in tqdm(MEMORY_CASES, desc="real-quant memory", unit="backend"):
        figure = Figure(case.key, case.name, "x", case.goal, "<=", details={"backend": case.backend, "spec": case.spec})
        figures.append(figure)
        try:  # a backend that is missing or cannot run here is reported, not fatal
            seconds, applied = seconds_of(lambda: get_backend(case.backend).apply(loaded, parse_spec(case.spec, backend=case.backend), None))
        except Exception as error:
            figure.unavailable = f"{case.backend} does not apply: {type(error).__name__}: {error}"
            continue
        try:
            quantized_bytes = model_bytes(applied.model)
            with torch.inference_mode():  # a memory figure only counts for a model that runs on CPU
                applied.model(input_ids=probe_ids, use_cache=False)
        except Exception as error:
            figure.unavailable = f"quantized model does not run on CPU: {type(error).__name__}: {error}"
            continue
        finally:
            applied.undo()
        figure.value = quantized_bytes / fp32_bytes
        figure.note = memory_note(model, case, fp32_bytes)
        figure.details.update(
            quantized_bytes=quantized_bytes, fp32_bytes=fp32_bytes, apply_seconds=seconds, summary=applied.summary,
            counting="distinct storages of parameters and buffers; bitsandbytes int8 data + SCB, 4-bit packed data + "
            "quant_state absmax/code; torchao subclass weights through __tensor_flatten__",
        )
    return figures


# ---- figure 7: resident memory of in-place fake quantization


def fake_quant_memory_figures(model, probe_ids: Tensor) -> list[Figure]:
    """Resident memory ``quantize_`` adds to a model, over the bytes of the linears it quantizes.

    Garbage is collected and glibc's free heap returned before ``quantize_``;
    after it only garbage is collected, so pages the allocator keeps from the
    transient tensors of quantization (freed, not returned) count against it.
    """
    figures = []
    for key, spec in (("7a", "w8"), ("7b", "w8a8")):
        figure = Figure(key, f"{spec} fake-quant extra resident memory / bytes of its quantized linears", "x", 0.10, "<=")
        figures.append(figure)
        try:
            before = settled_resident_bytes()
        except (OSError, AttributeError) as error:
            figure.unavailable = f"needs Linux /proc and glibc malloc: {error}"
            continue
        seconds, handle = seconds_of(lambda: quantize_(model, spec))
        try:
            gc.collect()
            extra = _status_bytes("VmRSS") - before
            trimmed = settled_resident_bytes() - before
            linear_bytes = sum(linear.weight.nbytes for linear in handle.linears.values())
            with torch.inference_mode():  # the wrapped model runs: nothing it needs is missing
                model(input_ids=probe_ids, use_cache=False)
            sources = handle.summary()["undo_sources"]
        finally:
            undo_seconds, _ = seconds_of(handle.undo)
        figure.value = extra / linear_bytes
        figure.note = f"+{extra / 2**20:.1f} MiB over {linear_bytes / 2**20:.0f} MiB of linears; undo source: " + ", ".join(
            f"{kind} {count}" for kind, count in sources.items()
        )
        figure.details = {
            "spec": spec,
            "extra_resident_bytes": extra,
            "extra_resident_bytes_after_malloc_trim": trimmed,
            "quantized_linear_bytes": linear_bytes,
            "undo_sources": sources,
            "quantize_seconds": seconds,
            "undo_seconds": undo_seconds,
            "formula": "(VmRSS after quantize_ and gc - VmRSS before, after gc and malloc_trim) / bytes of the quantized "
            "linears' weights; before this change every linear kept a second, quantized copy (about 0.93)",
        }
    return figures


# ---- figure 8: loading the embedded model, first time (GGUF de-quantized) against cached


def load_figure() -> Figure:
    """Seconds of the embedded model's first load (de-quantized from its GGUF file, then cached) over a load
    from that cache, in an empty cache directory of its own (``$MASSQUANT_CACHE_DIR``)."""
    import tempfile

    figure = Figure("8", f"{DEFAULT_MODEL} first load (GGUF de-quantized) / cached load, seconds", "x", None, ">=")
    previous = os.environ.get("MASSQUANT_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="massquant-bench-cache-") as directory:
        os.environ["MASSQUANT_CACHE_DIR"] = directory
        try:
            seconds = {}
            for name in tqdm(("first", "cached"), desc="model loads", unit="load"):
                seconds[name], loaded = seconds_of(lambda: load_model(model=DEFAULT_MODEL))
                hit = loaded.extra.get("weights_cache_hit")
                del loaded
                gc.collect()
                if hit != (name == "cached"):
                    figure.unavailable = f"the {name} load {'missed' if hit is False else 'hit'} the cache"
                    return figure
        finally:
            if previous is None:
                del os.environ["MASSQUANT_CACHE_DIR"]
            else:
                os.environ["MASSQUANT_CACHE_DIR"] = previous
    figure.value = seconds["first"] / seconds["cached"]
    figure.note = f"first {seconds['first']:.1f} s, cached {seconds['cached']:.1f} s"
    figure.details = {"seconds": seconds, "method": "load_model() twice into a new, empty cache directory; one run each"}
    return figure


# ---- figure 9: a recipe on a local Ray cluster against one process


def ray_figure(sizes: Sizes) -> Figure:
    """Wall time of a 4-cell recipe (fp, w8, w8a8, w4g16 on the embedded model) on a local 2-CPU Ray cluster
    over the same recipe in this process; both compute every cell (empty run directories)."""
    import tempfile

    from massquant.recipes.execute import Executor, run_cells
    from massquant.recipes.ray_executor import CellResources
    from massquant.recipes.schema import expand, recipe_from_mapping

    figure = Figure("9", "4-cell recipe wall time: Ray executor (local, 2 CPUs) / in-process", "x", None, "<=")
    try:
        import ray
    except ImportError:
        figure.unavailable = "Ray is not installed (pip install 'massquant[ray]')"
        return figure
    recipe = recipe_from_mapping(
        {"kind": "grid", "model": [DEFAULT_MODEL], "seq_len": [sizes.window], "max_tokens": 2 * sizes.window,
         "spec": ["w8", "w8a8", "w4g16"]},
        "benchmark recipe",
    )
    cells = expand(recipe)
    with tempfile.TemporaryDirectory(prefix="massquant-bench-ray-") as directory:
        local_seconds, local = seconds_of(lambda: run_cells(cells, Path(directory) / "local", "bench"))
        start_seconds, _ = seconds_of(lambda: ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False))
        try:
            executor = Executor("ray", None, CellResources(num_cpus=1))
            ray_seconds, on_ray = seconds_of(lambda: run_cells(cells, Path(directory) / "ray", "bench", executor=executor))
        finally:
            ray.shutdown()
    same = [record["row"].get("ppl") for record in local.records] == [record["row"].get("ppl") for record in on_ray.records]
    figure.value = ray_seconds / local_seconds
    figure.note = (
        f"Ray {ray_seconds:.1f} s (+{start_seconds:.1f} s cluster start), in-process {local_seconds:.1f} s; "
        f"perplexities {'identical' if same else 'DIFFER'}"
    )
    figure.details = {
        "cells": len(cells), "ray_seconds": ray_seconds, "in_process_seconds": local_seconds,
        "ray_cluster_start_seconds": start_seconds, "identical_perplexities": same,
        "perplexities": [record["row"].get("ppl") for record in local.records],
        "method": "run_cells on empty run directories: in this process, then on a local Ray cluster (ray.init(num_cpus=2), "
        "start not counted) with one CPU per worker; each worker loads the model once",
    }
    return figure


# ---- command


def run_benchmark(sizes: Sizes) -> tuple[dict, list[Figure]]:
    started, load_before = time.perf_counter(), os.getloadavg()
    loaded = load_model(model=DEFAULT_MODEL)
    text = load_text(DEFAULT_TEXT)
    input_ids = leading_tokens(loaded.tokenizer, text, sizes.forward_tokens)
    figures = forward_figures(loaded.model, input_ids, sizes.repeats)
    rounds = perplexity_rounds(loaded, text, sizes)
    figures += harness_figures(rounds)
    figures.append(gemm_figure(loaded.model, rounds, sizes.matmul_size))
    figures += memory_figures(loaded, input_ids[:, :16])
    figures += fake_quant_memory_figures(loaded.model, input_ids[:, :16])
    figures.append(load_figure())
    figures.append(ray_figure(sizes))
    figures.append(locate_time_figure(loaded.model, input_ids, sizes.repeats))
    figures.append(locate_memory_figure(loaded.model, leading_tokens(loaded.tokenizer, text, sizes.memory_tokens)))  # last: see there
    figures.sort(key=lambda figure: figure.key)
    payload = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"reference": DEFAULT_MODEL, "source": loaded.source, "fingerprint": loaded.fingerprint},
        "text": {"reference": DEFAULT_TEXT, "sha": text_fingerprint(text)},
        "settings": {**vars(sizes), "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        # other processes share this machine; their load explains outlying timings
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "figures": [figure.as_dict() for figure in figures],
        "seconds": time.perf_counter() - started,
        "environment": environment(),
    }
    return payload, figures


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m massquant.benchmarks",
        description="Benchmark massquant on the embedded model: fake-quantization overhead, perplexity speed and "
        "agreement with lm-eval, the cost of locating massive activations, GEMM efficiency and real-quantization "
        "memory, each against its goal.",
    )
    parser.add_argument("--out", default="bench-results", metavar="DIR", help="write DIR/bench.json (default: bench-results)")
    parser.add_argument("--repeats", type=positive_int, help=f"timed repeats per measurement (default: {FULL.repeats}, --quick: {QUICK.repeats})")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shorter inputs (a smoke test, not a measurement)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        directory = ensure_writable_dir(args.out)
        sizes = QUICK if args.quick else FULL
        if args.repeats:
            sizes = replace(sizes, repeats=args.repeats)
        payload, figures = run_benchmark(sizes)
    except UserError as error:
        print(f"massquant.benchmarks: error: {error}", file=sys.stderr)
        return 2
    path = write_json_atomic(directory / "bench.json", payload)
    print(render([figure.table_row() for figure in figures], COLUMNS))
    print(f"\nraw timings: {path}", file=sys.stderr)
    return 0


