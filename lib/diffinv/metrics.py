"""Image quality metrics: PSNR, SSIM and LPIPS, plus the summary written to ``metrics.json``.

Every metric takes a restored batch ``x`` and its reference ``ref`` as tensors ``(B, C, H, W)``
in [-1, 1] and returns one value per image, shape ``(B,)``. The tensors are scored as they are,
never min-max stretched. Values outside [-1, 1] are clipped first, as a display would clip them.

- PSNR and SSIM see the images mapped to [0, 1] by ``(x + 1) / 2`` with data range 1.
- SSIM is the Gaussian-window SSIM of Wang et al. (2004): an 11x11 window with sigma 1.5,
  K1 = 0.01, K2 = 0.03, population (co)variances, averaged over the valid interior and over
  channels. This is what ``skimage.metrics.structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1)`` returns.
- LPIPS is the learned perceptual distance of Zhang et al. (2018) with the AlexNet trunk and
  the v0.1 linear heads of the ``lpips`` package. Grayscale is repeated to 3 channels, and
  images whose shorter side is below 64 pixels are enlarged bilinearly to 64 first
  (see :func:`lpips`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffinv.data import shared_data_dir

if TYPE_CHECKING:
    import lpips as lpips_package

# Gaussian SSIM window of Wang et al. (2004).
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# The AlexNet trunk shrinks a 64 px image to 3x3 features in its last layers. Below 31 px its
# second max-pool gets an input smaller than its 3x3 window and fails, so small images are enlarged.
LPIPS_MIN_SIDE = 64

# torchvision's AlexNet_Weights.IMAGENET1K_V1.url, written out so that importing this module does not
# import lpips and torchvision (3 s); tests/test_metrics.py checks that the two agree.
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
ALEXNET_SHARED_FILE = Path("lpips-alexnet") / "alexnet_features.safetensors"
DOWNLOAD_TIMEOUT_S = 10.0


def _check_pair(x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(
            f"image batch has shape {tuple(x.shape)} but the reference has shape {tuple(ref.shape)}, "
            "expected equal shapes"
        )
    if x.ndim != 4:
        raise ValueError(f"images have shape {tuple(x.shape)}, expected (B, C, H, W)")


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1], clipping values outside as a display would."""
    if not x.is_floating_point():
        raise ValueError(f"images have dtype {x.dtype}, expected a floating point dtype")
    return ((x + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Return the PSNR in dB of each image, ``10 log10(1 / MSE)`` on [0, 1] images, shape (B,).

    Identical images have MSE 0 and get ``inf``: there is no cap.
    """
    _check_pair(x, ref)
    mse = (to_unit_range(x) - to_unit_range(ref)).pow(2).flatten(1).mean(dim=1)
    return -10 * torch.log10(mse)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Return the normalised 1-D Gaussian of length 11 and sigma 1.5."""
    radius = SSIM_WINDOW // 2
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    window = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return window / window.sum()


def _gaussian_filter_valid(images: torch.Tensor) -> torch.Tensor:
    """Blur every channel of ``images`` with the separable SSIM window, no padding."""
    batch, channels, height, width = images.shape
    window = _gaussian_window(images.dtype, images.device)
    planes = images.reshape(batch * channels, 1, height, width)
    planes = F.conv2d(planes, window.view(1, 1, 1, -1))
    planes = F.conv2d(planes, window.view(1, 1, -1, 1))
    return planes.reshape(batch, channels, *planes.shape[-2:])


def ssim(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Return the mean SSIM of each image on [0, 1] with data range 1, shape (B,).

    The local means, variances and covariance come from an 11x11 Gaussian window (sigma 1.5)
    applied without padding, so the SSIM map covers the (H - 10) x (W - 10) pixels whose window
    lies inside the image. Its mean over those pixels and over channels is the score. scikit-image
    computes the same mean: it filters with reflected borders and then crops 5 pixels per side.
    """
    _check_pair(x, ref)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"images have shape {tuple(x.shape)}, expected height and width of at least {SSIM_WINDOW} "
            "for the SSIM window"
        )
    x, ref = to_unit_range(x), to_unit_range(ref)
    c1 = SSIM_K1**2
    c2 = SSIM_K2**2

    # Gaussian-weighted local moments, with population (co)variances as Wang et al. (2004) use.
    mu_x, mu_y, xx, yy, xy = _gaussian_filter_valid(torch.cat([x, ref, x * x, ref * ref, x * ref])).chunk(5)
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov_xy = xy - mu_x * mu_y

    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = (2 * cov_xy + c2) / (var_x + var_y + c2)
    ssim_map = luminance * contrast_structure
    return ssim_map.flatten(1).mean(dim=1)


def _hub_alexnet_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(ALEXNET_URL)


def _download_alexnet(path: Path) -> str | None:
    """Download torchvision's AlexNet weights to ``path`` and return None, or return why the download failed.

    A socket timeout bounds every network wait, so an offline machine fails within seconds
    instead of hanging. The file name carries the first 8 hex digits of its sha256, which
    the download must match.
    """
    expected_prefix = path.stem.rsplit("-", 1)[-1]
    partial = path.with_name(path.name + ".partial")
    digest = hashlib.sha256()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(ALEXNET_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            with open(partial, "wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    except OSError as error:
        partial.unlink(missing_ok=True)
        return f"download of {ALEXNET_URL} failed: {error}"

    if not digest.hexdigest().startswith(expected_prefix):
        partial.unlink(missing_ok=True)
        return f"download of {ALEXNET_URL} has sha256 {digest.hexdigest()}, expected prefix {expected_prefix}"
    os.replace(partial, path)
    return None


def _load_shared_alexnet(model: lpips_package.LPIPS, path: Path) -> None:
    """Copy the torchvision-layout ``features.*`` weights at ``path`` into the LPIPS trunk."""
    features = load_file(path)

    # The trunk splits torchvision's ``features`` into slices but keeps the layer indices,
    # so ``slice2.3.weight`` is ``features.3.weight``.
    state = {name: features[f"features.{name.split('.', 1)[1]}"] for name in model.net.state_dict()}
    model.net.load_state_dict(state)


def _construct_lpips(pnet_rand: bool) -> lpips_package.LPIPS:
    import lpips as lpips_package

    # lpips 0.1.4 builds its trunk with torchvision's deprecated ``pretrained`` argument.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated since 0.13", category=UserWarning)
        return lpips_package.LPIPS(net="alex", version="0.1", pnet_rand=pnet_rand, verbose=False)


def _build_lpips_network() -> lpips_package.LPIPS:
    """Build LPIPS (AlexNet, v0.1) with ImageNet trunk weights from the first source that has them.

    1. torchvision's ``alexnet-owt-7be5be79.pth`` in the torch hub cache, downloaded there
       when it is missing and the network allows.
    2. ``lpips-alexnet/alexnet_features.safetensors`` in the shared data folder
       (``DIFFINV_SHARED_DATA``), an offline copy of the same convolution weights.
    The linear heads always come from the ``lpips`` package itself.
    """
    hub_path = _hub_alexnet_path()
    download_error = None if hub_path.is_file() else _download_alexnet(hub_path)
    if download_error is None:
        return _construct_lpips(pnet_rand=False)

    shared = shared_data_dir()
    if shared is not None and (shared / ALEXNET_SHARED_FILE).is_file():
        model = _construct_lpips(pnet_rand=True)
        _load_shared_alexnet(model, shared / ALEXNET_SHARED_FILE)
        return model

    raise RuntimeError(
        f"LPIPS needs the ImageNet AlexNet weights, but {hub_path} is missing and the {download_error}. "
        f"Put torchvision's {hub_path.name} at {hub_path}, or set DIFFINV_SHARED_DATA to a folder "
        f"that contains {ALEXNET_SHARED_FILE}."
    )


@functools.lru_cache(maxsize=None)
def lpips_network(device: torch.device) -> lpips_package.LPIPS:
    """Return the LPIPS (AlexNet, v0.1) network on ``device``, built once per device, in eval mode."""
    model = _build_lpips_network().to(device).eval()
    model.requires_grad_(False)
    return model


def _enlarge_to_min_side(images: torch.Tensor) -> torch.Tensor:
    """Enlarge bilinearly until the shorter side is ``LPIPS_MIN_SIDE``, keeping the aspect ratio."""
    height, width = images.shape[-2:]
    if min(height, width) >= LPIPS_MIN_SIDE:
        return images
    scale = LPIPS_MIN_SIDE / min(height, width)
    size = (max(LPIPS_MIN_SIDE, round(height * scale)), max(LPIPS_MIN_SIDE, round(width * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def lpips(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Return the LPIPS distance (AlexNet, v0.1) of each image to its reference, shape (B,).

    Inputs are clipped to [-1, 1], the LPIPS input range. Grayscale images are repeated to
    3 channels. Images whose shorter side is below 64 pixels are enlarged bilinearly until it
    is 64, so 32x32 becomes 64x64. At 32 px the AlexNet trunk would pool its last layers down
    to a single pixel, and below 31 px it fails. Scores of small images are therefore LPIPS of
    the enlarged pair, comparable with each other but not with LPIPS of 256 px images.
    """
    _check_pair(x, ref)
    channels = x.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"images have {channels} channels, expected 1 (grayscale) or 3 (RGB) for LPIPS")

    pair = torch.cat([x, ref]).float().clamp(-1, 1)
    pair = _enlarge_to_min_side(pair.expand(-1, 3, -1, -1))
    x_in, ref_in = pair.chunk(2)
    return lpips_network(x.device)(x_in, ref_in).flatten()


def all_metrics(x: torch.Tensor, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """Compute PSNR, SSIM and LPIPS of each image, keyed ``"psnr"``, ``"ssim"``, ``"lpips"``."""
    return {"psnr": psnr(x, ref), "ssim": ssim(x, ref), "lpips": lpips(x, ref)}


def summarize(values: Sequence[float] | torch.Tensor | np.ndarray) -> dict[str, float]:
    """Return the mean of ``values`` and its 95% Student t confidence interval as ``mean``, ``low``, ``high``.

    The interval is ``mean -/+ t_{0.975, n-1} s / sqrt(n)`` with the sample standard deviation
    ``s`` (ddof 1). A single value has no spread estimate, so it gets ``low = high = mean``.
    An infinite PSNR (an exact restoration) among several values makes the mean infinite
    and the interval NaN.
    """
    array = torch.as_tensor(values).detach().cpu().double().flatten().numpy()
    count = array.size
    if count == 0:
        raise ValueError("summarize received no values, expected at least one")

    mean = float(array.mean())
    if count == 1:
        return {"mean": mean, "low": mean, "high": mean}
    if not np.isfinite(array).all():
        return {"mean": mean, "low": math.nan, "high": math.nan}

    half_width = scipy.stats.t.ppf(0.975, count - 1) * array.std(ddof=1) / math.sqrt(count)
    return {"mean": mean, "low": float(mean - half_width), "high": float(mean + half_width)}
