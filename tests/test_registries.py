"""One contract per registry, checked on every entry: what an entry must provide for the rest of massquant."""

from __future__ import annotations

import importlib

import pytest
import torch

from massquant.backends import BACKENDS
from massquant.config import parse_options
from massquant.mitigations import PROTOCOLS, parse_mitigations, registry
from massquant.models.architectures import ARCHITECTURES, FACTS
from massquant.quantizers.formats import FORMATS
from massquant.quantizers.functional import fake_quantize
from massquant.quantizers.spec import parse_spec

FAKE_FORMATS = [name for name, fmt in FORMATS.items() if fmt.quantize is not None]


@pytest.mark.parametrize("name", FAKE_FORMATS)
def test_every_format_is_spelled_quantizes_idempotently_and_keeps_shape(name):
    fmt = FORMATS[name]
    token = str(fmt.default_bits) if name == "int" else fmt.label
    assert parse_spec(f"w{token}a{token}").weights.format == name
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    once = fake_quantize(x, name, fmt.default_bits, "row")
    assert once.shape == x.shape and once.dtype == x.dtype
    if not fmt.tensor_scale:  # a second-level tensor scale moves with the re-quantized amax (NVFP4)
        assert torch.equal(fake_quantize(once, name, fmt.default_bits, "row"), once)  # values on the grid stay
    block = once.float()[0, : fmt.default_group_size or 64]  # one scale: at most 2**bits values
    assert len(torch.unique(block)) <= 2 ** fmt.default_bits


@pytest.mark.parametrize("name", [name for name, fmt in FORMATS.items() if fmt.quantize is None])
def test_every_backend_only_format_names_a_registered_backend(name):
    assert FORMATS[name].backend in BACKENDS


@pytest.mark.parametrize("name", list(registry()))
def test_every_mitigation_implements_its_protocol_and_declares_real_facts(name):
    entry = registry()[name]
    module = importlib.import_module(entry.module)
    assert callable(getattr(module, PROTOCOLS[entry.kind][0]))
    assert set(entry.requires) <= set(FACTS) and entry.architectures  # some architecture in the table qualifies
    assert parse_options("", entry.parameters, name) == entry.parameters  # defaults parse as their own types
    (variant,) = parse_mitigations(name)
    assert variant[0].name == name and variant[0].params == entry.parameters
    if entry.hook("on_step") is not None:
        assert entry.trainable


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_module_defines_check_and_apply(name):
    module = importlib.import_module(f"massquant.backends.{BACKENDS[name].module}")
    assert callable(module.check) and callable(module.apply)
    assert name == "fake" or BACKENDS[name].install_hint.startswith("pip install")


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_entry_states_its_facts(name):
    entry = ARCHITECTURES[name]
    assert entry.facts <= set(FACTS) and entry.norm_kind in entry.facts
    assert entry.weight_layout in ("out_in", "in_out") and entry.layers and entry.down_proj
