"""Cross-checks of the operators and metrics against DeepInverse (deepinv 0.5.0).

- Blur: ``deepinv.physics.BlurFFT`` pads the filter to the image size and rolls its centre
  ``k // 2`` to pixel (0, 0), the same centring as :class:`diffinv.operators.CircularConvolution`,
  and both convolve circularly. Given the same kernel they agree to float64 rounding.
- Inpainting: ``deepinv.physics.Inpainting`` with our ``(B, 1, H, W)`` mask multiplies every
  channel by it, as :class:`diffinv.operators.MaskOperator` does.
- PSNR: ``deepinv.metric.PSNR`` computes ``-10 log10(MSE + 1e-8)`` on [0, 1] images, so it
  differs from ours only by that 1e-8 (about 1e-5 dB at 25 dB).
- SSIM: ``deepinv.metric.SSIM`` calls torchmetrics' Gaussian SSIM (11x11 window, sigma 1.5,
  K1 = 0.01, K2 = 0.03, population variances), as ours does, but it pads the images by
  reflection and averages the SSIM map over every pixel. Ours averages over the interior
  pixels whose window fits in the image. The interior maps agree to float64 rounding, but
  the two scores differ: ours is higher by 0.002 to 0.08 on the faces used here.
"""

import pytest
import torch

from diffinv.data import load_faces
from diffinv.metrics import SSIM_WINDOW, psnr, ssim
from diffinv.operators import CircularConvolution, MotionBlur, make_operator, measure

dinv = pytest.importorskip("deepinv")
torchmetrics_image = pytest.importorskip("torchmetrics.functional.image")

SEEDS = (0, 1, 7)
SHAPES = ((1, 32, 32), (3, 16, 24))
# deepinv adds this to the MSE (on [0, 1] images) before taking the logarithm.
DEEPINV_PSNR_EPSILON = 1e-8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    return load_faces("test").images[:6].double()


def random_images(shape, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=generator, dtype=torch.float64)


def deepinv_blur(op) -> "dinv.physics.BlurFFT":
    return dinv.physics.BlurFFT(img_size=op.image_shape, filter=op.kernel[None, None].clone())


@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_blur_matches_blurfft(shape):
    op = make_operator("deblur", shape, batch_size=1).double()
    x = random_images(shape, 3, seed=0)
    assert torch.allclose(op(x), deepinv_blur(op).A(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_blur_adjoint_matches_blurfft(shape):
    op = make_operator("deblur", shape, batch_size=1).double()
    y = random_images(shape, 3, seed=1)
    assert torch.allclose(op.adjoint(y), deepinv_blur(op).A_adjoint(y), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_motion_blur_matches_blurfft(seed):
    # The motion kernel has no symmetry, so a flipped or shifted convention would show.
    op = MotionBlur((1, 32, 32), size=15, intensity=0.8, seed=seed).double()
    x = random_images(op.image_shape, 2, seed)
    assert torch.allclose(op(x), deepinv_blur(op).A(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_motion_blur_adjoint_matches_blurfft(seed):
    op = MotionBlur((1, 32, 32), size=15, intensity=0.8, seed=seed).double()
    y = random_images(op.image_shape, 2, seed + 100)
    assert torch.allclose(op.adjoint(y), deepinv_blur(op).A_adjoint(y), rtol=0, atol=1e-5)


def test_offcentre_kernel_shifts_both_alike():
    # A kernel whose only weight sits one column right of the centre shifts the image one
    # column right, with wrap-around, in both libraries.
    kernel = torch.zeros(5, 5, dtype=torch.float64)
    kernel[2, 3] = 1
    op = CircularConvolution((1, 16, 16), kernel).double()
    x = random_images(op.image_shape, 1, seed=3)
    expected = torch.roll(x, shifts=1, dims=-1)
    assert torch.allclose(op(x), expected, rtol=0, atol=1e-12)
    assert torch.allclose(deepinv_blur(op).A(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("task", ["inpaint-box", "inpaint-random"])
@pytest.mark.parametrize("seed", SEEDS)
def test_inpainting_matches_deepinv(task, seed):
    shape = (3, 16, 24)
    op = make_operator(task, shape, batch_size=4, seed=seed).double()
    physics = dinv.physics.Inpainting(img_size=shape, mask=op.mask.clone())
    x = random_images(shape, 4, seed)
    assert torch.allclose(op(x), physics.A(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("task", ["inpaint-box", "inpaint-random"])
def test_inpainting_adjoint_matches_deepinv(task):
    shape = (3, 16, 24)
    op = make_operator(task, shape, batch_size=4, seed=5).double()
    physics = dinv.physics.Inpainting(img_size=shape, mask=op.mask.clone())
    y = random_images(shape, 4, seed=6)
    assert torch.allclose(op.adjoint(y), physics.A_adjoint(y), rtol=0, atol=1e-5)


def blurred_pair(faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return noisy blurred faces (some pixels beyond [-1, 1]) and the clean faces."""
    op = make_operator("deblur", tuple(faces.shape[1:]), len(faces)).double()
    return measure(op, faces, sigma_y=0.1, seed=0), faces


def unit(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def test_psnr_matches_deepinv(faces):
    x, ref = blurred_pair(faces)
    theirs = dinv.metric.PSNR()(unit(x), unit(ref))
    # Undo deepinv's epsilon: 10^(-PSNR / 10) is the MSE on [0, 1] plus 1e-8.
    their_mse = 10 ** (-theirs / 10) - DEEPINV_PSNR_EPSILON
    our_mse = 10 ** (-psnr(x, ref) / 10)
    assert torch.allclose(our_mse, their_mse, rtol=1e-9, atol=0)


def test_psnr_close_to_deepinv_in_db(faces):
    x, ref = blurred_pair(faces)
    theirs = dinv.metric.PSNR()(unit(x), unit(ref))
    assert torch.allclose(psnr(x, ref), theirs, rtol=0, atol=1e-4)


def torchmetrics_ssim_map(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    _, ssim_map = torchmetrics_image.structural_similarity_index_measure(
        unit(x), unit(ref), data_range=1.0, reduction="none", return_full_image=True)
    return ssim_map


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_ssim_matches_deepinv_interior(faces, dtype, tolerance):
    x, ref = blurred_pair(faces)
    x, ref = x.to(dtype), ref.to(dtype)
    border = SSIM_WINDOW // 2
    interior = torchmetrics_ssim_map(x, ref)[..., border:-border, border:-border]
    assert torch.allclose(ssim(x, ref), interior.flatten(1).mean(1), rtol=0, atol=tolerance)


def test_deepinv_ssim_averages_full_map(faces):
    # deepinv's score includes the border pixels, whose windows see reflected padding.
    x, ref = blurred_pair(faces)
    theirs = dinv.metric.SSIM()(unit(x), unit(ref))
    assert torch.allclose(theirs, torchmetrics_ssim_map(x, ref).flatten(1).mean(1), rtol=0, atol=1e-10)
