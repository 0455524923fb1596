"""Where each architecture keeps its layers, attention, MLP and norms, and how it is built: data, in one table.

To support a new architecture, add one ``Architecture`` entry below, keyed by
``config.model_type``. Paths are dotted attribute names, relative to the model
(``layers``, ``final_norm``) or to one decoder layer (the others). Where one
model type comes in several layouts (Falcon's norms), a layer path lists the
alternatives, ``"ln_mlp|input_layernorm"``; ``architecture_of`` resolves them
to the one the model at hand has. Every entry is checked against a tiny random
model of its config class in ``tests/test_architectures.py``.

Structural facts (``Architecture.facts``) are what mitigations require
(``Mitigation.requires``) instead of lists of model types: a new architecture
gets every mitigation whose requirements its entry meets.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from transformers.pytorch_utils import Conv1D

from massquant.errors import UserError


@dataclass(frozen=True)
class Architecture:
    layers: str
    attention: str
    mlp: str
    down_proj: str  # the MLP's output projection, whose input carries the super-weight spikes
    input_norm: str
    post_attention_norm: str
    final_norm: str
    norm_kind: str  # "rmsnorm" or "layernorm"
    query: str | None = None
    key: str | None = None
    value: str | None = None
    out_proj: str | None = None
    up_proj: tuple[str, ...] = ()  # linears reading the post-attention norm's output
    # the gated MLP's branch that is multiplied by the activated gate, not activated itself:
    # scaling its output channels scales down_proj's input channels exactly (SmoothQuant folds there)
    linear_up_proj: str | None = None
    # norms on the attention and MLP outputs before the residual add (Gemma 2/3 "sandwich" norms):
    # a rotation of the residual stream does not commute with them
    branch_output_norms: bool = False
    weight_layout: str = "out_in"  # nn.Linear [out, in]; GPT-2's Conv1D stores [in, out]

    @property
    def facts(self) -> frozenset[str]:
        """The structural facts mitigations may require (see ``FACTS``)."""
        found = {self.norm_kind, "branch-output-norms" if self.branch_output_norms else "no-branch-output-norms"}
        if self.query and self.key and self.value:
            found.add("separate-qkv")
        if self.linear_up_proj:
            found.add("gated-mlp")
        return frozenset(found)


FACTS = {
    "rmsnorm": "RMSNorm everywhere (no mean subtraction, no bias: scales and rotations fold into the next linear)",
    "layernorm": "LayerNorm",
    "no-branch-output-norms": "no norm on the attention/MLP outputs before the residual add",
    "branch-output-norms": "norms on the attention/MLP outputs (Gemma 2/3 sandwich norms)",
    "separate-qkv": "separate query, key and value projections (not one fused linear)",
    "gated-mlp": "a gated MLP with a linear (not activated) up branch",
}


_LLAMA_LIKE = Architecture(
    layers="model.layers", attention="self_attn", mlp="mlp", down_proj="mlp.down_proj",
    input_norm="input_layernorm", post_attention_norm="post_attention_layernorm", final_norm="model.norm",
    norm_kind="rmsnorm", query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
    out_proj="self_attn.o_proj", up_proj=("mlp.gate_proj", "mlp.up_proj"), linear_up_proj="mlp.up_proj",
)
_GEMMA2_LIKE = Architecture(  # extra norms after attention and MLP; the MLP reads pre_feedforward_layernorm
    **{**vars(_LLAMA_LIKE), "post_attention_norm": "pre_feedforward_layernorm", "branch_output_norms": True}
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "phi3": Architecture(
        layers="model.layers", attention="self_attn", mlp="mlp", down_proj="mlp.down_proj",
        input_norm="input_layernorm", post_attention_norm="post_attention_layernorm", final_norm="model.norm",
        norm_kind="rmsnorm", out_proj="self_attn.o_proj", up_proj=("mlp.gate_up_proj",),
    ),
    "phi": Architecture(  # parallel attention and MLP share one LayerNorm
        layers="model.layers", attention="self_attn", mlp="mlp", down_proj="mlp.fc2",
        input_norm="input_layernorm", post_attention_norm="input_layernorm", final_norm="model.final_layernorm",
        norm_kind="layernorm", query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
        out_proj="self_attn.dense", up_proj=("mlp.fc1",),
    ),
    "gpt2": Architecture(
        layers="transformer.h", attention="attn", mlp="mlp", down_proj="mlp.c_proj",
        input_norm="ln_1", post_attention_norm="ln_2", final_norm="transformer.ln_f", norm_kind="layernorm",
        out_proj="attn.c_proj", up_proj=("mlp.c_fc",), weight_layout="in_out",
    ),
    "gpt_neox": Architecture(
        layers="gpt_neox.layers", attention="attention", mlp="mlp", down_proj="mlp.dense_4h_to_h",
        input_norm="input_layernorm", post_attention_norm="post_attention_layernorm",
        final_norm="gpt_neox.final_layer_norm", norm_kind="layernorm", out_proj="attention.dense",
        up_proj=("mlp.dense_h_to_4h",),
    ),
    "opt": Architecture(
        layers="model.decoder.layers", attention="self_attn", mlp="", down_proj="fc2",
        input_norm="self_attn_layer_norm", post_attention_norm="final_layer_norm",
        final_norm="model.decoder.final_layer_norm", norm_kind="layernorm", query="self_attn.q_proj",
        key="self_attn.k_proj", value="self_attn.v_proj", out_proj="self_attn.out_proj", up_proj=("fc1",),
    ),
    # Falcon-7B: one LayerNorm for parallel attention and MLP; Falcon-40B/180B (new decoder
    # architecture): ln_attn and ln_mlp; Falcon-RW (sequential): input and post-attention LayerNorms.
    "falcon": Architecture(
        layers="transformer.h", attention="self_attention", mlp="mlp", down_proj="mlp.dense_4h_to_h",
        input_norm="ln_attn|input_layernorm", post_attention_norm="ln_mlp|post_attention_layernorm|input_layernorm",
        final_norm="transformer.ln_f", norm_kind="layernorm", out_proj="self_attention.dense",
        up_proj=("mlp.dense_h_to_4h",),
    ),
    # Gemma 3 with its vision tower (Gemma3ForConditionalGeneration, what AutoModelForCausalLM
    # builds for model_type "gemma3"); its text part is a gemma3_text decoder.
    "gemma3": replace(_GEMMA2_LIKE, layers="model.language_model.layers", final_norm="model.language_model.norm"),
}

_LAYER_PATH_FIELDS = tuple(
    f.name for f in fields(Architecture) if f.name not in ("layers", "final_norm", "norm_kind", "branch_output_norms", "weight_layout")
)
# Linear layers: nn.Linear and GPT-2's Conv1D (the same map, its weight stored transposed).
LINEAR_TYPES = (torch.nn.Linear, Conv1D)


def architecture_of(model: torch.nn.Module) -> Architecture:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(ARCHITECTURES)} "
            "(add it to massquant/models/architectures.py)"
        )
    return _resolve_alternatives(ARCHITECTURES[model_type], model)


def _first_present(layer: torch.nn.Module, alternatives: str) -> str:
    names = alternatives.split("|")
    for name in names:
        try:
            layer.get_submodule(name)
        except AttributeError:
            continue
        return name
    raise UserError(f"decoder layer {type(layer).__name__} has none of {', '.join(names)} (massquant/models/architectures.py)")


def _resolve_alternatives(entry: Architecture, model: torch.nn.Module) -> Architecture:
    """``entry`` with every ``a|b`` layer path replaced by the alternative this model's layers have."""
    listed = {
        name: value for name in _LAYER_PATH_FIELDS
        if isinstance(value := getattr(entry, name), str) and "|" in value
    }
    if not listed:
        return entry
    layer = model.get_submodule(entry.layers)[0]
    return replace(entry, **{name: _first_present(layer, value) for name, value in listed.items()})


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.get_submodule(architecture_of(model).layers))


def model_types_with(facts) -> list[str]:
    """The model types whose entry has every fact in ``facts`` (what a mitigation supports)."""
    return [name for name, entry in ARCHITECTURES.items() if set(facts) <= entry.facts]


def weight_out_in(module: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as ``[out, in]``: a view of GPT-2's ``[in, out]`` Conv1D weight, writable."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def attention_geometry(model: torch.nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of the first decoder layer's attention."""
    config = getattr(model.config, "text_config", None) or model.config
    attention = decoder_layers(model)[0].get_submodule(architecture_of(model).attention)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(heads), int(kv_heads), int(head_dim)


def layer_hidden(output) -> torch.Tensor:
    """The hidden state in a decoder layer's output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_layer_hidden(output, hidden: torch.Tensor):
    """``output`` with its hidden state replaced (for forward hooks that change it)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
