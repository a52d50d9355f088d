"""Record how long the book takes: chapter execution (from the last run) and a timed ``jupyter-book build``.

``book/tools/execute.py`` runs the chapters with papermill and writes each chapter's seconds
to ``_build/execution_times.json``. This script reads that file as it is (it executes no
notebook) and then times one ``jupyter-book build`` of the executed notebooks that exist.
The build renders only, because ``_config.yml`` turns notebook execution off. It writes to
a fresh temporary folder by default, so it is a clean build and leaves ``_build/html``
alone. A chapter of ``_toc.yml`` without an executed notebook makes the build warn, so with
the default ``--warningiserror`` the build fails. The result records the exit status and
the missing chapters either way.

Run: ``python benchmarks/book_build.py [--path-output DIR] [--flags "--warningiserror --keep-going"]``.
The result goes to ``benchmarks/results/book_build.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import load_record, run_record, write_result

logger = logging.getLogger("diffinv")

ROOT = Path(__file__).resolve().parents[1]
TIMES_FILE = ROOT / "_build" / "execution_times.json"
EXECUTED_PREFIX = "notebooks/_executed/"
DEFAULT_FLAGS = "--warningiserror --keep-going"
# Lines of the build log kept in the result when the build fails.
LOG_TAIL_LINES = 30
# Terminal colour codes, which Sphinx prints even into a pipe.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def execution_record() -> dict:
    """Return the chapter times of the last ``book/tools/execute.py`` run with their total, or a note that none exists."""
    if not TIMES_FILE.exists():
        return {"found": False, "note": f"{TIMES_FILE.relative_to(ROOT)} not found; run book/tools/execute.py first"}
    record = json.loads(TIMES_FILE.read_text())
    chapters = record.get("chapters", {})
    return {"found": True, "profile": record.get("profile"), "cpu_count": record.get("cpu_count"),
            "chapters": chapters, "total_seconds": round(sum(c.get("seconds", 0.0) for c in chapters.values()), 1),
            "failed": sorted(name for name, c in chapters.items() if c.get("status") != "ok")}


def missing_chapters() -> list[str]:
    """Return the executed-notebook entries of ``_toc.yml`` whose ``.ipynb`` does not exist."""
    import yaml

    entries = []

    def walk(node):
        if isinstance(node, dict):
            entry = node.get("file")
            if isinstance(entry, str) and entry.startswith(EXECUTED_PREFIX):
                entries.append(entry)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load((ROOT / "_toc.yml").read_text()))
    return [entry for entry in entries if not (ROOT / f"{entry}.ipynb").exists()]


def time_build(path_output: Path, flags: str) -> dict:
    """Run ``jupyter-book build`` into ``path_output`` and return its wall seconds and exit status."""
    command = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(ROOT),
               "--path-output", str(path_output), *shlex.split(flags)]
    logger.info("timing: %s", " ".join(command))
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    record = {"command": " ".join(command), "seconds": round(seconds, 1), "exit_status": completed.returncode}
    if completed.returncode != 0:
        log = ANSI_ESCAPE.sub("", completed.stdout + completed.stderr)
        record["log_tail"] = [line for line in log.splitlines() if line.strip()][-LOG_TAIL_LINES:]
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path-output", type=Path, default=None,
                        help="folder for the build's _build/ (default: a temporary folder, removed afterwards)")
    parser.add_argument("--flags", default=DEFAULT_FLAGS, help=f"extra jupyter-book build flags (default: {DEFAULT_FLAGS!r})")
    parser.add_argument("--output", default="book_build", help="result name in benchmarks/results/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    execution = execution_record()
    missing = missing_chapters()
    load_before = load_record()
    if args.path_output is None:
        with tempfile.TemporaryDirectory(prefix="book-build-") as folder:
            build = time_build(Path(folder), args.flags)
    else:
        build = time_build(args.path_output, args.flags)
    load_after = load_record()

    payload = {
        "benchmark": "book_build", "execution": execution, "missing_executed_chapters": missing, "build": build,
        **run_record(load_before, load_after),
    }
    path = write_result(args.output, payload)
    logger.info("execution %s s over %d chapters (last run); build %.1f s, exit status %d; written to %s",
                execution.get("total_seconds"), len(execution.get("chapters", {})), build["seconds"],
                build["exit_status"], path)
    return payload


if __name__ == "__main__":
    main()
