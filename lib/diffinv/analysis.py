"""Jacobians of the score network: columns, top singular values, spectral radius, over time.

Three maps of one noisy image ``x_t`` are analysed, all at a fixed timestep t:

- the score ``s(x) = prior.score(x, t)``, Jacobian ``J_s = ds/dx``;
- the denoiser ``D(x) = x0_hat(x, t)``, ``J_D = (I + (1 - abar_t) J_s) / sqrt(abar_t)``;
- the deterministic reverse step ``f(x) = (x + (1 - alpha_t) s(x)) / sqrt(alpha_t)``,
  ``J_f = (I + (1 - alpha_t) J_s) / sqrt(alpha_t)``.

No Jacobian is formed unless asked for (:func:`full_jacobian`, small images only).
Everything else is matrix-free: Jacobian-vector products ``J v`` by forward-mode AD
(``torch.func.jvp``) and vector-Jacobian products ``J^T u`` by reverse mode
(``torch.func.vjp``), each counted as one network pass per vector.

Products for several vectors run as one batch: the primal image is repeated along the
batch dimension and each batch item carries its own tangent. This assumes the map treats
batch items independently, which holds for every prior here (GroupNorm, no BatchNorm).
It took half the time of ``torch.func.vmap`` over single jvps (8 tangents through the
32x32 embedded UNet, torch 2.14, a 2-core CPU).
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Callable, NamedTuple, Sequence

import torch
from torch.func import jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .models import GaussianPrior, Prior
from .solvers import reverse_mean

ImageMap = Callable[[torch.Tensor], torch.Tensor]

METHODS = ("subspace", "lanczos")
MAPS = ("score", "denoiser", "reverse")
# A dense (D, D) Jacobian beyond this size costs D passes and D^2 memory: use top_singular.
MAX_FULL_DIM = 4096
DEFAULT_CHUNK = 64


class SingularTriplets(NamedTuple):
    """The leading singular values ``(k,)``, right and left vectors ``(k, C, H, W)``, and pass counts."""

    values: torch.Tensor
    right: torch.Tensor
    left: torch.Tensor
    passes: dict[str, int]


# --- the three maps -----------------------------------------------------------------------


def check_timestep(prior: Prior, t) -> int:
    """Return ``t`` as an int, or raise ValueError if it is not a timestep of the prior's schedule."""
    if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)) or (
            isinstance(t, torch.Tensor) and (t.numel() != 1 or t.is_floating_point())):
        raise ValueError(f"timestep {t!r} is not an integer, expected 0 <= t <= {prior.schedule.T - 1}")
    if not 0 <= int(t) < prior.schedule.T:
        raise ValueError(f"timestep {int(t)} is outside the schedule, expected 0 <= t <= {prior.schedule.T - 1}")
    return int(t)


def reverse_alpha(prior: Prior, t: int, steps: int | None = None) -> float:
    """Return ``alpha_t`` of the reverse step at timestep t.

    With ``steps=None`` it is ``1 - beta_t`` of the full schedule. With ``steps`` it is the
    alpha of a ``steps``-step respaced sampler, ``abar_t / abar_{t_prev}`` with ``t_prev`` the
    previous kept timestep, so t must be one of the kept timesteps.
    """
    t = check_timestep(prior, t)
    if steps is None:
        return float(prior.schedule.alphas[t])
    respaced = prior.schedule.respace(steps)
    sampler_timesteps = respaced.timesteps.tolist()
    if t not in sampler_timesteps:
        nearest = sampler_timesteps[respaced.index_of(t)]
        raise ValueError(f"timestep {t} is not a step of the {steps}-step sampler, "
                         f"expected one of its timesteps such as {nearest}")
    return float(respaced.alphas[sampler_timesteps.index(t)])


def score_map(prior: Prior, t: int) -> ImageMap:
    """Return ``x -> s(x, t)``."""
    t = check_timestep(prior, t)
    return lambda x: prior.score(x, t)


def denoiser_map(prior: Prior, t: int) -> ImageMap:
    """Return ``x -> x0_hat(x, t)``, the Tweedie denoiser."""
    t = check_timestep(prior, t)
    return lambda x: prior.x0_hat(x, t)


def reverse_step_map(prior: Prior, t: int, steps: int | None = None) -> ImageMap:
    """Return ``x -> (x + (1 - alpha_t) s(x, t)) / sqrt(alpha_t)``, the reverse step without noise."""
    t = check_timestep(prior, t)
    alpha_t = reverse_alpha(prior, t, steps)
    return lambda x: reverse_mean(x, prior.score(x, t), alpha_t)


def make_map(prior: Prior, name: str, t: int, steps: int | None = None) -> ImageMap:
    """Return the map called ``name`` (one of :data:`MAPS`) at timestep t."""
    if name == "score":
        return score_map(prior, t)
    if name == "denoiser":
        return denoiser_map(prior, t)
    if name == "reverse":
        return reverse_step_map(prior, t, steps)
    raise ValueError(f"map {name!r} is not valid, expected one of {', '.join(MAPS)}")


# --- batched products ---------------------------------------------------------------------


def check_single_image(x: torch.Tensor) -> None:
    if x.ndim != 4 or len(x) != 1:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected one image (1, C, H, W)")


def jvp_batch(fn: ImageMap, x: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """Return ``J v`` for each of the tangents ``(B, C, H, W)``, J the Jacobian of ``fn`` at ``x``."""
    primal = x.repeat(len(tangents), 1, 1, 1)
    # Forward AD has no rule for the fused attention kernels (flash attention on CPU in torch 2.14),
    # so attention runs as the math backend's plain matrix products. torch's first jvp imports its
    # own decompositions, which warn that torch.jit.script is deprecated: that is torch's to fix.
    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        return jvp(fn, (primal,), (tangents.to(x.dtype),))[1]


def vjp_batch(fn: ImageMap, x: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """Return ``J^T u`` for each of the cotangents ``(B, C, H, W)``."""
    primal = x.repeat(len(cotangents), 1, 1, 1)
    with sdpa_kernel(SDPBackend.MATH):
        _, pullback = vjp(fn, primal)
        return pullback(cotangents.to(x.dtype))[0]


def _chunks(count: int, size: int):
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def jvp_chunked(fn: ImageMap, x: torch.Tensor, tangents: torch.Tensor, chunk_size: int) -> torch.Tensor:
    return torch.cat([jvp_batch(fn, x, tangents[part]) for part in _chunks(len(tangents), chunk_size)])


def vjp_chunked(fn: ImageMap, x: torch.Tensor, cotangents: torch.Tensor, chunk_size: int) -> torch.Tensor:
    return torch.cat([vjp_batch(fn, x, cotangents[part]) for part in _chunks(len(cotangents), chunk_size)])


# --- columns and the full Jacobian --------------------------------------------------------


def check_pixels(pixels: Sequence[int], image_shape: Sequence[int]) -> list[int]:
    """Return ``pixels`` as ints, or raise ValueError naming the first one outside the image."""
    dim = math.prod(image_shape)
    checked = []
    for pixel in pixels:
        if isinstance(pixel, bool) or not isinstance(pixel, int) or not 0 <= pixel < dim:
            raise ValueError(f"pixel {pixel!r} is outside the image of shape {tuple(image_shape)}, "
                             f"expected a flat index in [0, {dim - 1}]")
        checked.append(pixel)
    if not checked:
        raise ValueError("no pixels given, expected at least one flat pixel index")
    return checked


def pixel_index(image_shape: Sequence[int], row: int, column: int, channel: int = 0) -> int:
    """Return the flat index of pixel ``(channel, row, column)`` in an image of shape (C, H, W)."""
    channels, height, width = image_shape
    if not (0 <= channel < channels and 0 <= row < height and 0 <= column < width):
        raise ValueError(f"pixel (channel {channel}, row {row}, column {column}) is outside the image "
                         f"of shape {tuple(image_shape)}")
    return (channel * height + row) * width + column


def basis_vectors(pixels: Sequence[int], x: torch.Tensor) -> torch.Tensor:
    """Return the unit images ``e_i`` for the flat indices ``pixels``, shaped (len(pixels), C, H, W)."""
    flat = torch.zeros(len(pixels), x[0].numel(), dtype=x.dtype, device=x.device)
    flat[torch.arange(len(pixels)), torch.as_tensor(pixels, device=x.device)] = 1
    return flat.view(len(pixels), *x.shape[1:])


def jacobian_columns(fn: ImageMap, x: torch.Tensor, pixels: Sequence[int],
                     chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Return the columns ``J e_i`` (len(pixels), C, H, W): the response of every output pixel to pixel i.

    One forward-mode pass per pixel, batched ``chunk_size`` at a time.
    """
    check_single_image(x)
    pixels = check_pixels(pixels, x.shape[1:])
    return jvp_chunked(fn, x, basis_vectors(pixels, x), chunk_size)


def full_jacobian(fn: ImageMap, x: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Return the dense Jacobian ``J[i, j] = d fn(x)_i / d x_j`` as a (D, D) matrix, using D jvps.

    The exact reference for the matrix-free methods, limited to D <= :data:`MAX_FULL_DIM`.
    """
    check_single_image(x)
    dim = x[0].numel()
    if dim > MAX_FULL_DIM:
        raise ValueError(f"the image has D = {dim} pixels, but a full Jacobian is limited to D <= {MAX_FULL_DIM}, "
                         "so use top_singular or jacobian_columns instead")
    columns = jacobian_columns(fn, x, range(dim), chunk_size)
    return columns.reshape(dim, dim).T


# --- top singular values, matrix-free -----------------------------------------------------


def _random_images(count: int, x: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((count, *x.shape[1:]), generator=generator, dtype=torch.float64).to(x.device, x.dtype)


def _orthonormal_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Return an orthonormal basis of the span of ``vectors`` (B, C, H, W), in the same shape."""
    q, _ = torch.linalg.qr(vectors.flatten(1).T)
    return q.T.reshape(vectors.shape)


def top_singular(fn: ImageMap, x: torch.Tensor, k: int, iterations: int = 10, method: str = "lanczos",
                 seed: int = 0, oversample: int = 8, block_size: int | None = None,
                 chunk_size: int = DEFAULT_CHUNK) -> SingularTriplets:
    """Return the k largest singular values of the Jacobian of ``fn`` at ``x``, with their vectors.

    ``method="subspace"``: randomised subspace iteration (Halko, Martinsson and Tropp 2011,
    Algorithm 4.4) on a block of ``k + oversample`` vectors: ``iterations`` rounds of
    ``J^T`` then ``J``, then a Rayleigh-Ritz step, ``2 (iterations + 1) (k + oversample)``
    passes. It converges at the rate ``(sigma_{k+oversample+1} / sigma_k)^(2 iterations)``,
    slowly where the spectrum is flat, as for ``J_f``, whose singular values all lie near 1.

    ``method="lanczos"`` (the default): block Golub-Kahan-Lanczos bidiagonalisation (block Lanczos on
    ``J^T J``) with full reorthogonalisation: ``iterations`` steps on blocks of
    ``block_size`` vectors (default k), then Rayleigh-Ritz on the whole Krylov space,
    ``(2 iterations - 1) block_size`` passes. Its convergence depends on gaps relative to
    the spread of the spectrum, so a flat spectrum costs it nothing. It finds a singular
    value repeated up to ``block_size`` times; with ``block_size = 1`` (classic Lanczos) it
    finds each repeated value once.

    NOTE: a tight cluster at the top of the spectrum needs many passes whatever the method.
    On the trained embedded model, 100 passes (block 4) gave the top 16 of ``J_D`` and ``J_f``
    at t = 500 to a relative 2e-5, but those of ``J_s``, a cluster within 4%, only to 4e-2
    (``benchmarks/jacobian_bench.py``).
    """
    check_single_image(x)
    dim = x[0].numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= dim:
        raise ValueError(f"k = {k!r}, expected an integer in [1, {dim}] (the number of pixels D = {dim})")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations = {iterations!r}, expected a non-negative integer")
    if method == "subspace":
        return _subspace_iteration(fn, x, k, iterations, seed, oversample, chunk_size)
    if method != "lanczos":
        raise ValueError(f"method {method!r} is not valid, expected one of {', '.join(METHODS)}")
    block_size = k if block_size is None else block_size
    if not 1 <= block_size <= dim:
        raise ValueError(f"block_size = {block_size}, expected an integer in [1, {dim}]")
    if iterations * block_size < k:
        raise ValueError(f"iterations = {iterations} steps of block_size = {block_size} span fewer than "
                         f"k = {k} directions, expected iterations >= {math.ceil(k / block_size)}")
    return _block_lanczos(fn, x, k, iterations, seed, block_size, chunk_size)


def _subspace_iteration(fn, x, k, iterations, seed, oversample, chunk_size) -> SingularTriplets:
    block = min(k + oversample, x[0].numel())
    passes = {"jvp": 0, "vjp": 0}

    def forward(vectors):
        passes["jvp"] += len(vectors)
        return jvp_chunked(fn, x, vectors, chunk_size)

    def backward(vectors):
        passes["vjp"] += len(vectors)
        return vjp_chunked(fn, x, vectors, chunk_size)

    # Q spans the range of J Omega, refined by (J J^T)^q, re-orthonormalised every half step.
    q = _orthonormal_rows(forward(_random_images(block, x, seed)))
    for _ in range(iterations):
        q = _orthonormal_rows(forward(_orthonormal_rows(backward(q))))

    # Rayleigh-Ritz: B = Q^T J, whose SVD gives the Ritz triplets of J.
    b = backward(q).flatten(1)
    left_small, values, right = torch.linalg.svd(b, full_matrices=False)
    left = left_small.T @ q.flatten(1)
    return SingularTriplets(values[:k], right[:k].reshape(k, *x.shape[1:]),
                            left[:k].reshape(k, *x.shape[1:]), passes)


def _orthonormal_complement(block: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Return orthonormal columns spanning ``block`` (D, b) with the span of ``basis`` (D, n) removed.

    Gram-Schmidt against ``basis`` runs before and after the QR, because the QR of a block
    with a nearly dependent column returns an arbitrary direction there, which the second
    pass makes orthogonal to ``basis`` too.
    """
    for _ in range(2):
        if basis is not None:
            block = block - basis @ (basis.T @ block)
            block = block - basis @ (basis.T @ block)
        block = torch.linalg.qr(block)[0]
    return block


def _block_lanczos(fn, x, k, steps, seed, block_size, chunk_size) -> SingularTriplets:
    shape, dim = x.shape[1:], x[0].numel()
    passes = {"jvp": 0, "vjp": 0}
    as_images = lambda columns: columns.T.reshape(-1, *shape)
    right = _orthonormal_complement(_random_images(block_size, x, seed).flatten(1).T, None)
    left = None
    products = []
    for step in range(steps):
        # Right block V_j: store J V_j, whose new directions extend the left basis U.
        applied = sum(product.shape[1] for product in products)
        block = right[:, applied:]
        products.append(jvp_chunked(fn, x, as_images(block), chunk_size).flatten(1).T)
        passes["jvp"] += block.shape[1]
        left_block = _orthonormal_complement(products[-1], left)
        left = left_block if left is None else torch.cat([left, left_block], 1)
        if step == steps - 1 or right.shape[1] == dim:
            break

        # J^T U_j, less what V already spans, is the next right block V_{j+1}. When the Krylov
        # space reaches D, the last block is cut to the remaining directions.
        pulled = vjp_chunked(fn, x, as_images(left_block), chunk_size).flatten(1).T
        passes["vjp"] += left_block.shape[1]
        right = torch.cat([right, _orthonormal_complement(pulled, right)[:, :dim - right.shape[1]]], 1)

    # Rayleigh-Ritz: J V = U (U^T J V) exactly, because U spans every J V_j.
    small = left.T @ torch.cat(products, 1)
    p, values, qt = torch.linalg.svd(small, full_matrices=False)
    left_vectors = (left @ p[:, :k]).T.reshape(k, *shape)
    right_vectors = (right @ qt[:k].T).T.reshape(k, *shape)
    return SingularTriplets(values[:k], right_vectors, left_vectors, passes)


def largest_singular_value(fn: ImageMap, x: torch.Tensor, iterations: int = 20, method: str = "lanczos",
                           seed: int = 0) -> float:
    """Return the operator norm ``sigma_1`` of the Jacobian of ``fn`` at ``x``."""
    return float(top_singular(fn, x, 1, iterations, method, seed, oversample=4).values[0])


def spectral_radius(fn: ImageMap, x: torch.Tensor, iterations: int = 30, method: str = "arnoldi",
                    seed: int = 0) -> float:
    """Return the largest |eigenvalue| of the Jacobian J of ``fn`` at ``x``, using ``iterations`` jvps.

    ``method="arnoldi"``: the largest |Ritz value| of ``iterations`` Arnoldi steps (full
    reorthogonalisation, see :func:`ritz_values`). Like Lanczos, it converges fast on the
    exterior of a flat spectrum. ``method="power"``: the growth ``|J v|`` of the last
    normalised iterate of power iteration, which converges at the rate ``|lambda_2 / lambda_1|``.
    That rate is close to 1 for ``J_f``, whose eigenvalues all lie near 1, so power iteration
    needs thousands of passes there.

    For a symmetric J (the Gaussian and empirical priors, whose score Jacobian is a Hessian)
    the spectral radius equals the largest singular value. A learned network's J_f is not
    symmetric in general. Its leading eigenvalues may then be a complex pair, and power
    iteration oscillates. Arnoldi's Ritz values of a non-normal J lie in its field of
    values, so its estimate may also exceed the true radius, though never ``sigma_1``.
    """
    if method == "arnoldi":
        return float(ritz_values(fn, x, iterations, seed).abs().max())
    check_single_image(x)
    _check_count("iterations", iterations, 1)
    if method != "power":
        raise ValueError(f"method {method!r} is not valid, expected 'arnoldi' or 'power'")
    v = _random_images(1, x, seed)
    v = v / v.norm()
    growth = 0.0
    for _ in range(iterations):
        w = jvp_batch(fn, x, v)
        growth = float(w.norm())
        if growth == 0.0:
            return 0.0
        v = w / growth
    return growth


def ritz_values(fn: ImageMap, x: torch.Tensor, iterations: int = 30, seed: int = 0) -> torch.Tensor:
    """Return the Ritz values (complex, by descending modulus) of ``iterations`` Arnoldi steps on the Jacobian of ``fn``.

    They estimate eigenvalues of J, the extreme ones first: after n steps the largest and the
    leftmost and rightmost real parts are usually close, the interior ones not. One run gives
    them all, so the spectral radius and the leftmost eigenvalue of J cost the same
    ``iterations`` jvps. With the same seed, ``a I + b J`` has the same Krylov space and the
    Ritz values ``a + b * theta`` for each value ``theta`` here.

    The basis is kept in float64 whatever the dtype of ``x``. The run stops early when the new
    direction is no larger than the rounding error of the product that made it, 10 machine
    epsilons of ``x``'s dtype relative to that product. The Krylov space is then invariant as
    far as the products can resolve, and further steps would add only rounding noise.
    """
    check_single_image(x)
    _check_count("iterations", iterations, 1)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"x has {int((~torch.isfinite(x)).sum())} non-finite values (NaN or inf), expected finite pixels")
    steps = min(int(iterations), x[0].numel())
    shape = x.shape[1:]
    rounding = 10 * torch.finfo(x.dtype).eps
    start = _random_images(1, x, seed).flatten().double()
    basis = [start / start.norm()]
    hessenberg = torch.zeros(steps + 1, steps, dtype=torch.float64)
    for j in range(steps):
        w = jvp_batch(fn, x, basis[j].to(x.dtype).reshape(1, *shape)).flatten().double()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"the Jacobian-vector product of Arnoldi step {j + 1} is not finite: the map returns "
                             f"NaN or inf near x, expected finite derivatives")
        product_norm = float(w.norm())
        stacked = torch.stack(basis)
        # Classical Gram-Schmidt twice: H[:j+1, j] are the coefficients of J q_j on q_0..q_j.
        for _ in range(2):
            coefficients = stacked @ w
            w = w - coefficients @ stacked
            hessenberg[: j + 1, j] += coefficients.cpu()
        norm = float(w.norm())
        hessenberg[j + 1, j] = norm
        if norm <= rounding * product_norm:
            steps = j + 1  # invariant up to rounding, so further steps would find nothing new
            break
        basis.append(w / norm)
    values = torch.linalg.eigvals(hessenberg[:steps, :steps])
    return values[values.abs().argsort(descending=True)]


# --- summaries of a spectrum and of subspaces ---------------------------------------------


def participation_ratio(values: torch.Tensor) -> torch.Tensor:
    """Return ``(sum sigma)^2 / sum sigma^2`` over the last dimension: the effective dimension, at most k."""
    return values.sum(-1) ** 2 / (values**2).sum(-1)


def count_above_half(values: torch.Tensor) -> torch.Tensor:
    """Return how many singular values exceed half of the largest, over the last dimension."""
    return (values > values[..., :1] / 2).sum(-1)


def spectral_gap(values: torch.Tensor) -> torch.Tensor:
    """Return ``sigma_1 / sigma_2`` over the last dimension."""
    return values[..., 0] / values[..., 1]


def principal_angles(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Return the principal angles (radians, ascending) between the column spans of U (D, p) and V (D, q).

    Columns are orthonormalised first. Small angles come from the sines (singular values of
    the part of one basis outside the other) and large ones from the cosines, which keeps
    both accurate (Knyazev and Argentati 2002).
    """
    if U.ndim != 2 or V.ndim != 2 or U.shape[0] != V.shape[0]:
        raise ValueError(f"U has shape {tuple(U.shape)} and V {tuple(V.shape)}, expected (D, p) and (D, q)")
    dtype = torch.promote_types(U.dtype, V.dtype)
    small, large = sorted((torch.linalg.qr(U.to(dtype))[0], torch.linalg.qr(V.to(dtype))[0]),
                          key=lambda basis: basis.shape[1])
    overlap = large.T @ small
    cosines = torch.linalg.svdvals(overlap).clamp(0, 1)
    sines = torch.linalg.svdvals(small - large @ overlap).clamp(0, 1).flip(0)
    return torch.where(cosines**2 < 0.5, torch.arccos(cosines), torch.arcsin(sines))


def eigenface_alignment(vectors: torch.Tensor, prior: GaussianPrior, count: int | None = None) -> torch.Tensor:
    """Return the principal angles between the span of ``vectors`` (n, C, H, W) and the leading eigenfaces.

    ``count`` eigenfaces (default n) of the Gaussian prior span the comparison subspace.
    """
    count = len(vectors) if count is None else count
    if not 1 <= count <= prior.dim:
        raise ValueError(f"count = {count}, expected an integer in [1, {prior.dim}]")
    eigenfaces = prior.eigvecs[:, :count]
    return principal_angles(vectors.flatten(1).T.to(eigenfaces), eigenfaces)


# --- sweeps over timesteps ----------------------------------------------------------------


def noisy_image(prior: Prior, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """Return ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` for a given noise draw eps."""
    abar_t = float(prior.schedule.abar[t])
    return math.sqrt(abar_t) * x0 + math.sqrt(1 - abar_t) * noise


def _check_count(name: str, value, minimum: int) -> None:
    """Accept any integer type (int, numpy or 0-d torch integers) but bool, at least ``minimum``."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < minimum:
        raise ValueError(f"{name} = {value!r}, expected an integer >= {minimum}")


def check_sweep(prior: Prior, x0: torch.Tensor, timesteps: Sequence[int], k: int, steps: int | None,
                iterations: int = 1, method: str = "lanczos", radius_iterations: int = 1) -> list[int]:
    """Check every argument of a sweep before any network pass; return the timesteps as ints."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not valid, expected one of {', '.join(METHODS)}")
    _check_count("iterations", iterations, 1)
    _check_count("radius_iterations", radius_iterations, 1)
    prior.check_images(x0, "x0")
    check_single_image(x0)
    timesteps = [check_timestep(prior, t) for t in timesteps]
    if not timesteps:
        raise ValueError("no timesteps given, expected at least one")
    for t in timesteps:
        reverse_alpha(prior, t, steps)
    dim = x0[0].numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= dim:
        raise ValueError(f"k = {k!r}, expected an integer in [2, {dim}]: the spectral gap needs two values")
    return timesteps


def spectrum_over_time(prior: Prior, x0: torch.Tensor, timesteps: Sequence[int], k: int = 8,
                       iterations: int = 10, method: str = "lanczos", seed: int = 0,
                       steps: int | None = None, radius_iterations: int = 30,
                       return_vectors: bool = False, progress: bool = False) -> dict:
    """Return the top-k spectra of ``J_s``, ``J_D`` and ``J_f`` at each timestep, at ``x_t`` made from ``x0``.

    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with one noise draw eps (from ``seed``)
    shared by all timesteps. ``steps`` selects the reverse step of a respaced sampler (see
    :func:`reverse_alpha`). The result holds, per map name in :data:`MAPS`, tensors with one
    row per timestep: ``singular_values`` (n_t, k), ``participation_ratio`` (the effective
    dimension ``(sum sigma)^2 / sum sigma^2`` of the top k, at most k), ``count_above_half``,
    ``spectral_gap`` ``sigma_1 / sigma_2`` and pass counts (also for the spectral radius);
    for ``J_f`` also ``spectral_radius`` and ``largest_singular_value``. With
    ``return_vectors`` it adds the right singular vectors (n_t, k, C, H, W) per map.
    """
    timesteps = check_sweep(prior, x0, timesteps, k, steps, iterations, method, radius_iterations)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0)

    values = {name: [] for name in MAPS}
    vectors = {name: [] for name in MAPS}
    passes = {name: {"jvp": 0, "vjp": 0} for name in MAPS}
    passes["spectral_radius"] = {"jvp": 0, "vjp": 0}
    radii = []
    for t in tqdm(timesteps, desc="jacobian spectra", disable=not progress, leave=False):
        x_t = noisy_image(prior, x0, t, noise)
        for name in MAPS:
            triplets = top_singular(make_map(prior, name, t, steps), x_t, k, iterations, method, seed)
            values[name].append(triplets.values.detach().double().cpu())
            if return_vectors:
                vectors[name].append(triplets.right.detach().cpu())
            for kind, count in triplets.passes.items():
                passes[name][kind] += count
        radii.append(spectral_radius(reverse_step_map(prior, t, steps), x_t, radius_iterations, seed=seed))
        passes["spectral_radius"]["jvp"] += radius_iterations

    spectra = {name: torch.stack(values[name]) for name in MAPS}
    result = {
        "timesteps": timesteps,
        "singular_values": spectra,
        "participation_ratio": {name: participation_ratio(s) for name, s in spectra.items()},
        "count_above_half": {name: count_above_half(s) for name, s in spectra.items()},
        "spectral_gap": {name: spectral_gap(s) for name, s in spectra.items()},
        "spectral_radius": torch.tensor(radii, dtype=torch.float64),
        "largest_singular_value": spectra["reverse"][:, 0],
        "passes": passes,
    }
    if return_vectors:
        result["vectors"] = {name: torch.stack(vectors[name]) for name in MAPS}
    return result


# --- the `diffinv jacobian` command -------------------------------------------------------


def face_for(prior: Prior, image_index: int) -> torch.Tensor:
    """Return embedded face ``image_index`` (dataset index 0-99) at the prior's size, as (1, C, H, W)."""
    from .data import load_faces

    channels, height, width = prior.image_shape
    if height != width:
        raise ValueError(f"the prior models {height}x{width} images, expected square ones for the faces")
    faces = load_faces("all", size=height)
    return faces.images[faces.indices.index(image_index)][None].repeat(1, channels, 1, 1)


def run_jacobian(prior_name: str, image_index: int, timesteps: Sequence[int], k: int, pixels: Sequence[int],
                 out_dir, iterations: int = 10, method: str = "lanczos", seed: int = 0,
                 steps: int | None = None, radius_iterations: int = 30, device: str | None = None) -> dict:
    """Analyse the Jacobians of prior ``prior_name`` at one face and write the results to ``out_dir``.

    Writes ``jacobian.json`` (configuration, per-timestep spectra, spectral radii, pass counts,
    seconds) and, per timestep t, ``responses_tT.png`` (the columns ``J_s e_i`` and
    ``J_f e_i`` for each pixel i, the channel mean when C > 1) and ``singular_vectors_tT.png``
    (the top-k right singular vectors of each map). Every argument is checked before any
    network pass, and every file is written under a temporary name, then renamed.
    Returns the dictionary written to ``jacobian.json``.
    """
    import time
    from pathlib import Path

    from .evaluation import library_versions, pick_device, write_json
    from .models import load_prior

    _check_count("image_index", image_index, 0)
    if image_index > 99:
        raise ValueError(f"image_index = {image_index}, expected a dataset index of the embedded faces in [0, 99]")
    _check_count("iterations", iterations, 1)
    _check_count("radius_iterations", radius_iterations, 1)
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not valid, expected one of {', '.join(METHODS)}")
    _check_count("k", k, 2)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a folder")

    device = pick_device(device)
    prior = load_prior(prior_name, device=device)
    pixels = check_pixels(list(pixels), prior.image_shape)
    dtype = torch.float64 if isinstance(prior, GaussianPrior) else torch.float32
    x0 = face_for(prior, image_index).to(device, dtype)
    timesteps = check_sweep(prior, x0, timesteps, k, steps, iterations, method, radius_iterations)

    start = time.perf_counter()
    spectra = spectrum_over_time(prior, x0, timesteps, k, iterations, method, seed, steps,
                                 radius_iterations, return_vectors=True, progress=True)
    responses = _pixel_responses(prior, x0, spectra["timesteps"], pixels, seed, steps)
    seconds = time.perf_counter() - start

    report = _jacobian_report(prior_name, prior, image_index, pixels, spectra, seconds, library_versions(),
                              dict(k=k, iterations=iterations, method=method, seed=seed, steps=steps,
                                   radius_iterations=radius_iterations, device=str(device)))
    for row, t in enumerate(spectra["timesteps"]):
        _plot_responses(out_dir / f"responses_t{t}.png", responses[t], pixels, prior.image_shape, t)
        _plot_vectors(out_dir / f"singular_vectors_t{t}.png",
                      {name: spectra["vectors"][name][row] for name in MAPS},
                      {name: spectra["singular_values"][name][row] for name in MAPS}, t)
    write_json(out_dir / "jacobian.json", report)
    return report


def _pixel_responses(prior, x0, timesteps, pixels, seed, steps) -> dict[int, dict[str, torch.Tensor]]:
    """Return ``{t: {"score": J_s e_i, "reverse": J_f e_i}}`` at the x_t of :func:`spectrum_over_time`."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0)
    responses = {}
    for t in timesteps:
        x_t = noisy_image(prior, x0, t, noise)
        responses[t] = {
            "score": jacobian_columns(score_map(prior, t), x_t, pixels).detach().cpu(),
            "reverse": jacobian_columns(reverse_step_map(prior, t, steps), x_t, pixels).detach().cpu(),
        }
    return responses


def _jacobian_report(prior_name, prior, image_index, pixels, spectra, seconds, versions, options) -> dict:
    as_list = lambda tensor: [float(value) for value in tensor]
    rows = []
    for row, t in enumerate(spectra["timesteps"]):
        rows.append({
            "t": t,
            "abar_t": float(prior.schedule.abar[t]),
            "singular_values": {name: as_list(spectra["singular_values"][name][row]) for name in MAPS},
            "participation_ratio": {name: float(spectra["participation_ratio"][name][row]) for name in MAPS},
            "count_above_half": {name: int(spectra["count_above_half"][name][row]) for name in MAPS},
            "spectral_gap": {name: float(spectra["spectral_gap"][name][row]) for name in MAPS},
            "spectral_radius_reverse": float(spectra["spectral_radius"][row]),
            "largest_singular_value_reverse": float(spectra["largest_singular_value"][row]),
        })
    config = {"model": prior_name, "image_index": image_index, "image_shape": list(prior.image_shape),
              "timesteps": spectra["timesteps"], "pixels": pixels, **options, "versions": versions}
    return {"config": config, "timesteps": rows, "passes": spectra["passes"], "seconds": seconds}


def _save_figure(figure, path) -> None:
    """Save a pyplot-free Figure (so no notebook backend is switched) under a temporary name, then rename."""
    from pathlib import Path

    from .evaluation import write_atomic

    write_atomic(Path(path), lambda name: figure.savefig(name, format="png", dpi=100, bbox_inches="tight"))


def _plot_responses(path, responses: dict[str, torch.Tensor], pixels, image_shape, t: int) -> None:
    from matplotlib.figure import Figure

    from .plotting import signed_panel

    _, height, width = image_shape
    figure = Figure(figsize=(2 * len(pixels), 4.2))
    axes = figure.subplots(2, len(pixels), squeeze=False)
    for column, pixel in enumerate(pixels):
        row_index, column_index = divmod(pixel % (height * width), width)
        for row, (name, label) in enumerate((("score", "J_s e_i"), ("reverse", "J_f e_i"))):
            axis = axes[row][column]
            # The diagonal entry dwarfs the rest, so the colour scale leaves pixel i out.
            signed_panel(axis, responses[name][column], f"{label}, i = {pixel}", exclude=pixel % (height * width))
            axis.plot(column_index, row_index, marker="+", color="black", markersize=6)
    figure.suptitle(f"pixel responses at t = {t} (colour scale without pixel i, marked +)", fontsize=9)
    _save_figure(figure, path)


def _plot_vectors(path, vectors: dict[str, torch.Tensor], values: dict[str, torch.Tensor], t: int) -> None:
    from matplotlib.figure import Figure

    from .plotting import signed_panel

    count = len(next(iter(vectors.values())))
    labels = {"score": "J_s", "denoiser": "J_D", "reverse": "J_f"}
    figure = Figure(figsize=(1.6 * count, 1.8 * len(MAPS)))
    axes = figure.subplots(len(MAPS), count, squeeze=False)
    for row, name in enumerate(MAPS):
        for column in range(count):
            signed_panel(axes[row][column], vectors[name][column],
                         f"{labels[name]} v{column + 1}, {float(values[name][column]):.3g}")
    figure.suptitle(f"top right singular vectors at t = {t} (title: singular value)", fontsize=9)
    _save_figure(figure, path)
