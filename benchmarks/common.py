"""Helpers shared by the benchmark scripts: the machine record, timing, the prior and JSON output.

:class:`NetworkTimer` times the UNet's calls inside a solver run, so that a run's overhead
(its seconds outside the network) can be measured under the same load as its network calls.

Every result file carries :func:`machine_record` and a :func:`load_record` from before and
after the run, because the load average shows whether other processes shared the CPU while
the timings were taken.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from diffinv.evaluation import library_versions
from diffinv.models import DiffusersPrior, Prior, default_schedule, load_prior
from diffinv.schedule import Schedule

RESULTS = Path(__file__).resolve().parent / "results"
EMBEDDED_CONFIG = Path(__file__).resolve().parents[1] / "lib" / "diffinv" / "configs" / "embedded.yaml"
# "random" builds the embedded architecture with freshly initialised weights, for timing only.
RANDOM_MODEL = "random"


def cpu_name() -> str:
    """Return the CPU model name from /proc/cpuinfo, or platform.processor() where that file is missing."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_record() -> dict:
    """Return the hardware, library versions and thread count that every result file records."""
    return {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "machine": platform.machine(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "versions": library_versions()}


def load_record() -> dict:
    """Return the 1, 5 and 15 minute load averages and the time, to bracket a run."""
    one, five, fifteen = os.getloadavg()
    return {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_1min": round(one, 2), "load_5min": round(five, 2), "load_15min": round(fifteen, 2)}


def sharing_note(before: dict, after: dict) -> str:
    """Say whether the load averages show other processes competing for the CPU during the run."""
    cores = os.cpu_count() or 1
    highest = max(before["load_1min"], after["load_1min"])
    if highest > cores:
        return (f"shared: the 1-minute load average reached {highest:g} on {cores} logical cores, so other "
                "processes competed for the CPU and wall times are longer than on an idle machine")
    return f"not shared beyond the cores: the 1-minute load average stayed at or below {highest:g} on {cores} cores"


def run_record(load_before: dict, load_after: dict) -> dict:
    """Return the fields every result file records about where it ran: machine, loads and sharing."""
    return {"machine": machine_record(), "load_before": load_before, "load_after": load_after,
            "sharing": sharing_note(load_before, load_after)}


def add_run_arguments(parser: argparse.ArgumentParser, output: str) -> None:
    """Add the options that every timing script shares: ``--model``, ``--threads`` and ``--output``."""
    parser.add_argument("--model", default="embedded",
                        help="prior to time: embedded, random (its architecture, untrained), a folder or a hub id")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, fixed for the whole run")
    parser.add_argument("--output", default=output, help="result name in benchmarks/results/")


def start_run(args: argparse.Namespace) -> Prior:
    """Set up logging and the thread count from ``args``, then return the prior named by ``args.model``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_threads(args.threads)
    return build_prior(args.model)


def build_prior(model: str) -> Prior:
    """Load ``model`` with :func:`diffinv.models.load_prior`, or build the embedded architecture with random weights."""
    if model != RANDOM_MODEL:
        return load_prior(model)
    from diffusers import UNet2DModel

    config = yaml.safe_load(EMBEDDED_CONFIG.read_text())
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    unet = UNet2DModel(**config["model"])
    torch.random.set_rng_state(generator_state)
    schedule = Schedule.from_diffusers(config["scheduler"]) if "scheduler" in config else default_schedule()
    return DiffusersPrior(unet, schedule, source=RANDOM_MODEL)


def time_call(function, repeats: int, warmup: int = 1) -> list[float]:
    """Return the wall seconds of ``repeats`` calls of ``function`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        function()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return seconds


def median(values) -> float:
    return float(statistics.median(values))


def set_threads(threads: int) -> None:
    if threads < 1:
        raise ValueError(f"threads = {threads}, expected a positive number of CPU threads")
    torch.set_num_threads(threads)


class BackwardMark(torch.autograd.Function):
    """Identity whose backward appends the time it runs to ``log``: it marks where a backward pass reaches it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, log: list) -> torch.Tensor:
        ctx.log = log
        return x.view_as(x)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        ctx.log.append(time.perf_counter())
        return gradient, None


class NetworkTimer(torch.nn.Module):
    """Wraps the UNet and adds up the wall seconds of its forward passes and of the backward passes through it.

    Under autograd the UNet's output and input pass through a :class:`BackwardMark`. The
    backward pass reaches the output mark before any node of the UNet and the input mark
    after all of them, so the interval between the two is the backward through the UNet.
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.forward_seconds = 0.0
        self.backward_starts: list[float] = []
        self.backward_ends: list[float] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        if x_t.requires_grad:
            x_t = BackwardMark.apply(x_t, self.backward_ends)
        started = time.perf_counter()
        output = self.unet(x_t, t).sample
        self.forward_seconds += time.perf_counter() - started
        if output.requires_grad:
            output = BackwardMark.apply(output, self.backward_starts)
        return SimpleNamespace(sample=output)

    @property
    def seconds(self) -> float:
        backward = sum(end - start for start, end in zip(self.backward_starts, self.backward_ends, strict=True))
        return self.forward_seconds + backward


@contextmanager
def swapped_network(prior, network: torch.nn.Module):
    """Put ``network`` in place of ``prior.unet`` inside the block."""
    unet = prior.unet
    prior.unet = network
    try:
        yield network
    finally:
        prior.unet = unet


def write_result(name: str, payload: dict) -> Path:
    """Write ``payload`` to ``benchmarks/results/NAME.json`` and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
