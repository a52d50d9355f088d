"""Run the same DPS in diffinv and in DeepInverse (``deepinv.sampling.DPS``, deepinv 0.5.0) and compare.

Both restore the same held-out faces from the same Gaussian-blur measurements with the same
network, number of network evaluations and seed. The result records each run's wall and
CPU seconds, its seconds inside the UNet (timed by ``common.NetworkTimer``), and the PSNR,
SSIM and LPIPS of each image.

How deepinv runs our model. ``deepinv.sampling.DPS`` solves a continuous variance-preserving
SDE, ``abar(tau) = exp(-(0.1 tau + 9.95 tau^2))`` for ``tau`` in [0, 1] (the defaults of
``VariancePreservingDiffusion``), with the ancestral DDPM step. Its iterate lives in [-1, 1],
and its denoiser ``D(x, sigma)`` receives ``x = x_t / sqrt(abar)`` mapped to [0, 1] with the
noise level ``sigma = sqrt(1 / abar - 1)`` halved. deepinv's own ``ScoreModelWrapper``
turns our eps network into that denoiser: it looks up the discrete timestep whose sigma is
nearest and returns ``x0_hat = x / sqrt(abar) - sigma eps``. The measurement and the blur
then act on [0, 1] images, so deepinv gets ``(y + 1) / 2`` and ``deepinv.physics.BlurFFT``
with our kernel (the same circular convolution, as tests/test_deepinv_crosscheck.py checks).

Where the algorithms differ, and the two deepinv runs:

1. Step size. Our update adds ``-2 zeta grad_{x_t} |y - A x0_hat|``, since
   ``zeta_t = zeta / |r|`` multiplies ``g = -grad |r|^2``. The official DPS code adds
   ``-zeta' grad |r|``, so ``zeta' = 2 zeta``. deepinv subtracts ``weight grad |r|`` from the score,
   and its ancestral step multiplies the score by ``beta_k / sqrt(alpha_k)``. In [0, 1]
   units the residual is halved, so the net step is ``-(weight / 2) (beta_k / sqrt(alpha_k))
   grad |r|``. A constant ``weight`` thus guides weakly at low noise and strongly at high noise.
2. Timesteps. We keep ``steps`` timesteps ``round(linspace(999, 0, steps))`` of the discrete
   schedule and end with the Tweedie step at t = 0. deepinv spaces ``tau`` linearly in
   [1, 0] on its continuous schedule and ends at ``tau = 0``; ``num_steps`` times give
   ``num_steps - 1`` network evaluations.
3. Clipping. Our DPS never clips ``x0_hat``. deepinv's wrapper clips it to [-1, 1] by default
   (``clip_output=True``), which also changes the prior's step, because deepinv computes the
   score from the clipped ``x0_hat``.
4. Noise (eta). Both use the DDPM posterior variance ``beta_tilde`` (eta = 1).

The ``deepinv-matched`` run removes 1 to 3. Its ``tau`` values reproduce our respaced
``abar`` exactly, and a per-step weight ``4 zeta sqrt(alpha_k) / beta_k`` gives our step
size. Nothing is clipped. It starts from our ``x_T`` and draws its noise from our generator
in float32, so it should reproduce our samples up to float rounding. The two
``deepinv-default`` runs keep deepinv's own choices (timesteps, clipping, float64, its own
noise) with a constant weight: deepinv's default 1.0, or the weight whose steps sum to
ours, ``4 zeta steps / sum_k (beta_k / sqrt(alpha_k))``. The ``deepinv-default-our-step-size``
run keeps those choices too, but weights each step so that its size is ours, which
separates the step-size convention (1) from the timesteps, clipping and noise (2 to 4).

Run: ``python benchmarks/deepinv_dps.py [--model embedded] [--images 4] [--steps 100] [--seeds 0]``.
The result goes to ``benchmarks/results/deepinv_dps.json``.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from common import NetworkTimer, add_run_arguments, load_record, run_record, start_run, swapped_network, write_result
from diffinv.data import load_faces
from diffinv.metrics import all_metrics
from diffinv.operators import make_operator, measure
from diffinv.solvers import DEFAULT_ZETA, make_generator, solve

logger = logging.getLogger("diffinv")

TASK = "deblur"
SIGMA_Y = 0.05
# deepinv.sampling.VariancePreservingDiffusion defaults: beta(tau) = 0.1 + (20 - 0.1) tau.
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0


def continuous_times(abar: torch.Tensor) -> torch.Tensor:
    """Return the ``tau`` at which deepinv's VP schedule has noise ``abar``: solve ``B(tau) = -log abar``.

    ``B(tau) = beta_min tau + (beta_max - beta_min) tau^2 / 2`` is the integral of the linear beta.
    """
    a, b, c = (VP_BETA_MAX - VP_BETA_MIN) / 2, VP_BETA_MIN, abar.double().log()
    return (-b + (b * b - 4 * a * c).sqrt()) / (2 * a)


def deepinv_denoiser(prior, clip_output: bool):
    """Wrap the prior's UNet as deepinv's denoiser ``D(x, sigma)`` on [0, 1] images."""
    from deepinv.models.wrapper import ScoreModelWrapper

    return ScoreModelWrapper(
        score_model=lambda x, t: prior.unet(x, t).sample, prediction_type="epsilon", clip_output=clip_output,
        scale_t=prior.schedule.abar.sqrt().float(), variance_preserving=True, takes_integer_time=True,
        n_timesteps=prior.schedule.T, T=1.0)


def step_weighted_fidelity(denoiser, sigmas: torch.Tensor, weights: torch.Tensor):
    """Return deepinv's DPS data fidelity with the weight of the step whose sigma is nearest to the one given."""
    from deepinv.sampling import DPSDataFidelity

    class StepWeightedDPSFidelity(DPSDataFidelity):
        def forward(self, x, y, physics, sigma, *args, **kwargs):
            self.weight = float(weights[(sigmas - float(sigma)).abs().argmin()])
            return super().forward(x, y, physics, sigma, *args, **kwargs)

    return StepWeightedDPSFidelity(denoiser=denoiser, clip=None)


def guidance_factors(abar: torch.Tensor) -> torch.Tensor:
    """Return ``beta_k / sqrt(alpha_k)``, the factor deepinv's ancestral step puts on the score at step k."""
    previous = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    alphas = abar / previous
    return (1 - alphas) / alphas.sqrt()


def timed(prior, function):
    """Return the result, wall seconds, CPU seconds and wall seconds inside the UNet of one call of ``function``."""
    with swapped_network(prior, NetworkTimer(prior.unet)) as timer:
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result, wall, cpu, timer.seconds


def run_ours(prior, operator, y, steps: int, zeta: float, seed: int):
    result, *seconds = timed(prior, lambda: solve(prior, operator, y, "dps", steps=steps, zeta=zeta,
                                                  sigma_y=SIGMA_Y, seed=seed))
    return result.x0, *seconds, result.network_evaluations


def run_deepinv_matched(prior, physics, y, steps: int, zeta: float, seed: int):
    """Run deepinv's DPS with our timesteps, step sizes, start and noise (see the module docstring)."""
    from deepinv.sampling import DPS, DDPMSolver

    schedule = prior.schedule.respace(steps)
    abar = schedule.abar
    times = torch.cat([continuous_times(abar).flip(0), torch.zeros(1, dtype=torch.float64)]).float()
    generator = make_generator(seed, y.device)
    x_start = torch.randn((len(y), *prior.image_shape), generator=generator, device=y.device, dtype=y.dtype)

    denoiser = deepinv_denoiser(prior, clip_output=False)
    dps = DPS(denoiser, solver=DDPMSolver(timesteps=times, rng=generator), dtype=torch.float32)
    sigmas = ((1 / abar - 1).sqrt() / 2).float()
    # -(weight / 2) (beta_k / sqrt(alpha_k)) grad |r| must equal our -2 zeta grad |r|.
    weights = 4 * zeta / guidance_factors(abar)
    dps.data_fidelity = step_weighted_fidelity(denoiser, sigmas, weights)
    check_times(dps, times[:-1], abar.flip(0))

    output, *seconds = timed(prior, lambda: dps((y + 1) / 2, physics, x_init=x_start))
    return 2 * output - 1, *seconds, steps


def check_times(dps, times: torch.Tensor, abar: torch.Tensor) -> None:
    """Raise RuntimeError unless deepinv's schedule at ``times`` reproduces ``abar``."""
    theirs = dps.sde.scale_t(times.double()) ** 2
    error = float(((theirs - abar) / abar).abs().max())
    if error > 1e-5:
        raise RuntimeError(f"deepinv's abar at the matched times is off by {error:.2e} (relative), expected < 1e-5; "
                           "have VariancePreservingDiffusion's defaults changed?")


def run_deepinv_default(prior, physics, y, steps: int, seed: int, weight: float = 1.0, zeta: float | None = None):
    """Run deepinv's DPS with its own timesteps, clipping, dtype and noise.

    The guidance weight is the constant ``weight``, or with ``zeta`` given, the per-step weight
    that makes each step's size ours, ``-2 zeta grad |r|``.
    """
    from deepinv.sampling import DPS

    denoiser = deepinv_denoiser(prior, clip_output=True)
    # num_steps times give num_steps - 1 network evaluations, so one more matches ours.
    dps = DPS(denoiser, num_steps=steps + 1, weight=weight, rng=torch.Generator().manual_seed(seed))
    if zeta is not None:
        times = dps.solver.timesteps.double()
        scale, sigma = dps.sde.scale_t(times), dps.sde.sigma_t(times)
        # The ancestral step from tau_k to tau_{k+1} multiplies the score by s_k s_{k+1} (sigma_k^2 - sigma_{k+1}^2).
        factors = scale[:-1] * scale[1:] * (sigma[:-1] ** 2 - sigma[1:] ** 2)
        dps.data_fidelity = step_weighted_fidelity(denoiser, (sigma[:-1] / 2).float(), 4 * zeta / factors)
    output, *seconds = timed(prior, lambda: dps((y + 1) / 2, physics, seed=seed))
    return (2 * output - 1).float(), *seconds, steps


def summarise(name: str, restored, truth, wall: float, cpu: float, network: float, evaluations: int,
              **extra) -> dict:
    metrics = {key: value.tolist() for key, value in all_metrics(restored, truth).items()}
    return {"run": name, "seconds": wall, "cpu_seconds": cpu, "network_seconds": network,
            "overhead": wall / network if network else None, "network_evaluations": evaluations, **extra,
            **{f"{key}_mean": sum(values) / len(values) for key, values in metrics.items()}, "per_image": metrics}


def compare(run: dict, reference: dict) -> dict:
    """Return the time ratios and metric differences of ``run`` against ``reference``.

    ``overhead_ratio`` divides the two runs' overheads (wall seconds over seconds inside the
    UNet). Both runs make the same network calls, so it is their time ratio at equal network
    speed, which a varying load does not shift as it shifts the raw ``time_ratio``.
    """
    return {"time_ratio": run["seconds"] / reference["seconds"],
            "cpu_time_ratio": run["cpu_seconds"] / reference["cpu_seconds"],
            "overhead_ratio": run["overhead"] / reference["overhead"],
            **{f"{key}_difference": run[f"{key}_mean"] - reference[f"{key}_mean"] for key in ("psnr", "ssim", "lpips")}}


def compare_seed(prior, truth, indices, seed: int, steps: int, zeta: float) -> list[dict]:
    """Run every configuration on ``truth`` with ``seed`` and return one entry per run."""
    import deepinv

    operator = make_operator(TASK, prior.image_shape, len(truth))
    y = measure(operator, truth, SIGMA_Y, seed=seed)
    physics = deepinv.physics.BlurFFT(img_size=prior.image_shape, filter=operator.kernel[None, None].float())
    equal_total_weight = 4 * zeta * steps / float(guidance_factors(prior.schedule.respace(steps).abar).sum())
    # An untimed short run first, so that no timed run pays for the first network call.
    run_ours(prior, operator, y, 2, zeta, seed)

    ours_x, *ours_times = run_ours(prior, operator, y, steps, zeta, seed)
    ours = summarise("diffinv", ours_x, truth, *ours_times, seed=seed, indices=indices)
    entries = [summarise("measurement", y, truth, 0.0, 0.0, 0.0, 0, seed=seed, indices=indices), ours]

    matched_x, *matched_times = run_deepinv_matched(prior, physics, y, steps, zeta, seed)
    matched = summarise("deepinv-matched", matched_x, truth, *matched_times, seed=seed, indices=indices)
    matched["max_abs_pixel_difference"] = float((matched_x - ours_x).abs().max())
    entries.append(matched)
    for label, weight in (("deepinv-default-weight", 1.0), ("deepinv-equal-total-weight", equal_total_weight)):
        x, *times = run_deepinv_default(prior, physics, y, steps, seed, weight=weight)
        entries.append(summarise(label, x, truth, *times, seed=seed, indices=indices, weight=weight))
    x, *times = run_deepinv_default(prior, physics, y, steps, seed, zeta=zeta)
    entries.append(summarise("deepinv-default-our-step-size", x, truth, *times, seed=seed, indices=indices,
                             weight="4 zeta / (s_k s_k+1 (sigma_k^2 - sigma_k+1^2)) per step"))

    for entry in entries[2:]:
        entry["against_diffinv"] = compare(entry, ours)
    for entry in entries:
        logger.info("seed %d %-29s %6.1f s  overhead %s  PSNR %6.2f  SSIM %.3f  LPIPS %.3f", seed, entry["run"],
                    entry["seconds"], f"{entry['overhead']:.3f}" if entry["overhead"] else "  -  ", entry["psnr_mean"],
                    entry["ssim_mean"], entry["lpips_mean"])
    return entries


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, "deepinv_dps")
    parser.add_argument("--images", type=int, default=4, help="held-out faces to restore")
    parser.add_argument("--steps", type=int, default=100, help="network evaluations per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the measurement noise and sampler")
    parser.add_argument("--zeta", type=float, default=DEFAULT_ZETA["dps"],
                        help="our DPS step size (the official code's zeta' is twice this)")
    args = parser.parse_args(argv)
    prior = start_run(args)
    faces = load_faces("test").take(args.images)
    load_before = load_record()
    runs = [entry for seed in args.seeds
            for entry in compare_seed(prior, faces.images, list(faces.indices), seed, args.steps, args.zeta)]
    load_after = load_record()

    payload = {
        "benchmark": "deepinv_dps",
        "config": {"model": args.model, "task": TASK, "sigma_y": SIGMA_Y, "steps": args.steps, "zeta": args.zeta,
                   "official_zeta": 2 * args.zeta, "seeds": args.seeds, "images": len(faces.indices),
                   "indices": list(faces.indices), "split": "test", "threads": args.threads, "device": "cpu",
                   "deepinv": __import__("deepinv").__version__},
        **run_record(load_before, load_after),
        "runs": runs,
    }
    path = write_result(args.output, payload)
    logger.info("written to %s", path)
    return payload


if __name__ == "__main__":
    main()
