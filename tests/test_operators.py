import math

import pytest
import torch

from diffinv.operators import (
    TASKS,
    BoxInpaint,
    Downsample,
    GaussianBlur,
    LinearOperator,
    MaskOperator,
    MotionBlur,
    RandomInpaint,
    default_blur_std,
    default_box_margin,
    default_kernel_size,
    default_motion_size,
    make_operator,
    measure,
)

SEEDS = (0, 1, 7)
SHAPES = ((1, 32, 32), (3, 16, 24))


pytestmark = pytest.mark.usefixtures("one_thread")


def random_pair(op: LinearOperator, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *op.image_shape, generator=generator, dtype=torch.float64)
    y = torch.randn(op.measurement_shape(batch), generator=generator, dtype=torch.float64)
    return x, y


# ---------------------------------------------------------------------------------------------
# Adjoint, linearity, matrix


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("task", TASKS)
def test_adjoint_identity(task, seed, shape):
    op = make_operator(task, shape, 3, seed=seed)
    x, y = random_pair(op, 3, seed + 100)

    lhs = (op(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()

    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


@pytest.mark.parametrize("task", TASKS)
def test_adjoint_equals_autograd(task):
    # The vector-Jacobian product of A is A^T, which DPS relies on when it differentiates through A.
    op = make_operator(task, (1, 32, 32), 2, seed=3)
    x, y = random_pair(op, 2, 5)
    x.requires_grad_(True)

    (op(x) * y).sum().backward()

    assert torch.allclose(x.grad, op.adjoint(y), atol=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_linearity(task):
    op = make_operator(task, (3, 32, 32), 2, seed=4)
    x1, _ = random_pair(op, 2, 1)
    x2, _ = random_pair(op, 2, 2)

    combined = op(2.5 * x1 - 0.75 * x2)

    assert torch.allclose(combined, 2.5 * op(x1) - 0.75 * op(x2), atol=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_matrix_matches_forward(task):
    op = make_operator(task, (1, 16, 16), 2, seed=5)
    x, _ = random_pair(op, 2, 3)

    A = op.matrix()

    assert A.shape == (math.prod(op.measurement_shape(1)), 256)
    assert torch.allclose(A @ x[0].flatten(), op(x)[0].flatten(), atol=1e-12)


def test_matrix_too_large():
    op = make_operator("deblur", (3, 64, 64), 1)
    with pytest.raises(ValueError, match="12288 pixels"):
        op.matrix()


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("task", TASKS)
def test_dtype_preserved(task, dtype):
    op = make_operator(task, (1, 32, 32), 2, seed=0)
    x = torch.rand(2, 1, 32, 32, dtype=dtype)

    assert op(x).dtype == dtype
    assert op.adjoint(op(x)).dtype == dtype


def test_cast_operator_float32():
    op = GaussianBlur((1, 32, 32), 1.0)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)

    cast = GaussianBlur((1, 32, 32), 1.0).to(torch.float32)

    assert torch.allclose(cast(x.float()).double(), op(x), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("task", TASKS)
def test_cuda_matches_cpu(task):
    op = make_operator(task, (3, 32, 32), 2, seed=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    on_gpu = op.to("cuda")(x.to("cuda")).cpu()

    assert torch.allclose(on_gpu, make_operator(task, (3, 32, 32), 2, seed=2)(x), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Determinism by seed


@pytest.mark.parametrize(
    "build, buffer",
    [
        (lambda seed: MotionBlur((1, 32, 32), seed=seed), "kernel"),
        (lambda seed: BoxInpaint((1, 32, 32), 4, seed=seed), "mask"),
        (lambda seed: RandomInpaint((1, 32, 32), 4, seed=seed), "mask"),
    ],
    ids=["motion", "box", "random"],
)
def test_seed_determines_operator(build, buffer):
    first, again, other = build(11), build(11), build(12)

    assert torch.equal(getattr(first, buffer), getattr(again, buffer))
    assert not torch.equal(getattr(first, buffer), getattr(other, buffer))


@pytest.mark.parametrize("cls", (BoxInpaint, RandomInpaint))
def test_mask_independent_of_batch(cls):
    small, large = cls((1, 32, 32), 3, seed=9), cls((1, 32, 32), 6, seed=9)

    assert torch.equal(small.mask, large.mask[:3])


def test_masks_differ_across_batch():
    op = BoxInpaint((1, 32, 32), 4, seed=0)

    assert not torch.equal(op.mask[0], op.mask[1])


# ---------------------------------------------------------------------------------------------
# Blur kernels


def second_moment(kernel: torch.Tensor) -> tuple[float, float]:
    r = torch.arange(kernel.shape[0], dtype=torch.float64) - kernel.shape[0] // 2
    return float((kernel.sum(1) * r**2).sum()), float((kernel.sum(0) * r**2).sum())


@pytest.mark.parametrize("side, std", [(32, 1.0), (64, 2.0), (256, 3.0)])
def test_gaussian_kernel_std(side, std):
    kernel = GaussianBlur((1, side, side), std).kernel
    var_rows, var_cols = second_moment(kernel)

    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-12)
    assert math.sqrt(var_rows) == pytest.approx(std, rel=1e-6)
    assert math.sqrt(var_cols) == pytest.approx(std, rel=1e-6)


def test_default_sizes_at_256():
    assert default_blur_std(256) == 3.0
    assert default_kernel_size(3.0, 256) == 61
    assert make_operator("deblur", (3, 256, 256), 1).kernel.shape == (61, 61)
    assert default_motion_size(256) == 61
    assert default_box_margin(256) == 16


def test_default_sizes_at_32():
    assert default_blur_std(32) == 1.0
    assert default_kernel_size(1.0, 32) == 21
    assert default_motion_size(32) == 9
    assert default_box_margin(32) == 2


def test_kernel_size_capped():
    assert default_kernel_size(5.0, 32) == 31
    assert default_kernel_size(5.0, 40) == 39


def test_motion_kernel_properties():
    kernel = MotionBlur((1, 32, 32), size=9, seed=3).kernel
    r = torch.arange(9, dtype=torch.float64) - 4

    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(kernel.min()) >= 0
    assert int((kernel > 0).sum()) >= 9
    # The kernel's centroid sits on its centre, so blurring does not shift the image.
    assert float((kernel.sum(1) * r).sum()) == pytest.approx(0.0, abs=1e-12)
    assert float((kernel.sum(0) * r).sum()) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_motion_straight_line(seed):
    kernel = MotionBlur((1, 32, 32), size=9, intensity=0.0, seed=seed).kernel
    r = torch.arange(9, dtype=torch.float64) - 4
    rows, cols = torch.meshgrid(r, r, indexing="ij")
    covariance = torch.tensor(
        [
            [(kernel * rows * rows).sum(), (kernel * rows * cols).sum()],
            [(kernel * rows * cols).sum(), (kernel * cols * cols).sum()],
        ]
    )
    minor, major = torch.linalg.eigvalsh(covariance).tolist()

    # A straight stroke: across it only the bilinear splat spreads mass (variance <= 1/4),
    # along it a stroke spanning 9 px has variance above 5.
    assert minor <= 0.25
    assert major >= 5


def test_blur_constant_image_unchanged():
    op = make_operator("deblur-motion", (1, 32, 32), 1, seed=5)
    x = torch.full((1, 1, 32, 32), 0.3, dtype=torch.float64)

    assert torch.allclose(op(x), x, atol=1e-12)


def test_blur_pinv_fourier_mode():
    # pinv multiplies each Fourier mode by |K|^2 / (|K|^2 + eps), here at frequency (3, 5) / 32.
    op = GaussianBlur((1, 32, 32), 1.0)
    n = torch.arange(32, dtype=torch.float64)
    x = torch.cos(2 * torch.pi * (3 * n[:, None] + 5 * n[None, :]) / 32).reshape(1, 1, 32, 32)
    gain = math.exp(-2 * math.pi**2 * (3**2 + 5**2) / 32**2)

    expected = gain**2 / (gain**2 + op.pinv_epsilon) * x

    assert torch.allclose(op.pinv(op(x)), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Masks and downsampling


@pytest.mark.parametrize("seed", SEEDS)
def test_box_mask_geometry(seed):
    op = BoxInpaint((1, 32, 32), 4, seed=seed)

    for mask in op.mask[:, 0]:
        rows, cols = torch.nonzero(mask == 0, as_tuple=True)
        assert len(rows) == 16 * 16
        assert int(rows.max() - rows.min()) == 15
        assert int(cols.max() - cols.min()) == 15
        assert int(rows.min()) >= 2
        assert int(rows.max()) <= 29
        assert int(cols.min()) >= 2
        assert int(cols.max()) <= 29


def test_random_mask_fractions():
    op = RandomInpaint((1, 32, 32), 8, seed=4)
    dropped = 1 - op.mask.flatten(1).mean(1)
    p = op.drop_fractions
    spread = (p * (1 - p) / 1024).sqrt()

    assert bool(((p >= 0.3) & (p <= 0.7)).all())
    assert bool(((dropped - p).abs() <= 4 * spread).all())


def test_mask_shared_across_channels():
    op = RandomInpaint((3, 32, 32), 2, seed=0)
    y = op(torch.ones(2, 3, 32, 32))

    assert torch.equal(y[:, 0], y[:, 1])
    assert torch.equal(y[:, 0], y[:, 2])


@pytest.mark.parametrize("task", ("inpaint-box", "inpaint-random"))
def test_mask_pinv_keeps_pixels(task):
    op = make_operator(task, (3, 32, 32), 3, seed=6)
    x, _ = random_pair(op, 3, 0)

    restored = op.pinv(op(x))

    assert torch.equal(restored, x * op.mask)
    assert torch.equal(op(restored), op(x))


def test_mask_broadcast_single():
    op = BoxInpaint((1, 32, 32), 1, seed=0)
    x = torch.randn(5, 1, 32, 32)

    assert torch.equal(op(x), x * op.mask.float())


def test_single_selects_image():
    op = RandomInpaint((1, 32, 32), 3, seed=2)

    assert torch.equal(op.single(2).mask[0], op.mask[2])


def test_downsample_pinv_right_inverse():
    op = Downsample((3, 32, 32), 4)
    _, y = random_pair(op, 2, 1)

    assert torch.allclose(op(op.pinv(y)), y, atol=1e-12)


def test_downsample_pinv_recovers_blocks():
    op = Downsample((1, 32, 32), 2)
    blocks = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    x = blocks.repeat_interleave(2, -2).repeat_interleave(2, -1)

    assert torch.allclose(op.pinv(op(x)), x, atol=1e-12)


def test_downsample_pinv_is_moore_penrose():
    op = Downsample((1, 8, 8), 2)
    pinv_columns = op.pinv(torch.eye(16, dtype=torch.float64).reshape(16, 1, 4, 4))

    assert torch.allclose(pinv_columns.reshape(16, 64).T, torch.linalg.pinv(op.matrix()), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# measure


def test_measure_reproducible():
    op = make_operator("deblur", (1, 32, 32), 2)
    x = torch.rand(2, 1, 32, 32) * 2 - 1

    assert torch.equal(measure(op, x, 0.05, seed=3), measure(op, x, 0.05, seed=3))
    assert not torch.equal(measure(op, x, 0.05, seed=3), measure(op, x, 0.05, seed=4))


def test_measure_noise_std():
    op = make_operator("inpaint-random", (1, 32, 32), 8, seed=0)
    x = torch.rand(8, 1, 32, 32, dtype=torch.float64) * 2 - 1

    noise = measure(op, x, 0.05, seed=0) - op(x)

    # 8192 samples: the sample std has a relative spread of about 1 / sqrt(2 * 8192) = 0.8 %.
    assert float(noise.std()) == pytest.approx(0.05, rel=0.04)
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.003)


def test_measure_noiseless():
    op = make_operator("super-resolution", (1, 32, 32), 1)
    x = torch.rand(1, 1, 32, 32) * 2 - 1

    assert torch.equal(measure(op, x, 0.0, seed=0), op(x))


@pytest.mark.parametrize(
    "x, sigma_y, message",
    [
        (torch.zeros(1, 1, 32, 32), -0.1, "sigma_y is -0.1"),
        (torch.full((1, 1, 32, 32), 1.5), 0.05, r"values in \[1.5, 1.5\]"),
        (torch.full((1, 1, 32, 32), float("nan")), 0.05, "1024 non-finite"),
    ],
    ids=["negative-sigma", "out-of-range", "nan"],
)
def test_measure_rejects(x, sigma_y, message):
    op = make_operator("deblur", (1, 32, 32), 1)
    with pytest.raises(ValueError, match=message):
        measure(op, x, sigma_y, seed=0)


# ---------------------------------------------------------------------------------------------
# Invalid arguments


@pytest.mark.parametrize(
    "task, options, message",
    [
        ("denoise", {}, "task 'denoise' is not valid, expected one of deblur, deblur-motion"),
        ("deblur", {"std": 0.0}, "std is 0.0"),
        ("deblur", {"std": -1.0}, "std is -1.0"),
        ("deblur", {"kernel_size": 8}, "kernel_size is 8"),
        ("deblur", {"kernel_size": 41}, "kernel size 41 exceeds the image side 32"),
        ("deblur", {"factor": 2}, "option factor is not valid for task 'deblur'"),
        ("deblur-motion", {"size": 4}, "motion kernel size is 4"),
        ("deblur-motion", {"intensity": 1.5}, "intensity is 1.5"),
        ("inpaint-box", {"box_fraction": 1.0}, "box_fraction is 1.0"),
        ("inpaint-box", {"margin": 9}, "margin 9 does not fit"),
        ("inpaint-random", {"drop_range": (0.8, 0.2)}, r"drop_range is \(0.8, 0.2\)"),
        ("inpaint-random", {"drop_range": (1.0, 1.0)}, "keeps no pixel"),
        ("super-resolution", {"factor": 3}, "factor 3 does not divide"),
        ("super-resolution", {"factor": 1}, "factor is 1"),
    ],
)
def test_make_operator_rejects(task, options, message):
    with pytest.raises(ValueError, match=message):
        make_operator(task, (1, 32, 32), 2, **options)


def test_negative_seed_rejected():
    with pytest.raises(ValueError, match="seed is -1"):
        make_operator("inpaint-box", (1, 32, 32), 1, seed=-1)


def test_forward_wrong_shape():
    op = make_operator("deblur", (1, 32, 32), 1)
    with pytest.raises(ValueError, match=r"image has shape \(1, 1, 30, 32\), expected \(1, 1, 32, 32\)"):
        op(torch.zeros(1, 1, 30, 32))


def test_adjoint_wrong_shape():
    op = make_operator("super-resolution", (1, 32, 32), 1)
    with pytest.raises(ValueError, match=r"measurement has shape \(1, 1, 32, 32\), expected \(1, 1, 16, 16\)"):
        op.adjoint(torch.zeros(1, 1, 32, 32))


def test_mask_wrong_batch():
    op = make_operator("inpaint-box", (1, 32, 32), 3)
    with pytest.raises(ValueError, match="batch size 2, but this BoxInpaint was built with 3 masks"):
        op(torch.zeros(2, 1, 32, 32))


def test_integer_input_rejected():
    op = make_operator("deblur", (1, 32, 32), 1)
    with pytest.raises(ValueError, match="torch.int64"):
        op(torch.zeros(1, 1, 32, 32, dtype=torch.long))


def test_gaussian_pinv_documented_bound():
    # The regularised inverse amplifies no frequency by more than 1 / (2 sqrt(eps)) = 50.
    op = GaussianBlur((1, 32, 32), 1.0)
    K = op.transfer_function(torch.zeros(1, dtype=torch.float64)).abs()

    gain = K / (K**2 + op.pinv_epsilon)

    assert float(gain.max()) <= 1 / (2 * math.sqrt(op.pinv_epsilon)) + 1e-9


def test_mask_keeps_no_pixel():
    mask = torch.ones(3, 1, 32, 32)
    mask[1] = 0
    with pytest.raises(ValueError, match="the mask of image 1 keeps no pixel"):
        MaskOperator((1, 32, 32), mask)
