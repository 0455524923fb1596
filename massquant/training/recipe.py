"""Training recipes: one YAML file per run, parsed onto dataclasses (typo'd keys are one-line errors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from massquant.config import MAX_SEED, MAX_SEQUENCES, check_int, from_mapping, read_yaml
from massquant.data.calibration import DEFAULT_CALIBRATION_TEXT
from massquant.data.text import DEFAULT_TEXT
from massquant.errors import UserError
from massquant.evaluation.perplexity import BOS_POLICIES
from massquant.models.loading import DEFAULT_MODEL, ModelConfig

SCHEDULES = ("cosine", "linear", "constant")
RECIPE_KIND = "train"


@dataclass
class TrainSettings:
    """The optimisation: AdamW on next-token loss over windows of an offline text."""

    data: str = DEFAULT_TEXT
    seq_len: int = 256
    batch_size: int = 4
    steps: int = 100
    lr: float = 5e-5
    min_lr_ratio: float = 0.1  # where cosine/linear decay ends, as a fraction of lr
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.1  # on matrices only; norms, biases and scalars are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    bf16: bool = False  # bfloat16 autocast (weights and optimizer stay float32)
    bos: str = "auto"
    seed: int = 0
    save_every: int = 0  # also write checkpoint-<step>/ every N steps; 0: only the final checkpoint
    # per-layer massive-activation statistics every N steps (and before the first), on record_sequences
    # held-out windows: massquant.analysis.dynamics; 0: not recorded
    record_every: int = 0
    record_sequences: int = 2

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"recipe train.schedule '{self.schedule}' is unknown; accepted: {', '.join(SCHEDULES)}")
        if self.bos not in BOS_POLICIES:
            raise UserError(f"recipe train.bos '{self.bos}' is unknown; accepted: {', '.join(BOS_POLICIES)}")
        for name in ("seq_len", "batch_size", "steps"):
            check_int(getattr(self, name), f"recipe train.{name}")
        check_int(self.seed, "recipe train.seed", low=0, high=MAX_SEED)
        check_int(self.warmup_steps, "recipe train.warmup_steps", low=0)
        check_int(self.save_every, "recipe train.save_every", low=0)
        check_int(self.record_every, "recipe train.record_every", low=0)
        check_int(self.record_sequences, "recipe train.record_sequences", high=MAX_SEQUENCES)
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"recipe train needs lr > 0 and 0 <= min_lr_ratio <= 1; got lr={self.lr}, min_lr_ratio={self.min_lr_ratio}")
        if min(self.warmup_steps, self.save_every) < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError("recipe train: warmup_steps, save_every, weight_decay and grad_clip must not be negative")


@dataclass
class CalibrationSettings:
    """Sequences for fitted initialisations (DyT) and for static quantization ranges in the evaluation."""

    data: str = DEFAULT_CALIBRATION_TEXT
    samples: int = 8
    seq_len: int = 512


@dataclass
class EvalSettings:
    """Perplexity (and massive-activation statistics) before and after training, on held-out tokens."""

    data: str = DEFAULT_TEXT
    seq_len: int = 512
    max_tokens: int = 4096  # the first tokens of the text; training skips them when it reads the same text
    bos: str = "auto"
    batch_size: int = 1
    specs: list[str] = field(default_factory=list)  # quantization specs evaluated besides full precision
    locate: bool = True  # massive-activation statistics via massquant.massive.locate
    locate_sequences: int = 4


@dataclass
class TrainRecipe:
    """``massquant train RECIPE.yaml``: a model, the mitigation(s) to train with, the optimisation, the evaluation."""

    kind: str = RECIPE_KIND
    model: str = DEFAULT_MODEL  # alias, .gguf, directory or hub id; with from_scratch: the tokenizer and architecture
    dtype: str = "float32"
    device: str = "cpu"
    attn: str = "sdpa"
    from_scratch: dict | None = None  # config overrides (hidden_size, num_hidden_layers, ...) for a random init
    mitigation: str = "none"  # registry syntax, one combination: tvr, dyt, gated, kvbias, tvr+kvbias, tvr+dyt:alpha=0.8
    out: str = "results/train"
    train: TrainSettings = field(default_factory=TrainSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    eval: EvalSettings | None = field(default_factory=EvalSettings)  # null: no evaluation

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(model=self.model, dtype=self.dtype, device=self.device, attn_implementation=self.attn)

    def validate(self) -> "TrainRecipe":
        self.model_config.validate()
        self.train.validate()
        if self.eval is not None:
            if self.eval.bos not in BOS_POLICIES:
                raise UserError(f"recipe eval.bos '{self.eval.bos}' is unknown; accepted: {', '.join(BOS_POLICIES)}")
            for name in ("seq_len", "max_tokens", "batch_size", "locate_sequences"):
                check_int(getattr(self.eval, name), f"recipe eval.{name}")
        check_int(self.calibration.samples, "recipe calibration.samples", high=MAX_SEQUENCES)
        check_int(self.calibration.seq_len, "recipe calibration.seq_len")
        if self.from_scratch is not None and not isinstance(self.from_scratch, dict):
            raise UserError("recipe from_scratch: expected a mapping of config overrides, e.g. {hidden_size: 64, num_hidden_layers: 2}")
        return self


_SECTIONS = {"train": TrainSettings, "calibration": CalibrationSettings, "eval": EvalSettings}


def parse_recipe(mapping, where: str = "recipe") -> TrainRecipe:
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping with keys such as model, mitigation, train, eval")
    if mapping.get("kind", RECIPE_KIND) != RECIPE_KIND:  # before the keys: a grid recipe has other ones
        raise UserError(f"{where} has 'kind: {mapping['kind']}', not a training recipe (kind: {RECIPE_KIND}); run it with 'massquant run'")
    values = dict(mapping)
    for key, cls in _SECTIONS.items():
        if key in values:
            section = values[key]
            if key == "eval" and section in (None, False):  # no evaluation
                values[key] = None
            else:
                values[key] = from_mapping(cls, {} if section is None else section, f"{where} {key}")
    return from_mapping(TrainRecipe, values, where).validate()


def load_recipe(path: str | Path) -> TrainRecipe:
    path = Path(path)
    return parse_recipe(read_yaml(path, f"recipe '{path}'"), f"recipe '{path.name}'")
