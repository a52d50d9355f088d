"""Jacobian analysis checked against the closed forms of the Gaussian prior on the 80 training faces.

With ``Sigma = U diag(lambda) U^T`` and ``C_t = abar_t Sigma + (1 - abar_t) I``, every Jacobian
is symmetric with the eigenfaces U as eigenvectors: ``J_s = -C_t^{-1}``,
``J_D = sqrt(abar_t) Sigma C_t^{-1}`` and ``J_f = (I - (1 - alpha_t) C_t^{-1}) / sqrt(alpha_t)``.
All inputs are float64 32x32 images (D = 1024).
"""

import json
import math

import pytest
import torch

from diffinv import analysis
from diffinv.data import load_faces
from diffinv.models import DiffusersPrior, EmpiricalPrior, GaussianPrior, default_schedule

TIMESTEPS = (50, 300, 700)
K = 8


@pytest.fixture(scope="module")
def faces():
    return load_faces("train").images.double()


@pytest.fixture(scope="module")
def gaussian(faces):
    return GaussianPrior.fit(faces)


@pytest.fixture(scope="module")
def noisy(gaussian, faces):
    """``x_t`` of the first training face at each timestep, one seeded noise draw."""
    noise = torch.randn(faces[:1].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {t: analysis.noisy_image(gaussian, faces[:1], t, noise) for t in TIMESTEPS}


def closed_form_singular_values(prior: GaussianPrior, name: str, t: int) -> torch.Tensor:
    """Return the singular values of J_s, J_D or J_f from the eigenvalues lambda, descending."""
    abar_t = float(prior.schedule.abar[t])
    alpha_t = float(prior.schedule.alphas[t])
    variances = abar_t * prior.eigvals + 1 - abar_t
    values = {
        "score": 1 / variances,
        "denoiser": math.sqrt(abar_t) * prior.eigvals / variances,
        "reverse": (1 - (1 - alpha_t) / variances) / math.sqrt(alpha_t),
    }[name]
    return values.abs().sort(descending=True).values


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((estimate - reference).abs() / reference.abs()).max())


# --- exact Jacobians -----------------------------------------------------------------------


def test_full_jacobian_gaussian_score(gaussian, noisy):
    jacobian = analysis.full_jacobian(analysis.score_map(gaussian, 300), noisy[300], chunk_size=1024)
    assert float((jacobian - gaussian.score_jacobian(300)).abs().max()) < 1e-8


@pytest.fixture(scope="module")
def empirical_case(faces):
    # At t = 400 the mixture weights of a noisy training face are spread over several faces.
    prior = EmpiricalPrior(faces)
    noise = torch.randn(1, 1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_t = analysis.noisy_image(prior, faces[1:2], 400, noise)
    fn = analysis.score_map(prior, 400)
    return fn, x_t, analysis.full_jacobian(fn, x_t, chunk_size=1024)


def test_empirical_score_jacobian_symmetric(empirical_case):
    _, _, jacobian = empirical_case
    assert float((jacobian - jacobian.T).abs().max()) < 1e-8


def test_empirical_score_jacobian_not_trivial(empirical_case):
    # The mixture's Hessian differs from the pure-noise -I / (1 - abar_t) by the posterior covariance.
    _, x_t, jacobian = empirical_case
    noise_only = -torch.eye(1024, dtype=torch.float64) / (1 - float(default_schedule().abar[400]))
    assert float((jacobian - noise_only).abs().max()) > 1e-2


def test_jacobian_columns_match_full(empirical_case):
    fn, x_t, jacobian = empirical_case
    pixels = [0, 37, 500, 1023]
    columns = analysis.jacobian_columns(fn, x_t, pixels)
    assert float((columns.flatten(1) - jacobian[:, pixels].T).abs().max()) < 1e-12


# --- matrix-free singular values against closed forms --------------------------------------


@pytest.mark.parametrize("name", analysis.MAPS)
@pytest.mark.parametrize("t", TIMESTEPS)
def test_lanczos_singular_values(gaussian, noisy, name, t):
    triplets = analysis.top_singular(analysis.make_map(gaussian, name, t), noisy[t], K, iterations=12,
                                     method="lanczos")
    assert relative_error(triplets.values, closed_form_singular_values(gaussian, name, t)[:K]) < 1e-4


@pytest.mark.parametrize(("name", "t", "iterations"), [("score", 50, 6), ("denoiser", 700, 6)])
def test_subspace_singular_values(gaussian, noisy, name, t, iterations):
    # Subspace iteration converges where sigma_{k+oversample+1} / sigma_k is well below 1.
    triplets = analysis.top_singular(analysis.make_map(gaussian, name, t), noisy[t], K, iterations,
                                     method="subspace")
    assert relative_error(triplets.values, closed_form_singular_values(gaussian, name, t)[:K]) < 1e-4


def test_pass_counts(gaussian, noisy):
    fn = analysis.denoiser_map(gaussian, 300)
    subspace = analysis.top_singular(fn, noisy[300], 4, iterations=3, method="subspace", oversample=4)
    lanczos = analysis.top_singular(fn, noisy[300], 4, iterations=5, method="lanczos", block_size=2)
    assert subspace.passes == {"jvp": 4 * 8, "vjp": 4 * 8}
    assert lanczos.passes == {"jvp": 5 * 2, "vjp": 4 * 2}


def test_lanczos_exact_at_full_dimension():
    # 6 blocks of 3 exceed D = 16, so the last block is cut to 1 and the Krylov space is all of R^16.
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = (2 / torch.cosh(x) ** 2).flatten().sort(descending=True).values
    triplets = analysis.top_singular(lambda z: 2 * torch.tanh(z), x, 3, iterations=6, block_size=3)
    assert relative_error(triplets.values, exact[:3]) < 1e-12
    assert triplets.passes == {"jvp": 16, "vjp": 15}


def test_singular_triplets_consistent(gaussian, noisy):
    # J v_i = sigma_i u_i for every returned triplet.
    fn = analysis.reverse_step_map(gaussian, 300)
    triplets = analysis.top_singular(fn, noisy[300], 4, iterations=12, method="lanczos")
    applied = analysis.jvp_batch(fn, noisy[300], triplets.right)
    expected = triplets.values.view(-1, 1, 1, 1) * triplets.left
    assert float((applied - expected).abs().max()) < 1e-8


# --- singular vectors and eigenfaces --------------------------------------------------------


@pytest.mark.parametrize("name", ["denoiser", "reverse"])
@pytest.mark.parametrize("t", TIMESTEPS)
def test_top_vectors_span_eigenfaces(gaussian, noisy, name, t):
    # The top-8 subspace is well defined because lambda_8 / lambda_9 = 1.35 > 1.1.
    assert float(gaussian.eigvals[K - 1] / gaussian.eigvals[K]) > 1.1
    triplets = analysis.top_singular(analysis.make_map(gaussian, name, t), noisy[t], K, iterations=12,
                                     method="lanczos")
    angles = analysis.eigenface_alignment(triplets.right, gaussian)
    assert float(angles.max()) < 1e-3


def test_score_vectors_least_variance(gaussian, noisy):
    # |J_s| is largest where abar_t lambda + 1 - abar_t is smallest: the shrinkage floor of Sigma.
    floor = gaussian.eigvals < gaussian.eigvals[-1] * (1 + 1e-9)
    triplets = analysis.top_singular(analysis.score_map(gaussian, 50), noisy[50], K, iterations=6,
                                     method="subspace")
    vectors = triplets.right.flatten(1).T
    to_floor = analysis.principal_angles(vectors, gaussian.eigvecs[:, floor])
    to_eigenfaces = analysis.eigenface_alignment(triplets.right, gaussian)
    assert float(to_floor.max()) < 1e-3
    assert float(to_eigenfaces.min()) > 1.5


# --- spectral radius ------------------------------------------------------------------------


@pytest.mark.parametrize("t", TIMESTEPS)
def test_spectral_radius_reverse(gaussian, noisy, t):
    abar_t, alpha_t = float(gaussian.schedule.abar[t]), float(gaussian.schedule.alphas[t])
    expected = float(((1 - (1 - alpha_t) / (abar_t * gaussian.eigvals + 1 - abar_t)).abs().max())
                     / math.sqrt(alpha_t))
    radius = analysis.spectral_radius(analysis.reverse_step_map(gaussian, t), noisy[t], iterations=30)
    assert abs(radius - expected) / expected < 1e-4


@pytest.mark.parametrize("t", (50, 300))
def test_ritz_values_score_extremes(gaussian, noisy, t):
    # J_s = -C_t^{-1} has real eigenvalues in [-1 / min variance, -1 / max variance].
    # At t = 50 the right end is a small gap at the edge of a wide spectrum, so it needs about 60 steps.
    variances = gaussian.schedule.abar[t] * gaussian.eigvals + 1 - gaussian.schedule.abar[t]
    values = analysis.ritz_values(analysis.score_map(gaussian, t), noisy[t], iterations=60)
    assert values.shape == (60,)
    assert float(values.imag.abs().max()) < 1e-8
    assert abs(float(values.real.min()) + float(1 / variances.min())) * float(variances.min()) < 1e-6
    assert abs(float(values.real.max()) + float(1 / variances.max())) * float(variances.max()) < 1e-6
    assert torch.equal(values.abs(), values.abs().sort(descending=True).values)


def test_ritz_values_shift_and_scale(gaussian, noisy):
    # The Krylov space of a I + b J is that of J, so each Ritz value theta of J becomes a + b * theta.
    t = 300
    score = analysis.score_map(gaussian, t)
    alpha_t = float(gaussian.schedule.alphas[t])
    of_score = analysis.ritz_values(score, noisy[t], iterations=12)
    of_step = analysis.ritz_values(analysis.reverse_step_map(gaussian, t), noisy[t], iterations=12)
    mapped = (1 + (1 - alpha_t) * of_score) / math.sqrt(alpha_t)
    assert torch.allclose(of_step.real.sort().values, mapped.real.sort().values, rtol=0, atol=1e-10)


def test_ritz_values_stop_at_invariant_subspace():
    # A diagonal map on 4 pixels: 4 Arnoldi steps span everything, so the values are exact.
    scale = torch.tensor([3.0, -2.0, 0.5, 1.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    values = analysis.ritz_values(lambda x: scale * x, torch.zeros(1, 1, 2, 2, dtype=torch.float64), 10)
    assert torch.allclose(values.real, torch.tensor([3.0, -2.0, 1.0, 0.5], dtype=torch.float64), atol=1e-12)


def test_ritz_values_float32_wide_spectrum():
    # In float32 a spread of 1e4 must not pass for an invariant subspace after the first step.
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    eigvals = torch.tensor([-1e4, *torch.linspace(-3, -1, 15).tolist()], dtype=torch.float64)
    matrix = (rotation * eigvals) @ rotation.T
    fn = lambda x: (x.flatten(1).double() @ matrix.T).to(x.dtype).reshape(x.shape)
    values = analysis.ritz_values(fn, torch.zeros(1, 1, 4, 4), iterations=16)
    assert len(values) == 16
    assert abs(float(values.real.min()) + 1e4) < 1e4 * 1e-5
    assert abs(float(values.real.max()) + 1.0) < 1e-2


def test_ritz_values_integer_types(gaussian, noisy):
    import numpy as np

    values = analysis.ritz_values(analysis.score_map(gaussian, 300), noisy[300], np.int64(5))
    assert values.shape == (5,)


def test_ritz_values_rejects_non_finite(gaussian, noisy):
    x = noisy[300].clone()
    x[0, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite values"):
        analysis.ritz_values(analysis.score_map(gaussian, 300), x, 5)
    with pytest.raises(ValueError, match="not finite"):
        analysis.ritz_values(lambda x: x / 0.0, noisy[300], 5)


@pytest.mark.parametrize("iterations", [0, -1, 2.5, True])
def test_ritz_values_rejects_iterations(gaussian, noisy, iterations):
    with pytest.raises(ValueError, match="iterations"):
        analysis.ritz_values(analysis.score_map(gaussian, 50), noisy[50], iterations)


def test_power_iteration_denoiser(gaussian, noisy):
    # At t = 700, sigma_1 / sigma_2 of J_D is about 1.44, so 60 power steps converge.
    expected = float(closed_form_singular_values(gaussian, "denoiser", 700)[0])
    radius = analysis.spectral_radius(analysis.denoiser_map(gaussian, 700), noisy[700], 60, method="power")
    assert abs(radius - expected) / expected < 1e-6


def test_largest_singular_value_reverse(gaussian, noisy):
    expected = float(closed_form_singular_values(gaussian, "reverse", 300)[0])
    value = analysis.largest_singular_value(analysis.reverse_step_map(gaussian, 300), noisy[300], 30)
    assert abs(value - expected) / expected < 1e-4


# --- principal angles -------------------------------------------------------------------------


@pytest.mark.parametrize("angle", [1e-9, 1e-4, 0.3, 1.2, math.pi / 2])
def test_principal_angles_plane(angle):
    basis = torch.eye(6, dtype=torch.float64)
    U = basis[:, :2]
    V = torch.stack([basis[:, 0], math.cos(angle) * basis[:, 1] + math.sin(angle) * basis[:, 4]], 1)
    angles = analysis.principal_angles(U, 3 * V)
    assert float(angles[0]) < 1e-12
    assert abs(float(angles[1]) - angle) < 1e-12 * max(1, angle)


def test_principal_angles_unequal_dimensions():
    basis = torch.eye(5, dtype=torch.float64)
    angles = analysis.principal_angles(basis[:, :3], basis[:, [0, 3]])
    assert angles.tolist() == pytest.approx([0.0, math.pi / 2], abs=1e-12)


# --- sweeps, respacing and the command --------------------------------------------------------


def test_spectrum_over_time_closed_forms(gaussian, faces):
    result = analysis.spectrum_over_time(gaussian, faces[:1], [300, 700], k=4, iterations=12)
    for row, t in enumerate([300, 700]):
        expected = closed_form_singular_values(gaussian, "denoiser", t)[:4]
        assert relative_error(result["singular_values"]["denoiser"][row], expected) < 1e-4
    ratio = result["participation_ratio"]["denoiser"]
    values = result["singular_values"]["denoiser"]
    assert torch.allclose(ratio, values.sum(1) ** 2 / (values**2).sum(1))
    assert torch.allclose(result["spectral_radius"], result["largest_singular_value"], rtol=1e-4)
    assert result["passes"]["spectral_radius"] == {"jvp": 2 * 30, "vjp": 0}


def test_reverse_alpha_respaced(gaussian):
    schedule = gaussian.schedule.respace(100)
    t, previous = int(schedule.timesteps[50]), int(schedule.timesteps[49])
    expected = float(gaussian.schedule.abar[t] / gaussian.schedule.abar[previous])
    assert analysis.reverse_alpha(gaussian, t, steps=100) == pytest.approx(expected, rel=1e-12)
    assert analysis.reverse_alpha(gaussian, t) == pytest.approx(float(gaussian.schedule.alphas[t]), rel=1e-12)


def test_reverse_alpha_off_grid(gaussian):
    schedule = gaussian.schedule.respace(100)
    with pytest.raises(ValueError, match="not a step of the 100-step sampler"):
        analysis.reverse_alpha(gaussian, int(schedule.timesteps[50]) + 1, steps=100)


def test_run_jacobian_writes_outputs(tmp_path):
    report = analysis.run_jacobian("gaussian", 3, [300], k=2, pixels=[0, 528], out_dir=tmp_path,
                                   iterations=4, radius_iterations=10)
    written = json.loads((tmp_path / "jacobian.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert len(written["timesteps"][0]["singular_values"]["reverse"]) == 2
    assert (tmp_path / "responses_t300.png").stat().st_size > 0
    assert (tmp_path / "singular_vectors_t300.png").stat().st_size > 0
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


# --- a learned model with attention -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet_prior():
    """A random 8x8 diffusers UNet with attention, in float64: D = 64, so its full Jacobian is cheap."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)
    return DiffusersPrior(unet.double(), default_schedule())


def test_unet_lanczos_matches_full_svd(tiny_unet_prior):
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fn = analysis.reverse_step_map(tiny_unet_prior, 400)
    exact = torch.linalg.svdvals(analysis.full_jacobian(fn, x))
    triplets = analysis.top_singular(fn, x, 4, iterations=16, method="lanczos")
    assert relative_error(triplets.values, exact[:4]) < 1e-8


def test_unet_jvp_vjp_adjoint(tiny_unet_prior):
    # u . (J v) = (J^T u) . v checks forward-mode AD through attention against reverse mode.
    generator = torch.Generator().manual_seed(3)
    x, u, v = (torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=generator) for _ in range(3))
    fn = analysis.score_map(tiny_unet_prior, 200)
    forward = float((u * analysis.jvp_batch(fn, x, v)).sum())
    backward = float((analysis.vjp_batch(fn, x, u) * v).sum())
    assert forward == pytest.approx(backward, rel=1e-10)


# --- invalid input -------------------------------------------------------------------------------


@pytest.mark.parametrize("pixel", [1024, -1])
def test_pixel_out_of_range(gaussian, noisy, pixel):
    with pytest.raises(ValueError, match=rf"pixel {pixel} is outside .* expected a flat index in \[0, 1023\]"):
        analysis.jacobian_columns(analysis.score_map(gaussian, 300), noisy[300], [0, pixel])


def test_pixel_index_row_major():
    assert analysis.pixel_index((3, 32, 32), row=16, column=5, channel=2) == 2 * 1024 + 16 * 32 + 5


def test_pixel_index_out_of_range():
    with pytest.raises(ValueError, match=r"pixel \(channel 0, row 32, column 0\) is outside the image"):
        analysis.pixel_index((1, 32, 32), row=32, column=0)


@pytest.mark.parametrize("method", analysis.METHODS)
def test_k_larger_than_dimension(gaussian, noisy, method):
    with pytest.raises(ValueError, match=r"k = 1025, expected an integer in \[1, 1024\]"):
        analysis.top_singular(analysis.score_map(gaussian, 300), noisy[300], 1025, method=method)


@pytest.mark.parametrize("t", [1000, -1])
def test_timestep_outside_schedule(gaussian, t):
    with pytest.raises(ValueError, match=rf"timestep {t} is outside the schedule, expected 0 <= t <= 999"):
        analysis.score_map(gaussian, t)


@pytest.mark.parametrize("t", [1000, -1])
def test_sweep_timestep_outside_schedule(gaussian, faces, t):
    with pytest.raises(ValueError, match="outside the schedule"):
        analysis.spectrum_over_time(gaussian, faces[:1], [300, t], k=4)


def test_run_jacobian_rejects_timestep_first(tmp_path):
    with pytest.raises(ValueError, match="outside the schedule"):
        analysis.run_jacobian("gaussian", 3, [300, 1000], k=2, pixels=[0], out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_full_jacobian_too_large():
    image = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match="D = 12288 pixels"):
        analysis.full_jacobian(lambda x: x, image)


def test_unknown_method(gaussian, noisy):
    with pytest.raises(ValueError, match="method 'power' is not valid"):
        analysis.top_singular(analysis.score_map(gaussian, 300), noisy[300], 2, method="power")
