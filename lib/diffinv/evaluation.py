"""Restore test images end to end and record what was done: ``diffinv solve``.

A run writes ``metrics.json`` (configuration, one row per image, summary with 95%
intervals), ``references.json`` (the same metrics for the degraded input and, for the
Gaussian prior, the exact posterior mean) and, per image, ``truth_I.png``,
``degraded_I.png`` and ``restored_I.png`` with I the dataset index. Every file is written
to a temporary name and renamed, so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data import load_dataset
from .metrics import all_metrics, summarize
from .models import ANALYTIC_PRIORS, GaussianPrior, load_prior
from .operators import TASKS, make_operator, measure
from .solvers import DEFAULT_T0, DEFAULT_ZETA, SOLVERS, solve

logger = logging.getLogger("diffinv")


def write_atomic(path: Path, write) -> None:
    """Call ``write(temporary_path)`` and rename the result to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path: Path, data) -> None:
    write_atomic(Path(path), lambda name: Path(name).write_text(json.dumps(data, indent=2) + "\n"))


def save_png(path: Path, image: torch.Tensor) -> None:
    """Save one (C, H, W) image in [-1, 1] as an 8-bit PNG, clipping values outside the range."""
    from PIL import Image

    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    write_atomic(Path(path), lambda name: picture.save(name, format="PNG"))


def library_versions() -> dict[str, str]:
    import diffusers

    return {"diffinv": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "numpy": np.__version__}


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not valid, expected for example 'cpu' or 'cuda'") from error


def validate_solve_arguments(task: str, solver: str, images: int, steps: int, zeta: float | None,
                             t0: float | None, sigma_y: float) -> None:
    """Raise ValueError naming the first invalid argument, before any data or model is loaded."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not valid, expected one of {', '.join(TASKS)}")
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not valid, expected one of {', '.join(SOLVERS)}")
    if images < 1:
        raise ValueError(f"images = {images}, expected a positive number of test images")
    if steps < 1:
        raise ValueError(f"steps = {steps}, expected a positive number of reverse steps")
    if zeta is not None and not (math.isfinite(zeta) and zeta > 0):
        raise ValueError(f"zeta = {zeta}, expected a positive step size")
    if t0 is not None and not 0 < t0 <= 1:
        raise ValueError(f"t0 = {t0}, expected a fraction of the schedule in (0, 1]")
    if not (math.isfinite(sigma_y) and sigma_y > 0):
        raise ValueError(f"sigma_y = {sigma_y}, expected a positive noise level")


def load_prior_for(model: str, dataset: str, device: torch.device):
    """Load ``model``; the analytic priors are fitted to the training split of ``dataset``."""
    train_images = None
    if model in ANALYTIC_PRIORS:
        if dataset not in ("faces", "olivetti"):
            raise ValueError(f"the {model} prior is fitted to a training split, which dataset {dataset!r} lacks; "
                             "use --dataset faces or olivetti")
        train_images = load_dataset(dataset, "train").images
    return load_prior(model, train_images, device)


def metric_rows(restored: torch.Tensor, truth: torch.Tensor, indices: list[int], seconds: float) -> list[dict]:
    values = {name: tensor.tolist() for name, tensor in all_metrics(restored, truth).items()}
    return [{"index": index, **{name: values[name][i] for name in ("psnr", "ssim", "lpips")}, "seconds": seconds}
            for i, index in enumerate(indices)]


def summary_of(rows: list[dict]) -> dict:
    return {name: summarize([row[name] for row in rows]) for name in ("psnr", "ssim", "lpips")}


def run_solve(model: str = "gaussian", task: str = "deblur", solver: str = "dps", dataset: str = "faces",
              images: int = 4, steps: int = 100, zeta: float | None = None, t0: float | None = None,
              sigma_y: float = 0.05, seed: int = 0, device: str | None = None, out: str | Path = "runs/solve",
              progress: bool = True) -> dict:
    """Restore the first ``images`` test images and write the results to ``out``; return metrics.json's content."""
    validate_solve_arguments(task, solver, images, steps, zeta, t0, sigma_y)
    device = pick_device(device)
    out = Path(out)
    faces = load_dataset(dataset, "test").take(images)
    prior = load_prior_for(model, dataset, device)
    if tuple(faces.images.shape[1:]) != tuple(prior.image_shape):
        raise ValueError(f"model {model!r} expects images of shape {tuple(prior.image_shape)}, "
                         f"but dataset {dataset!r} gives {tuple(faces.images.shape[1:])}")

    truth = faces.images.to(device)
    operator = make_operator(task, prior.image_shape, len(truth), seed=seed).to(device)
    y = measure(operator, truth, sigma_y, seed)
    zeta = DEFAULT_ZETA.get(solver) if zeta is None else zeta
    t0 = DEFAULT_T0 if t0 is None else t0
    config = {"model": model, "task": task, "solver": solver, "steps": steps, "zeta": zeta if solver != "sdedit" else None,
              "sigma_y": sigma_y, "seed": seed, "image_size": prior.image_shape[-1], "device": str(device),
              "versions": library_versions()}
    if solver == "sdedit":
        config["t0"] = t0
    logger.info("diffinv solve: %s", json.dumps({**config, "dataset": dataset, "images": images, "out": str(out)}))

    started = time.perf_counter()
    result = solve(prior, operator, y, solver, steps=steps, zeta=zeta, sigma_y=sigma_y, t0=t0, seed=seed,
                   progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / len(truth)

    degraded = y if y.shape == truth.shape else operator.pinv(y)
    for i, index in enumerate(faces.indices):
        save_png(out / f"truth_{index}.png", truth[i])
        save_png(out / f"degraded_{index}.png", degraded[i])
        save_png(out / f"restored_{index}.png", result.x0[i])
    rows = metric_rows(result.x0, truth, faces.indices, seconds)
    report = {"config": config, "images": rows, "summary": summary_of(rows)}
    write_json(out / "metrics.json", report)
    write_json(out / "references.json", reference_metrics(prior, operator, y, truth, faces.indices, sigma_y))

    logger.info("diffinv solve: %d images, %.2f s per image, %s; wrote %s", len(rows), seconds,
                ", ".join(f"{name} {value['mean']:.4f} [{value['low']:.4f}, {value['high']:.4f}]"
                          for name, value in report["summary"].items()), out / "metrics.json")
    return report


def reference_metrics(prior, operator, y, truth, indices, sigma_y) -> dict:
    """Score the degraded input and, for the Gaussian prior, the exact posterior mean."""
    degraded = (y if y.shape == truth.shape else operator.pinv(y)).clamp(-1, 1)
    references = {"degraded": metric_rows(degraded, truth, indices, 0.0)}
    if isinstance(prior, GaussianPrior):
        references["posterior_mean"] = metric_rows(prior.posterior_mean(operator, y, sigma_y), truth, indices, 0.0)
    return {name: {"images": rows, "summary": summary_of(rows)} for name, rows in references.items()}


def solve_command(args) -> None:
    run_solve(args.model, args.task, args.solver, args.dataset, args.images, args.steps, args.zeta, args.t0,
              args.sigma_y, args.seed, args.device, args.out, progress=not args.quiet)
