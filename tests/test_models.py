import math

import pytest
import torch
import torch.nn.functional as F

from diffinv.data import load_faces
from diffinv.models import EmpiricalPrior, GaussianPrior, load_prior
from diffinv.operators import make_operator, measure
from diffinv.solvers import sample


@pytest.fixture(scope="module")
def small_faces():
    """The training faces at 8x8 in float64: a 64-dimensional problem with closed-form results."""
    faces = load_faces("train").images.double()
    return F.interpolate(faces, size=(8, 8), mode="area")


@pytest.fixture(scope="module")
def small_gaussian(small_faces):
    return GaussianPrior.fit(small_faces)


def exact_marginal(prior: GaussianPrior, t: int) -> torch.distributions.MultivariateNormal:
    abar_t = prior.abar_table[t]
    cov = prior.eigvecs @ torch.diag(abar_t * prior.eigvals + 1 - abar_t) @ prior.eigvecs.T
    return torch.distributions.MultivariateNormal(abar_t.sqrt() * prior.mean, covariance_matrix=cov)


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_gaussian_eps_is_marginal_score(small_gaussian, t):
    x_t = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(t)).requires_grad_()
    log_density = exact_marginal(small_gaussian, t).log_prob(x_t.flatten(1)).sum()
    autograd_score = torch.autograd.grad(log_density, x_t)[0]
    torch.testing.assert_close(small_gaussian.score(x_t.detach(), t), autograd_score, rtol=1e-8, atol=1e-8)


def test_gaussian_fit_is_full_rank(small_faces):
    prior = GaussianPrior.fit(small_faces)
    assert 0 < prior.shrinkage < 1
    assert float(prior.eigvals.min()) > 0
    assert bool((prior.eigvals[:-1] >= prior.eigvals[1:]).all())


def test_gaussian_shrinkage_formula(small_faces):
    prior = GaussianPrior.fit(small_faces, shrinkage=0.2)
    flat = small_faces.flatten(1)
    sample_cov = torch.cov(flat.T)
    expected = 0.8 * sample_cov + 0.2 * sample_cov.trace() / 64 * torch.eye(64, dtype=torch.float64)
    rebuilt = prior.eigvecs @ torch.diag(prior.eigvals) @ prior.eigvecs.T
    torch.testing.assert_close(rebuilt, expected, rtol=1e-9, atol=1e-10)


def test_gaussian_rejects_bad_shrinkage(small_faces):
    with pytest.raises(ValueError, match="shrinkage = 1.5"):
        GaussianPrior.fit(small_faces, shrinkage=1.5)


@pytest.mark.parametrize("t", [10, 400])
def test_gaussian_score_jacobian_is_autograd(small_gaussian, t):
    x_t = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda x: small_gaussian.score(x, t).flatten(), x_t).reshape(64, 64)
    torch.testing.assert_close(small_gaussian.score_jacobian(t), jacobian, rtol=1e-9, atol=1e-9)


def test_gaussian_posterior_mean_closed_form(small_faces, small_gaussian):
    truth = small_faces[:3]
    operator = make_operator("inpaint-random", (1, 8, 8), 3, seed=1).double()
    y = measure(operator, truth, 0.05, seed=2)
    mean = small_gaussian.posterior_mean(operator, y, 0.05).double()
    sigma = small_gaussian.eigvecs @ torch.diag(small_gaussian.eigvals) @ small_gaussian.eigvecs.T
    for i in range(3):
        A = torch.diag(operator.mask[i].flatten().double().repeat(1))
        gain = sigma @ A.T @ torch.linalg.inv(A @ sigma @ A.T + 0.05**2 * torch.eye(64, dtype=torch.float64))
        expected = small_gaussian.mean + gain @ (y[i].flatten() - A @ small_gaussian.mean)
        torch.testing.assert_close(mean[i].flatten(), expected, rtol=0, atol=1e-5)


def test_gaussian_samples_match_moments(small_gaussian):
    # 4000 samples of a 64-dimensional Gaussian with 200 DDPM steps. Sampling error of the
    # mean is about sqrt(lambda_max / 4000) = 0.02 per direction; the discretisation adds less.
    samples = sample(small_gaussian, 4000, steps=200, seed=0).x0.double().flatten(1)
    mean_error = (samples.mean(0) - small_gaussian.mean).norm() / small_gaussian.mean.norm()
    covariance = small_gaussian.eigvecs @ torch.diag(small_gaussian.eigvals) @ small_gaussian.eigvecs.T
    covariance_error = (torch.cov(samples.T) - covariance).norm() / covariance.norm()
    assert float(mean_error) < 0.03
    assert float(covariance_error) < 0.08


def log_mixture_density(train: torch.Tensor, x_t: torch.Tensor, abar_t: float) -> torch.Tensor:
    squared = ((x_t.flatten(1)[:, None, :] - math.sqrt(abar_t) * train.flatten(1)[None]) ** 2).sum(-1)
    return torch.logsumexp(-squared / (2 * (1 - abar_t)), dim=1)


@pytest.mark.parametrize("t", [20, 300, 900])
def test_empirical_eps_is_mixture_score(small_faces, t):
    prior = EmpiricalPrior(small_faces)
    abar_t = float(prior.abar_table[t])
    x_t = torch.randn(4, 1, 8, 8, dtype=torch.float64).requires_grad_()
    autograd_score = torch.autograd.grad(log_mixture_density(small_faces, x_t, abar_t).sum(), x_t)[0]
    torch.testing.assert_close(prior.score(x_t.detach(), t), autograd_score, rtol=1e-7, atol=1e-7)


def test_empirical_denoiser_recalls_training_face(small_faces):
    prior = EmpiricalPrior(small_faces)
    abar_t = float(prior.abar_table[50])
    x_t = math.sqrt(abar_t) * small_faces[7:8] + math.sqrt(1 - abar_t) * 0.5 * torch.randn(1, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(prior.x0_hat(x_t, 50), small_faces[7:8], rtol=0, atol=1e-6)


def test_prior_rejects_outside_timestep(small_gaussian):
    x = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="timestep"):
        small_gaussian.eps(x, 1000)


def test_prior_rejects_wrong_image_shape(small_gaussian):
    with pytest.raises(ValueError, match=r"expected \(B, 1, 8, 8\)"):
        small_gaussian.eps(torch.zeros(2, 1, 9, 8, dtype=torch.float64), 10)


def test_load_prior_rejects_unknown_name():
    with pytest.raises(ValueError, match="gaussian, empirical, embedded"):
        load_prior("not-a-model")


def test_gaussian_posterior_covariance_information_form(small_faces, small_gaussian):
    operator = make_operator("deblur", (1, 8, 8), 1, seed=0, std=1.0)
    y = measure(operator, small_faces[:1], 0.05, seed=0)
    _, covariances = small_gaussian.posterior(operator, y, 0.05)
    A = operator.matrix()
    information = torch.linalg.inv(small_gaussian.covariance()) + A.T @ A / 0.05**2
    torch.testing.assert_close(covariances[0], torch.linalg.inv(information), rtol=1e-6, atol=1e-9)


def test_gaussian_posterior_samples_match_moments(small_faces, small_gaussian):
    operator = make_operator("inpaint-box", (1, 8, 8), 1, seed=0)
    y = measure(operator, small_faces[:1], 0.05, seed=0)
    mean, covariances = small_gaussian.posterior(operator, y, 0.05)
    samples = small_gaussian.posterior_sample(operator, y, 0.05, count=20000, seed=1)[0].double().flatten(1)
    # Monte Carlo error of the mean is about sqrt(max variance / 20000) = 0.02 per direction.
    assert float((samples.mean(0) - mean[0].double().flatten()).abs().max()) < 0.02
    assert float((torch.cov(samples.T) - covariances[0]).norm() / covariances[0].norm()) < 0.05
