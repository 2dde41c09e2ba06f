"""RTN and GPTQ cores against the independent float64 references in ``reference.py``."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch

from llmlite.quant.gptq import (
    accumulate_drift,
    accumulate_hessian,
    damped_inverse,
    drift_target,
    finish_hessian,
    gptq,
    refit_scales,
)
from llmlite.quant.grid import dequantize_codes, grid_params, group_index, quantize_codes
from llmlite.quant.rtn import rtn

SHAPES = [(1, 1), (3, 7), (16, 96), (24, 200), (5, 576)]  # in-features not multiples of the groups
GROUPS = [-1, 32, 64, 128]


def random_weight(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.05
    w[:, ::7] *= 4  # outlier columns
    return w


def correlated_inputs(tokens, cols, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    scale = torch.rand(cols, generator=g, dtype=torch.float64) * 3 + 0.1
    return (torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mix) * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", GROUPS)
def test_rtn_matches_float64_reference(bits, sym, shape, group_size):
    w = random_weight(*shape, seed=bits * 1000 + shape[1] + group_size)
    got = rtn(w, bits, group_size, sym)
    codes, scales, zeros = ref.rtn(w.numpy(), bits, group_size, sym)
    assert np.array_equal(got.codes.numpy(), codes)
    g = got.g_idx.long()
    assert np.array_equal(got.scale[:, g].double().numpy(), scales)
    assert np.array_equal(got.zero[:, g].double().numpy(), zeros)
    expected = (codes - zeros) * scales
    assert np.allclose(got.dequantize(torch.float64).numpy(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_rtn_mse_grid_matches_reference_and_lowers_error(bits, sym, group_size):
    w = random_weight(10, 200, seed=bits)
    got = rtn(w, bits, group_size, sym, mse=True)
    codes, scales, _zeros = ref.rtn(w.numpy(), bits, group_size, sym, mse=True)
    assert np.array_equal(got.codes.numpy(), codes)
    assert np.array_equal(got.scale[:, got.g_idx.long()].double().numpy(), scales)
    plain = rtn(w, bits, group_size, sym)
    err = lambda q: float((q.dequantize(torch.float64) - w).abs().pow(2.4).sum())  # noqa: E731
    assert err(got) <= err(plain)


def test_grid_conventions():
    w = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.2, 0.3], [-0.3, -0.1, -0.2], [-0.001, 0.5, 1.0]])
    scale, zero = grid_params(w, 4, sym=False)
    assert torch.all(zero >= 1), "v1 checkpoints store zero-1: zero must be at least 1"
    assert torch.equal(scale, scale.half().float()), "scales must be float16-representable"
    q = quantize_codes(w, scale[:, None], zero[:, None], 4)
    back = dequantize_codes(q, scale[:, None], zero[:, None])
    assert torch.allclose(back, w, atol=float(scale.max()) / 2 + 1e-7)  # every weight in range
    assert torch.equal(back[0], torch.zeros(3))  # an all-zero row stays exactly zero
    _, zsym = grid_params(w, 3, sym=True)
    assert torch.all(zsym == 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(
    "group_size,act_order", [(-1, False), (32, False), (64, False), (-1, True), (32, True), (128, True)]
)
@pytest.mark.parametrize("mse", [False, True])
def test_gptq_matches_obq_reference_float64(bits, sym, group_size, act_order, mse):
    rows, cols = 12, 200
    w = random_weight(rows, cols, seed=bits + cols)
    x = correlated_inputs(512, cols, seed=bits)
    h = 2 * x.T @ x / x.shape[0]
    h[:, 5] = h[5, :] = 0  # a dead input column
    got = gptq(w, h, bits, group_size, sym, act_order, damp=0.01, block_size=64, mse=mse)
    codes, scales, zeros = ref.gptq(w.numpy(), h.numpy(), bits, group_size, sym, act_order, mse=mse)
    assert np.array_equal(got.weight.codes.double().numpy(), codes)
    g = got.weight.g_idx.long()
    assert np.array_equal(got.weight.scale[:, g].double().numpy(), scales)
    assert np.array_equal(got.weight.zero[:, g].double().numpy(), zeros)
    assert torch.all(got.weight.dequantize()[:, 5] == 0)
    assert got.damp == 0.01


def output_error(w, w_hat, x):
    return float(((x @ (w_hat - w).T) ** 2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 64])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_calibration_inputs(bits, group_size, act_order):
    w = random_weight(64, 192, seed=7).float()
    x = correlated_inputs(2048, 192, seed=8).float()
    h = torch.zeros(192, 192)
    accumulate_hessian(h, x)
    h = finish_hessian(h, x.shape[0])
    q = gptq(w, h, bits, group_size, True, act_order).weight.dequantize()
    r = rtn(w, bits, group_size, True).dequantize()
    assert output_error(w, q, x) < output_error(w, r, x)


@pytest.mark.parametrize("cols", [1, 100, 300, 600])
def test_hessian_upper_triangle_accumulation(cols):
    x = torch.randn(333, cols, dtype=torch.float64)
    h = torch.zeros(cols, cols, dtype=torch.float64)
    accumulate_hessian(h, x[:200])
    accumulate_hessian(h, x[200:])
    assert torch.allclose(finish_hessian(h, 333), 2 * x.T @ x / 333, rtol=1e-12, atol=1e-12)


def test_damping_retries_until_factorisable():
    h = torch.zeros(4, 4, dtype=torch.float64)
    h[0, 0] = 1.0
    h[1, 1] = -0.5  # indefinite: fails at 0.01 and 0.1, works once λ = damp·mean(diag) > 0.5
    h[2, 2] = h[3, 3] = 0.25
    inverse, upper, damp = damped_inverse(h, 0.01)
    assert damp == pytest.approx(10.0)
    eye = torch.eye(4, dtype=torch.float64)
    inv = torch.linalg.inv(h + damp * h.diagonal().mean() * eye)
    assert torch.allclose(upper.T @ upper, inv)
    assert torch.allclose(inverse, inv)


def test_gptq_reports_raised_damping():
    w = torch.randn(8, 16)
    h = -torch.eye(16)  # negative definite
    h[0, 0] = 20.0
    result = gptq(w, h, 4)
    assert result.damp > 0.01


def hessian_and_drift(x, x_float):
    cols = x.shape[1]
    h = torch.zeros(cols, cols, dtype=x.dtype)
    d = torch.zeros_like(h)
    for part in (slice(0, x.shape[0] // 3), slice(x.shape[0] // 3, None)):  # two chunks
        accumulate_hessian(h, x[part])
        accumulate_drift(d, x[part], x_float[part])
    return finish_hessian(h, x.shape[0]), d / x.shape[0]


@pytest.mark.parametrize("alpha", [0.25, 1.0])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (24, 200)])
def test_drift_target_matches_ridge_regression_float64(alpha, shape):
    rows, cols = shape
    seed = int(torch.randint(0, 2**31, ()))
    w = random_weight(rows, cols, seed)
    x_float = correlated_inputs(4 * cols + 5, cols, seed + 1)
    x = x_float + 0.1 * correlated_inputs(4 * cols + 5, cols, seed + 2)  # drifted inputs
    h, d = hessian_and_drift(x, x_float)
    got = drift_target(w, h, d, alpha).numpy()
    want = ref.gptaq_target(w.numpy(), x.numpy(), x_float.numpy(), alpha)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def test_accumulate_drift_with_the_weight_is_w_times_d():
    """Given ``w``, the drift accumulates as ``W·D`` ``[out, in]`` (float64 reference: W @ D)."""
    x_float = correlated_inputs(50, 30, 5)
    x = x_float + 0.1 * correlated_inputs(50, 30, 6)
    w = random_weight(7, 30, 7)
    d, wd = torch.zeros(30, 30, dtype=torch.float64), torch.zeros(7, 30, dtype=torch.float64)
    for part in (slice(0, 20), slice(20, None)):
        accumulate_drift(d, x[part], x_float[part])
        accumulate_drift(wd, x[part], x_float[part], w)
    torch.testing.assert_close(wd, w @ d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d, 2 * (x_float - x).T @ x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (24, 200)])
def test_gptq_shift_aims_at_the_drift_target(shape, act_order):
    """``gptq(w, h, shift=α·W·D)`` gives the codes of GPTQ run on ``drift_target(w, h, D, α)``
    (float64)."""
    rows, cols = shape
    seed = int(torch.randint(0, 2**31, ()))
    w = random_weight(rows, cols, seed)
    x_float = correlated_inputs(4 * cols + 5, cols, seed + 1)
    x = x_float + 0.1 * correlated_inputs(4 * cols + 5, cols, seed + 2)
    h, d = hessian_and_drift(x, x_float)
    want = gptq(drift_target(w, h, d, 0.25), h, 4, 32, True, act_order).weight
    got = gptq(w, h, 4, 32, True, act_order, shift=0.25 * w @ d).weight
    assert torch.equal(got.codes, want.codes)
    torch.testing.assert_close(got.scale, want.scale)
    assert torch.equal(got.zero, want.zero)


def test_drift_target_without_drift_is_the_weight():
    w = random_weight(8, 40, 3)
    x = correlated_inputs(100, 40, 4)
    h, d = hessian_and_drift(x, x)
    assert torch.equal(d, torch.zeros_like(d))
    assert torch.allclose(drift_target(w, h, d, 1.0), w, rtol=0, atol=1e-15)
    assert torch.equal(drift_target(w, torch.zeros_like(h), d, 1.0), w)  # no signal at all


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_on_drift_target_fits_float_outputs_better(bits):
    """Fed drifted inputs X, GPTQ aimed at the drift target reproduces the float outputs X̃Wᵀ more
    closely than GPTQ aimed at W itself (float32, as the driver runs it)."""
    w = random_weight(64, 192, seed=11).float()
    x_float = correlated_inputs(2048, 192, seed=12)
    x = (x_float + 0.3 * correlated_inputs(2048, 192, seed=13)).float()
    x_float = x_float.float()
    h, d = hessian_and_drift(x, x_float)
    plain = gptq(w, h, bits, 64, True, True).weight.dequantize()
    aimed = gptq(drift_target(w, h, d, 1.0), h, bits, 64, True, True).weight.dequantize()

    def float_error(q):
        return float(((x @ q.T - x_float @ w.T) ** 2).mean())

    assert float_error(aimed) < float_error(plain)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape,group_size", [((1, 1), -1), ((3, 33), 32), ((6, 200), 64), ((4, 96), -1)])
def test_refit_scales_matches_least_squares_float64(shape, group_size, sym):
    """The refit scales solve each row's least squares on ``X`` (lstsq on ``X·B``, no normal
    equations), float16-rounded; in-features that do not divide into groups included."""
    rows, cols = shape
    seed = int(torch.randint(0, 2**31, ()))
    g = torch.Generator().manual_seed(seed)
    groups = -(-cols // (cols if group_size == -1 else group_size))
    codes = torch.randint(0, 16, (rows, cols), generator=g).double()
    zero = torch.randint(1, 15, (rows, groups), generator=g).double()
    if sym:
        zero.fill_(8)
    scale = torch.rand(rows, groups, generator=g, dtype=torch.float64) + 0.5
    g_idx = group_index(cols, group_size)
    # a target near the grid, so that every solution is positive
    target = (codes - zero[:, g_idx.long()]) * scale[:, g_idx.long()]
    target += 0.05 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = correlated_inputs(3 * cols + 4, cols, seed + 1)
    got = refit_scales(target, x.T @ x, codes, scale, zero, g_idx)
    want = ref.refit_scales(target.numpy(), x.numpy(), codes.numpy(), scale.numpy(), zero.numpy(), group_size)
    assert (want > 0).all()
    torch.testing.assert_close(got, torch.from_numpy(ref.fp16(want)), rtol=1e-3, atol=0)


def test_refit_scales_keeps_empty_groups_and_non_positive_rows():
    """A group whose codes all sit on its zero-point keeps its scale; a row whose best fit needs a
    negative scale keeps all of its scales."""
    codes = torch.tensor([[8.0, 8.0, 9.0, 10.0], [9.0, 10.0, 9.0, 10.0]])
    zero = torch.full((2, 2), 8.0)
    scale = torch.tensor([[0.5, 0.25], [0.5, 0.25]])
    target = torch.tensor([[0.3, -0.2, 0.3, 0.5], [-0.5, -1.0, 0.3, 0.6]])
    got = refit_scales(target, torch.eye(4), codes, scale, zero, group_index(4, 2))
    assert got[0, 0] == 0.5 and got[0, 1] != 0.25  # empty group kept, the other refit
    assert torch.equal(got[1], scale[1])  # best fit of group 0 is negative: the row is kept


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape,group_size", [((32, 200), 64), ((16, 96), -1)])
def test_gptq_refit_lowers_the_output_error_with_the_same_codes(shape, group_size, sym, act_order):
    rows, cols = shape
    seed = int(torch.randint(0, 2**31, ()))
    w = random_weight(rows, cols, seed).float()
    x = correlated_inputs(8 * cols, cols, seed + 1).float()
    h = torch.zeros(cols, cols)
    accumulate_hessian(h, x)
    h = finish_hessian(h, x.shape[0])
    plain = gptq(w, h, 4, group_size, sym, act_order).weight
    refit = gptq(w, h, 4, group_size, sym, act_order, refit=True).weight
    assert torch.equal(refit.codes, plain.codes) and torch.equal(refit.zero, plain.zero)
    assert not torch.equal(refit.scale, plain.scale)
    assert output_error(w, refit.dequantize(), x) < output_error(w, plain.dequantize(), x)
