"""Measure the embedded prior against the Gaussian and empirical priors on the 32x32 faces.

Two measurements, written to ``benchmarks/results/embedded_quality.json`` with a figure:

1. Denoising error: for each prior and each t in the grid, noise every face with
   ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``. The error is the per-pixel mean squared
   error of the Tweedie estimate ``x0_hat(x_t, t)`` against ``x_0`` on the [-1, 1] scale.
   It is reported on the 20 held-out faces and on the 80 training faces, and every prior
   sees the same ``eps`` draws.
2. Memorisation: draw unconditional samples with the respaced DDPM sampler and report each
   sample's root-mean-square pixel distance to its nearest training face (flipped copies
   included, because training used flips), beside the same distance for the held-out faces,
   which is how far a new face of this distribution lies from the training set.

With ``--loss-curve PNG`` it also plots the training and held-out loss recorded in the
model folder's ``loss_history.json`` (written by ``diffinv.train``).

Run: ``python benchmarks/embedded_quality.py [--model embedded] [--samples 16] [--steps 100]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from diffinv.data import TRAIN_INDICES, load_faces
from diffinv.models import DiffusersPrior, EmpiricalPrior, GaussianPrior, resolve_model_folder
from diffinv.solvers import sample

logger = logging.getLogger("diffinv")

RESULTS = Path(__file__).resolve().parent / "results"
T_GRID = (50, 100, 200, 400, 600, 800)
NOISE_SEED = 0


@torch.no_grad()
def denoising_errors(prior, images: torch.Tensor, noise: dict[int, torch.Tensor]) -> dict[str, dict]:
    """Return, per t, the mean and 95% interval over images of the per-pixel MSE of ``x0_hat``."""
    abar = prior.schedule.abar
    table = {}
    for t, eps in noise.items():
        abar_t = float(abar[t])
        x_t = abar_t**0.5 * images + (1 - abar_t) ** 0.5 * eps
        mse = ((prior.x0_hat(x_t, t) - images) ** 2).flatten(1).mean(1).double()
        half_width = 1.96 * float(mse.std()) / len(mse) ** 0.5
        table[str(t)] = {"mse": float(mse.mean()), "ci95": [float(mse.mean()) - half_width,
                                                              float(mse.mean()) + half_width]}
    return table


def nearest_distances(queries: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the RMS pixel distance from each query to its nearest reference, and that reference's row."""
    distances = torch.cdist(queries.flatten(1).double(), references.flatten(1).double()) / queries[0].numel() ** 0.5
    nearest, index = distances.min(dim=1)
    return nearest, index


def summarise(values: torch.Tensor) -> dict:
    return {"mean": float(values.mean()), "min": float(values.min()), "median": float(values.median()),
            "max": float(values.max()), "values": [round(float(v), 5) for v in values]}


def memorisation(samples: torch.Tensor, train: torch.Tensor, test: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Compare the nearest-training-face distances of samples with those of held-out faces.

    Returns the summary and, for each sample, its nearest training face (possibly flipped).
    """
    references = torch.cat([train, train.flip(-1)])
    sample_nearest, sample_index = nearest_distances(samples, references)
    test_nearest, _ = nearest_distances(test, references)
    # A sample nearer to the training set than every held-out face counts as a copy.
    copies = int((sample_nearest < test_nearest.min()).sum())
    return {
        "sample_to_train": summarise(sample_nearest),
        "heldout_to_train": summarise(test_nearest),
        "samples_closer_than_every_heldout_face": copies,
        "nearest_train_index": [TRAIN_INDICES[int(i) % len(train)] for i in sample_index],
        "nearest_is_flipped": [bool(i >= len(train)) for i in sample_index],
    }, references[sample_index]


def save_figure(errors: dict, samples: torch.Tensor, nearest: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, grid) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1, 1.3]})
    for color, (name, by_split) in zip(("C0", "C1", "C2"), errors.items()):
        for split, style in (("test", "-"), ("train", ":")):
            ts = [int(t) for t in by_split[split]]
            mse = [by_split[split][str(t)]["mse"] for t in ts]
            curves.plot(ts, mse, style, color=color, marker="o", label=f"{name} ({split} faces)")
    # The empirical prior denoises training faces almost exactly (MSE near 1e-16); clip the axis there.
    curves.set(yscale="log", ylim=(1e-4, None), xlabel="timestep t", ylabel="MSE of x0_hat", title="denoising error")
    curves.legend(fontsize=7)

    # Samples in the top rows, the nearest training face of each in the same place below.
    columns = 8 if len(samples) % 8 == 0 else len(samples)
    tiles = torch.cat([samples, nearest]).view(-1, columns, 32, 32)
    canvas = tiles.permute(0, 2, 1, 3).reshape(-1, columns * 32)
    grid.imshow(((canvas + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
    grid.set(title="samples (top) and their nearest training faces (bottom)", xticks=[], yticks=[])
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def save_loss_curve(history: dict, path: Path) -> None:
    """Plot the training loss per log window and the held-out loss per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3))
    train = history["train"]
    axes.plot([e["step"] for e in train], [e["loss"] for e in train], label="train (running mean, model)")
    heldout = history["heldout"]
    axes.plot([e["step"] for e in heldout], [e["loss"] for e in heldout], "o-", label="held-out (fixed draws, EMA)")
    axes.set(yscale="log", xlabel="step", ylabel="epsilon MSE", title="embedded prior: DDPM loss")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="'embedded', a diffusers folder or a Hub id")
    parser.add_argument("--samples", type=int, default=16, help="number of unconditional samples")
    parser.add_argument("--steps", type=int, default=100, help="respaced DDPM sampling steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and the figure")
    parser.add_argument("--loss-curve", type=Path, default=None,
                        help="also plot the model folder's loss_history.json to this PNG")
    args = parser.parse_args(argv)

    train, test = load_faces("train").images, load_faces("test").images
    priors = {
        "gaussian": GaussianPrior.fit(train),
        "empirical": EmpiricalPrior(train),
        "learned": DiffusersPrior.from_pretrained(args.model),
    }
    if args.loss_curve is not None:
        folder = resolve_model_folder(args.model)
        save_loss_curve(json.loads((folder / "loss_history.json").read_text()), args.loss_curve)
    generator = torch.Generator().manual_seed(NOISE_SEED)
    noise = {split: {t: torch.randn(images.shape, generator=generator) for t in T_GRID}
             for split, images in (("test", test), ("train", train))}

    started = time.perf_counter()
    errors = {name: {split: denoising_errors(prior, images, noise[split])
                     for split, images in (("test", test), ("train", train))}
              for name, prior in priors.items()}
    samples = sample(priors["learned"], args.samples, steps=args.steps, seed=args.seed).x0.clamp(-1, 1)
    memo, nearest = memorisation(samples, train, test)

    result = {
        "config": {"model": args.model, "t_grid": list(T_GRID), "noise_seed": NOISE_SEED,
                   "samples": args.samples, "sampling_steps": args.steps, "sampler_seed": args.seed,
                   "torch": torch.__version__, "machine": platform.machine(),
                   "seconds": round(time.perf_counter() - started, 1)},
        "denoising_mse": errors,
        "memorisation": memo,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "embedded_quality.json").write_text(json.dumps(result, indent=1))
    save_figure(errors, samples, nearest, args.out / "embedded_quality.png")
    logger.info("wrote %s and embedded_quality.png", args.out / "embedded_quality.json")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
