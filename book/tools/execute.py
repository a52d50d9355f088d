#!/usr/bin/env python
"""Execute the book's chapters with papermill under one parameter profile.

The chapters are the ``notebooks/_executed/NAME`` entries of ``_toc.yml``. For each one,
``notebooks/NAME.md`` (a jupytext MyST notebook) is converted to ipynb and run by papermill
on the ``python3`` kernel, in ``notebooks/``, with the parameters that
``notebooks/profiles/PROFILE.yaml`` gives ``NAME``. The executed notebook replaces
``notebooks/_executed/NAME.ipynb`` only if every cell ran and no cell printed an error or a
traceback to stderr. A failed run is kept in ``_build/papermill/`` for inspection.
Execution times are printed and written to ``_build/execution_times.json``.

Exit status: 0 when every chapter ran, 1 when any failed, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import papermill
import yaml

# The kernels inherit this. Intra-op threads on 32 px tensors buy little, and on a shared CPU
# two threads per kernel made chapters run 5 to 10 times slower than one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
EXECUTED = NOTEBOOKS / "_executed"
STAGING = ROOT / "_build" / "papermill"
TIMES_FILE = ROOT / "_build" / "execution_times.json"
KERNEL = "python3"
EXECUTED_PREFIX = "notebooks/_executed/"

# An error or traceback printed to stderr: a traceback header, an exception name at the start
# of a line (``ValueError: ...``), or a logging ERROR record.
STDERR_ERROR = re.compile(
    r"Traceback \(most recent call last\)|^\s*[\w.]*(?:Error|Exception)\b|\bERROR\b|\berror:", re.MULTILINE
)


class ChapterFailed(RuntimeError):
    """A chapter raised in a cell, printed an error to stderr, or has an invalid profile."""


def toc_chapters(toc_path: Path = ROOT / "_toc.yml") -> list[str]:
    """Return the chapter names (``01_question``) of the executed-notebook entries of the table of contents."""
    names = []

    def walk(node):
        if isinstance(node, dict):
            entry = node.get("file")
            if isinstance(entry, str) and entry.startswith(EXECUTED_PREFIX):
                names.append(entry[len(EXECUTED_PREFIX):].removesuffix(".ipynb"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(toc_path.read_text()))
    return names


def load_profile(profile: str) -> dict[str, dict]:
    """Return ``{chapter: parameters}`` from ``notebooks/profiles/PROFILE.yaml``."""
    path = NOTEBOOKS / "profiles" / f"{profile}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in (NOTEBOOKS / "profiles").glob("*.yaml"))
        raise ChapterFailed(f"profile {profile!r} not found at {path}, expected one of {', '.join(available)}")
    content = yaml.safe_load(path.read_text()) or {}
    if not isinstance(content, dict) or not all(isinstance(v, dict) for v in content.values()):
        raise ChapterFailed(f"{path} must map each chapter name to a mapping of parameters")
    return content


def stderr_errors(notebook) -> list[str]:
    """Return ``"cell N: line"`` for each error output and each stderr stream that reports an error."""
    problems = []
    for number, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"cell {number}: {output.get('ename')}: {output.get('evalue')}")
            elif output.get("output_type") == "stream" and output.get("name") == "stderr":
                match = STDERR_ERROR.search(output.get("text", ""))
                if match:
                    line = output["text"][match.start():].splitlines()[0]
                    problems.append(f"cell {number} printed to stderr: {line[:200]}")
    return problems


def finish_notebook(notebook, profile: str) -> None:
    """Drop the saved widget state and name the profile in papermill's injected parameter cell.

    The rendered book shows static sliders in place of live widgets, and saved widget state
    would make myst-nb load the widget manager from a CDN.
    """
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.source = re.sub(r"^# Parameters\n", f"# Parameters of the {profile} profile\n", cell.source)


def write_atomically(notebook, path: Path) -> None:
    """Write ``notebook`` to ``path`` through a temporary file, so a reader never sees half a notebook."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    nbformat.write(notebook, partial)
    os.replace(partial, path)


def execute_chapter(name: str, parameters: dict, profile: str, timeout: int | None) -> float:
    """Run one chapter and write its executed notebook; return the execution time in seconds."""
    source = NOTEBOOKS / f"{name}.md"
    if not source.exists():
        raise ChapterFailed(f"{name}: source {source} not found")
    STAGING.mkdir(parents=True, exist_ok=True)
    unexecuted = STAGING / f"{name}.input.ipynb"
    jupytext.write(jupytext.read(source), unexecuted)

    known = papermill.inspect_notebook(str(unexecuted))
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ChapterFailed(f"{name}: profile {profile!r} sets {', '.join(unknown)}, which the parameters cell "
                            f"does not define (it defines {', '.join(known) or 'nothing'})")

    executed = STAGING / f"{name}.ipynb"
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(unexecuted), str(executed), parameters=parameters, kernel_name=KERNEL,
                                   cwd=str(NOTEBOOKS), progress_bar=False, execution_timeout=timeout)
    except papermill.PapermillExecutionError as error:
        raise ChapterFailed(f"{name}: cell {error.exec_count} raised {error.ename}: {error.evalue}\n"
                            f"  the partly executed notebook is {executed}") from error
    seconds = time.perf_counter() - start

    notebook = nbformat.read(executed, as_version=4)
    problems = stderr_errors(notebook)
    if problems:
        raise ChapterFailed(f"{name}: " + "; ".join(problems) + f"\n  the executed notebook is {executed}")
    finish_notebook(notebook, profile)
    write_atomically(notebook, EXECUTED / f"{name}.ipynb")
    return seconds


def check_kernel() -> None:
    """Exit unless the ``python3`` kernel runs this interpreter's environment, where diffinv is installed."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    fix = f"register it with: {sys.executable} -m ipykernel install --sys-prefix --name {KERNEL}"
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        sys.exit(f"execute: no {KERNEL!r} Jupyter kernel found; {fix}")
    # jupyter_client runs a bare "python" (as in ipykernel's own kernel.json) with sys.executable.
    bare_names = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    kernel_python = sys.executable if spec.argv[0] in bare_names else spec.argv[0]
    try:
        kernel_prefix = subprocess.run([kernel_python, "-c", "import sys; print(sys.prefix)"],
                                       capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as error:
        sys.exit(f"execute: the {KERNEL!r} kernel's interpreter {kernel_python} does not run ({error}); {fix}")
    if os.path.abspath(kernel_prefix) != os.path.abspath(sys.prefix):
        sys.exit(f"execute: the {KERNEL!r} kernel runs {kernel_prefix}, not this environment {sys.prefix}; {fix}")


def record_times(times: dict[str, dict], profile: str) -> None:
    """Merge this run's chapter times into the JSON file, keeping other chapters of the same profile."""
    previous = json.loads(TIMES_FILE.read_text()) if TIMES_FILE.exists() else {}
    chapters = previous.get("chapters", {}) if previous.get("profile") == profile else {}
    chapters.update(times)
    record = {"profile": profile, "python": platform.python_version(), "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "chapters": chapters}
    TIMES_FILE.parent.mkdir(parents=True, exist_ok=True)
    TIMES_FILE.write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=os.environ.get("PROFILE", "ci"),
                        help="parameter profile in notebooks/profiles/ (default: $PROFILE or ci)")
    parser.add_argument("--only", action="append", metavar="CHAPTER",
                        help="run only this chapter (a name such as 01_question); repeatable")
    parser.add_argument("--timeout", type=int, default=None,
                        help="maximum seconds per cell (default: no limit)")
    args = parser.parse_args(argv)

    chapters = toc_chapters()
    if args.only:
        unknown = sorted(set(args.only) - set(chapters))
        if unknown:
            parser.error(f"chapter {', '.join(unknown)} is not in _toc.yml, expected one of {', '.join(chapters)}")
        chapters = [name for name in chapters if name in args.only]
    try:
        profile = load_profile(args.profile)
    except ChapterFailed as error:
        parser.error(str(error))
    check_kernel()

    print(f"executing {len(chapters)} chapter(s) with the {args.profile!r} profile")
    times, failures = {}, []
    for name in chapters:
        try:
            if name not in profile:
                raise ChapterFailed(f"{name}: profile {args.profile!r} has no entry for this chapter; "
                                    f"add one to notebooks/profiles/{args.profile}.yaml")
            seconds = execute_chapter(name, profile[name], args.profile, args.timeout)
        except ChapterFailed as error:
            failures.append(str(error))
            times[name] = {"seconds": None, "status": "failed"}
            print(f"FAILED {name}")
            continue
        times[name] = {"seconds": round(seconds, 1), "status": "ok"}
        print(f"{name}: {seconds:.1f} s")
    record_times(times, args.profile)

    for failure in failures:
        print(f"\n{failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
