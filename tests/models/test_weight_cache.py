"""The on-disk cache of de-quantized GGUF weights: same weights, tokens and hash as an uncached load; damage is rebuilt."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from massquant.models import cache
from massquant.models.loading import load_model


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    assert cache.cache_root() == tmp_path / "xdg" / "massquant"
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "mine"))
    assert cache.cache_root() == cache.cache_home() == tmp_path / "mine"
    monkeypatch.setenv(cache.CACHE_ENV, "off")
    assert cache.cache_root() is None and cache.cache_home() == tmp_path / "xdg" / "massquant"


def test_file_sha256_is_hashlib_and_sees_changes(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"massive" * 1000)
    assert cache.file_sha256(path) == hashlib.sha256(b"massive" * 1000).hexdigest()
    path.write_bytes(b"activations")  # another size: not the memoized hash
    assert cache.file_sha256(path) == hashlib.sha256(b"activations").hexdigest()


def _entry_files(entry):
    return sorted(p.name for p in entry.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest", "extra"])
def test_a_damaged_entry_is_detected_removed_and_rebuilt(tiny_llama_dir, cache_dir, damage, capsys):
    loaded = load_model(model=tiny_llama_dir)
    source = "ab" * 32
    entry = cache.store(loaded.model, loaded.tokenizer, source, "float32")
    assert entry == cache_dir / "weights" / cache.entry_key(source, "float32") and cache.lookup(source, "float32") == entry
    assert "model.safetensors" in _entry_files(entry) and "tokenizer.json" in _entry_files(entry)
    assert list((cache_dir / "weights").iterdir()) == [entry]  # no temporary directory left behind
    assert cache.lookup(source, "bfloat16") is None and cache.lookup("cd" * 32, "float32") is None
    weights = entry / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "flip":  # same size, one bit different
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 1
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        weights.unlink()
    elif damage == "manifest":
        (entry / cache.MANIFEST).write_text("{not json")
    else:
        (entry / "stray.bin").write_bytes(b"x")
    assert cache.lookup(source, "float32") is None
    assert "incomplete or damaged" in capsys.readouterr().err and not entry.exists()
    assert cache.store(loaded.model, loaded.tokenizer, source, "float32") == entry and cache.lookup(source, "float32") == entry


def test_an_unfinished_entry_is_never_read(tiny_llama_dir, cache_dir):
    # a writer killed before its rename leaves only a temporary directory, which lookup never opens
    loaded = load_model(model=tiny_llama_dir)
    source = "ef" * 32
    key = cache.entry_key(source, "float32")
    partial = cache_dir / "weights" / f".{key}.abc123"
    partial.mkdir(parents=True)
    loaded.model.save_pretrained(partial)
    assert cache.lookup(source, "float32") is None
    # a concurrent writer that finished first wins; the second store keeps its entry and removes its own temporary
    first = cache.store(loaded.model, loaded.tokenizer, source, "float32")
    manifest = (first / cache.MANIFEST).read_text()
    assert cache.store(loaded.model, loaded.tokenizer, source, "float32") == first
    assert (first / cache.MANIFEST).read_text() == manifest
    assert sorted(p.name for p in (cache_dir / "weights").iterdir()) == sorted([key, partial.name])


def test_unwritable_cache_is_a_warning_not_an_error(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(cache.CACHE_ENV, str(blocker))
    loaded = load_model(model=tiny_llama_dir)
    assert cache.store(loaded.model, loaded.tokenizer, "12" * 32, "float32") is None
    assert "could not cache de-quantized weights" in capsys.readouterr().err


def state_digest(model) -> dict:
    return {name: hashlib.sha256(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, tensor in model.state_dict().items()}


def test_smollm2_cached_load_equals_the_uncached_one(cache_dir, enwiki_text):
    uncached = load_model(model="smollm2-135m")  # de-quantizes the GGUF, then writes the entry
    assert uncached.extra == {"weights_cache_hit": False}
    [entry] = (cache_dir / "weights").iterdir()
    manifest = json.loads((entry / cache.MANIFEST).read_text())
    assert manifest["source_sha256"].startswith(uncached.fingerprint.removeprefix("sha256:"))
    cached = load_model(model="smollm2-135m")
    assert cached.extra == {"weights_cache_hit": True}
    # the recorded hash, source and settings are those of the GGUF file either way
    assert cached.record() == uncached.record()
    assert state_digest(cached.model) == state_digest(uncached.model)
    def config_of(loaded) -> dict:
        return {key: value for key, value in loaded.model.config.to_diff_dict().items() if key != "_name_or_path"}

    assert config_of(cached) == config_of(uncached)
    text = enwiki_text[:20000]
    assert cached.tokenizer(text)["input_ids"] == uncached.tokenizer(text)["input_ids"]
    assert (cached.tokenizer.bos_token_id, cached.tokenizer.pad_token_id) == (uncached.tokenizer.bos_token_id, uncached.tokenizer.pad_token_id)
    ids = torch.tensor([[1] + cached.tokenizer(text[:2000])["input_ids"][:127]])
    with torch.no_grad():
        torch.testing.assert_close(cached.model(ids).logits, uncached.model(ids).logits, rtol=0, atol=0)
