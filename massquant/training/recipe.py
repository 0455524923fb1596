"""Training recipes: one YAML file per run. Every key is a declared option (``massquant.options``), so a
typo'd key or an out-of-range value is a one-line error naming the file; the sections below only set
each key's default where training wants another one than evaluation."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from massquant import options
from massquant.config import read_yaml
from massquant.data.calibration import CalibrationSettings
from massquant.data.text import DEFAULT_TEXT
from massquant.errors import UserError
from massquant.models.loading import ModelConfig
from massquant.options import settings

RECIPE_KIND = "train"


@dataclass
class TrainSettings:
    """The ``train:`` section: AdamW on next-token loss over windows of an offline text."""

    data: str = DEFAULT_TEXT
    seq_len: int = 256
    batch_size: int = 4
    bos: str = "auto"
    seed: int = 0
    steps: int = 100
    optimizer: str = "adamw"
    lr: float = 5e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bf16: bool = False
    save_every: int = 0
    record_every: int = 0  # massquant.analysis.dynamics statistics every N steps (and at step 0); 0: off
    record_sequences: int = 2


@dataclass
class EvalSettings:
    """The ``eval:`` section: perplexity (and massive-activation statistics) before and after training, on
    held-out tokens (training skips the first ``max_tokens`` when it reads the same text)."""

    data: str = DEFAULT_TEXT
    seq_len: int = 512
    max_tokens: int = 4096
    bos: str = "auto"
    batch_size: int = 1
    spec: list[str] = field(default_factory=list)  # quantization specs evaluated besides full precision
    locate: bool = True
    n_seqs: int = 4  # sequences of the locate statistics


@dataclass
class TrainRecipe:
    """``massquant train RECIPE.yaml``: a model, the mitigation(s) to train with, the optimisation, the evaluation."""

    kind: str = RECIPE_KIND
    model: ModelConfig = field(default_factory=ModelConfig)  # with from_scratch: the tokenizer and architecture
    from_scratch: dict | None = None  # config overrides (hidden_size, num_hidden_layers, ...) for a random init
    mitigation: str = "none"  # registry syntax, one combination: tvr, dyt, gated, kvbias, tvr+kvbias, tvr+dyt:alpha=0.8
    out: str = "results/train"
    train: TrainSettings = field(default_factory=TrainSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    eval: EvalSettings | None = field(default_factory=EvalSettings)  # null: no evaluation


TOP_GROUPS = ("model", "calibration", "mitigation")
TOP_KEYS = ("kind", "from_scratch", "out", "train", "eval")


def _section(cls, mapping, groups: tuple[str, ...], where: str):
    """A section's dataclass from its mapping: the keys are the dataclass fields, typed by their declarations."""
    names = [f.name for f in fields(cls)]
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(cls)}
    values = options.from_mapping(
        {} if mapping is None else mapping, groups, where, defaults=defaults,
        skip=[key for key in options.keys(*groups) if key not in names],
    )
    for name in names:
        if options.OPTIONS[name].axis:  # one run: a single value where grids take several
            if len(getattr(values, name)) != 1:
                raise UserError(f"{where}: '{name}' takes one value in a training recipe; got {getattr(values, name)}")
            setattr(values, name, getattr(values, name)[0])
    return cls(**{name: getattr(values, name) for name in names})


def parse_recipe(mapping, where: str = "recipe") -> TrainRecipe:
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping with keys such as model, mitigation, train, eval")
    if mapping.get("kind", RECIPE_KIND) != RECIPE_KIND:  # before the keys: a grid recipe has other ones
        raise UserError(f"{where} has 'kind: {mapping['kind']}', not a training recipe (kind: {RECIPE_KIND}); run it with 'massquant run'")
    top = options.from_mapping(mapping, TOP_GROUPS, where, extra=TOP_KEYS)
    if len(top.mitigation) != 1:
        raise UserError(f"{where}: mitigation names {len(top.mitigation)} variants; a training run trains one (combine with '+')")
    from_scratch = mapping.get("from_scratch")
    if from_scratch is not None and not isinstance(from_scratch, dict):
        raise UserError(f"{where}: from_scratch: expected a mapping of config overrides, e.g. {{hidden_size: 64, num_hidden_layers: 2}}")
    out = mapping.get("out", TrainRecipe.out)
    if not isinstance(out, str):
        raise UserError(f"{where}: 'out' expects a directory path; got {out!r}")
    evaluation = mapping.get("eval", {})
    recipe = TrainRecipe(
        model=settings.model_config(top, top.model[0]),
        from_scratch=from_scratch,
        mitigation=top.mitigation[0],
        out=out,
        train=_section(TrainSettings, mapping.get("train"), ("text", "run", "train"), f"{where} train"),
        calibration=settings.calibration(top),
        eval=None if evaluation in (None, False) else _section(EvalSettings, evaluation, ("text", "quantization", "train"), f"{where} eval"),
    )
    recipe.model.validate()
    return recipe


def load_recipe(path: str | Path) -> TrainRecipe:
    path = Path(path)
    return parse_recipe(read_yaml(path, f"recipe '{path}'"), f"recipe '{path.name}'")
