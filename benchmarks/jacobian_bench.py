"""Measure the matrix-free Jacobian spectra against the exact ones, and their cost at full size.

Two parts, each run in its own process so that its peak memory is its own, written together
to ``benchmarks/results/jacobian.json``:

1. ``embedded``: on the embedded 32x32 model (D = 1024), the full Jacobian of the score at
   one held-out face (1024 jvps) gives exact top-16 singular values of ``J_s``, and, through
   ``J_D = (I + (1 - abar_t) J_s) / sqrt(abar_t)`` and
   ``J_f = (I + (1 - alpha_t) J_s) / sqrt(alpha_t)``, of ``J_D`` and ``J_f``. Each matrix-free
   configuration (all but one within 102 passes, a tenth of the full Jacobian's) is compared
   with them: maximum relative error over the top 16, network passes, wall and CPU time. If the trained
   weights are missing, a UNet of the same configuration with random weights is used instead,
   and the JSON says so.
2. ``scale``: a 256x256x3 diffusers UNet with random weights and the block layout of
   google/ddpm-celebahq-256 (built from a dict, nothing downloaded): the top 2 singular
   values of ``J_s`` by block Lanczos, with the peak resident memory (``ru_maxrss``) and time.
   No Jacobian is formed.

Each part also records its CPU seconds and the 1, 5 and 15 minute load averages at its end,
because other jobs on a shared machine inflate wall times.

Run: ``nice python benchmarks/jacobian_bench.py [--part all|embedded|scale]``. On a 2-core
CPU the embedded part took 5 minutes on an idle machine and 25 to 45 under a load average of
6 to 12; the scale part took 9 minutes at load average 6.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffinv import analysis
from diffinv.data import TEST_INDICES, load_faces
from diffinv.models import DiffusersPrior, default_schedule, embedded_model_folder, load_prior

RESULTS = Path(__file__).resolve().parent / "results"
EMBEDDED_CONFIG = Path(__file__).resolve().parents[1] / "lib" / "diffinv" / "configs" / "embedded.yaml"
K = 16
MAX_PASSES = 102
TIMESTEPS = (100, 500)
SEED = 0
# (method, iterations, block_size or oversample). All but the last use at most MAX_PASSES
# passes; the last (240 passes) shows how the error falls beyond that budget.
CONFIGURATIONS = (
    ("lanczos", 3, 16),
    ("lanczos", 6, 8),
    ("lanczos", 13, 4),
    ("lanczos", 26, 2),
    ("lanczos", 51, 1),
    ("subspace", 1, 8),
    ("lanczos", 8, 16),
)
# The block layout of google/ddpm-celebahq-256: six levels, two ResNet layers each, attention
# at 16x16. Other arguments keep their diffusers defaults, which may differ from the published
# model in constants such as the attention head size.
CELEBAHQ_256 = {
    "sample_size": 256, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
}

def hardware() -> dict:
    return {"machine": platform.machine(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_seconds() -> float:
    """Return this process's user plus system CPU time, which other jobs on a shared machine do not inflate."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_memory_mib() -> float:
    """Return this process's peak resident memory in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def embedded_prior() -> tuple[DiffusersPrior, str]:
    """Return the trained embedded prior, or an untrained one of the same configuration."""
    if (embedded_model_folder() / "unet" / "config.json").exists():
        return load_prior("embedded"), "trained embedded model"
    from diffinv.train import build_unet, load_config

    torch.manual_seed(SEED)
    return DiffusersPrior(build_unet(load_config(EMBEDDED_CONFIG)), default_schedule()), \
        "random weights (the embedded model was not trained yet)"


def exact_spectra(prior, x_t: torch.Tensor, t: int) -> tuple[dict[str, torch.Tensor], float]:
    """Return the full singular spectra of J_s, J_D, J_f from one full Jacobian, and its seconds."""
    start, cpu_start = time.perf_counter(), cpu_seconds()
    score = analysis.full_jacobian(analysis.score_map(prior, t), x_t).double()
    seconds = {"wall": time.perf_counter() - start, "cpu": cpu_seconds() - cpu_start}
    identity = torch.eye(len(score), dtype=torch.float64)
    abar_t = float(prior.schedule.abar[t])
    alpha_t = float(prior.schedule.alphas[t])
    jacobians = {
        "score": score,
        "denoiser": (identity + (1 - abar_t) * score) / math.sqrt(abar_t),
        "reverse": (identity + (1 - alpha_t) * score) / math.sqrt(alpha_t),
    }
    return {name: torch.linalg.svdvals(matrix) for name, matrix in jacobians.items()}, seconds


def run_embedded() -> dict:
    prior, weights = embedded_prior()
    index = TEST_INDICES[0]
    faces = load_faces("test")
    x0 = faces.images[faces.indices.index(index)][None]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(SEED))
    rows = []
    for t in TIMESTEPS:
        x_t = analysis.noisy_image(prior, x0, t, noise)
        exact, full_seconds = exact_spectra(prior, x_t, t)
        row = {"t": t, "full_jacobian": {"passes": {"jvp": x_t.numel(), "vjp": 0}, "seconds": full_seconds},
               "exact_top": {name: values[:K].tolist() for name, values in exact.items()}, "matrix_free": []}
        for name in analysis.MAPS:
            fn = analysis.make_map(prior, name, t)
            for method, iterations, size in CONFIGURATIONS:
                options = {"block_size": size} if method == "lanczos" else {"oversample": size}
                start, cpu_start = time.perf_counter(), cpu_seconds()
                triplets = analysis.top_singular(fn, x_t, K, iterations, method, SEED, **options)
                seconds = {"wall": time.perf_counter() - start, "cpu": cpu_seconds() - cpu_start}
                error = (triplets.values.double() - exact[name][:K]).abs() / exact[name][:K]
                row["matrix_free"].append({
                    "map": name, "method": method, "iterations": iterations, **options,
                    "passes": triplets.passes, "total_passes": sum(triplets.passes.values()),
                    "within_budget": sum(triplets.passes.values()) <= MAX_PASSES,
                    "seconds": seconds, "max_relative_error": float(error.max()),
                    "median_relative_error": float(error.median()), "values": triplets.values.tolist()})
                print(f"t={t} {name:8s} {method:8s} it={iterations:2d} size={size:2d} "
                      f"passes={sum(triplets.passes.values()):3d} max rel err={float(error.max()):.2e} "
                      f"{seconds['wall']:.1f}s", file=sys.stderr, flush=True)
        rows.append(row)
    return {"model": weights, "image_index": index, "k": K, "max_passes": MAX_PASSES, "seed": SEED,
            "timesteps": rows, "peak_memory_mib": peak_memory_mib(), "load_average": os.getloadavg()}


def run_scale(iterations: int) -> dict:
    from diffusers import UNet2DModel

    torch.manual_seed(SEED)
    unet = UNet2DModel(**CELEBAHQ_256)
    prior = DiffusersPrior(unet, default_schedule())
    parameters = sum(parameter.numel() for parameter in unet.parameters())
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(SEED))
    t = 500
    memory_before = peak_memory_mib()

    start, cpu_start = time.perf_counter(), cpu_seconds()
    with torch.no_grad():
        prior.score(x, t)
    forward_seconds = {"wall": time.perf_counter() - start, "cpu": cpu_seconds() - cpu_start}

    start, cpu_start = time.perf_counter(), cpu_seconds()
    triplets = analysis.top_singular(analysis.score_map(prior, t), x, 2, iterations, "lanczos",
                                     SEED, block_size=2, chunk_size=1)
    seconds = {"wall": time.perf_counter() - start, "cpu": cpu_seconds() - cpu_start}
    return {"model": "UNet2DModel, block layout of google/ddpm-celebahq-256, random weights",
            "parameters": parameters, "image_shape": [3, 256, 256], "D": x.numel(), "t": t, "k": 2,
            "method": "lanczos", "iterations": iterations, "block_size": 2, "chunk_size": 1,
            "passes": triplets.passes, "values": triplets.values.tolist(), "seconds": seconds,
            "forward_seconds": forward_seconds, "peak_memory_mib_after_load": memory_before,
            "peak_memory_mib": peak_memory_mib(), "load_average": os.getloadavg()}


def run_part_in_subprocess(part: str, iterations: int) -> dict:
    """Run one part in a fresh interpreter, so that its ru_maxrss is its own, and return its JSON."""
    output = subprocess.run([sys.executable, __file__, "--part", part, "--iterations", str(iterations), "--stdout"],
                            check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "embedded", "scale"), default="all")
    parser.add_argument("--iterations", type=int, default=3, help="block Lanczos steps of the scale part")
    parser.add_argument("--stdout", action="store_true", help="print the part's JSON instead of writing it")
    parser.add_argument("--out", type=Path, default=RESULTS / "jacobian.json")
    args = parser.parse_args(argv)

    if args.stdout:
        result = run_embedded() if args.part == "embedded" else run_scale(args.iterations)
        print(json.dumps(result))
        return

    parts = ("embedded", "scale") if args.part == "all" else (args.part,)
    results = {part: run_part_in_subprocess(part, args.iterations) for part in parts}
    # Read the file only now, so a part measured by another run meanwhile is kept.
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    for part, result in results.items():
        result["command"] = f"nice python benchmarks/jacobian_bench.py --part {part}"
    report.update(results)
    report["hardware"] = hardware()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_name(args.out.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temporary, args.out)


if __name__ == "__main__":
    main()
