import pytest
import torch

from meswitch.compression.quantizer import (
    dequantize_codes,
    fit_affine,
    num_groups,
    quantize_codes,
    quantize_dequantize,
)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_min_max_fit_error_is_at_most_half_a_step(bits):
    x = torch.randn(16, 96)
    p = fit_affine(x, bits, clip_grid=(1.0,))
    x_hat = dequantize_codes(quantize_codes(x, p, bits), p)
    # float16 rounding of scale/offset can widen the range by a hair: allow 1% of a step.
    bound = p.scale.float() * 0.5 * 1.01 + 1e-3 * p.scale.float()
    assert ((x - x_hat).abs() <= bound).all()
    codes = quantize_codes(x, p, bits)
    assert int(codes.max()) <= (1 << bits) - 1


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_clip_search_never_worse_than_min_max(bits):
    x = torch.randn(32, 128) * torch.rand(32, 1)
    x[:, 3] *= 8  # heavy tails, where clipping pays off
    mm = fit_affine(x, bits, clip_grid=(1.0,))
    err_mm = ((dequantize_codes(quantize_codes(x, mm, bits), mm) - x) ** 2).sum(1)
    err = ((quantize_dequantize(x, bits) - x) ** 2).sum(1)
    assert (err <= err_mm * (1 + 1e-3) + 1e-9).all()
    if bits <= 2:
        assert err.sum() < 0.95 * err_mm.sum()


def test_more_bits_less_error():
    x = torch.randn(8, 256)
    errs = [float(((quantize_dequantize(x, b) - x) ** 2).mean()) for b in (1, 2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-4 * float((x ** 2).mean())


def test_groups_have_their_own_step_sizes():
    x = torch.cat([torch.randn(4, 32) * 0.01, torch.randn(4, 32) * 10], dim=1)
    p = fit_affine(x, 2, group_size=32)
    assert p.scale.shape == (4, 2)
    assert (p.scale[:, 0].float() < p.scale[:, 1].float() / 50).all()
    err_g = ((dequantize_codes(quantize_codes(x, p, 2), p) - x)[:, :32] ** 2).sum()
    err_row = ((quantize_dequantize(x, 2) - x)[:, :32] ** 2).sum()
    assert err_g < err_row / 100
    assert num_groups(70, 32) == 3  # a last, shorter group


def test_constant_rows_are_exact():
    x = torch.zeros(3, 10)
    x[1] = 0.25
    assert torch.equal(quantize_dequantize(x, 2), x)


def test_uneven_last_group_round_trips_within_half_a_step():
    x = torch.randn(6, 70)
    p = fit_affine(x, 3, group_size=32, clip_grid=(1.0,))
    assert p.scale.shape == (6, 3)
    x_hat = dequantize_codes(quantize_codes(x, p, 3), p)
    step = p.scale.float().repeat_interleave(32, dim=1)[:, :70]
    assert ((x - x_hat).abs() <= step * 0.505).all()
