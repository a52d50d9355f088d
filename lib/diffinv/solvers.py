"""Reverse diffusion with a measurement correction: DDPM sampling, SDEdit, Score-ALD and DPS.

Every solver runs the same loop over a respaced schedule. Step k, at model timestep t:

1. ``s = -eps(x_t, t) / sqrt(1 - abar_t)``                          (score of the prior)
2. ``x'_{t-1} = (x_t + (1 - alpha_t) s) / sqrt(alpha_t) + sigma_t z``  (the study's reverse step)
3. ``x_{t-1} = x'_{t-1} + zeta_t g(x_t, y)``                         (measurement correction)

with ``sigma_t = sqrt(beta_tilde_t)``, the DDPM posterior standard deviation; the study
writes step 2 without ``sigma_t z``, which is its deterministic mean
(:func:`reverse_mean`). The solvers differ only in where they start and in ``zeta_t g``:

- SDEdit: ``g = 0``; start from the degraded image noised to ``t0``.
- Score-ALD: ``zeta_t = zeta (1 - alpha_t) / (sigma_y^2 + gamma_t^2)`` and
  ``g = -grad_{x_t} |y - A x_t|^2``, with the annealed noise level
  ``gamma_t = sqrt(1 - abar_t)``. The study's ``1 / (sigma_y^2 + gamma_t^2)`` is the
  likelihood weight of annealed Langevin dynamics; Langevin multiplies it by the step
  size, which here is the ``1 - alpha_t`` that already multiplies the score in step 2.
  Without it, the correction at small t is ``2 / sigma_y^2`` times the residual (800 for
  sigma_y = 0.05) and the iteration diverges. Because g is the gradient of the squared
  norm, ``zeta = 1/2`` is exactly the Langevin step of the annealed likelihood, and
  ``zeta = 1`` doubles it.
- DPS: ``zeta_t = zeta / |y - A x0_hat(x_t)|`` and ``g = -grad_{x_t} |y - A x0_hat(x_t)|^2``,
  the gradient taken through the network. The official DPS code steps by
  ``zeta' grad |y - A x0_hat|``, so its ``zeta'`` is twice the ``zeta`` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .models import Prior
from .operators import LinearOperator
from .schedule import Schedule

SOLVERS = ("sdedit", "scoreald", "dps")
DEFAULT_ZETA = {"scoreald": 1.0, "dps": 0.5}
DEFAULT_T0 = 0.4
# An iterate this far outside the image range [-1, 1] has diverged.
DIVERGENCE_LIMIT = 1e3


class DivergenceError(RuntimeError):
    """A solver's iterate became non-finite or exploded."""


@dataclass
class SolverResult:
    """The restored images and, if requested, snapshots ``(t, x_t, x0_hat)`` along the way."""

    x0: torch.Tensor
    trajectory: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    network_evaluations: int = 0


class Guidance:
    """The correction ``zeta_t g(x_t, y)`` of step 3; the base class corrects nothing."""

    needs_graph = False

    def correction(self, x_t: torch.Tensor, eps: torch.Tensor, step: StepConstants) -> torch.Tensor | None:
        return None


@dataclass(frozen=True)
class StepConstants:
    """The scalars of one reverse step, computed once per run."""

    k: int
    t: int
    alpha_t: float
    abar_t: float
    sigma_t: float


class ScoreALDGuidance(Guidance):
    """``zeta_t g`` with ``g = -grad |y - A x_t|^2 = 2 A^T (y - A x_t)``, the gradient at x_t itself."""

    def __init__(self, operator: LinearOperator, y: torch.Tensor, sigma_y: float, zeta: float):
        self.operator, self.y, self.sigma_y, self.zeta = operator, y, sigma_y, zeta

    def correction(self, x_t, eps, step):
        gamma_t_squared = 1 - step.abar_t
        zeta_t = self.zeta * (1 - step.alpha_t) / (self.sigma_y**2 + gamma_t_squared)
        g = 2 * self.operator.adjoint(self.y - self.operator(x_t))
        return zeta_t * g


class DPSGuidance(Guidance):
    """``zeta_t g`` with ``g = -grad_{x_t} |y - A x0_hat(x_t)|^2`` through the network."""

    needs_graph = True

    def __init__(self, operator: LinearOperator, y: torch.Tensor, zeta: float):
        self.operator, self.y, self.zeta = operator, y, zeta

    def correction(self, x_t, eps, step):
        x0_hat = (x_t - math.sqrt(1 - step.abar_t) * eps) / math.sqrt(step.abar_t)
        residual_norm = (self.y - self.operator(x0_hat)).flatten(1).norm(dim=1)
        g = -torch.autograd.grad(residual_norm.square().sum(), x_t)[0]
        zeta_t = self.zeta / residual_norm.detach().clamp_min(1e-12)
        return zeta_t.view(-1, 1, 1, 1) * g


def step_constants(schedule: Schedule) -> list[StepConstants]:
    alphas, abar = schedule.alphas.tolist(), schedule.abar.tolist()
    return [StepConstants(k, int(schedule.timesteps[k]), alphas[k], abar[k], schedule.sigma(k))
            for k in range(schedule.T)]


def reverse_mean(x_t: torch.Tensor, score: torch.Tensor, alpha_t: float) -> torch.Tensor:
    """Return the deterministic reverse step ``(x_t + (1 - alpha_t) s) / sqrt(alpha_t)``."""
    return (x_t + (1 - alpha_t) * score) / math.sqrt(alpha_t)


def check_iterate(x: torch.Tensor, step: StepConstants) -> None:
    """Raise DivergenceError if ``x`` is non-finite or beyond :data:`DIVERGENCE_LIMIT`."""
    largest = x.detach().abs().amax()
    if not torch.isfinite(largest):
        raise DivergenceError(f"the iterate became non-finite at step {step.k} (t = {step.t})")
    if largest > DIVERGENCE_LIMIT:
        raise DivergenceError(
            f"the iterate exploded at step {step.k} (t = {step.t}): max |x| = {float(largest):.3g} "
            f"> {DIVERGENCE_LIMIT:g}; lower zeta"
        )


def run_reverse(prior: Prior, schedule: Schedule, x_start: torch.Tensor, guidance: Guidance,
                start_step: int, generator: torch.Generator, record_every: int | None = None,
                progress: bool = False, description: str = "sampling") -> SolverResult:
    """Run steps ``start_step, ..., 0`` of the reverse process from ``x_start``."""
    constants = step_constants(schedule)
    x_t = x_start
    result = SolverResult(x_start)
    for k in tqdm(range(start_step, -1, -1), desc=description, disable=not progress, leave=False):
        step = constants[k]
        x_t = x_t.detach().requires_grad_(guidance.needs_graph)
        with torch.set_grad_enabled(guidance.needs_graph):
            eps = prior.eps(x_t, step.t)
            correction = guidance.correction(x_t, eps, step)
        eps = eps.detach()
        x_t = x_t.detach()

        # 1. Score of the prior.
        score = -eps / math.sqrt(1 - step.abar_t)
        # 2. Reverse step: x'_{t-1} = (x_t + (1 - alpha_t) s) / sqrt(alpha_t) + sigma_t z.
        x_prev = reverse_mean(x_t, score, step.alpha_t)
        if step.sigma_t > 0:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            x_prev = x_prev + step.sigma_t * noise
        # 3. Measurement correction: x_{t-1} = x'_{t-1} + zeta_t g(x_t, y).
        if correction is not None:
            x_prev = x_prev + correction.detach()

        check_iterate(x_prev, step)
        if record_every and (k % record_every == 0 or k == start_step):
            x0_hat = (x_t - math.sqrt(1 - step.abar_t) * eps) / math.sqrt(step.abar_t)
            result.trajectory.append((step.t, x_t.cpu(), x0_hat.cpu()))
        x_t = x_prev
        result.network_evaluations += 1
    result.x0 = x_t
    return result


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} = {value}, expected a positive finite number")


def sample(prior: Prior, batch: int, steps: int = 100, seed: int = 0, device=None,
           record_every: int | None = None, progress: bool = False) -> SolverResult:
    """Draw ``batch`` unconditional samples with ``steps`` respaced DDPM steps."""
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"steps = {steps}, expected a positive integer")
    device = device or prior.abar_table.device
    schedule = prior.schedule.respace(steps)
    generator = make_generator(seed, device)
    x_T = torch.randn((batch, *prior.image_shape), generator=generator, device=device)
    return run_reverse(prior, schedule, x_T, Guidance(), steps - 1, generator, record_every, progress)


def solve(prior: Prior, operator: LinearOperator, y: torch.Tensor, solver: str, steps: int = 100,
          zeta: float | None = None, sigma_y: float = 0.05, t0: float = DEFAULT_T0, seed: int = 0,
          record_every: int | None = None, progress: bool = False) -> SolverResult:
    """Restore images from measurements ``y = A x + sigma_y n`` with the solver named ``solver``.

    ``zeta`` scales the correction (defaults in :data:`DEFAULT_ZETA`; SDEdit has none);
    ``t0`` is SDEdit's start time as a fraction of the schedule. Every argument is checked
    before the first network call.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not valid, expected one of {', '.join(SOLVERS)}")
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"steps = {steps}, expected a positive integer")
    check_positive("sigma_y", sigma_y)
    zeta = DEFAULT_ZETA.get(solver) if zeta is None else zeta
    if solver != "sdedit":
        check_positive("zeta", zeta)
    if not 0 < t0 <= 1:
        raise ValueError(f"t0 = {t0}, expected a fraction of the schedule in (0, 1]")
    if tuple(operator.image_shape) != tuple(prior.image_shape):
        raise ValueError(f"the operator acts on images of shape {tuple(operator.image_shape)}, "
                         f"but the prior models {tuple(prior.image_shape)}")
    expected = tuple(operator.measurement_shape(len(y)))
    if tuple(y.shape) != expected:
        raise ValueError(f"y has shape {tuple(y.shape)}, expected the measurement shape {expected}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y contains NaN or infinite values")

    schedule = prior.schedule.respace(steps)
    generator = make_generator(seed, y.device)
    shape = (len(y), *prior.image_shape)
    if solver == "sdedit":
        start_step = schedule.index_of(round(t0 * (prior.schedule.T - 1)))
        abar_0 = float(schedule.abar[start_step])
        # SDEdit starts from the degraded image itself; a smaller measurement is mapped back first.
        degraded = y if tuple(y.shape) == shape else operator.pinv(y)
        degraded = degraded.clamp(-1, 1)
        noise = torch.randn(shape, generator=generator, device=y.device, dtype=y.dtype)
        x_start = math.sqrt(abar_0) * degraded + math.sqrt(1 - abar_0) * noise
        guidance = Guidance()
    else:
        start_step = steps - 1
        x_start = torch.randn(shape, generator=generator, device=y.device, dtype=y.dtype)
        guidance = (ScoreALDGuidance(operator, y, sigma_y, zeta) if solver == "scoreald"
                    else DPSGuidance(operator, y, zeta))
    return run_reverse(prior, schedule, x_start, guidance, start_step, generator, record_every,
                       progress, description=solver)
