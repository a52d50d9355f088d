"""Measure images per second against batch size for unconditional sampling and for DPS.

Each batch size runs ``diffinv.solvers.sample`` (unconditional DDPM sampling) and DPS on
Gaussian deblurring of held-out faces (repeated past the 20 test faces), with the same
number of respaced steps. A run's throughput is ``batch / wall seconds``, and the result
is the median over repeats. ``per_image_speedup`` compares the time per image with that of
batch 1. Throughput scales inversely with the number of steps, so compare runs made with
the same ``--steps``.

Run: ``python benchmarks/batch_scaling.py [--model embedded] [--batches 1 2 4 8 16 32] [--steps 10]``.
The result goes to ``benchmarks/results/batch_scaling.json``.
"""

from __future__ import annotations

import argparse
import logging

import torch

from common import add_run_arguments, load_record, median, run_record, start_run, time_call, write_result
from diffinv.data import load_faces
from diffinv.operators import make_operator, measure
from diffinv.solvers import DEFAULT_ZETA, sample, solve

logger = logging.getLogger("diffinv")

MODES = ("sample", "dps")
TASK = "deblur"
SIGMA_Y = 0.05


def make_run(prior, mode: str, batch: int, steps: int, dps_zeta: float | None):
    """Return a function that runs ``mode`` once on ``batch`` images."""
    if mode == "sample":
        return lambda: sample(prior, batch, steps=steps, seed=0)
    faces = load_faces("test").images
    truth = faces[torch.arange(batch) % len(faces)]
    operator = make_operator(TASK, prior.image_shape, batch)
    y = measure(operator, truth, SIGMA_Y, seed=0)
    return lambda: solve(prior, operator, y, "dps", steps=steps, zeta=dps_zeta, sigma_y=SIGMA_Y, seed=0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, "batch_scaling")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="batch sizes")
    parser.add_argument("--steps", type=int, default=10, help="respaced reverse steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size and mode")
    parser.add_argument("--dps-zeta", type=float, default=None,
                        help=f"DPS step size (default {DEFAULT_ZETA['dps']}; random weights need about 0.01)")
    args = parser.parse_args(argv)
    prior = start_run(args)
    load_before = load_record()
    results = []
    for mode in MODES:
        batch_one_seconds_per_image = None
        for batch in args.batches:
            run = make_run(prior, mode, batch, args.steps, args.dps_zeta)
            seconds = median(time_call(run, args.repeats, warmup=1))
            per_image = seconds / batch
            if batch_one_seconds_per_image is None and batch == 1:
                batch_one_seconds_per_image = per_image
            entry = {"mode": mode, "batch": batch, "steps": args.steps, "seconds": seconds,
                     "images_per_second": batch / seconds,
                     "per_image_speedup": (batch_one_seconds_per_image / per_image
                                           if batch_one_seconds_per_image else None)}
            logger.info("%-6s batch %3d  %7.2f s  %6.2f images/s", mode, batch, seconds, entry["images_per_second"])
            results.append(entry)
    load_after = load_record()

    payload = {
        "benchmark": "batch_scaling",
        "config": {"model": args.model, "modes": list(MODES), "task": TASK, "sigma_y": SIGMA_Y, "steps": args.steps,
                   "dps_zeta": args.dps_zeta if args.dps_zeta is not None else DEFAULT_ZETA["dps"], "seed": 0,
                   "dtype": "float32", "device": "cpu", "repeats": args.repeats, "threads": args.threads},
        **run_record(load_before, load_after),
        "results": results,
    }
    path = write_result(args.output, payload)
    logger.info("written to %s", path)
    return payload


if __name__ == "__main__":
    main()
