"""Every kind of model reference, and the text corpora."""

from __future__ import annotations

import pytest
import torch

from massquant.data.text import TEXT_SOURCES, load_text
from massquant.errors import UserError
from massquant.models.loading import MODEL_ALIASES, load_model, resolve_reference


def test_local_directory_loads_with_dtype(tiny_llama_dir):
    loaded = load_model(model=tiny_llama_dir, dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert not loaded.model.training
    assert loaded.fingerprint.startswith("sha256:") and loaded.source == tiny_llama_dir
    again = load_model(model=tiny_llama_dir)
    assert again.fingerprint == loaded.fingerprint  # content hash, stable across loads


def test_alias_resolves_to_the_packaged_gguf():
    resolved = resolve_reference("smollm2-135m")
    assert resolved.gguf_file == MODEL_ALIASES["smollm2-135m"].filename and resolved.kind == "alias"


def test_embedded_model_is_real_llama_and_saves_as_plain_hf(smollm2, tmp_path):
    config = smollm2.model.config
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert smollm2.tokenizer.bos_token_id == 1
    smollm2.model.save_pretrained(tmp_path)  # refused while the GGUF markers are set
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "reference, message",
    [
        ("no-such-org/no-such-model", "cannot load model"),
        ("./missing/model", "not found"),
        ("/tmp/nothing-here.gguf", "GGUF file not found"),
    ],
)
def test_bad_model_references(reference, message):
    with pytest.raises(UserError, match=message):
        load_model(model=reference)


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(model=str(tmp_path))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UserError, match="cannot load model"):
        load_model(model=str(bad))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu(tiny_llama_dir):
    with pytest.raises(UserError, match="no CUDA GPU"):
        load_model(model=tiny_llama_dir, device="cuda")


def test_enwiki_sample_is_real_wikipedia_text(enwiki_text):
    assert enwiki_text.startswith("= Anarchism =\n\nAnarchism is a political philosophy")
    assert enwiki_text.count("\n= ") + 1 == 106
    assert "''" not in enwiki_text and "[[" not in enwiki_text
    assert 2_500_000 < len(enwiki_text) < 3_500_000


def test_text_file_and_errors(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"line one\r\nline two\r\n")
    assert load_text(str(path)) == "line one\nline two\n"
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="named corpora"):
        load_text(str(tmp_path / "missing.txt"))


def test_hub_corpus_offline_names_the_offline_choices():
    with pytest.raises(UserError, match="offline corpora: enwiki-sample"):
        TEXT_SOURCES["wikitext2"].load()
