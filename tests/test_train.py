"""Tests of diffinv.train: config checks, the loss, EMA, checkpoints, resume and the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import diffinv
from diffinv import train as tr
from diffinv.data import load_faces

SHIPPED = Path(diffinv.__file__).parent / "weights" / "embedded"

# A UNet of about 40k parameters without attention: fast enough to train for a few steps in a test.
TINY = {
    "model": {
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 4,
        "add_attention": False,
    },
    "train": {
        "steps": 4,
        "batch_size": 4,
        "lr": 2e-3,
        "warmup_steps": 2,
        "checkpoint_every": 2,
        "keep_checkpoints": 4,
        "log_every": 1,
        "eval_draws": 1,
        "ema_decay": 0.9,
    },
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_config():
    return tr.validate_config(TINY)


def _tiny_unet(config, seed=0):
    torch.manual_seed(seed)
    return tr.build_unet(config)


# --- config ---------------------------------------------------------------------------------


def test_config_shipped_file_is_valid():
    config = tr.load_config(Path(tr.__file__).parent / "configs" / "embedded.yaml")
    assert config["scheduler"] == {
        "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
    }
    assert any("Attn" in kind for kind in config["model"]["down_block_types"])


def test_config_shipped_model_fits_20_mb():
    config = tr.load_config(Path(tr.__file__).parent / "configs" / "embedded.yaml")
    parameters = sum(p.numel() for p in tr.build_unet(config).parameters())
    assert parameters * 4 <= 20e6


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "batch_size", 0, "train.batch_size = 0"),
        ("train", "lr", -1.0, "train.lr = -1.0"),
        ("train", "ema_decay", 1.0, "train.ema_decay = 1.0"),
        ("train", "lr_schedule", "step", "train.lr_schedule = 'step'"),
        ("train", "steps", 2.5, "train.steps = 2.5"),
        ("model", "norm_num_groups", 7, "model.norm_num_groups = 7"),
        ("model", "attention_head_dim", 48, "model.attention_head_dim = 48"),
        ("model", "sample_size", 30, "model.sample_size = 30"),
        ("model", "no_such_argument", 1, "model.no_such_argument = 1"),
        ("scheduler", "beta_end", 1e-5, "scheduler.beta_end = 1e-05"),
        ("data", "size", 64, "data.size = 64"),
    ],
)
def test_config_rejects_bad_value(section, key, value, expected):
    with pytest.raises(ValueError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        tr.validate_config({section: {key: value}})


def test_config_rejects_unknown_key():
    with pytest.raises(ValueError, match=r"'train\.epochs' is not known"):
        tr.validate_config({"train": {"epochs": 3}})


def test_config_rejects_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        tr.load_config(tmp_path / "missing.yaml")


# --- schedule, EMA, batches ---------------------------------------------------------------


def test_learning_rate_warmup_and_cosine():
    opts = {"lr": 1e-3, "warmup_steps": 10, "steps": 110, "lr_schedule": "cosine"}
    assert tr.learning_rate(0, opts) == pytest.approx(1e-4)
    assert tr.learning_rate(10, opts) == pytest.approx(1e-3)
    assert tr.learning_rate(60, opts) == pytest.approx(5e-4)
    assert tr.learning_rate(110, opts) == pytest.approx(0.0, abs=1e-12)


def test_learning_rate_constant_after_warmup():
    opts = {"lr": 1e-3, "warmup_steps": 0, "steps": 100, "lr_schedule": "constant"}
    assert tr.learning_rate(99, opts) == pytest.approx(1e-3)


@pytest.mark.parametrize(("step", "expected"), [(0, 0.9), (100, 0.1)])
def test_ema_update_closed_form(step, expected):
    # d = min(0.9, (1 + step) / (10 + step)): 0.1 at step 0, 0.9 at step 100; ema <- d * 0 + (1 - d) * 1.
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.nn.init.ones_(model.weight)
    torch.nn.init.zeros_(ema.weight)
    tr.update_ema(ema, model, 0.9, step)
    assert torch.allclose(ema.weight, torch.full((2, 2), expected))


def test_draw_batch_flips_or_keeps_each_image():
    images = torch.randn(5, 1, 4, 4)
    batch = tr.draw_batch(images, 5, True, torch.Generator().manual_seed(0))
    for x in batch:
        matches = [torch.equal(x, im) or torch.equal(x, im.flip(-1)) for im in images]
        assert sum(matches) == 1


def test_draw_batch_has_distinct_images():
    images = torch.arange(80.0).reshape(80, 1, 1, 1)
    batch = tr.draw_batch(images, 32, False, torch.Generator().manual_seed(0))
    assert len(batch.flatten().unique()) == 32


# --- loss and training ----------------------------------------------------------------------


def test_loss_decreases_on_fixed_batch(tiny_config):
    unet, scheduler = _tiny_unet(tiny_config), tr.build_scheduler(tiny_config)
    x0 = load_faces("train").images[:8]
    generator = torch.Generator().manual_seed(0)
    t = torch.randint(1000, (8,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)

    losses = []
    for _ in range(11):
        loss = tr.epsilon_loss(unet, scheduler, x0, t, eps)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # Measured on CPU: 1.067 at the start, 0.368 after 5 steps, 0.226 after 10.
    assert 0.9 < losses[0] < 1.25
    assert losses[5] < 0.55
    assert losses[10] < 0.35


def test_fixed_draw_loss_is_repeatable(tiny_config):
    unet, scheduler = _tiny_unet(tiny_config).eval(), tr.build_scheduler(tiny_config)
    images = load_faces("test").images[:4]
    first = tr.fixed_draw_loss(unet, scheduler, images, draws=2)
    assert first == tr.fixed_draw_loss(unet, scheduler, images, draws=2)


def test_save_load_round_trip_exact(tiny_config, tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    unet, scheduler = _tiny_unet(tiny_config, seed=3), tr.build_scheduler(tiny_config)
    tr.save_pipeline(unet, scheduler, {"train": [], "heldout": []}, tmp_path)
    loaded = UNet2DModel.from_pretrained(tmp_path, subfolder="unet", low_cpu_mem_usage=False)
    loaded_scheduler = DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler")

    saved = unet.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert torch.equal(loaded_scheduler.alphas_cumprod, scheduler.alphas_cumprod)
    assert loaded_scheduler.config.prediction_type == "epsilon"
    assert (tmp_path / "model_index.json").is_file()


def _final_state(out_dir: Path) -> dict:
    return torch.load(tr.latest_checkpoint(out_dir), weights_only=False)


def _assert_same_tensors(a: dict, b: dict, label: str) -> None:
    for name, tensor in a.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, b[name]), f"{label}: {name}"


def test_resume_matches_uninterrupted_run(tiny_config, tmp_path):
    tr.train(tiny_config, tmp_path / "whole", device="cpu")
    tr.train(tiny_config, tmp_path / "split", max_steps=2, device="cpu")
    assert tr.latest_checkpoint(tmp_path / "split").name == "step_0000002.pt"
    tr.train(tiny_config, tmp_path / "split", device="cpu")

    whole, split = _final_state(tmp_path / "whole"), _final_state(tmp_path / "split")
    assert split["step"] == 4
    assert [entry["step"] for entry in split["history"]["train"]] == [1, 2, 3, 4]
    assert split["history"] == whole["history"]
    _assert_same_tensors(whole["unet"], split["unet"], "unet")
    _assert_same_tensors(whole["ema"], split["ema"], "ema")
    for index, state in whole["optimizer"]["state"].items():
        _assert_same_tensors(state, split["optimizer"]["state"][index], f"optimizer state {index}")


def test_train_writes_diffusers_layout(tiny_config, tmp_path):
    from diffusers import UNet2DModel

    model_dir = tr.train(tiny_config, tmp_path, max_steps=1, device="cpu")
    history = json.loads((model_dir / "loss_history.json").read_text())
    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet", low_cpu_mem_usage=False)
    assert list(unet.config.block_out_channels) == [8, 16]
    assert history["summary"]["steps"] == 1
    assert history["summary"]["batch_size"] == 4
    assert len(history["heldout"]) == 1


def test_train_finished_run_is_left_alone(tiny_config, tmp_path):
    model_dir = tr.train(tiny_config, tmp_path, device="cpu")
    before = (model_dir / "loss_history.json").read_text()
    tr.train(tiny_config, tmp_path, device="cpu")
    assert (model_dir / "loss_history.json").read_text() == before


def test_resume_rejects_other_architecture(tiny_config, tmp_path):
    tr.train(tiny_config, tmp_path, max_steps=1, device="cpu")
    wider = tr.validate_config({**TINY, "model": {**TINY["model"], "block_out_channels": [8, 32]}})
    with pytest.raises(ValueError, match="was trained with model"):
        tr.train(wider, tmp_path, device="cpu")


# --- the shipped model ----------------------------------------------------------------------


@pytest.mark.skipif(not (SHIPPED / "unet" / "config.json").is_file(),
                    reason="the embedded weights have not been trained and copied into the package yet")
def test_shipped_model_loads_offline():
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(SHIPPED, subfolder="unet", local_files_only=True, low_cpu_mem_usage=False)
    unet.eval()
    scheduler = DDPMScheduler.from_pretrained(SHIPPED, subfolder="scheduler", local_files_only=True)
    x_t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = unet(x_t, torch.tensor([10, 500])).sample
    assert eps.shape == (2, 1, 32, 32)
    assert bool(torch.isfinite(eps).all())
    assert scheduler.config.num_train_timesteps == 1000
