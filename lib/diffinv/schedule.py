"""The DDPM noise schedule and its respacing to fewer sampling steps.

Timesteps are 0-based indices ``t = 0, ..., T-1`` as in diffusers, so ``abar[0]`` is the
first, least noisy level. With ``alpha_t = 1 - beta_t`` and ``abar_t = alpha_0 ... alpha_t``,
the forward process is ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """A variance schedule ``beta`` and the model timesteps that it samples at.

    ``timesteps[k]`` is the timestep of the network's own schedule that step ``k`` of this
    schedule stands for. For the full schedule it is ``k``; a respaced schedule keeps a
    subset of the timesteps and recomputes ``beta`` so that ``abar`` agrees on that subset.
    """

    betas: torch.Tensor
    timesteps: torch.Tensor

    def __post_init__(self):
        if self.betas.ndim != 1 or len(self.betas) == 0:
            raise ValueError(f"betas has shape {tuple(self.betas.shape)}, expected a non-empty 1-D tensor")
        if not bool(((self.betas > 0) & (self.betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        if self.timesteps.shape != self.betas.shape:
            raise ValueError(
                f"timesteps has shape {tuple(self.timesteps.shape)}, expected {tuple(self.betas.shape)}"
            )

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
        """Return the DDPM schedule with ``T`` betas spaced linearly from ``beta_start`` to ``beta_end``."""
        if T < 1:
            raise ValueError(f"T = {T}, expected a positive number of timesteps")
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls(betas, torch.arange(T))

    @classmethod
    def from_diffusers(cls, config) -> Schedule:
        """Build the schedule described by a diffusers ``DDPMScheduler`` config (dict or object)."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        kind = get("beta_schedule", "linear")
        T = int(get("num_train_timesteps", 1000))
        start, end = float(get("beta_start", 1e-4)), float(get("beta_end", 0.02))
        trained = get("trained_betas", None)
        if trained is not None:
            return cls(torch.as_tensor(trained, dtype=torch.float64), torch.arange(T))
        if kind == "linear":
            return cls.linear(T, start, end)
        if kind == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
            return cls(betas, torch.arange(T))
        if kind == "squaredcos_cap_v2":
            steps = torch.arange(T + 1, dtype=torch.float64) / T
            abar = torch.cos((steps + 0.008) / 1.008 * torch.pi / 2) ** 2
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
            return cls(betas, torch.arange(T))
        raise ValueError(
            f"beta_schedule {kind!r} is not supported, expected 'linear', 'scaled_linear' or 'squaredcos_cap_v2'"
        )

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def abar(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    def sigma(self, k: int) -> float:
        """Return the DDPM posterior standard deviation ``sqrt(beta_tilde_k)`` of reverse step ``k``.

        ``beta_tilde_k = (1 - abar_{k-1}) / (1 - abar_k) beta_k``; at ``k = 0`` it is 0,
        so the last step adds no noise.
        """
        if k == 0:
            return 0.0
        abar = self.abar
        return float(((1 - abar[k - 1]) / (1 - abar[k]) * self.betas[k]).sqrt())

    def respace(self, steps: int) -> Schedule:
        """Keep ``steps`` evenly spaced timesteps, with betas that preserve ``abar`` on them.

        The kept timesteps include the last one, ``T - 1``. The new betas are
        ``1 - abar[t_k] / abar[t_{k-1}]``, so each step of the shorter chain spans the
        noise of the steps it skips (the respacing of Nichol and Dhariwal, 2021).
        """
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps = {steps}, expected an integer in [1, {self.T}]")
        kept = torch.linspace(self.T - 1, 0, steps).round().long().flip(0).unique()
        if len(kept) != steps:
            raise ValueError(f"cannot pick {steps} distinct timesteps out of {self.T}")
        abar = self.abar[kept]
        previous = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        return Schedule(1 - abar / previous, self.timesteps[kept])

    def index_of(self, t: int) -> int:
        """Return the step ``k`` whose model timestep is the one nearest to ``t``."""
        if not 0 <= t < int(self.timesteps[-1]) + 1:
            raise ValueError(f"timestep {t} is outside the schedule, expected 0 <= t <= {int(self.timesteps[-1])}")
        return int((self.timesteps - t).abs().argmin())
