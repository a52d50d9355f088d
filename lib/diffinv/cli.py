"""The ``diffinv`` command: restore, evaluate, train and analyse from a shell.

Every subcommand checks its arguments before any long computation, logs its configuration
once and its summary at the end, and exits with status 1 and a one-line message (no
traceback) on bad input or a diverging run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__

logger = logging.getLogger("diffinv")


def add_solve_arguments(parser: argparse.ArgumentParser) -> None:
    from .operators import TASKS
    from .solvers import SOLVERS

    parser.add_argument("--model", default="gaussian",
                        help="prior: gaussian, empirical, embedded, a Hugging Face Hub id or a folder (default: gaussian)")
    parser.add_argument("--task", default="deblur", help=f"degradation, one of {', '.join(TASKS)} (default: deblur)")
    parser.add_argument("--solver", default="dps", help=f"solver, one of {', '.join(SOLVERS)} (default: dps)")
    parser.add_argument("--dataset", default="faces",
                        help="faces (embedded, 32 px), olivetti (64 px) or a folder of images (default: faces)")
    parser.add_argument("--images", type=int, default=4, help="number of held-out test images, from the first (default: 4)")
    parser.add_argument("--steps", type=int, default=100, help="reverse diffusion steps (default: 100)")
    parser.add_argument("--zeta", type=float, default=None,
                        help="correction step size; DPS in the squared-norm convention (default: per solver)")
    parser.add_argument("--t0", type=float, default=None,
                        help="SDEdit start time as a fraction of the schedule (default: 0.4)")
    parser.add_argument("--sigma-y", type=float, default=0.05,
                        help="measurement noise standard deviation on the [-1, 1] scale (default: 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the operator, the noise and the sampler (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffinv", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"diffinv {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only, no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    solve = commands.add_parser("solve", help="restore degraded test images and write metrics.json")
    add_solve_arguments(solve)
    solve.add_argument("--out", required=True, help="output folder for metrics.json and the images")

    evaluate = commands.add_parser("evaluate", help="run a grid of priors x tasks x solvers into one results table")
    evaluate.add_argument("--models", default="gaussian", help="comma-separated priors (default: gaussian)")
    evaluate.add_argument("--tasks", default="deblur,inpaint-box", help="comma-separated tasks (default: deblur,inpaint-box)")
    evaluate.add_argument("--solvers", default="sdedit,scoreald,dps",
                          help="comma-separated solvers; posterior-mean adds the Gaussian prior's exact posterior mean "
                               "(default: sdedit,scoreald,dps)")
    evaluate.add_argument("--baselines", default="", help="comma-separated classical baselines: wiener, tv (default: none)")
    evaluate.add_argument("--dataset", default="faces", help="faces, olivetti or a folder of images (default: faces)")
    evaluate.add_argument("--split", default="test", help="train, test or all (default: test; sweeps use train)")
    evaluate.add_argument("--images", type=int, default=None, help="first N images of the split (default: all)")
    evaluate.add_argument("--steps", type=int, default=100, help="reverse diffusion steps (default: 100)")
    evaluate.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    evaluate.add_argument("--sigma-y", type=float, default=0.05, help="measurement noise on the [-1, 1] scale (default: 0.05)")
    evaluate.add_argument("--chosen", default=None, help="chosen.json of a sweep: zeta or t0 per model/task/solver")
    evaluate.add_argument("--sweep", action="store_true", help="sweep --zetas and --t0s on training faces; write chosen.json")
    evaluate.add_argument("--zetas", default="0.25,0.5,1,2", help="zeta values of a sweep (default: 0.25,0.5,1,2)")
    evaluate.add_argument("--t0s", default="0.1,0.2,0.3,0.5", help="SDEdit start times of a sweep (default: 0.1,0.2,0.3,0.5)")
    evaluate.add_argument("--shard", default=None,
                          help="RANK/WORLD, e.g. 0/2, to run one share of the grid (default: torchrun's RANK and WORLD_SIZE)")
    evaluate.add_argument("--merge", action="store_true", help="only join the shards' rows files in --out")
    evaluate.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    evaluate.add_argument("--out", required=True, help="output folder for rows.json, rows.csv and summary.json")

    train = commands.add_parser("train", help="train a diffusers UNet on the embedded training faces")
    train.add_argument("--config", default=None, help="YAML training config (default: the shipped embedded.yaml)")
    train.add_argument("--out", required=True, help="output folder for checkpoints and the trained model")
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: the config's)")
    train.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    train.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")

    jacobian = commands.add_parser("jacobian", help="Jacobian columns, spectra and spectral radii of a prior")
    jacobian.add_argument("--model", default="gaussian", help="prior, as for solve (default: gaussian)")
    jacobian.add_argument("--image", type=int, default=2, help="dataset index of the face, 0-99 (default: 2, a test face)")
    jacobian.add_argument("--timesteps", default="50,200,500,800",
                          help="comma-separated timesteps (default: 50,200,500,800)")
    jacobian.add_argument("--k", type=int, default=8, help="number of singular values (default: 8)")
    jacobian.add_argument("--pixels", default=None,
                          help="comma-separated flat pixel indices to perturb (default: the image centre)")
    jacobian.add_argument("--out", required=True, help="output folder for jacobian.json and the images")
    bench = commands.add_parser("bench", help="run a script of the repository's benchmarks/ folder (writes JSON)")
    bench.add_argument("name", nargs="?", default=None, help="benchmark name, e.g. sampler_overhead (default: list them)")
    bench.add_argument("arguments", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script")
    return parser


def benchmarks_folder():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: diffinv bench runs the scripts of a source checkout's "
                                "benchmarks/ folder; install diffinv editable from a clone")
    return folder


def bench_command(args: argparse.Namespace) -> None:
    import subprocess

    folder = benchmarks_folder()
    scripts = sorted(path.stem for path in folder.glob("*.py") if path.stem != "common")
    if args.name is None:
        print("benchmarks: " + ", ".join(scripts))
        return
    if args.name not in scripts:
        raise ValueError(f"benchmark {args.name!r} is not valid, expected one of {', '.join(scripts)}")
    completed = subprocess.run([sys.executable, str(folder / f"{args.name}.py"), *args.arguments], cwd=folder.parent)
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark {args.name} failed with exit status {completed.returncode}")


def configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


def run(args: argparse.Namespace) -> None:
    if args.command == "solve":
        from .evaluation import solve_command

        solve_command(args)
    elif args.command == "evaluate":
        evaluate_command(args)
    elif args.command == "train":
        from importlib import resources

        from .train import train

        config = args.config or str(resources.files("diffinv") / "configs" / "embedded.yaml")
        train(config, args.out, resume=not args.no_resume, max_steps=args.max_steps, device=args.device)
    elif args.command == "bench":
        bench_command(args)
    elif args.command == "jacobian":
        from .analysis import run_jacobian

        timesteps = [int(value) for value in args.timesteps.split(",")]
        pixels = None if args.pixels is None else [int(value) for value in args.pixels.split(",")]
        run_jacobian(args.model, args.image, timesteps, args.k, pixels, args.out)


def split_list(text: str, convert=str) -> list:
    try:
        return [convert(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise ValueError(f"{text!r} is not a comma-separated list of numbers") from error


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        rank, world = (int(part) for part in text.split("/"))
    except ValueError as error:
        raise ValueError(f"shard {text!r} is not valid, expected RANK/WORLD such as 0/2") from error
    return rank, world


def evaluate_command(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from . import grid

    if args.merge:
        grid.merge(args.out)
        return
    models, tasks, solvers = split_list(args.models), split_list(args.tasks), split_list(args.solvers)
    if args.sweep:
        values = {"sdedit": split_list(args.t0s, float), "scoreald": split_list(args.zetas, float),
                  "dps": split_list(args.zetas, float)}
        rows = grid.sweep(models, tasks, solvers, {name: values[name] for name in solvers if name in values},
                          args.out, images=args.images or 4, steps=args.steps, seed=split_list(args.seeds, int)[0],
                          sigma_y=args.sigma_y, dataset=args.dataset, device=args.device, progress=not args.quiet)
        chosen = {"/".join(key): value for key, value in grid.choose(rows).items()}
        grid.write_json(Path(args.out) / "chosen.json", chosen)
        logger.info("diffinv evaluate: chosen on training faces: %s", json.dumps(chosen))
        return
    chosen = None
    if args.chosen:
        chosen = {tuple(key.split("/")): value for key, value in json.loads(Path(args.chosen).read_text()).items()}
    grid.evaluate(models, tasks, solvers, args.out, baselines=split_list(args.baselines), split=args.split,
                  images=args.images, steps=args.steps, seeds=split_list(args.seeds, int), sigma_y=args.sigma_y,
                  chosen=chosen, dataset=args.dataset, shard=parse_shard(args.shard), device=args.device,
                  progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.quiet)
    try:
        run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # Bad input and diverging runs end here: a message for the user, not a traceback.
        print(f"diffinv {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"diffinv {args.command}: interrupted; finished batches are saved", file=sys.stderr)
        return 130
    return 0
