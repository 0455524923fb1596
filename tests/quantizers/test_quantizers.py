"""Fake quantization checked against torch's reference kernels, hand-computed values and properties."""

import dataclasses
import math

import pytest
import torch

from massquant.errors import UserError
from massquant.quantizers import (
    FORMATS,
    compute_amax,
    compute_amin,
    fake_quantize,
    get_format,
    round_to_e2m1,
    search_clip_ratio,
    sqnr_db,
    validate,
)

SYMMETRIC_FORMATS = [("int", 8), ("int", 4), ("int", 2), ("fp8_e4m3", 8), ("fp8_e5m2", 8), ("mxfp4", 4), ("nvfp4", 4)]


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --- int against torch.fake_quantize_* -------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_symmetric_per_tensor_matches_torch(bits):
    x = randn(64, 96, seed=bits)
    qmax = 2 ** (bits - 1) - 1
    scale = float(x.abs().max() / qmax)
    expected = torch.fake_quantize_per_tensor_affine(x, scale, 0, -qmax - 1, qmax)
    assert torch.equal(fake_quantize(x, "int", bits, "tensor"), expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_asymmetric_per_tensor_matches_torch(bits):
    x = randn(64, 96, seed=bits) + 0.7  # skewed, so the zero point is not mid-range
    low, high = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
    levels = 2**bits - 1
    scale = (high - low) / levels
    zero_point = int(torch.round(-low / scale))
    expected = torch.fake_quantize_per_tensor_affine(x, float(scale), zero_point, 0, levels)
    actual = fake_quantize(x, "int", bits, "tensor", symmetric=False)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_symmetric_per_row_matches_torch(bits):
    x = randn(48, 80, seed=10 + bits) * torch.linspace(0.1, 5.0, 48)[:, None]
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=1) / qmax
    zero_point = torch.zeros(48, dtype=torch.int32)
    expected = torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, -qmax - 1, qmax)
    assert torch.equal(fake_quantize(x, "int", bits, "row"), expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_asymmetric_per_row_matches_torch(bits):
    x = randn(48, 80, seed=20 + bits) + torch.linspace(-2.0, 2.0, 48)[:, None]
    x[0] = x[0].abs() + 1.0  # all positive: the range must be widened to include 0
    low = x.amin(dim=1).clamp(max=0.0)
    high = x.amax(dim=1).clamp(min=0.0)
    levels = 2**bits - 1
    scale = (high - low) / levels
    zero_point = torch.round(-low / scale).to(torch.int32)
    expected = torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, 0, levels)
    assert torch.equal(fake_quantize(x, "int", bits, "row", symmetric=False), expected)


def test_row_granularity_of_activation_is_per_token():
    x = randn(2, 5, 64, seed=3)
    per_token = fake_quantize(x, "int", 4, "row")
    flat = x.reshape(10, 64)
    scale = flat.abs().amax(dim=1) / 7
    expected = torch.fake_quantize_per_channel_affine(flat, scale, torch.zeros(10, dtype=torch.int32), 0, -8, 7)
    assert torch.equal(per_token, expected.reshape(2, 5, 64))


# --- group granularity -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,bits,symmetric", [("int", 4, True), ("int", 3, False), ("fp8_e4m3", 8, True), ("fp8_e5m2", 8, True)]
)
def test_group_equals_row_of_reshaped_and_explicit_loop(fmt, bits, symmetric):
    x = randn(6, 128, seed=4) * torch.linspace(0.5, 4.0, 128)
    group_size = 32
    grouped = fake_quantize(x, fmt, bits, "group", group_size, symmetric)

    as_rows = fake_quantize(x.reshape(-1, group_size), fmt, bits, "row", symmetric=symmetric).reshape(x.shape)
    assert torch.equal(grouped, as_rows)

    looped = torch.empty_like(x)
    for row in range(x.shape[0]):
        for start in range(0, x.shape[1], group_size):
            chunk = x[row, start : start + group_size]
            looped[row, start : start + group_size] = fake_quantize(chunk, fmt, bits, "tensor", symmetric=symmetric)
    assert torch.equal(grouped, looped)


def test_int_group_matches_torch_per_channel_of_groups():
    x = randn(4, 96, seed=5)
    groups = x.reshape(-1, 32)
    scale = groups.abs().amax(dim=1) / 7
    zero_point = torch.zeros(groups.shape[0], dtype=torch.int32)
    expected = torch.fake_quantize_per_channel_affine(groups, scale, zero_point, 0, -8, 7).reshape(x.shape)
    assert torch.equal(fake_quantize(x, "int", 4, "group", 32), expected)


# --- fp8 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_matches_cast_reference(fmt, dtype):
    x = randn(32, 64, seed=6, scale=10.0)
    fp8_max = torch.finfo(dtype).max

    scale = x.abs().max() / fp8_max
    expected = (x / scale).to(dtype).float() * scale
    assert torch.equal(fake_quantize(x, fmt, 8, "tensor"), expected)

    row_scale = x.abs().amax(dim=1, keepdim=True) / fp8_max
    expected_rows = (x / row_scale).to(dtype).float() * row_scale
    assert torch.equal(fake_quantize(x, fmt, 8, "row"), expected_rows)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_saturates_beyond_clipped_range(fmt):
    x = randn(16, 64, seed=7, scale=3.0)
    limit = 0.5 * float(x.abs().max())
    out = fake_quantize(x, fmt, clip_ratio=0.5)
    assert torch.isfinite(out).all()
    assert math.isclose(float(out.max()), limit, rel_tol=1e-6)
    assert math.isclose(float(out.min()), -limit, rel_tol=1e-6)


# --- micro formats: hand-computed blocks -----------------------------------------------------


def pad(values, length):
    return values + [0.0] * (length - len(values))


def test_round_to_e2m1_grid_ties_and_saturation():
    x = torch.tensor([0.0, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 2.9, 3.5, 4.9, 5.0, 5.1, 6.0, 7.0, 100.0, -0.75, -5.0])
    expected = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 4.0, 6.0, 6.0, 6.0, 6.0, -1.0, -4.0])
    assert torch.equal(round_to_e2m1(x), expected)


def test_mxfp4_hand_computed_blocks():
    rows = [
        # amax 6 -> scale 2**(2-2) = 1: elements are rounded straight onto the E2M1 grid
        ([6.0, -6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 0.1, 0.3, 2.9, 4.9, 5.1, -1.4],
         [6.0, -6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 0.0, 0.5, 3.0, 4.0, 6.0, -1.5]),
        # amax 10 -> scale 2**(3-2) = 2; 10/2 = 5 is a tie between 4 and 6 -> 4 -> 8
        ([10.0, -7.0, 3.0, 1.0, 0.5, 2.5, 9.0, 7.0, -0.6, 4.5, 6.0],
         [8.0, -8.0, 3.0, 1.0, 0.0, 2.0, 8.0, 8.0, -1.0, 4.0, 6.0]),
        # amax 15 -> scale 2; 15/2 = 7.5 and 13/2 = 6.5 saturate at 6 -> 12
        ([15.0, 13.0, -12.0, 0.75, -15.0],
         [12.0, 12.0, -12.0, 1.0, -12.0]),
        # amax 0.75 -> scale 2**(-1-2) = 0.125
        ([0.75, 0.3, 0.0625, 0.03125, -0.7],
         [0.75, 0.25, 0.0625, 0.0, -0.75]),
    ]
    x = torch.tensor([pad(values, 32) for values, _ in rows])
    expected = torch.tensor([pad(values, 32) for _, values in rows])
    assert torch.equal(fake_quantize(x, "mxfp4"), expected)
    # blocks run along the last dimension: two rows side by side are still separate blocks
    assert torch.equal(fake_quantize(x.reshape(2, 64), "mxfp4"), expected.reshape(2, 64))


def test_nvfp4_hand_computed_blocks():
    rows = [
        # tensor amax 2688 = 6 * 448 -> global scale 1; this block's scale is 2688/6 = 448
        ([2688.0, -1344.0, 1120.0, 560.0, 100.0, 2000.0],
         [2688.0, -1344.0, 896.0, 448.0, 0.0, 1792.0]),
        # amax 12 -> block scale 2
        ([12.0, 5.0, 1.0, 7.0, 0.5, 9.0, 11.0, -3.0],
         [12.0, 4.0, 1.0, 8.0, 0.0, 8.0, 12.0, -3.0]),
        # amax 10 -> 10/6 = 1.667 rounds to 1.625 in E4M3, so 10/1.625 = 6.15 saturates to 6 -> 9.75
        ([10.0, 3.25, 1.0, -8.0, 6.0, 2.0],
         [9.75, 3.25, 0.8125, -6.5, 6.5, 1.625]),
        # all-zero block
        ([], []),
    ]
    x = torch.tensor([pad(values, 16) for values, _ in rows])
    expected = torch.tensor([pad(values, 16) for _, values in rows])
    assert torch.equal(fake_quantize(x, "nvfp4"), expected)


def test_nvfp4_with_non_unit_global_scale():
    # global = 6 / 2688; block scales 448 and 224 (exact in E4M3) -> effective scales 1 and 0.5
    x = torch.tensor([pad([6.0, 2.6, -0.2], 16), pad([3.0, 1.2, -0.4], 16)])
    expected = torch.tensor([pad([6.0, 3.0, 0.0], 16), pad([3.0, 1.0, -0.5], 16)])
    torch.testing.assert_close(fake_quantize(x, "nvfp4"), expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_micro_formats_shape_zero_blocks_and_group_override(fmt):
    x = randn(3, 4, 96, seed=8)
    x[1, 2] = 0.0
    out = fake_quantize(x, fmt)
    assert out.shape == x.shape
    assert torch.equal(out[1, 2], torch.zeros(96))
    assert torch.isfinite(out).all()
    assert torch.equal(fake_quantize(torch.zeros(2, 32), fmt), torch.zeros(2, 32))
    # granularity is ignored: micro formats always use their blocks
    assert torch.equal(fake_quantize(x, fmt, granularity="row"), out)
    # group_size overrides the block size: blocks of 48 act like blocks of 16 sharing their 48-wide amax
    wide_amax = x.reshape(-1, 48).abs().amax(dim=1, keepdim=True)
    shared = fake_quantize(x, fmt, group_size=16, amax=wide_amax.repeat_interleave(3, dim=0))
    assert torch.equal(fake_quantize(x, fmt, group_size=48), shared)
    assert not torch.equal(fake_quantize(x, fmt, group_size=48), fake_quantize(x, fmt, group_size=16))


# --- properties over seeded random tensors ---------------------------------------------------


@pytest.mark.parametrize("fmt,bits", SYMMETRIC_FORMATS)
@pytest.mark.parametrize("granularity", ["tensor", "row", "group"])
def test_idempotent_with_fixed_amax(fmt, bits, granularity):
    for seed in range(3):
        x = randn(8, 64, seed=seed, scale=seed + 0.5)
        amax = compute_amax(x, granularity, 32, fmt)
        once = fake_quantize(x, fmt, bits, granularity, 32, amax=amax)
        assert torch.equal(fake_quantize(once, fmt, bits, granularity, 32, amax=amax), once)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_int_idempotent_with_fixed_range(bits):
    for seed in range(3):
        x = randn(8, 64, seed=seed) + 1.0
        amax = compute_amax(x, "row", symmetric=False)
        amin = compute_amin(x, "row")
        once = fake_quantize(x, "int", bits, "row", symmetric=False, amax=amax, amin=amin)
        again = fake_quantize(once, "int", bits, "row", symmetric=False, amax=amax, amin=amin)
        assert torch.equal(again, once)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_error_at_most_half_a_step(bits, symmetric):
    for seed in range(3):
        x = randn(16, 64, seed=seed) + (0.5 if not symmetric else 0.0)
        out = fake_quantize(x, "int", bits, "row", symmetric=symmetric)
        if symmetric:
            step = x.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
        else:
            span = x.amax(dim=1, keepdim=True).clamp(min=0) - x.amin(dim=1, keepdim=True).clamp(max=0)
            step = span / (2**bits - 1)
        assert ((x - out).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("fmt,bits", SYMMETRIC_FORMATS)
def test_symmetric_formats_are_odd_functions(fmt, bits):
    for seed in range(3):
        x = randn(8, 64, seed=seed, scale=2.0)
        for granularity in ("tensor", "row"):
            assert torch.equal(fake_quantize(-x, fmt, bits, granularity), -fake_quantize(x, fmt, bits, granularity))


@pytest.mark.parametrize("fmt,bits,symmetric", [*[(f, b, True) for f, b in SYMMETRIC_FORMATS], ("int", 3, False)])
def test_zero_stays_zero(fmt, bits, symmetric):
    for seed in range(3):
        x = randn(8, 64, seed=seed) + 0.3
        x[x.abs() < 0.5] = 0.0
        out = fake_quantize(x, fmt, bits, "row", symmetric=symmetric)
        assert (out[x == 0] == 0).all()


@pytest.mark.parametrize("fmt,bits", SYMMETRIC_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_and_shape_preserved(fmt, bits, dtype):
    x = randn(3, 5, 64, seed=9).to(dtype)
    for granularity in ("tensor", "row", "group"):
        out = fake_quantize(x, fmt, bits, granularity, group_size=16)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.isfinite(out).all()


def test_bits_default_to_the_format_width():
    x = randn(4, 32, seed=10)
    assert torch.equal(fake_quantize(x, "int"), fake_quantize(x, "int", 8))
    assert torch.equal(fake_quantize(x, "mxfp4"), fake_quantize(x, "mxfp4", 4))


def test_empty_tensor_passes_through():
    x = torch.empty(0, 64)
    assert fake_quantize(x, "int", 4, "row").shape == (0, 64)


# --- static ranges and clipping --------------------------------------------------------------


def test_static_amax_saturates_and_matches_dynamic_when_equal():
    x = randn(8, 64, seed=11, scale=3.0)
    static = fake_quantize(x, "int", 8, "row", amax=compute_amax(x, "row"))
    assert torch.equal(static, fake_quantize(x, "int", 8, "row"))
    assert compute_amax(x).shape == () and compute_amax(x, "row").shape == (8, 1)
    assert compute_amax(x, "group", 16).shape == (32, 1) and compute_amax(x, fmt="nvfp4").shape == (32, 1)

    out = fake_quantize(x, "int", 8, "tensor", amax=torch.tensor(1.0))
    assert float(out.max()) == pytest.approx(1.0) and float(out.min()) == pytest.approx(-128 / 127)


def test_clip_ratio_scales_the_range():
    x = randn(8, 64, seed=12)
    clipped = fake_quantize(x, "int", 4, "row", clip_ratio=0.5)
    assert torch.equal(clipped, fake_quantize(x, "int", 4, "row", amax=0.5 * compute_amax(x, "row")))
    per_row = torch.linspace(1.0, 0.5, 8)[:, None]
    assert torch.equal(
        fake_quantize(x, "int", 4, "row", clip_ratio=per_row),
        fake_quantize(x, "int", 4, "row", amax=per_row * compute_amax(x, "row")),
    )


def test_search_clip_ratio_beats_no_clipping_on_outlier_rows():
    x = randn(8, 1024, seed=13)
    x[torch.arange(8), torch.arange(8) * 100] = 8.0  # one outlier per row
    ratios = search_clip_ratio(x, "int", 4, "row")
    assert ratios.shape == (8, 1)
    grid = torch.linspace(1.0, 0.5, 11)
    assert all(torch.isclose(grid, r).any() for r in ratios.flatten())

    def row_mse(clip_ratio):
        return (fake_quantize(x, "int", 4, "row", clip_ratio=clip_ratio) - x).square().mean(dim=1)

    searched, unclipped = row_mse(ratios), row_mse(1.0)
    assert (searched <= unclipped).all()
    assert (searched < unclipped).any()


def test_search_clip_ratio_keeps_the_range_unless_clipping_helps():
    x = randn(4, 64, seed=14)
    assert torch.equal(search_clip_ratio(x, "fp8_e4m3", granularity="row", grid=[1.0]), torch.ones(4, 1))
    # an all-zero row quantizes exactly at every ratio: the tie goes to the first grid value
    x[2] = 0.0
    assert search_clip_ratio(x, "int", 4, "row")[2].item() == 1.0


# --- registry and argument errors ------------------------------------------------------------


def test_registry_entries():
    assert set(FORMATS) == {"int", "fp8_e4m3", "fp8_e5m2", "mxfp4", "nvfp4", "nf4", "fp4"}
    assert [name for name, fmt in FORMATS.items() if fmt.quantize is None] == ["nf4", "fp4"]
    assert get_format("nf4").backend == "bnb" and get_format("nf4").weight_only
    with pytest.raises(UserError, match="nf4 has no fake quantization; it runs on --backend bnb"):
        fake_quantize(torch.ones(2, 64), "nf4", 4)
    assert get_format("int").bits == tuple(range(2, 9))
    assert get_format("mxfp4").default_group_size == 32 and get_format("nvfp4").default_group_size == 16
    assert get_format("fp8_e5m2").torch_dtype == torch.float8_e5m2
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_format("int").name = "other"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(fmt="int", bits=9), "int bits must be 2..8; got 9"),
        (dict(fmt="int", bits=1), "int bits must be 2..8; got 1"),
        (dict(fmt="fp8_e4m3", bits=4), "fp8_e4m3 is 8-bit only; got bits=4"),
        (dict(fmt="mxfp4", bits=8), "mxfp4 is 4-bit only; got bits=8"),
        (dict(fmt="fp6"), "unknown number format 'fp6'; valid formats: int, fp8_e4m3"),
        (dict(granularity="group", group_size=200), "group size 200 must be between 1 and the last dimension"),
        (dict(granularity="group"), "granularity='group' needs group_size"),
        (dict(granularity="channel"), "unknown granularity 'channel'"),
        (dict(fmt="mxfp4", group_size=40), "group size 40"),
        (dict(fmt="fp8_e5m2", symmetric=False), "asymmetric quantization is only available for fmt='int'"),
        (dict(granularity="row", amax=torch.ones(3)), "amax must be a scalar or broadcast"),
        (dict(symmetric=False, amax=torch.tensor(1.0)), "also needs amin"),
    ],
)
def test_invalid_arguments_raise_user_error(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        fake_quantize(torch.ones(4, 128), **kwargs)


def test_validate_accepts_every_registered_width():
    for name, fmt in FORMATS.items():
        for bits in fmt.bits:  # backend-only formats validate too (the bnb backend runs them)
            assert validate(name, bits) is fmt


# --- sqnr ------------------------------------------------------------------------------------


def test_sqnr_db_known_values():
    ones = torch.ones(100)
    assert sqnr_db(ones, ones * 1.1) == pytest.approx(20.0, abs=1e-4)
    assert sqnr_db(ones, ones) == math.inf
    assert sqnr_db(ones, ones * 0.9) == pytest.approx(20.0, abs=1e-4)


@pytest.mark.parametrize("fmt, symmetric", [("int", True), ("int", False), ("fp8_e4m3", True)])
def test_ragged_last_group_equals_separately_quantized_pieces(fmt, symmetric):
    """A width of 80 in groups of 32: two full groups and one of 16, each with its own scale."""
    x = torch.randn(5, 80, generator=torch.Generator().manual_seed(3)) * 4
    out = fake_quantize(x, fmt, 4 if fmt == "int" else 8, "group", 32, symmetric)
    for begin, end in ((0, 32), (32, 64), (64, 80)):
        piece = fake_quantize(x[:, begin:end], fmt, 4 if fmt == "int" else 8, "row", symmetric=symmetric)
        assert torch.equal(out[:, begin:end], piece)
