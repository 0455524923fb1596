"""Downstream tasks through lm-eval, in process, on a model already loaded; deltas with paired-bootstrap intervals.

lm-eval scores each configuration (``simple_evaluate`` over an ``HFLM`` built on
the model in memory) and reports its own stderr. With the per-question scores
it logs, every Δ against the baseline gets a confidence interval from a paired
bootstrap: the same resampled questions score both models, so the interval
reflects how much the two disagree rather than how hard the questions are.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import scipy.stats
import torch

from massquant.errors import UserError
from massquant.data.text import BOS_POLICIES

OFFLINE_PREFIX = "massquant_"
# How lm-eval aggregates per-question values into a task score; a Δ gets an
# interval only when one of these reproduces lm-eval's own score.
AGGREGATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda values: values.mean(dim=-1),
    "perplexity": lambda loglikelihoods: torch.exp(-loglikelihoods.mean(dim=-1)),
}
RESAMPLES_PER_CHUNK = 256


@dataclass
class TaskSettings:
    """Which lm-eval tasks to run on every configuration, and how; the same fields are CLI flags."""

    tasks: tuple[str, ...]
    limit: float | None = None  # lm-eval's --limit: below 1 a fraction of each task, else a count
    num_fewshot: int | None = None  # None: each task's default
    batch_size: int = 1
    bos: str = "auto"
    bootstrap: int = 1000  # paired bootstrap resamples per Δ
    confidence: float = 0.95
    seed: int = 0

    def validate(self) -> "TaskSettings":
        if not self.tasks:
            raise UserError("no tasks given; name lm-eval tasks such as massquant_arc_easy,massquant_hellaswag")
        if self.limit is not None and not 0 < self.limit < float("inf"):
            raise UserError(f"limit must be positive (a count, or a fraction below 1); got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UserError(f"num-fewshot must be 0 or more; got {self.num_fewshot}")
        if self.batch_size <= 0:
            raise UserError(f"task batch size must be a positive integer; got {self.batch_size}")
        if self.bos not in BOS_POLICIES:
            raise UserError(f"unknown BOS policy '{self.bos}'; accepted: {', '.join(BOS_POLICIES)}")
        if self.bootstrap < 100:
            raise UserError(f"bootstrap resamples must be at least 100; got {self.bootstrap}")
        if not 0 < self.confidence < 1:
            raise UserError(f"confidence must be between 0 and 1; got {self.confidence}")
        return self

    def as_dict(self) -> dict:
        return {**asdict(self), "tasks": list(self.tasks)}


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval warns about every custom dataset, prints bootstrap notices to stdout (where massquant's table or
    JSON goes) and datasets draws a bar per map; progress bars of the scoring itself stay."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _looks_offline(error: BaseException) -> bool:
    """Whether an exception chain says the hub could not be reached (or offline mode forbade it)."""
    while error is not None:
        text = f"{type(error).__name__} {error}".lower()
        if any(word in text for word in ("offline", "connection", "couldn't reach", "resolve", "network")):
            return True
        error = error.__cause__ or error.__context__
    return False


@functools.cache
def task_index():
    """lm-eval's task index with massquant's tasks: built once per process (it reads every task YAML)."""
    from massquant.lmeval.data import task_manager

    with _quiet_lm_eval():
        return task_manager()


class TaskSuite:
    """The tasks every configuration runs, with their names checked before any model is loaded."""

    def __init__(self, settings: TaskSettings):
        self.settings = settings.validate()
        self.manager = task_index()
        self.tokens: dict | None = None
        known = set(self.manager.all_tasks)
        for name in settings.tasks:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                offline = sorted(t for t in self.manager.all_groups + self.manager.all_subtasks if t.startswith(OFFLINE_PREFIX) and "mmlu_" not in t)
                raise UserError(
                    f"unknown task '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                    + f"; offline tasks: {', '.join(offline)}; 'massquant lm-eval ls tasks' lists all of lm-eval's"
                )

    def run(self, model, tokenizer) -> dict:
        """Every task on ``model`` (already mitigated and quantized): scores, stderr and per-question values.

        Afterwards ``tokens`` says which BOS and context token ids the requests carried."""
        import lm_eval

        from massquant.lmeval.hflm import InvariantHFLM

        with _quiet_lm_eval():
            lm = InvariantHFLM(model, tokenizer, self.settings.bos, batch_size=self.settings.batch_size)
            self.tokens = lm.bos_tokens  # the BOS and context token ids the requests really carried
            try:
                output = lm_eval.simple_evaluate(
                    model=lm, tasks=list(self.settings.tasks), num_fewshot=self.settings.num_fewshot,
                    limit=self.settings.limit, log_samples=True, task_manager=self.manager,
                )
            except Exception as error:
                hub_tasks = [name for name in self.settings.tasks if not name.startswith(OFFLINE_PREFIX)]
                if hub_tasks and _looks_offline(error):
                    copies = [OFFLINE_PREFIX + name for name in hub_tasks if OFFLINE_PREFIX + name in self.manager.all_tasks]
                    raise UserError(
                        f"task(s) {', '.join(hub_tasks)} load their data from the hub, which is not reachable "
                        f"({type(error).__name__})" + (f"; offline, use massquant's copies: {', '.join(copies)}" if copies else "")
                    ) from error
                raise
        return summarize(output)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _metric_name(metric: str, filter_name: str) -> str:
    return metric if filter_name == "none" else f"{metric},{filter_name}"


def _per_question(samples: list[dict], metrics: list[str]) -> tuple[list, dict[str, list[float]]]:
    """lm-eval's logged samples as doc ids and one value per question for each metric, in doc order."""
    rows: dict[str, dict] = {}
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        for metric in sample.get("metrics", []):
            name = _metric_name(metric, sample.get("filter", "none"))
            if name in metrics and _number(sample.get(metric)) is not None:
                rows.setdefault(name, {})[sample["doc_id"]] = float(sample[metric])
    doc_ids = sorted({doc for values in rows.values() for doc in values})
    return doc_ids, {name: [values.get(doc, math.nan) for doc in doc_ids] for name, values in rows.items()}


def identify_aggregation(values: list[float], score: float) -> str | None:
    """The aggregation (of AGGREGATIONS) that turns the per-question values into lm-eval's score, if any does."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if not len(values) or not torch.isfinite(tensor).all():
        return None
    for name, aggregate in AGGREGATIONS.items():
        if math.isclose(float(aggregate(tensor)), score, rel_tol=1e-9, abs_tol=1e-12):
            return name
    return None


def summarize(output: dict) -> dict:
    """``simple_evaluate``'s output as {name: entry}: tasks carry per-question values, groups their leaf tasks."""
    results, children = output["results"], output.get("group_subtasks", {})
    summary: dict[str, dict] = {}
    for name, numbers in results.items():
        metrics = {}
        for key, value in numbers.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or _number(value) is None:
                continue
            metrics[_metric_name(metric, filter_name)] = {
                "value": float(value),
                "stderr": _number(numbers.get(f"{metric}_stderr,{filter_name}")),
                "higher_is_better": output.get("higher_is_better", {}).get(name, {}).get(metric),
            }
        entry: dict = {"alias": numbers.get("alias", name).strip(), "metrics": metrics}
        if name in children:
            entry.update(kind="group", leaves=_leaves(name, children))
        else:
            doc_ids, values = _per_question(output.get("samples", {}).get(name, []), list(metrics))
            for metric, score in metrics.items():
                score["aggregation"] = identify_aggregation(values.get(metric, []), score["value"])
            entry.update(
                kind="task", num_fewshot=output.get("n-shot", {}).get(name), questions=len(doc_ids),
                doc_ids=doc_ids, per_question=values,
            )
        summary[name] = entry
    return summary


def _leaves(group: str, children: dict[str, list[str]]) -> list[str]:
    leaves = []
    for child in children.get(group, []):
        leaves.extend(_leaves(child, children) if child in children else [child])
    return leaves


def paired_bootstrap(
    variant: torch.Tensor, baseline: torch.Tensor, aggregation: str, resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile interval of aggregate(variant) - aggregate(baseline) over questions resampled together
    (``scipy.stats.bootstrap`` with ``paired=True``, ``method="percentile"``).

    ``variant[i]`` and ``baseline[i]`` are the two models' values on question i;
    each resample draws question indices with replacement and applies them to both.
    Raises ValueError for tensors of different shapes, not 1-D, or empty.
    """
    if variant.shape != baseline.shape or variant.ndim != 1 or not len(variant):
        raise ValueError("paired bootstrap needs two equally long, non-empty 1-D tensors")
    aggregate = AGGREGATIONS[aggregation]
    if len(variant) == 1:  # one question: every resample is that question
        only = float(aggregate(variant.double()) - aggregate(baseline.double()))
        return only, only

    def delta(ours: np.ndarray, theirs: np.ndarray, axis: int = -1) -> np.ndarray:
        ours, theirs = (torch.from_numpy(np.moveaxis(values, axis, -1)) for values in (ours, theirs))
        return (aggregate(ours) - aggregate(theirs)).numpy()

    result = scipy.stats.bootstrap(
        (variant.double().numpy(), baseline.double().numpy()), delta, paired=True, vectorized=True,
        n_resamples=resamples, batch=RESAMPLES_PER_CHUNK, confidence_level=confidence, method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _paired_values(variant: dict, baseline: dict, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tasks' values on the questions both scored, in the same order."""
    position = {doc: i for i, doc in enumerate(variant["doc_ids"])}
    shared = [(position[doc], i) for i, doc in enumerate(baseline["doc_ids"]) if doc in position]
    ours = torch.tensor([variant["per_question"][metric][i] for i, _ in shared], dtype=torch.float64)
    theirs = torch.tensor([baseline["per_question"][metric][j] for _, j in shared], dtype=torch.float64)
    return ours, theirs


def _pooled(entries: dict, baseline: dict, group: str, metric: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A group's questions pooled over its leaf tasks, when that pool's mean is the group's score for both models."""
    leaves = entries[group]["leaves"]
    if not all(metric in entries.get(leaf, {}).get("per_question", {}) and metric in baseline.get(leaf, {}).get("per_question", {}) for leaf in leaves):
        return None
    pairs = [_paired_values(entries[leaf], baseline[leaf], metric) for leaf in leaves]
    ours, theirs = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    for values, score in ((ours, entries[group]["metrics"][metric]["value"]), (theirs, baseline[group]["metrics"][metric]["value"])):
        if not len(values) or not math.isclose(float(values.mean()), score, rel_tol=1e-9, abs_tol=1e-12):
            return None
    return ours, theirs


def task_deltas(entries: dict, baseline: dict, settings: TaskSettings) -> dict[str, dict[str, dict]]:
    """{name: {metric: {delta, ci_low, ci_high, significant}}} of a configuration's tasks against the baseline's.

    A Δ is significant when its paired-bootstrap interval excludes 0; without
    per-question values that reproduce lm-eval's score there is no interval.
    """
    deltas: dict[str, dict[str, dict]] = {}
    for name, entry in entries.items():
        for metric, score in entry["metrics"].items():
            reference = baseline.get(name, {}).get("metrics", {}).get(metric)
            if reference is None:
                continue
            record = {"delta": score["value"] - reference["value"], "ci_low": None, "ci_high": None, "significant": None}
            if entry["kind"] == "task":
                aggregation = score.get("aggregation")
                paired = _paired_values(entry, baseline[name], metric) if aggregation and aggregation == reference.get("aggregation") else None
            else:
                aggregation, paired = "mean", _pooled(entries, baseline, name, metric)
            if paired is not None and len(paired[0]):
                low, high = paired_bootstrap(*paired, aggregation, settings.bootstrap, settings.confidence, settings.seed)
                record.update(ci_low=low, ci_high=high, significant=bool(low > 0 or high < 0))
            deltas.setdefault(name, {})[metric] = record
    return deltas
