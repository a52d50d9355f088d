import json
import subprocess
import sys

import pytest

from diffinv.cli import main

CONFIG_FIELDS = {"model", "task", "solver", "steps", "zeta", "sigma_y", "seed", "image_size", "device", "versions"}


@pytest.fixture(scope="module")
def solve_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("solve")
    code = main(["-q", "solve", "--model", "gaussian", "--task", "inpaint-box", "--solver", "scoreald",
                 "--images", "2", "--steps", "5", "--seed", "0", "--out", str(out)])
    return code, out


def test_solve_exits_zero(solve_run):
    code, _ = solve_run
    assert code == 0


def test_solve_metrics_fields(solve_run):
    _, out = solve_run
    report = json.loads((out / "metrics.json").read_text())
    assert set(report) == {"config", "images", "summary"}
    assert set(report["config"]) == CONFIG_FIELDS
    assert [row["index"] for row in report["images"]] == [2, 5]
    assert set(report["images"][0]) == {"index", "psnr", "ssim", "lpips", "seconds"}
    assert set(report["summary"]["psnr"]) == {"mean", "low", "high"}


def test_solve_writes_images(solve_run):
    _, out = solve_run
    for kind in ("truth", "degraded", "restored"):
        assert (out / f"{kind}_2.png").exists()


def test_solve_writes_references(solve_run):
    _, out = solve_run
    references = json.loads((out / "references.json").read_text())
    assert set(references) == {"degraded", "posterior_mean"}
    assert references["posterior_mean"]["summary"]["psnr"]["mean"] > references["degraded"]["summary"]["psnr"]["mean"]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--model", "unet-of-nowhere", "model 'unet-of-nowhere' is neither a known prior"),
    ("--task", "colorize", "task 'colorize' is not valid, expected one of deblur"),
    ("--solver", "admm", "solver 'admm' is not valid, expected one of sdedit, scoreald, dps"),
    ("--steps", "0", "steps = 0"),
    ("--zeta", "-2", "zeta = -2.0"),
    ("--sigma-y", "0", "sigma_y = 0.0"),
    ("--images", "21", "21 images requested, but the faces/test split holds 20"),
])
def test_solve_bad_option_message(tmp_path, capsys, option, value, message):
    arguments = {"--steps": "2", "--images": "1", option: value}
    code = main(["-q", "solve", *[item for pair in arguments.items() for item in pair], "--out", str(tmp_path)])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def test_solve_bad_option_has_no_traceback(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "diffinv", "solve", "--solver", "admm", "--out", str(tmp_path)],
                               capture_output=True, text=True)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert "solver 'admm' is not valid" in completed.stderr


def test_solve_divergence_is_reported(tmp_path, capsys):
    code = main(["-q", "solve", "--solver", "scoreald", "--zeta", "1e4", "--steps", "50", "--images", "1",
                 "--out", str(tmp_path)])
    assert code == 1
    assert "exploded at step" in capsys.readouterr().err
    assert not list(tmp_path.glob("restored_*.png"))
