"""The architecture table against tiny random models of every supported config class (no downloads).

Each path is checked by what flows through it in a real forward pass: the
input norm's output is what attention reads, the post-attention norm's output
is what every up projection reads, the MLP's output is its down projection's
output, the decoder layers' outputs are transformers' hidden states, and the
final norm turns the last one into the model's last hidden state.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from massquant.errors import UserError
from massquant.models.architectures import weight_out_in
from massquant.massive.locate import locate
from massquant.massive.observers import attention_sink_share
from massquant.massive.report import LocateConfig
from massquant.models.architectures import ARCHITECTURES, architecture_of, decoder_layers

HIDDEN, HEADS, LAYERS, VOCAB = 32, 4, 2, 128
_DECODER = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
    num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64,
)
_SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name -> (model_type, config kwargs); several Falcon layouts share one model type
TINY_CONFIGS = {
    "llama": ("llama", _DECODER),
    "mistral": ("mistral", _DECODER),
    "qwen2": ("qwen2", _DECODER),
    "qwen3": ("qwen3", {**_DECODER, "head_dim": 8}),
    "gemma": ("gemma", {**_DECODER, "head_dim": 8}),
    "gemma2": ("gemma2", {**_DECODER, "head_dim": 8}),
    "gemma3_text": ("gemma3_text", {**_DECODER, "head_dim": 8}),
    "gemma3": ("gemma3", dict(
        text_config={**_DECODER, "head_dim": 8},
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14),
        mm_tokens_per_image=4,
    )),
    "phi3": ("phi3", {**_DECODER, **_SPECIAL_IDS}),
    "phi": ("phi", {**_DECODER, **_SPECIAL_IDS}),
    "gpt2": ("gpt2", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, **_SPECIAL_IDS)),
    "gpt_neox": ("gpt_neox", {**_DECODER, **_SPECIAL_IDS}),
    "opt": ("opt", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        word_embed_proj_dim=HIDDEN, max_position_embeddings=64, **_SPECIAL_IDS,
    )),
    "falcon-7b": ("falcon", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                 parallel_attn=True, new_decoder_architecture=False, **_SPECIAL_IDS)),
    "falcon-40b": ("falcon", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  num_kv_heads=2, new_decoder_architecture=True, **_SPECIAL_IDS)),
    "falcon-rw": ("falcon", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                 parallel_attn=False, multi_query=False, alibi=True, new_decoder_architecture=False, **_SPECIAL_IDS)),
}
FALCON_NORMS = {  # (input_norm, post_attention_norm) each Falcon layout resolves to
    "falcon-7b": ("input_layernorm", "input_layernorm"),
    "falcon-40b": ("ln_attn", "ln_mlp"),
    "falcon-rw": ("input_layernorm", "post_attention_layernorm"),
}


def tiny_model(name: str, **options):
    model_type, kwargs = TINY_CONFIGS[name]
    torch.manual_seed(0)
    config = transformers.CONFIG_MAPPING[model_type](**kwargs)
    return AutoModelForCausalLM.from_config(config, **options).eval()


def test_every_table_entry_has_a_tiny_model():
    assert {model_type for model_type, _ in TINY_CONFIGS.values()} == set(ARCHITECTURES)


class Recorder:
    """Inputs and outputs of chosen modules in one forward pass."""

    def __init__(self):
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []

    def watch(self, name: str, module: nn.Module) -> None:
        def hook(module, args, kwargs, output):
            self.inputs[name] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.outputs[name] = output[0] if isinstance(output, tuple) else output

        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _is_norm(module: nn.Module, kind: str) -> bool:
    if kind == "layernorm":
        return isinstance(module, nn.LayerNorm)
    return "RMSNorm" in type(module).__name__


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_paths_carry_what_their_names_say(name):
    model = tiny_model(name)
    assert len(decoder_layers(model)) == LAYERS
    assert_paths_carry_what_their_names_say(model, torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1)))


def assert_paths_carry_what_their_names_say(model, input_ids: torch.Tensor) -> None:
    """Every path of the model's table entry, checked by what flows through it in one forward of ``input_ids`` [1, tokens]."""
    architecture = architecture_of(model)
    layers = decoder_layers(model)
    hidden_size = model.get_input_embeddings().weight.shape[1]
    recorder = Recorder()
    for index, layer in enumerate(layers):
        recorder.watch(f"{index}.layer", layer)
        recorder.watch(f"{index}.attention", layer.get_submodule(architecture.attention))
        recorder.watch(f"{index}.input_norm", layer.get_submodule(architecture.input_norm))
        recorder.watch(f"{index}.post_attention_norm", layer.get_submodule(architecture.post_attention_norm))
        recorder.watch(f"{index}.down_proj", layer.get_submodule(architecture.down_proj))
        if architecture.mlp:
            recorder.watch(f"{index}.mlp", layer.get_submodule(architecture.mlp))
        for path in architecture.up_proj:
            recorder.watch(f"{index}.{path}", layer.get_submodule(path))
        for field in ("query", "key", "value", "out_proj"):
            if getattr(architecture, field):
                recorder.watch(f"{index}.{field}", layer.get_submodule(getattr(architecture, field)))
    recorder.watch("final_norm", model.get_submodule(architecture.final_norm))
    try:
        with torch.no_grad():
            hidden_states = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    finally:
        recorder.remove()

    seen_in, seen_out = recorder.inputs, recorder.outputs
    for index, layer in enumerate(layers):
        normed = seen_out[f"{index}.input_norm"]
        assert _is_norm(layer.get_submodule(architecture.input_norm), architecture.norm_kind)
        torch.testing.assert_close(seen_in[f"{index}.attention"], normed)
        for field in ("query", "key", "value"):
            if getattr(architecture, field):
                torch.testing.assert_close(seen_in[f"{index}.{field}"], normed)
        if architecture.out_proj:
            torch.testing.assert_close(seen_out[f"{index}.attention"], seen_out[f"{index}.out_proj"])
        mlp_input = seen_out[f"{index}.post_attention_norm"]
        assert _is_norm(layer.get_submodule(architecture.post_attention_norm), architecture.norm_kind)
        assert architecture.up_proj
        for path in architecture.up_proj:
            torch.testing.assert_close(seen_in[f"{index}.{path}"], mlp_input)
        down = layer.get_submodule(architecture.down_proj)
        assert isinstance(down, (nn.Linear, Conv1D))
        down_in = seen_in[f"{index}.down_proj"].shape[-1]
        assert weight_out_in(down).shape == (hidden_size, down_in)
        assert seen_out[f"{index}.{architecture.up_proj[-1]}"].shape[-1] in (down_in, 2 * down_in)  # fused gate_up: twice
        if architecture.mlp:
            torch.testing.assert_close(seen_out[f"{index}.mlp"], seen_out[f"{index}.down_proj"])
        if index < len(layers) - 1:  # transformers' last hidden state is after the final norm
            torch.testing.assert_close(seen_out[f"{index}.layer"], hidden_states[index + 1])
    assert _is_norm(model.get_submodule(architecture.final_norm), architecture.norm_kind)
    torch.testing.assert_close(seen_in["final_norm"], seen_out[f"{len(layers) - 1}.layer"])
    torch.testing.assert_close(seen_out["final_norm"], hidden_states[-1])


@pytest.mark.parametrize("name", list(FALCON_NORMS))
def test_falcon_layouts_resolve_to_the_norms_they_have(name):
    architecture = architecture_of(tiny_model(name))
    assert (architecture.input_norm, architecture.post_attention_norm) == FALCON_NORMS[name]
    assert ARCHITECTURES["falcon"].input_norm == "ln_attn|input_layernorm"  # the table entry itself is unchanged


def test_gpt2_down_projection_is_a_transposed_conv1d():
    model = tiny_model("gpt2")
    down = decoder_layers(model)[0].get_submodule(architecture_of(model).down_proj)
    assert isinstance(down, Conv1D) and down.weight.shape == (4 * HIDDEN, HIDDEN)  # [in, out]
    x = torch.randn(3, 4 * HIDDEN)
    torch.testing.assert_close(down(x), x @ weight_out_in(down).T + down.bias)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_locate_and_attention_share_agree_with_transformers_on_every_architecture(name):
    model = tiny_model(name)
    input_ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    report = locate(model, input_ids, LocateConfig(top_k=3), progress=False)
    with torch.no_grad():
        hidden_states = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    assert len(report.layers) == LAYERS
    assert abs(report.layers[0].top[0].value) == pytest.approx(float(hidden_states[1].abs().max()), rel=1e-5)

    if not model._can_set_attn_implementation():  # Falcon: attention is chosen when the model is built
        with pytest.raises(UserError, match="--attn-implementation eager"):
            attention_sink_share(model, input_ids, progress=False)
        model = tiny_model(name, attn_implementation="eager")
    implementation = model.config._attn_implementation
    share = torch.tensor(attention_sink_share(model, input_ids, progress=False))
    assert model.config._attn_implementation == implementation
    if model._can_set_attn_implementation():
        model.set_attn_implementation("eager")  # the reference: transformers' own attention probabilities
    with torch.no_grad():
        attentions = model(input_ids=input_ids, output_attentions=True).attentions
    expected = torch.stack([layer[:, :, 1:, 0].mean(dim=(0, 2)) for layer in attentions])  # [layer, head]
    torch.testing.assert_close(share, expected)


def test_unsupported_architecture_names_the_supported_ones_and_where_to_add_it():
    config = transformers.CONFIG_MAPPING["starcoder2"](**_DECODER)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UserError) as caught:
        architecture_of(model)
    message = str(caught.value)
    assert "'starcoder2' is not supported" in message and "massquant/models/architectures.py" in message
    assert all(model_type in message for model_type in ARCHITECTURES)
