import json
import math
import shutil
import subprocess
import sys

import pytest

from diffinv import grid
from diffinv.cli import main

GRID = dict(models=("gaussian",), tasks=("deblur", "inpaint-box"), solvers=("scoreald", "dps", "posterior-mean"),
            baselines=("wiener",), images=2, steps=3, seeds=(0,), progress=False)


def without_time(rows):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return grid.evaluate(out=tmp_path_factory.mktemp("whole"), **GRID)


def test_grid_row_count(uninterrupted):
    # 2 tasks x (1 baseline + 3 solvers) x 2 images.
    assert len(uninterrupted) == 16


def test_grid_resume_after_interruption(tmp_path, monkeypatch, uninterrupted):
    finished = []
    original = grid.run_job

    def interrupt_third_job(job, *args, **kwargs):
        if len(finished) == 2:
            raise KeyboardInterrupt
        finished.append(job)
        return original(job, *args, **kwargs)

    monkeypatch.setattr(grid, "run_job", interrupt_third_job)
    with pytest.raises(KeyboardInterrupt):
        grid.evaluate(out=tmp_path, **GRID)
    assert len(grid.read_rows(tmp_path / "rows")) == 4

    monkeypatch.setattr(grid, "run_job", original)
    resumed = grid.evaluate(out=tmp_path, **GRID)
    assert without_time(resumed) == without_time(uninterrupted)


def test_grid_rerun_adds_no_rows(tmp_path, uninterrupted):
    grid.evaluate(out=tmp_path, **GRID)
    again = grid.evaluate(out=tmp_path, **GRID)
    assert len(again) == len(uninterrupted)


def test_grid_csv_matches_json(uninterrupted, tmp_path):
    grid.evaluate(out=tmp_path, **GRID)
    lines = (tmp_path / "rows.csv").read_text().splitlines()
    assert lines[0].split(",") == list(grid.ROW_FIELDS)
    assert len(lines) == 1 + len(uninterrupted)


def test_grid_two_processes_match_one(tmp_path, uninterrupted):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "diffinv", "-q", "evaluate", "--models", "gaussian", "--tasks", "deblur,inpaint-box",
               "--solvers", "scoreald,dps,posterior-mean", "--baselines", "wiener", "--images", "2",
               "--steps", "3", "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert sorted(path.name for path in tmp_path.glob("rows-shard*.json")) == [
        "rows-shard0-of-2.json", "rows-shard1-of-2.json"]
    assert main(["-q", "evaluate", "--merge", "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [grid.row_key(row) for row in merged] == [grid.row_key(row) for row in uninterrupted]
    # torchrun runs each process with one thread, which changes the order of float sums.
    for name in grid.METRICS:
        assert [row[name] for row in merged] == pytest.approx([row[name] for row in uninterrupted], rel=1e-4)


def test_merge_rejects_duplicate_shards(tmp_path):
    grid.evaluate(out=tmp_path, shard=(0, 2), **GRID)
    shutil.copy(tmp_path / "rows-shard0-of-2.json", tmp_path / "rows-shard1-of-2.json")
    with pytest.raises(ValueError, match="share rows"):
        grid.merge(tmp_path)


def test_choose_picks_best_psnr():
    rows = [{"model": "m", "task": "deblur", "solver": "dps", "zeta": zeta, "t0": None, "steps": 5,
             "psnr": psnr, "ssim": 0.5, "lpips": 0.2} for zeta, psnr in [(0.5, 20.0), (1.0, 22.0), (2.0, 21.0)]]
    assert grid.choose(rows) == {("m", "deblur", "dps"): 1.0}


def test_choose_skips_diverged_values():
    rows = [{"model": "m", "task": "deblur", "solver": "scoreald", "zeta": zeta, "t0": None, "steps": 5,
             "psnr": psnr, "ssim": 0.5, "lpips": 0.2} for zeta, psnr in [(0.5, 20.0), (8.0, math.nan)]]
    rows += [{**rows[0], "solver": "dps", "zeta": 8.0, "psnr": math.nan}]
    # A NaN mean compares false with everything, so without the skip it could win or block a value.
    assert grid.choose(rows) == {("m", "deblur", "scoreald"): 0.5}


def test_sweep_divergence_gives_nan_rows(tmp_path):
    rows = grid.sweep(("gaussian",), ("deblur",), ("scoreald",), {"scoreald": [1.0, 1e6]}, tmp_path,
                      images=2, steps=3, progress=False)
    by_zeta = {zeta: [row["psnr"] for row in rows if row["zeta"] == zeta] for zeta in (1.0, 1e6)}
    assert len(by_zeta[1e6]) == 2 and all(math.isnan(value) for value in by_zeta[1e6])
    assert len(by_zeta[1.0]) == 2 and all(math.isfinite(value) for value in by_zeta[1.0])
    assert grid.choose(rows) == {("gaussian", "deblur", "scoreald"): 1.0}


def test_sweep_loads_each_prior_once(tmp_path, monkeypatch):
    loaded = []
    original = grid.load_prior_for

    def counting_load(model, *args, **kwargs):
        loaded.append(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(grid, "load_prior_for", counting_load)
    grid.sweep(("gaussian",), ("deblur",), ("scoreald", "dps"), {"scoreald": [0.5, 1.0], "dps": [0.5]}, tmp_path,
               images=1, steps=2, progress=False)
    assert loaded == ["gaussian"]


def test_evaluate_rejects_priors_of_another_dataset(tmp_path):
    priors = grid.PriorCache("olivetti", grid.pick_device("cpu"))
    with pytest.raises(ValueError, match="dataset 'olivetti'"):
        grid.evaluate(out=tmp_path, **{**GRID, "device": "cpu"}, priors=priors)


def test_evaluate_accepts_device_name_priors(tmp_path):
    rows = grid.evaluate(out=tmp_path, **{**GRID, "solvers": ("dps",), "baselines": (), "images": 1,
                                          "device": "cpu"}, priors=grid.PriorCache("faces", "cpu"))
    assert len(rows) == 2


def test_choose_rejects_unknown_metric():
    with pytest.raises(ValueError, match="metric 'psrn' is not valid"):
        grid.choose([], metric="psrn")


def test_evaluate_returns_only_requested_rows(tmp_path, uninterrupted):
    grid.evaluate(out=tmp_path, **GRID)
    other = grid.evaluate(out=tmp_path, **{**GRID, "steps": 2})
    assert len(other) == len(uninterrupted)
    assert {row["steps"] for row in other} == {2, None}
    # The rows file keeps both runs; the diffusion solvers' rows differ by steps, the others are shared.
    shared = sum(row["steps"] is None for row in uninterrupted)
    assert len(grid.read_rows(tmp_path / "rows")) == 2 * len(uninterrupted) - shared
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {entry["steps"] for entry in summary} == {2, None}


@pytest.mark.parametrize(("arguments", "message"), [
    ({"tasks": ("colorize",)}, "task 'colorize' is not valid"),
    ({"solvers": ("admm",)}, "solver 'admm' is not valid"),
    ({"baselines": ("bm3d",)}, "baseline 'bm3d' is not valid"),
    ({"steps": 0}, "steps = 0"),
    ({"shard": (2, 2)}, "shard 2 of 2 is not valid"),
])
def test_evaluate_rejects_bad_argument(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        grid.evaluate(out=tmp_path, **{**GRID, **arguments})
