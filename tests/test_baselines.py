import math

import pytest
import torch

from diffinv.baselines import (
    BASELINES,
    SIGMA_FLOOR,
    _fourier_multiply,
    _shrink,
    estimate_power_spectrum,
    gradient,
    gradient_adjoint,
    laplacian_spectrum,
    power_law_spectrum,
    restore,
    tikhonov,
    total_variation,
    tv_admm,
    tv_objective,
    wiener,
)
from diffinv.data import load_faces
from diffinv.metrics import psnr
from diffinv.operators import TASKS, LinearOperator, make_operator, measure


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """The first 4 held-out embedded faces, 32x32, float64."""
    return load_faces("test").images[:4].double()


# CG stops at a relative residual of 1e-8, which leaves errors up to about 1e-6 on these systems
# (condition numbers near 200).
CG_ATOL = 1e-5


def dense_circulant(multiplier: torch.Tensor, shape) -> torch.Tensor:
    """Return the matrix of ``x -> irfft2(rfft2(x) * multiplier)`` on images of ``shape``."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    return _fourier_multiply(basis, multiplier).reshape(n, n).T


# ---------------------------------------------------------------------------------------------
# Finite differences


def test_gradient_adjoint_identity():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 24, generator=generator, dtype=torch.float64)
    p = torch.randn(2, 3, 2, 16, 24, generator=generator, dtype=torch.float64)

    lhs = (gradient(x) * p).sum()
    rhs = (x * gradient_adjoint(p)).sum()

    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)


def test_laplacian_spectrum_diagonalises():
    x = torch.randn(2, 1, 16, 24, dtype=torch.float64)

    in_fourier = _fourier_multiply(x, laplacian_spectrum(16, 24, x))

    assert torch.allclose(in_fourier, gradient_adjoint(gradient(x)), atol=1e-12)


def test_total_variation_step():
    # A vertical step of height 2 wraps around: two edges of 32 pixels, each of magnitude 2.
    x = torch.full((1, 1, 32, 32), -1.0, dtype=torch.float64)
    x[..., 16:] = 1.0

    assert float(total_variation(x)) == pytest.approx(2 * 32 * 2.0)


def test_shrink_vector():
    v = torch.tensor([3.0, 4.0], dtype=torch.float64).view(1, 1, 2, 1, 1)

    shrunk = _shrink(v, 1.0).flatten()

    assert shrunk.tolist() == pytest.approx([2.4, 3.2])
    assert _shrink(v, 6.0).abs().max() == 0


# ---------------------------------------------------------------------------------------------
# Tikhonov and Wiener against dense solves


@pytest.mark.parametrize("task", TASKS)
def test_tikhonov_matches_dense(task):
    op = make_operator(task, (1, 16, 16), 1, seed=2)
    y = torch.randn(op.measurement_shape(1), dtype=torch.float64)
    A = op.matrix()
    lam = 0.05

    expected = torch.linalg.solve(A.T @ A + lam * torch.eye(256, dtype=torch.float64), A.T @ y.flatten())

    assert torch.allclose(tikhonov(y, op, lam).flatten(), expected, atol=CG_ATOL)


@pytest.mark.parametrize("task", TASKS)
def test_wiener_matches_dense(task):
    op = make_operator(task, (1, 16, 16), 1, seed=3)
    y = torch.randn(op.measurement_shape(1), dtype=torch.float64)
    A = op.matrix()
    power = power_law_spectrum(op.image_shape)
    sigma_y = 0.1

    precision = dense_circulant(sigma_y**2 / power, (1, 16, 16))
    expected = torch.linalg.solve(A.T @ A + precision, A.T @ y.flatten())

    assert torch.allclose(wiener(y, op, sigma_y).flatten(), expected, atol=CG_ATOL)


def test_wiener_matches_dense_batch():
    # Each image of a batch of masks is solved with its own mask.
    op = make_operator("inpaint-random", (1, 16, 16), 3, seed=4)
    y = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    precision = dense_circulant(0.05**2 / power_law_spectrum(op.image_shape), (1, 16, 16))

    restored = wiener(y, op, 0.05)

    for index in range(3):
        A = op.single(index).matrix()
        expected = torch.linalg.solve(A.T @ A + precision, A.T @ y[index].flatten())
        assert torch.allclose(restored[index].flatten(), expected, atol=CG_ATOL)


def test_wiener_flat_prior_is_tikhonov():
    # A white prior of variance v turns the Wiener filter into Tikhonov with lam = sigma_y^2 / v.
    op = make_operator("deblur", (1, 32, 32), 2)
    y = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    flat = torch.full((32, 17), 0.25, dtype=torch.float64)

    assert torch.allclose(wiener(y, op, 0.1, prior_power=flat), tikhonov(y, op, 0.1**2 / 0.25), atol=1e-12)


def mean_over_full_grid(power: torch.Tensor) -> float:
    """Average a 32x32 spectrum given on its rfft2 grid (columns 0..16) over the full grid."""
    # Columns 1..15 each count for two columns of the full grid, by conjugate symmetry.
    weights = torch.full((17,), 2.0, dtype=torch.float64)
    weights[[0, 16]] = 1.0
    return float((power * weights).sum() / 1024)


def test_power_law_variance():
    power = power_law_spectrum((1, 32, 32), variance=0.2)

    assert mean_over_full_grid(power) == pytest.approx(0.2)


def test_estimate_power_spectrum_parseval(faces):
    power = estimate_power_spectrum(faces)

    assert mean_over_full_grid(power) == pytest.approx(float(faces.pow(2).mean()))


def test_wiener_noiseless_deblur(faces):
    # First 4 held-out faces, std 1.0 px blur: the blurred input scores 25.1-28.2 dB and the
    # Wiener estimate 42.9-45.1 dB, a gain of 16.2-17.9 dB per face.
    op = make_operator("deblur", (1, 32, 32), 4)
    y = measure(op, faces, 0.0, seed=0)

    gain = psnr(wiener(y, op, 0.0), faces) - psnr(y, faces)

    assert bool((gain >= 12).all())


def test_wiener_fills_box_from_neighbours(faces):
    # Tikhonov with a white prior leaves the box at 0, but the Wiener prior correlates pixels,
    # so the box takes values from its surroundings.
    op = make_operator("inpaint-box", (1, 32, 32), 4, seed=0)
    y = measure(op, faces, 0.0, seed=0)
    hole = op.mask == 0

    restored = wiener(y, op, 0.0)
    error_in_hole = (restored - faces)[hole.expand_as(faces)].pow(2).mean()

    assert float(error_in_hole) < float(faces[hole.expand_as(faces)].pow(2).mean()) / 2


def test_wiener_sigma_floor():
    op = make_operator("deblur", (1, 32, 32), 1)
    y = torch.randn(1, 1, 32, 32, dtype=torch.float64)

    assert torch.equal(wiener(y, op, 0.0), wiener(y, op, SIGMA_FLOOR))


# ---------------------------------------------------------------------------------------------
# Total variation


@pytest.mark.parametrize("task", ("deblur", "inpaint-box"))
def test_tv_reduces_objective(faces, task):
    op = make_operator(task, (1, 32, 32), 4, seed=0)
    y = measure(op, faces, 0.05, seed=1)
    lam = 0.05**2 / 0.3

    start = tv_objective(op.adjoint(y), y, op, lam)
    few = tv_objective(tv_admm(y, op, lam, rho=10 * lam, iterations=10), y, op, lam)
    many = tv_objective(tv_admm(y, op, lam, rho=10 * lam, iterations=100), y, op, lam)

    assert bool((few < start).all())
    assert bool((many <= few * (1 + 1e-3)).all())


def test_tv_beats_blurred_input(faces):
    # First 4 held-out faces, std 1.0 px blur, sigma_y = 0.05: the input scores 24.3-27.1 dB
    # and restore("tv") 26.9-30.0 dB, a gain of 2.0-2.9 dB per face.
    op = make_operator("deblur", (1, 32, 32), 4)
    y = measure(op, faces, 0.05, seed=1)

    gain = psnr(restore("tv", y, op, 0.05), faces) - psnr(y, faces)

    assert bool((gain >= 1.0).all())


def test_tv_beats_box_input(faces):
    # First 4 held-out faces, 16 px box, sigma_y = 0.05: the input (box at 0) scores 21.1-26.8 dB,
    # restore("tv") gains 3.9, -0.3, 1.3 and 2.0 dB, a mean gain of 1.7 dB.
    op = make_operator("inpaint-box", (1, 32, 32), 4, seed=0)
    y = measure(op, faces, 0.05, seed=1)

    gain = psnr(restore("tv", y, op, 0.05), faces) - psnr(y, faces)

    assert float(gain.mean()) >= 1.0


def test_tv_nonfinite_iterate():
    class Broken(LinearOperator):
        """An identity whose adjoint returns NaN, as a bug elsewhere might."""

        def measurement_shape(self, batch):
            return (batch, *self.image_shape)

        def forward(self, x):
            return x

        def adjoint(self, y):
            return torch.full_like(y, float("nan")) if y.abs().max() > 10 else y

    op = Broken((1, 8, 8))
    y = torch.full((1, 1, 8, 8), 20.0)
    with pytest.raises(FloatingPointError, match="iteration 1"):
        tv_admm(y, op, lam=0.1, rho=1.0, iterations=5)


# ---------------------------------------------------------------------------------------------
# restore


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("task", TASKS)
def test_restore_shapes(task, method):
    op = make_operator(task, (1, 32, 32), 2, seed=0)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    y = measure(op, x, 0.05, seed=0)

    restored = restore(method, y, op, 0.05, **({"iterations": 10} if method == "tv" else {}))

    assert restored.shape == x.shape
    assert restored.dtype == torch.float32
    assert bool(torch.isfinite(restored).all())


def test_restore_wiener_dispatch():
    op = make_operator("deblur", (1, 32, 32), 1)
    y = torch.randn(1, 1, 32, 32, dtype=torch.float64)

    assert torch.equal(restore("wiener", y, op, 0.05), wiener(y, op, 0.05))


def test_restore_negative_sigma():
    op = make_operator("deblur", (1, 32, 32), 1)
    with pytest.raises(ValueError, match="sigma_y is -0.05"):
        restore("tv", torch.zeros(1, 1, 32, 32), op, -0.05)


def test_restore_unknown():
    op = make_operator("deblur", (1, 32, 32), 1)
    with pytest.raises(ValueError, match="baseline 'bm3d' is not valid, expected one of wiener, tv"):
        restore("bm3d", torch.zeros(1, 1, 32, 32), op, 0.05)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda y, op: tikhonov(y, op, 0.0), "lam is 0.0"),
        (lambda y, op: wiener(y, op, -0.1), "sigma_y is -0.1"),
        (lambda y, op: wiener(y, op, 0.1, prior_power=torch.ones(32, 32)), r"prior_power has shape \(32, 32\)"),
        (lambda y, op: tv_admm(y, op, lam=0.1, rho=-1.0), "rho is -1.0"),
        (lambda y, op: tv_admm(y, op, lam=0.1, rho=1.0, iterations=0), "iterations is 0"),
        (lambda y, op: wiener(y[..., :30], op, 0.1), r"measurement has shape \(1, 1, 32, 30\)"),
        (lambda y, op: wiener(y * float("nan"), op, 0.1), "1024 non-finite"),
    ],
    ids=["lam", "sigma", "prior-shape", "rho", "iterations", "shape", "nan"],
)
def test_baselines_reject(call, message):
    op = make_operator("deblur", (1, 32, 32), 1)
    with pytest.raises(ValueError, match=message):
        call(torch.zeros(1, 1, 32, 32), op)
