"""Priors: anything that predicts the noise ``eps(x_t, t)`` of a noisy image.

Three priors share one interface:

- :class:`GaussianPrior`, the mean and covariance of the training faces. Every quantity
  (eps, the score Jacobian, the posterior of a linear inverse problem) has a closed form,
  which makes it the ground truth for tests and for the analysis chapters.
- :class:`EmpiricalPrior`, the exact optimal denoiser of the training set: the fully
  memorising limit of a diffusion model.
- :class:`DiffusersPrior`, a diffusers ``UNet2DModel`` with its scheduler: the embedded
  model shipped in this package, a local folder or a Hugging Face Hub id.

From ``eps`` the base class derives the score ``s = -eps / sqrt(1 - abar_t)`` and the
Tweedie estimate ``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``.
"""

from __future__ import annotations

import copy
import json
import logging
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .schedule import Schedule

logger = logging.getLogger("diffinv")

EMBEDDED_MODEL = "embedded"
ANALYTIC_PRIORS = ("gaussian", "empirical")


class Prior(nn.Module):
    """A noise predictor on images of shape ``image_shape`` = (C, H, W), with its schedule."""

    def __init__(self, schedule: Schedule, image_shape: tuple[int, int, int]):
        super().__init__()
        self.schedule = schedule
        self.image_shape = tuple(image_shape)
        self.register_buffer("abar_table", schedule.abar.clone(), persistent=False)

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        return self.eps(x_t, t)

    def timesteps(self, t, batch: int) -> torch.Tensor:
        """Return ``t`` (an int or a tensor) as a LongTensor of shape (batch,), checked against the schedule."""
        t = torch.as_tensor(t, device=self.abar_table.device).long()
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t has shape {tuple(t.shape)}, expected () or ({batch},)")
        if bool((t < 0).any() or (t >= self.schedule.T).any()):
            raise ValueError(f"timestep {t.tolist()} is outside the schedule, expected 0 <= t <= {self.schedule.T - 1}")
        return t

    def abar(self, t, x_t: torch.Tensor) -> torch.Tensor:
        """Return ``abar_t`` shaped (B, 1, 1, 1) in the dtype of ``x_t``, to broadcast over images."""
        return self.abar_table[self.timesteps(t, len(x_t))].to(x_t.dtype).view(-1, 1, 1, 1)

    def score(self, x_t: torch.Tensor, t) -> torch.Tensor:
        return -self.eps(x_t, t) / (1 - self.abar(t, x_t)).sqrt()

    def x0_hat(self, x_t: torch.Tensor, t) -> torch.Tensor:
        abar_t = self.abar(t, x_t)
        return (x_t - (1 - abar_t).sqrt() * self.eps(x_t, t)) / abar_t.sqrt()

    def check_images(self, x: torch.Tensor, name: str = "x_t") -> None:
        """Raise ValueError unless ``x`` is a batch of this prior's image shape."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}, expected (B, {', '.join(map(str, self.image_shape))})"
            )


def default_schedule() -> Schedule:
    return Schedule.linear(1000, 1e-4, 0.02)


def ledoit_wolf_shrinkage(centered: torch.Tensor) -> float:
    """Return the Ledoit-Wolf (2004) shrinkage weight for the sample covariance of ``centered`` rows."""
    from sklearn.covariance import ledoit_wolf_shrinkage as shrinkage

    return float(shrinkage(centered.double().cpu().numpy(), assume_centered=True))


class GaussianPrior(Prior):
    """The Gaussian N(mu, Sigma) fitted to training images; its eigenvectors are the eigenfaces.

    With ``Sigma = U diag(lambda) U^T`` the noisy marginal at t is
    ``N(sqrt(abar_t) mu, C_t)`` with ``C_t = abar_t Sigma + (1 - abar_t) I``, so
    ``s = -C_t^{-1} (x_t - sqrt(abar_t) mu)`` and ``eps = -sqrt(1 - abar_t) s`` exactly.
    Computation runs in float64 and returns the dtype of the input.
    """

    def __init__(self, mean: torch.Tensor, eigvals: torch.Tensor, eigvecs: torch.Tensor,
                 image_shape, schedule: Schedule | None = None, shrinkage: float = 0.0):
        super().__init__(schedule or default_schedule(), image_shape)
        dim = mean.numel()
        if eigvals.shape != (dim,) or eigvecs.shape != (dim, dim):
            raise ValueError(f"eigvals {tuple(eigvals.shape)} and eigvecs {tuple(eigvecs.shape)} do not match dimension {dim}")
        if bool((eigvals <= 0).any()):
            raise ValueError("the covariance must be positive definite; fit it with shrinkage > 0")
        self.register_buffer("mean", mean.double().flatten())
        self.register_buffer("eigvals", eigvals.double())
        self.register_buffer("eigvecs", eigvecs.double())
        self.shrinkage = shrinkage

    @classmethod
    def fit(cls, images: torch.Tensor, shrinkage: float | str = "ledoit-wolf",
            schedule: Schedule | None = None) -> GaussianPrior:
        """Fit mean and covariance to ``images`` (N, C, H, W), shrunk towards a multiple of I.

        ``Sigma = (1 - rho) S + rho (tr(S) / D) I`` with S the sample covariance. N images
        span at most N - 1 of D directions, so S alone is singular; any rho > 0 makes
        Sigma full rank without changing its eigenvectors. ``"ledoit-wolf"`` picks rho by
        the Ledoit-Wolf formula.
        """
        flat = images.double().flatten(1)
        count, dim = flat.shape
        if count < 2:
            raise ValueError(f"{count} images given, expected at least 2 to fit a covariance")
        mean = flat.mean(0)
        centered = flat - mean
        rho = ledoit_wolf_shrinkage(centered) if shrinkage == "ledoit-wolf" else float(shrinkage)
        if not 0 < rho < 1:
            raise ValueError(f"shrinkage = {rho}, expected a weight in (0, 1) or 'ledoit-wolf'")
        sample_cov = centered.T @ centered / (count - 1)
        cov = (1 - rho) * sample_cov + rho * sample_cov.trace() / dim * torch.eye(dim, dtype=torch.float64)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        order = eigvals.argsort(descending=True)
        return cls(mean, eigvals[order], eigvecs[:, order], images.shape[1:], schedule, rho)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def eigenfaces(self, count: int) -> torch.Tensor:
        """Return the leading ``count`` eigenvectors as images (count, C, H, W)."""
        return self.eigvecs[:, :count].T.reshape(count, *self.image_shape)

    def marginal_variances(self, t: int) -> torch.Tensor:
        """Return the eigenvalues ``abar_t lambda_i + 1 - abar_t`` of C_t, in eigenface order."""
        abar_t = self.abar_table[self.timesteps(t, 1)[0]]
        return abar_t * self.eigvals + (1 - abar_t)

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        self.check_images(x_t)
        abar_t = self.abar_table[self.timesteps(t, len(x_t))].view(-1, 1)
        centered = x_t.double().flatten(1) - abar_t.sqrt() * self.mean
        coefficients = (centered @ self.eigvecs) / (abar_t * self.eigvals + 1 - abar_t)
        score = -(coefficients @ self.eigvecs.T)
        return (-(1 - abar_t).sqrt() * score).to(x_t.dtype).view_as(x_t)

    def score_jacobian(self, t: int) -> torch.Tensor:
        """Return ``J_s = -C_t^{-1}`` as a (D, D) float64 matrix; it does not depend on x_t."""
        return -(self.eigvecs / self.marginal_variances(t)) @ self.eigvecs.T

    def score_jacobian_eigvals(self, t: int) -> torch.Tensor:
        """Return the eigenvalues ``-1 / (abar_t lambda_i + 1 - abar_t)`` of J_s, in eigenface order."""
        return -1 / self.marginal_variances(t)

    def denoiser_jacobian_eigvals(self, t: int) -> torch.Tensor:
        """Return the eigenvalues ``sqrt(abar_t) lambda_i / (abar_t lambda_i + 1 - abar_t)`` of d x0_hat / d x_t."""
        abar_t = self.abar_table[self.timesteps(t, 1)[0]]
        return abar_t.sqrt() * self.eigvals / self.marginal_variances(t)

    def covariance(self) -> torch.Tensor:
        """Return Sigma as a dense (D, D) float64 matrix."""
        return (self.eigvecs * self.eigvals) @ self.eigvecs.T

    def posterior(self, operator, y: torch.Tensor, sigma_y: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the exact posterior mean (B, C, H, W) and covariances (B, D, D) of x_0 given y, densely.

        For ``y = A x_0 + sigma_y n``: ``K = Sigma A^T (A Sigma A^T + sigma_y^2 I)^{-1}``, mean
        ``mu + K (y - A mu)`` and covariance ``Sigma - K A Sigma``, one image at a time with the
        matrix of that image's operator (``operator.single(i).matrix()``). Images of at
        most 4096 pixels only; :meth:`posterior_mean` works at any size.
        """
        check_noise_level(sigma_y)
        sigma = self.covariance()
        means, covariances = [], []
        for i in range(len(y)):
            A = operator.single(i).matrix().to(sigma)
            gram = A @ sigma @ A.T + sigma_y**2 * torch.eye(len(A), dtype=sigma.dtype, device=sigma.device)
            gain = torch.linalg.solve(gram, A @ sigma).T
            means.append(self.mean + gain @ (y[i].double().flatten() - A @ self.mean))
            covariances.append(sigma - gain @ A @ sigma)
        return torch.stack(means).view(len(y), *self.image_shape).float(), torch.stack(covariances)

    def posterior_sample(self, operator, y: torch.Tensor, sigma_y: float, count: int, seed: int = 0) -> torch.Tensor:
        """Draw ``count`` exact posterior samples per measurement, shaped (B, count, C, H, W)."""
        means, covariances = self.posterior(operator, y, sigma_y)
        generator = torch.Generator(device=covariances.device).manual_seed(seed)
        samples = []
        for mean, covariance in zip(means, covariances):
            # The posterior covariance is positive definite; the tiny jitter absorbs rounding.
            jitter = 1e-10 * covariance.diagonal().mean() * torch.eye(len(covariance), dtype=covariance.dtype,
                                                                        device=covariance.device)
            factor = torch.linalg.cholesky(covariance + jitter)
            noise = torch.randn(len(covariance), count, generator=generator, dtype=covariance.dtype,
                                device=covariance.device)
            samples.append(mean.double().flatten()[None] + (factor @ noise).T)
        return torch.stack(samples).view(len(y), count, *self.image_shape).float()

    def posterior_mean(self, operator, y: torch.Tensor, sigma_y: float,
                       tol: float = 1e-10, max_iterations: int = 2000) -> torch.Tensor:
        """Return E[x_0 | y] for ``y = A x_0 + sigma_y n`` with n standard normal, exactly.

        Images of at most 4096 pixels use the dense solve of :meth:`posterior`. Larger ones use
        ``E[x_0 | y] = mu + Sigma A^T w`` with ``(A Sigma A^T + sigma_y^2 I) w = y - A mu``,
        solved by conjugate gradients in float64 (the system is symmetric positive definite
        for sigma_y > 0) to a relative residual of ``tol``, with only ``operator.forward`` and
        ``operator.adjoint``.
        """
        check_noise_level(sigma_y)
        if self.dim <= DENSE_POSTERIOR_LIMIT:
            return self.posterior(operator, y, sigma_y)[0]
        operator = copy.deepcopy(operator).double()
        y = y.double()
        batch = len(y)
        mean = self.mean.view(1, *self.image_shape).expand(batch, *self.image_shape)

        def apply_sigma(x):
            coefficients = (x.flatten(1) @ self.eigvecs) * self.eigvals
            return (coefficients @ self.eigvecs.T).view_as(x)

        def apply_system(w):
            return operator.forward(apply_sigma(operator.adjoint(w))) + sigma_y**2 * w

        rhs = y - operator.forward(mean)
        w = conjugate_gradient(apply_system, rhs, tol, max_iterations)
        return (mean + apply_sigma(operator.adjoint(w))).float()


DENSE_POSTERIOR_LIMIT = 4096


def check_noise_level(sigma_y: float) -> None:
    if not sigma_y > 0:
        raise ValueError(f"sigma_y = {sigma_y}, expected a positive noise level")


def conjugate_gradient(apply, rhs: torch.Tensor, tol: float, max_iterations: int) -> torch.Tensor:
    """Solve ``apply(w) = rhs`` for a symmetric positive definite map, one system per batch item."""
    dims = tuple(range(1, rhs.ndim))
    w = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    rs = (residual * residual).sum(dims, keepdim=True)
    target = tol**2 * rs.clamp_min(1e-300)
    for _ in range(max_iterations):
        if bool((rs <= target).all()):
            return w
        applied = apply(direction)
        step = rs / (direction * applied).sum(dims, keepdim=True)
        w = w + step * direction
        residual = residual - step * applied
        rs_new = (residual * residual).sum(dims, keepdim=True)
        direction = residual + rs_new / rs * direction
        rs = rs_new
    raise RuntimeError(f"conjugate gradients did not reach relative residual {tol} in {max_iterations} iterations")


class EmpiricalPrior(Prior):
    """The optimal denoiser of a finite training set: the noisy marginal is a Gaussian mixture.

    ``p_t(x) = (1/N) sum_i N(x; sqrt(abar_t) x_i, (1 - abar_t) I)``, so ``x0_hat`` is the
    softmax-weighted average of the training images with weights
    ``w_i ∝ exp(-|x_t - sqrt(abar_t) x_i|^2 / (2 (1 - abar_t)))``. Sampling from it can only
    return training images: it is the limit of a model that memorises.
    """

    def __init__(self, train_images: torch.Tensor, schedule: Schedule | None = None):
        super().__init__(schedule or default_schedule(), train_images.shape[1:])
        self.register_buffer("train_flat", train_images.detach().flatten(1).clone())

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        self.check_images(x_t)
        abar_t = self.abar_table[self.timesteps(t, len(x_t))].to(x_t.dtype).view(-1, 1)
        flat = x_t.flatten(1)
        train = self.train_flat.to(x_t.dtype)
        # |x - sqrt(abar) x_i|^2 expanded, so the (B, N) distances need one matrix product.
        distances = ((flat**2).sum(1, keepdim=True) - 2 * abar_t.sqrt() * flat @ train.T
                     + abar_t * (train**2).sum(1))
        weights = torch.softmax(-distances / (2 * (1 - abar_t)), dim=1)
        x0_hat = weights @ train
        return ((flat - abar_t.sqrt() * x0_hat) / (1 - abar_t).sqrt()).view_as(x_t)


class DiffusersPrior(Prior):
    """A diffusers ``UNet2DModel`` and the schedule of its ``DDPMScheduler`` config.

    Models trained to predict ``"sample"`` or ``"v_prediction"`` are converted to eps,
    so every solver calls the same interface.
    """

    def __init__(self, unet, schedule: Schedule, prediction_type: str = "epsilon", source: str = ""):
        config = unet.config
        super().__init__(schedule, (config.in_channels, config.sample_size, config.sample_size))
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r} is not supported, expected 'epsilon', 'sample' or 'v_prediction'")
        self.unet = unet.eval().requires_grad_(False)
        self.prediction_type = prediction_type
        self.source = source

    @classmethod
    def from_pretrained(cls, source: str, device: str | torch.device | None = None) -> DiffusersPrior:
        """Load ``"embedded"``, a local folder or a Hub id holding ``unet/`` and ``scheduler/``.

        A folder may also hold the UNet's ``config.json`` at its top level, with an optional
        ``scheduler_config.json`` beside it; without one, the linear DDPM schedule is used.
        """
        from diffusers import UNet2DModel

        folder = resolve_model_folder(source)
        unet_folder = folder / "unet" if (folder / "unet" / "config.json").exists() else folder
        if not (unet_folder / "config.json").exists():
            raise FileNotFoundError(f"no diffusers UNet found in {folder} (expected unet/config.json or config.json)")
        unet = UNet2DModel.from_pretrained(unet_folder, low_cpu_mem_usage=False)
        scheduler_config = next(
            (path for path in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json")
             if path.exists()), None)
        config = json.loads(scheduler_config.read_text()) if scheduler_config else {}
        schedule = Schedule.from_diffusers(config) if config else default_schedule()
        prior = cls(unet, schedule, config.get("prediction_type", "epsilon"), source)
        return prior.to(device) if device is not None else prior

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        self.check_images(x_t)
        t = self.timesteps(t, len(x_t))
        output = self.unet(x_t, t).sample
        if self.prediction_type == "epsilon":
            return output
        abar_t = self.abar(t, x_t)
        if self.prediction_type == "sample":
            return (x_t - abar_t.sqrt() * output) / (1 - abar_t).sqrt()
        return abar_t.sqrt() * output + (1 - abar_t).sqrt() * x_t


def embedded_model_folder() -> Path:
    """Return the folder of the model shipped in this package."""
    return Path(str(resources.files("diffinv") / "weights" / "embedded"))


def resolve_model_folder(source: str) -> Path:
    """Map ``"embedded"``, a local folder or a Hub id to a local folder, downloading if needed."""
    if source == EMBEDDED_MODEL:
        folder = embedded_model_folder()
        if not (folder / "unet" / "config.json").exists():
            raise FileNotFoundError(f"the embedded model is missing from {folder}; reinstall diffinv")
        return folder
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser()
    if source.count("/") != 1 or Path(source).suffix:
        raise ValueError(
            f"model {source!r} is neither a known prior ({', '.join(ANALYTIC_PRIORS + (EMBEDDED_MODEL,))}), "
            "an existing folder, nor a Hugging Face Hub id of the form 'owner/name'"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "unet/*", "*.safetensors", "*.bin"]))
    except Exception as error:  # the hub client raises many connection and lookup errors
        raise RuntimeError(
            f"could not load {source!r} from the Hugging Face Hub ({type(error).__name__}). "
            f"Offline, download it elsewhere with `hf download {source} --local-dir DIR`, copy DIR here "
            "and pass the folder as the model"
        ) from error


def load_prior(name: str, train_images: torch.Tensor | None = None,
               device: str | torch.device | None = None) -> Prior:
    """Build the prior called ``name``: ``gaussian``, ``empirical``, ``embedded``, a folder or a Hub id.

    The analytic priors are fitted to ``train_images``, by default the 80 embedded training faces.
    """
    if name in ANALYTIC_PRIORS:
        if train_images is None:
            from .data import load_faces

            train_images = load_faces("train").images
        prior = GaussianPrior.fit(train_images) if name == "gaussian" else EmpiricalPrior(train_images)
        return prior.to(device) if device is not None else prior
    return DiffusersPrior.from_pretrained(name, device)
