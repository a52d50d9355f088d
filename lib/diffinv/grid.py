"""Evaluation grids: priors x tasks x solvers (and baselines) over images and seeds.

``evaluate`` writes one row per image and configuration to ``rows.json`` and ``rows.csv``,
rewritten atomically after every finished configuration, so a run that is killed and
started again skips what it finished and ends with exactly the rows of an uninterrupted
run. Configurations can be split across processes (``shard``, or the ``RANK`` and
``WORLD_SIZE`` variables that ``torchrun`` sets); each shard writes its own rows file and
:func:`merge` joins them.

``sweep`` runs the same grid over step sizes (or SDEdit start times) on training faces
and :func:`choose` picks, per prior, task and solver, the value with the best mean PSNR.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .baselines import BASELINES, restore
from .data import load_dataset
from .evaluation import library_versions, load_prior_for, pick_device, write_atomic, write_json
from .metrics import all_metrics, summarize
from .models import GaussianPrior
from .operators import TASKS, make_operator, measure
from .solvers import DEFAULT_T0, DEFAULT_ZETA, SOLVERS, DivergenceError, solve

logger = logging.getLogger("diffinv")

METRICS = ("psnr", "ssim", "lpips")
POSTERIOR_MEAN = "posterior-mean"
# Baselines use no prior; their rows carry this in the model column.
NO_PRIOR = "none"
ROW_FIELDS = ("model", "task", "solver", "zeta", "t0", "steps", "sigma_y", "seed", "split", "index",
              *METRICS, "seconds")


@dataclass(frozen=True)
class Job:
    """One configuration of the grid: a prior, a task, a solver and its step size or start time."""

    model: str
    task: str
    solver: str
    zeta: float | None = None
    t0: float | None = None


def row_key(row: dict) -> tuple:
    return tuple(row[name] for name in ROW_FIELDS[:10])


def plan_jobs(models, tasks, solvers, baselines=(), chosen: dict | None = None) -> list[Job]:
    """List the grid's configurations in a fixed order; ``chosen[(model, task, solver)]`` sets zeta or t0."""
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not valid, expected one of {', '.join(TASKS)}")
    for solver in solvers:
        if solver not in SOLVERS + (POSTERIOR_MEAN,):
            raise ValueError(f"solver {solver!r} is not valid, expected one of {', '.join(SOLVERS + (POSTERIOR_MEAN,))}")
    for baseline in baselines:
        if baseline not in BASELINES:
            raise ValueError(f"baseline {baseline!r} is not valid, expected one of {', '.join(BASELINES)}")
    chosen = chosen or {}
    jobs = [Job(NO_PRIOR, task, baseline) for task in tasks for baseline in baselines]
    for model in models:
        for task in tasks:
            for solver in solvers:
                if solver == POSTERIOR_MEAN and model != "gaussian":
                    continue
                value = chosen.get((model, task, solver))
                if solver == "sdedit":
                    jobs.append(Job(model, task, solver, t0=value if value is not None else DEFAULT_T0))
                elif solver in DEFAULT_ZETA:
                    jobs.append(Job(model, task, solver, zeta=value if value is not None else DEFAULT_ZETA[solver]))
                else:
                    jobs.append(Job(model, task, solver))
    return jobs


class PriorCache:
    """Loads each prior once per process."""

    def __init__(self, dataset: str, device: str | torch.device | None):
        self.dataset, self.device, self.priors = dataset, pick_device(device), {}

    def __call__(self, model: str):
        if model not in self.priors:
            self.priors[model] = load_prior_for(model, self.dataset, self.device)
        return self.priors[model]


def restore_job(job: Job, prior, operator, y, steps: int, sigma_y: float, seed: int) -> torch.Tensor:
    if job.solver in BASELINES:
        return restore(job.solver, y, operator, sigma_y)
    if job.solver == POSTERIOR_MEAN:
        if not isinstance(prior, GaussianPrior):
            raise ValueError(f"the exact posterior mean needs the Gaussian prior, not {job.model!r}")
        return prior.posterior_mean(operator, y, sigma_y)
    return solve(prior, operator, y, job.solver, steps=steps, zeta=job.zeta, sigma_y=sigma_y,
                 t0=job.t0 if job.t0 is not None else DEFAULT_T0, seed=seed).x0


def run_job(job: Job, priors: PriorCache, faces, split: str, steps: int, sigma_y: float, seed: int) -> list[dict]:
    """Restore every image of ``faces`` under ``job`` and return one row per image."""
    prior = None if job.model == NO_PRIOR else priors(job.model)
    truth = faces.images.to(priors.device)
    operator = make_operator(job.task, tuple(truth.shape[1:]), len(truth), seed=seed).to(priors.device)
    y = measure(operator, truth, sigma_y, seed)
    started = time.perf_counter()
    try:
        restored = restore_job(job, prior, operator, y, steps, sigma_y, seed)
        values = {name: tensor.tolist() for name, tensor in all_metrics(restored, truth).items()}
    except DivergenceError as error:
        # A sweep expects some step sizes to diverge, so a diverged job is a result, not a failed run.
        # Its rows get NaN metrics, which summaries carry and choose() skips.
        logger.warning("diffinv evaluate: %s diverged, so its rows get NaN metrics: %s", job, error)
        values = {name: [math.nan] * len(truth) for name in METRICS}
    seconds = (time.perf_counter() - started) / len(truth)
    uses_steps = job.solver in SOLVERS
    return [{"model": job.model, "task": job.task, "solver": job.solver, "zeta": job.zeta, "t0": job.t0,
             "steps": steps if uses_steps else None, "sigma_y": sigma_y, "seed": seed, "split": split,
             "index": index, **{name: values[name][i] for name in METRICS}, "seconds": seconds}
            for i, index in enumerate(faces.indices)]


def write_rows(path: Path, rows: list[dict], config: dict) -> None:
    """Write ``rows`` as JSON (with the configuration) and CSV, each atomically."""
    write_json(path.with_suffix(".json"), {"config": config, "rows": rows})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path.with_suffix(".csv"), lambda name: Path(name).write_text(buffer.getvalue()))


def read_rows(path: Path) -> list[dict]:
    path = path.with_suffix(".json")
    return json.loads(path.read_text())["rows"] if path.exists() else []


def shard_from_environment() -> tuple[int, int]:
    """Return (rank, world size) from ``torchrun``'s variables, or (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rows_path(out: Path, shard: tuple[int, int]) -> Path:
    rank, world = shard
    return out / ("rows" if world == 1 else f"rows-shard{rank}-of-{world}")


def evaluate(models=("gaussian",), tasks=("deblur",), solvers=SOLVERS, out: str | Path = "runs/evaluate", *,
             baselines=(), split: str = "test", images: int | None = None, steps: int = 100, seeds=(0,),
             sigma_y: float = 0.05, chosen: dict | None = None, dataset: str = "faces",
             shard: tuple[int, int] | None = None, device: str | None = None, progress: bool = True,
             priors: PriorCache | None = None) -> list[dict]:
    """Run the grid and return its rows (this shard's only, when sharded).

    ``priors`` lets several calls share the priors they load (as :func:`sweep` does); it
    must be for the same dataset and device.
    """
    jobs = plan_jobs(models, tasks, solvers, baselines, chosen)
    if steps < 1:
        raise ValueError(f"steps = {steps}, expected a positive number of reverse steps")
    if sigma_y <= 0:
        raise ValueError(f"sigma_y = {sigma_y}, expected a positive noise level")
    rank, world = shard or shard_from_environment()
    if not 0 <= rank < world:
        raise ValueError(f"shard {rank} of {world} is not valid, expected 0 <= shard < {world}")
    faces = load_dataset(dataset, split)
    faces = faces.take(images) if images is not None else faces
    out = Path(out)
    path = rows_path(out, (rank, world))
    config = {"models": list(models), "tasks": list(tasks), "solvers": list(solvers), "baselines": list(baselines),
              "split": split, "dataset": dataset, "images": len(faces), "steps": steps, "seeds": list(seeds),
              "sigma_y": sigma_y, "shard": [rank, world], "device": str(pick_device(device)),
              "chosen": {"/".join(key): value for key, value in (chosen or {}).items()},
              "versions": library_versions()}
    logger.info("diffinv evaluate: %s", json.dumps(config))

    rows = read_rows(path)
    done = {row_key(row) for row in rows}
    if priors is None:
        priors = PriorCache(dataset, device)
    elif (priors.dataset, priors.device) != (dataset, pick_device(device)):
        raise ValueError(f"priors were loaded for dataset {priors.dataset!r} on {priors.device}, "
                         f"expected dataset {dataset!r} on {pick_device(device)}")
    work = [(job, seed) for job in jobs[rank::world] for seed in seeds]
    requested = set()
    for job, seed in tqdm(work, desc="evaluate", disable=not progress):
        expected = [row_key({**asdict(job), "steps": steps if job.solver in SOLVERS else None, "sigma_y": sigma_y,
                             "seed": seed, "split": split, "index": index}) for index in faces.indices]
        requested.update(expected)
        if all(key in done for key in expected):
            continue
        new_rows = run_job(job, priors, faces, split, steps, sigma_y, seed)
        rows = [row for row in rows if row_key(row) not in set(expected)] + new_rows
        done.update(expected)
        write_rows(path, rows, config)

    # The rows file also keeps rows of earlier runs with other settings, so keep only this grid's rows.
    rows = [row for row in rows if row_key(row) in requested]
    table = summary_table(rows)
    write_json(out / ("summary.json" if world == 1 else f"summary-shard{rank}-of-{world}.json"), table)
    logger.info("diffinv evaluate: %d rows in %s\n%s", len(rows), path.with_suffix(".json"), format_table(table))
    return rows


def merge(out: str | Path) -> list[dict]:
    """Join the shards' rows files in ``out`` into ``rows.json`` and ``rows.csv``, rejecting duplicates."""
    out = Path(out)
    parts = sorted(out.glob("rows-shard*-of-*.json"))
    if not parts:
        raise FileNotFoundError(f"no shard rows files (rows-shardI-of-N.json) found in {out}")
    rows, config = [], None
    for part in parts:
        content = json.loads(part.read_text())
        config = config or {**content["config"], "shard": None}
        rows.extend(content["rows"])
    keys = [row_key(row) for row in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"the shards in {out} share rows; run each shard with its own rank")
    order = {(job.model, job.task, job.solver): i for i, job in enumerate(
        plan_jobs(config["models"], config["tasks"], config["solvers"], config["baselines"]))}
    rows.sort(key=lambda row: (order.get((row["model"], row["task"], row["solver"]), len(order)),
                               str(row["zeta"]), str(row["t0"]), row["seed"], row["index"]))
    write_rows(out / "rows", rows, config)
    write_json(out / "summary.json", summary_table(rows))
    return rows


def summary_table(rows: list[dict]) -> list[dict]:
    """Group rows by configuration and return the count, mean and 95% interval of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["task"], row["solver"], row["zeta"], row["t0"], row["steps"]), []).append(row)
    table = []
    for (model, task, solver, zeta, t0, steps), members in groups.items():
        entry = {"model": model, "task": task, "solver": solver, "zeta": zeta, "t0": t0, "steps": steps,
                 "count": len(members)}
        for name in METRICS:
            entry[name] = summarize([row[name] for row in members])
        table.append(entry)
    return table


def format_table(table: list[dict]) -> str:
    lines = [f"{'model':<10} {'task':<15} {'solver':<15} {'n':>3}  " + "  ".join(f"{name:>22}" for name in METRICS)]
    for entry in table:
        cells = "  ".join(f"{entry[name]['mean']:7.3f} [{entry[name]['low']:6.3f},{entry[name]['high']:6.3f}]"
                          for name in METRICS)
        lines.append(f"{entry['model']:<10} {entry['task']:<15} {entry['solver']:<15} {entry['count']:>3}  {cells}")
    return "\n".join(lines)


def sweep(models, tasks, solvers, values: dict[str, list[float]], out: str | Path, *, images: int = 4,
          steps: int = 50, seed: int = 0, sigma_y: float = 0.05, dataset: str = "faces", device: str | None = None,
          progress: bool = True) -> list[dict]:
    """Run each solver over its list of zeta (or, for SDEdit, t0) values on training faces."""
    rows = []
    priors = PriorCache(dataset, device)
    for solver in solvers:
        if solver not in values or not values[solver]:
            raise ValueError(f"no sweep values given for solver {solver!r}")
        parameter = "t0" if solver == "sdedit" else "zeta"
        chosen_values = [{(model, task, solver): value for model in models for task in tasks}
                         for value in values[solver]]
        for chosen in chosen_values:
            label = next(iter(chosen.values()))
            rows += evaluate(models, tasks, (solver,), Path(out) / f"{solver}-{parameter}-{label:g}", split="train",
                             images=images, steps=steps, seeds=(seed,), sigma_y=sigma_y, chosen=chosen,
                             dataset=dataset, shard=(0, 1), device=device, progress=progress, priors=priors)
    return rows


def choose(rows: list[dict], metric: str = "psnr") -> dict[tuple[str, str, str], float]:
    """Return, per (model, task, solver), the zeta or t0 with the best mean ``metric`` (higher PSNR/SSIM, lower LPIPS).

    Values whose runs diverged (NaN metrics) are skipped; a configuration where every value diverged is left out.
    """
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not valid, expected one of {', '.join(METRICS)}")
    sign = -1 if metric == "lpips" else 1
    best: dict[tuple, tuple[float, float]] = {}
    for entry in summary_table(rows):
        key = (entry["model"], entry["task"], entry["solver"])
        value = entry["t0"] if entry["solver"] == "sdedit" else entry["zeta"]
        score = sign * entry[metric]["mean"]
        if math.isnan(score):  # a diverged configuration
            continue
        if key not in best or score > best[key][0]:
            best[key] = (score, value)
    return {key: value for key, (_, value) in best.items()}
