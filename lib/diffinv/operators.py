"""Linear measurement operators ``y = A x`` on image batches ``(B, C, H, W)``.

Every operator has a forward map, its exact adjoint (``<A x, y> = <x, A^T y>``, tested) and,
where it is cheap, a pseudo-inverse. Kernels and masks are drawn once, in ``__init__``, from
the seed and stored as buffers, so an operator never changes between calls.

Default sizes scale the DPS setup at 256 px to the image side. DPS uses a Gaussian blur with
kernel 61 and std 3.0, a motion blur with kernel 61, and a 128 px box with a 16 px margin for
box inpainting. The functions ``default_*`` state each rule.

Buffers are kept in float64 and cast to the dtype and device of the input at each call, so
one operator serves float32 and float64 inputs on any device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

TASKS = ("deblur", "deblur-motion", "inpaint-box", "inpaint-random", "super-resolution")
MAX_MATRIX_COLUMNS = 4096


# ---------------------------------------------------------------------------------------------
# Size rules


def largest_odd_at_most(side: int) -> int:
    return side if side % 2 == 1 else side - 1


def default_blur_std(side: int) -> float:
    """Return the Gaussian blur std in pixels for images ``side`` pixels wide.

    DPS blurs 256 px faces with std 3.0, so the std scales linearly as ``3.0 * side / 256``.
    It is floored at 1.0 px because the linear rule gives 0.375 px at 32 px, a blur that
    leaves a face almost unchanged and so makes a trivial deblurring task.
    """
    return max(1.0, 3.0 * side / 256)


def default_kernel_size(std: float, side: int) -> int:
    """Return ``2 * round(10 * std) + 1`` (61 for std 3.0), capped at the largest odd size <= ``side``.

    The kernel reaches 10 std on each side, as the DPS kernel 61 for std 3.0 does. The cap
    truncates the Gaussian when ``std > side / 20``.
    """
    return min(2 * round(10 * std) + 1, largest_odd_at_most(side))


def default_motion_size(side: int) -> int:
    """Return the motion-blur kernel size: 61 at 256 px scaled linearly, odd, at least 3 and at most ``side``."""
    return min(max(3, 2 * round(30 * side / 256) + 1), largest_odd_at_most(side))


def default_box_margin(side: int) -> int:
    """Return the box-inpainting margin: 16 px at 256 px scaled linearly, at least 1 px."""
    return max(1, round(16 * side / 256))


def default_downsample_factor(side: int) -> int:
    """Return 4 (the usual x4 super-resolution at 256 px) for sides of 128 px and more, else 2.

    At 32 px a factor 4 would leave 8x8 measurements, too few pixels to tell faces apart.
    """
    return 4 if side >= 128 else 2


# ---------------------------------------------------------------------------------------------
# Base class


def _check_image_shape(image_shape) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape is {tuple(image_shape)}, expected (C, H, W) with positive sizes")
    return shape


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}, expected a positive integer")
    return int(batch_size)


class LinearOperator(torch.nn.Module):
    """A linear map ``A`` from images ``(B, C, H, W)`` to measurements ``measurement_shape(B)``.

    Subclasses implement ``forward`` and ``adjoint`` (calling :meth:`check_input` first) and
    ``measurement_shape``. Operators that hold one mask per image set ``batch_size``. They accept
    a batch of exactly that size, or any batch when ``batch_size == 1`` (the mask broadcasts).
    """

    batch_size: int | None = None

    def __init__(self, image_shape):
        super().__init__()
        self._image_shape = _check_image_shape(image_shape)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    def measurement_shape(self, batch: int) -> tuple[int, ...]:
        raise NotImplementedError(f"{type(self).__name__} does not define measurement_shape")

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define an adjoint")

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no cheap pseudo-inverse")

    def single(self, index: int = 0) -> LinearOperator:
        """Return the operator applied to image ``index`` of a batch, with batch size 1."""
        return self

    def check_input(self, x: torch.Tensor, measurement: bool = False) -> None:
        """Raise ValueError unless ``x`` is a float batch of images (or of measurements) for this operator."""
        name = "measurement" if measurement else "image"
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} is {kind}, expected a floating-point tensor")
        if x.ndim != 4:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected 4 dimensions (B, C, H, W)")

        batch = x.shape[0]
        expected = self.measurement_shape(batch) if measurement else (batch, *self.image_shape)
        if tuple(x.shape) != tuple(expected):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(expected)}")
        if self.batch_size not in (None, 1) and batch != self.batch_size:
            raise ValueError(
                f"{name} has batch size {batch}, but this {type(self).__name__} was built with "
                f"{self.batch_size} masks; build it with batch_size={batch}"
            )

    @torch.no_grad()
    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Return the dense ``(m, n)`` matrix of the operator for image 0, built column by column.

        Columns are ``A e_j`` for the basis images ``e_j``, flattened in (C, H, W) order.
        """
        n = math.prod(self.image_shape)
        if n > MAX_MATRIX_COLUMNS:
            raise ValueError(
                f"image_shape {self.image_shape} has {n} pixels, but matrix() builds at most "
                f"{MAX_MATRIX_COLUMNS} columns; use forward and adjoint instead"
            )
        device = next(iter(self.buffers()), torch.empty(0)).device
        basis = torch.eye(n, dtype=dtype, device=device).reshape(n, *self.image_shape)
        return self.single(0)(basis).reshape(n, -1).T.contiguous()

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}"


# ---------------------------------------------------------------------------------------------
# Circular convolution (Gaussian and motion blur)


class CircularConvolution(LinearOperator):
    """Convolution with a ``k x k`` kernel under periodic boundaries, computed by FFT.

    ``(A x)[i, j] = sum_{u, v} kernel[u, v] x[(i - u + c) mod H, (j - v + c) mod W]`` with
    ``c = k // 2``, so the kernel centre sits on the output pixel and the image wraps around
    its edges (circular padding). ``A`` is diagonal in the Fourier basis with transfer
    function ``K = rfft2(kernel)`` and the adjoint, a correlation, multiplies by ``conj(K)``.
    Every channel is blurred with the same kernel.

    ``pinv`` is a Tikhonov-regularised inverse ``conj(K) Y / (|K|^2 + pinv_epsilon)``, because
    ``K`` is tiny at high frequencies (below 1e-4 for a Gaussian of std 1 px). It agrees with
    the true pseudo-inverse where ``|K|^2 >> pinv_epsilon`` and never amplifies by more than
    ``1 / (2 sqrt(pinv_epsilon))`` = 50.
    """

    pinv_epsilon = 1e-4

    def __init__(self, image_shape, kernel: torch.Tensor):
        super().__init__(image_shape)
        _, H, W = self.image_shape
        k = kernel.shape[-1]
        if kernel.ndim != 2 or kernel.shape[0] != k or k % 2 == 0:
            raise ValueError(f"kernel has shape {tuple(kernel.shape)}, expected a square kernel of odd size")
        if k > min(H, W):
            raise ValueError(f"kernel size {k} exceeds the image side {min(H, W)}")

        # Embed the kernel in an H x W array with its centre moved to pixel (0, 0).
        padded = torch.zeros(H, W, dtype=torch.float64)
        padded[:k, :k] = kernel.to(torch.float64)
        padded = torch.roll(padded, shifts=(-(k // 2), -(k // 2)), dims=(0, 1))
        self.register_buffer("kernel", kernel.to(torch.float64))
        # Stored as real pairs, because Module.to(dtype=float32) would drop the imaginary
        # part of a complex buffer.
        self.register_buffer("transfer", torch.view_as_real(torch.fft.rfft2(padded)))

    def measurement_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.image_shape)

    def transfer_function(self, like: torch.Tensor) -> torch.Tensor:
        """Return ``K`` on the ``rfft2`` grid ``(H, W // 2 + 1)`` in the complex dtype matching ``like``."""
        pairs = self.transfer.to(device=like.device, dtype=like.dtype).contiguous()
        return torch.view_as_complex(pairs)

    def _multiply(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(torch.fft.rfft2(x) * factor, s=x.shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self._multiply(x, self.transfer_function(x))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self.check_input(y, measurement=True)
        return self._multiply(y, self.transfer_function(y).conj())

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        self.check_input(y, measurement=True)
        K = self.transfer_function(y)
        return self._multiply(y, K.conj() / (K.abs() ** 2 + self.pinv_epsilon))

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, kernel_size={self.kernel.shape[-1]}"


def gaussian_kernel(std: float, size: int) -> torch.Tensor:
    """Return the ``size x size`` sampled Gaussian ``exp(-r^2 / (2 std^2))``, normalised to sum 1."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(r**2) / (2 * std**2))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


class GaussianBlur(CircularConvolution):
    """Isotropic Gaussian blur of standard deviation ``std`` pixels, circular padding (see the base class).

    ``kernel_size`` defaults to :func:`default_kernel_size`. A kernel shorter than about 6 std
    truncates the Gaussian, so its measured std falls below ``std``.
    """

    def __init__(self, image_shape, std: float, kernel_size: int | None = None):
        shape = _check_image_shape(image_shape)
        side = min(shape[1:])
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std is {std}, expected a positive number of pixels")
        if kernel_size is None:
            kernel_size = default_kernel_size(std, side)
        if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size is {kernel_size}, expected a positive odd integer")

        super().__init__(shape, gaussian_kernel(std, int(kernel_size)))
        self.std = float(std)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, std={self.std}"


def motion_kernel(size: int, intensity: float, seed: int) -> torch.Tensor:
    """Return a seeded ``size x size`` motion-blur kernel that sums to 1.

    The camera path is a random walk of ``4 * size`` unit steps whose heading changes by a
    normal increment of std ``intensity * pi / sqrt(steps)`` per step. The heading therefore
    wanders by about ``intensity * pi`` over the whole path: 0 gives a straight stroke, 1 a
    curled one. The path is centred on its mean, scaled so that it spans the kernel, and
    rasterised by bilinear splatting. Centring the mean keeps the blurred image unshifted.
    """
    rng = _image_rng(seed, size)
    steps = 4 * size
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, intensity * np.pi / np.sqrt(steps), steps))
    path = np.cumsum(np.stack([np.sin(heading), np.cos(heading)], axis=1), axis=0)
    path -= path.mean(axis=0)
    path *= (size - 1) / 2 / max(np.abs(path).max(), 1e-12)
    path += size // 2

    kernel = torch.zeros(size, size, dtype=torch.float64)
    low = np.floor(path).astype(int)
    frac = path - low
    for du in (0, 1):
        for dv in (0, 1):
            weight = (frac[:, 0] if du else 1 - frac[:, 0]) * (frac[:, 1] if dv else 1 - frac[:, 1])
            rows = np.minimum(low[:, 0] + du, size - 1)
            cols = np.minimum(low[:, 1] + dv, size - 1)
            index = (torch.from_numpy(rows), torch.from_numpy(cols))
            kernel.index_put_(index, torch.from_numpy(weight), accumulate=True)
    return kernel / kernel.sum()


class MotionBlur(CircularConvolution):
    """Blur by a seeded random camera path (:func:`motion_kernel`), circular padding (see the base class)."""

    def __init__(self, image_shape, size: int | None = None, intensity: float = 0.5, seed: int = 0):
        shape = _check_image_shape(image_shape)
        if size is None:
            size = default_motion_size(min(shape[1:]))
        if int(size) != size or size < 3 or size % 2 == 0:
            raise ValueError(f"motion kernel size is {size}, expected an odd integer >= 3")
        if not (math.isfinite(intensity) and 0 <= intensity <= 1):
            raise ValueError(f"intensity is {intensity}, expected a number in [0, 1]")

        super().__init__(shape, motion_kernel(int(size), float(intensity), int(seed)))
        self.intensity = float(intensity)
        self.seed = int(seed)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, intensity={self.intensity}, seed={self.seed}"


# ---------------------------------------------------------------------------------------------
# Masks (inpainting)


def _image_rng(seed: int, index: int) -> np.random.Generator:
    """Return the generator for image ``index`` of a batch: one stream per (seed, index) pair.

    NumPy's SeedSequence hashes the pair, so image ``i`` gets the same mask in any batch size.
    """
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed is {seed}, expected a non-negative integer")
    return np.random.default_rng([int(seed), int(index)])


class MaskOperator(LinearOperator):
    """Pixel selection ``A x = mask * x`` with one mask ``(B, 1, H, W)`` per image, shared by channels.

    ``mask`` is 1 on kept pixels and 0 on dropped ones. ``A`` is an orthogonal projection, so
    it is its own adjoint and its own pseudo-inverse. The measurement keeps the image shape
    with zeros on dropped pixels.
    """

    def __init__(self, image_shape, mask: torch.Tensor):
        super().__init__(image_shape)
        _, H, W = self.image_shape
        if mask.ndim != 4 or mask.shape[1:] != (1, H, W):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (B, 1, {H}, {W})")
        kept = mask.flatten(1).sum(1)
        if bool((kept == 0).any()):
            index = int(torch.nonzero(kept == 0)[0])
            raise ValueError(f"the mask of image {index} keeps no pixel; lower the dropped fraction")
        self.register_buffer("mask", mask.to(torch.float64))
        self.batch_size = mask.shape[0]

    def measurement_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.image_shape)

    def _apply_mask(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask.to(device=x.device, dtype=x.dtype) * x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self._apply_mask(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self.check_input(y, measurement=True)
        return self._apply_mask(y)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return self.adjoint(y)

    def single(self, index: int = 0) -> MaskOperator:
        if not 0 <= index < self.batch_size:
            raise IndexError(f"image index {index} is out of range for {self.batch_size} masks")
        return MaskOperator(self.image_shape, self.mask[index : index + 1])

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, batch_size={self.batch_size}"


def box_mask(image_shape, batch_size: int, box_fraction: float, margin: int, seed: int) -> torch.Tensor:
    """Return masks ``(B, 1, H, W)`` that each drop one box at a seeded position at least ``margin`` px from the border."""
    _, H, W = image_shape
    box_h, box_w = max(1, round(box_fraction * H)), max(1, round(box_fraction * W))
    if box_h + 2 * margin > H or box_w + 2 * margin > W:
        raise ValueError(
            f"a {box_h}x{box_w} box with margin {margin} does not fit in a {H}x{W} image; "
            "lower box_fraction or margin"
        )

    mask = torch.ones(batch_size, 1, H, W, dtype=torch.float64)
    for index in range(batch_size):
        rng = _image_rng(seed, index)
        top = int(rng.integers(margin, H - margin - box_h + 1))
        left = int(rng.integers(margin, W - margin - box_w + 1))
        mask[index, :, top : top + box_h, left : left + box_w] = 0
    return mask


class BoxInpaint(MaskOperator):
    """Box inpainting: each image loses a box of ``box_fraction`` of its side (DPS: 128 px of 256).

    ``margin`` defaults to :func:`default_box_margin` of the shorter side (DPS: 16 px at 256 px).
    """

    def __init__(self, image_shape, batch_size: int, box_fraction: float = 0.5, margin: int | None = None, seed: int = 0):
        shape = _check_image_shape(image_shape)
        batch_size = _check_batch_size(batch_size)
        if not (math.isfinite(box_fraction) and 0 < box_fraction < 1):
            raise ValueError(f"box_fraction is {box_fraction}, expected a number in (0, 1)")
        if margin is None:
            margin = default_box_margin(min(shape[1:]))
        if int(margin) != margin or margin < 0:
            raise ValueError(f"margin is {margin}, expected a non-negative integer number of pixels")

        super().__init__(shape, box_mask(shape, batch_size, box_fraction, int(margin), seed))
        self.box_fraction, self.margin, self.seed = float(box_fraction), int(margin), int(seed)


def random_mask(image_shape, batch_size: int, drop_range: tuple[float, float], seed: int):
    """Return masks ``(B, 1, H, W)`` and the drop fraction ``p ~ U(drop_range)`` drawn for each image.

    Each pixel is dropped independently with probability ``p``, so the dropped share is only
    close to ``p`` (binomial spread ``sqrt(p (1 - p) / (H W))``).
    """
    _, H, W = image_shape
    masks, fractions = [], []
    for index in range(batch_size):
        rng = _image_rng(seed, index)
        p = rng.uniform(*drop_range)
        masks.append(torch.from_numpy(rng.random((1, H, W)) >= p))
        fractions.append(p)
    return torch.stack(masks).to(torch.float64), torch.tensor(fractions, dtype=torch.float64)


class RandomInpaint(MaskOperator):
    """Random inpainting: each image drops pixels independently with its own fraction from ``drop_range``."""

    def __init__(self, image_shape, batch_size: int, drop_range: tuple[float, float] = (0.3, 0.7), seed: int = 0):
        shape = _check_image_shape(image_shape)
        batch_size = _check_batch_size(batch_size)
        low, high = (float(p) for p in drop_range)
        if not (0 <= low <= high <= 1):
            raise ValueError(f"drop_range is {tuple(drop_range)}, expected (low, high) with 0 <= low <= high <= 1")

        mask, fractions = random_mask(shape, batch_size, (low, high), seed)
        super().__init__(shape, mask)
        self.register_buffer("drop_fractions", fractions)
        self.drop_range, self.seed = (low, high), int(seed)


# ---------------------------------------------------------------------------------------------
# Downsampling (super-resolution)


class Downsample(LinearOperator):
    """Average pooling over ``factor x factor`` blocks, the super-resolution operator.

    ``A A^T = I / factor^2``, so the adjoint is nearest upsampling divided by ``factor^2`` and
    the exact pseudo-inverse ``A^T (A A^T)^-1`` is nearest upsampling.
    """

    def __init__(self, image_shape, factor: int):
        super().__init__(image_shape)
        _, H, W = self.image_shape
        if int(factor) != factor or factor < 2:
            raise ValueError(f"factor is {factor}, expected an integer >= 2")
        if H % factor or W % factor:
            raise ValueError(f"factor {factor} does not divide the image size {H}x{W}")
        self.factor = int(factor)

    def measurement_shape(self, batch: int) -> tuple[int, ...]:
        C, H, W = self.image_shape
        return (batch, C, H // self.factor, W // self.factor)

    def _upsample(self, y: torch.Tensor) -> torch.Tensor:
        return y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self.check_input(y, measurement=True)
        return self._upsample(y) / self.factor**2

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        self.check_input(y, measurement=True)
        return self._upsample(y)

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, factor={self.factor}"


# ---------------------------------------------------------------------------------------------
# Factory and measurement

_TASK_OPTIONS = {
    "deblur": ("std", "kernel_size"),
    "deblur-motion": ("size", "intensity"),
    "inpaint-box": ("box_fraction", "margin"),
    "inpaint-random": ("drop_range",),
    "super-resolution": ("factor",),
}


def make_operator(task: str, image_shape, batch_size: int, seed: int = 0, **options) -> LinearOperator:
    """Build the operator of ``task`` (one of :data:`TASKS`) with the size defaults of this module.

    ``options`` set the task's own parameters: ``std`` and ``kernel_size`` (deblur), ``size``
    and ``intensity`` (deblur-motion), ``box_fraction`` and ``margin`` (inpaint-box),
    ``drop_range`` (inpaint-random), ``factor`` (super-resolution). ``seed`` draws the motion
    kernel and the masks; the Gaussian blur and downsampling use no randomness.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not valid, expected one of {', '.join(TASKS)}")
    unknown = sorted(set(options) - set(_TASK_OPTIONS[task]))
    if unknown:
        raise ValueError(
            f"option {', '.join(unknown)} is not valid for task {task!r}, "
            f"expected {', '.join(_TASK_OPTIONS[task])}"
        )
    shape = _check_image_shape(image_shape)
    batch_size = _check_batch_size(batch_size)
    side = min(shape[1:])

    if task == "deblur":
        return GaussianBlur(shape, options.get("std", default_blur_std(side)), options.get("kernel_size"))
    if task == "deblur-motion":
        return MotionBlur(shape, options.get("size"), options.get("intensity", 0.5), seed)
    if task == "inpaint-box":
        return BoxInpaint(shape, batch_size, options.get("box_fraction", 0.5), options.get("margin"), seed)
    if task == "inpaint-random":
        return RandomInpaint(shape, batch_size, options.get("drop_range", (0.3, 0.7)), seed)
    return Downsample(shape, options.get("factor", default_downsample_factor(side)))


def measure(op: LinearOperator, x: torch.Tensor, sigma_y: float, seed: int) -> torch.Tensor:
    """Return the noisy measurement ``y = A x + sigma_y n`` with ``n ~ N(0, I)``.

    ``n`` is drawn by a CPU ``torch.Generator`` seeded with ``seed`` and moved to the device
    of ``x``, so the noise is the same on every device. ``x`` must be finite and in [-1, 1].
    """
    if not (math.isfinite(sigma_y) and sigma_y >= 0):
        raise ValueError(f"sigma_y is {sigma_y}, expected a finite number >= 0")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"x contains {int((~torch.isfinite(x)).sum())} non-finite values, expected finite images")
    low, high = float(x.min()), float(x.max())
    if low < -1 - 1e-6 or high > 1 + 1e-6:
        raise ValueError(f"x has values in [{low:.4g}, {high:.4g}], expected images in [-1, 1]")

    y = op(x)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    n = torch.randn(y.shape, generator=generator, dtype=y.dtype)
    return y + sigma_y * n.to(y.device)
