"""Train a diffusers ``UNet2DModel`` as a DDPM noise predictor on a face set.

The objective is the DDPM epsilon loss (Ho et al., 2020): draw ``t`` uniformly in
``0..T-1`` and ``eps ~ N(0, I)``, form ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``
and regress the network output on ``eps`` in mean squared error. Training faces are
flipped left-right at random. An exponential moving average (EMA) of the weights is the
model that gets saved.

Everything comes from a YAML config (see ``configs/embedded.yaml``). A run writes into
``out_dir``:

- ``checkpoints/step_XXXXXXX.pt``: model, EMA, optimizer, step, RNG state and loss history,
  written atomically, so a run interrupted at any point resumes exactly from the last one;
- ``model/``: the EMA network in diffusers layout (``model_index.json``, ``unet/``,
  ``scheduler/``), loadable with ``UNet2DModel.from_pretrained(path, subfolder="unet")``;
- ``model/loss_history.json``: the training loss per log interval and the held-out loss
  per checkpoint.

Run it as ``python -m diffinv.train CONFIG OUT_DIR``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

logger = logging.getLogger("diffinv")

# Held-out and fixed-draw training losses use their own generator with this seed, so they
# are comparable across checkpoints, runs and configs without touching the training RNG.
EVAL_SEED = 12345

DEFAULTS = {
    "model": {
        "sample_size": 32,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [32, 64, 128],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "attention_head_dim": 32,
    },
    "scheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "beta_schedule": "linear",
    },
    "data": {
        "dataset": "faces",
        "size": 32,
        "hflip": True,
    },
    "train": {
        "steps": 2000,
        "batch_size": 40,
        "lr": 5e-4,
        "lr_schedule": "cosine",
        "warmup_steps": 100,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "ema_decay": 0.999,
        "seed": 0,
        "checkpoint_every": 200,
        "keep_checkpoints": 2,
        "log_every": 50,
        "eval_draws": 8,
    },
}

LR_SCHEDULES = ("constant", "cosine")


# --- configuration -------------------------------------------------------------------------


def _merge(defaults: dict, raw: dict, prefix: str) -> dict:
    """Overlay ``raw`` on ``defaults`` section by section, rejecting unknown keys."""
    merged = copy.deepcopy(defaults)
    for key, value in raw.items():
        name = f"{prefix}{key}"
        # Any UNet2DModel argument may be added under model; _check_model checks those names.
        if key not in defaults and prefix != "model.":
            raise ValueError(f"config key {name!r} is not known, expected one of {', '.join(sorted(defaults))}")
        if isinstance(defaults.get(key), dict):
            if not isinstance(value, dict):
                raise ValueError(f"config key {name!r} = {value!r}, expected a mapping")
            merged[key] = _merge(defaults[key], value, f"{name}.")
        else:
            merged[key] = value
    return merged


def _require(condition: bool, key: str, value, expected: str) -> None:
    if not condition:
        raise ValueError(f"config {key} = {value!r} is invalid, expected {expected}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_model(model: dict) -> None:
    from diffusers import UNet2DModel

    accepted = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
    for key in model:
        _require(key in accepted, f"model.{key}", model[key], "a UNet2DModel argument")
    channels = model["block_out_channels"]
    _require(
        isinstance(channels, list) and len(channels) > 0 and all(_is_int(c) and c > 0 for c in channels),
        "model.block_out_channels", channels, "a non-empty list of positive integers",
    )
    for key in ("down_block_types", "up_block_types"):
        _require(
            isinstance(model[key], list) and len(model[key]) == len(channels),
            f"model.{key}", model[key], f"a list of {len(channels)} block names, one per entry of block_out_channels",
        )
    groups = model["norm_num_groups"]
    _require(
        _is_int(groups) and groups > 0 and all(c % groups == 0 for c in channels),
        "model.norm_num_groups", groups, f"a positive integer that divides every channel count {channels}",
    )
    _check_attention(model, channels)
    size = model["sample_size"]
    _require(
        _is_int(size) and size > 0 and size % 2 ** (len(channels) - 1) == 0,
        "model.sample_size", size, f"a positive multiple of {2 ** (len(channels) - 1)} (one halving per down block)",
    )


def _check_attention(model: dict, channels: list[int]) -> None:
    """Reject a head size that does not divide the channels of every attention block.

    diffusers uses ``channels // attention_head_dim`` heads, so a larger head size leaves none.
    """
    head_dim = model.get("attention_head_dim")
    if head_dim is None:
        return
    _require(_is_int(head_dim) and head_dim > 0, "model.attention_head_dim", head_dim, "a positive integer or null")
    attended = [c for c, kind in zip(channels, model["down_block_types"]) if "Attn" in kind]
    if model.get("add_attention", True) and model.get("mid_block_type", "UNetMidBlock2D") is not None:
        attended.append(channels[-1])
    for c in attended:
        _require(c % head_dim == 0, "model.attention_head_dim", head_dim,
                 f"a divisor of {c}, the channel count of an attention block")


def _check_scheduler(scheduler: dict) -> None:
    T = scheduler["num_train_timesteps"]
    _require(_is_int(T) and T >= 2, "scheduler.num_train_timesteps", T, "an integer >= 2")
    start, end = scheduler["beta_start"], scheduler["beta_end"]
    _require(_is_number(start) and 0 < start < 1, "scheduler.beta_start", start, "a number in (0, 1)")
    _require(_is_number(end) and start <= end < 1, "scheduler.beta_end", end, f"a number in [beta_start={start}, 1)")
    kinds = ("linear", "scaled_linear", "squaredcos_cap_v2")
    _require(scheduler["beta_schedule"] in kinds, "scheduler.beta_schedule", scheduler["beta_schedule"], f"one of {kinds}")


def _check_data(data: dict, model: dict) -> None:
    _require(isinstance(data["dataset"], str) and data["dataset"], "data.dataset", data["dataset"],
             "'faces', 'olivetti' or a folder of images")
    _require(data["size"] == model["sample_size"], "data.size", data["size"],
             f"the model's sample_size {model['sample_size']}")
    _require(isinstance(data["hflip"], bool), "data.hflip", data["hflip"], "true or false")


def _check_train(train: dict) -> None:
    positive_ints = ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "eval_draws")
    for key in positive_ints:
        _require(_is_int(train[key]) and train[key] > 0, f"train.{key}", train[key], "a positive integer")
    _require(_is_int(train["warmup_steps"]) and train["warmup_steps"] >= 0, "train.warmup_steps",
             train["warmup_steps"], "a non-negative integer")
    _require(_is_int(train["seed"]) and train["seed"] >= 0, "train.seed", train["seed"], "a non-negative integer")
    _require(_is_number(train["lr"]) and 0 < train["lr"] < 1, "train.lr", train["lr"], "a number in (0, 1)")
    _require(train["lr_schedule"] in LR_SCHEDULES, "train.lr_schedule", train["lr_schedule"], f"one of {LR_SCHEDULES}")
    _require(_is_number(train["weight_decay"]) and train["weight_decay"] >= 0, "train.weight_decay",
             train["weight_decay"], "a non-negative number")
    _require(_is_number(train["grad_clip"]) and train["grad_clip"] >= 0, "train.grad_clip", train["grad_clip"],
             "a non-negative number (0 turns clipping off)")
    _require(_is_number(train["ema_decay"]) and 0 <= train["ema_decay"] < 1, "train.ema_decay",
             train["ema_decay"], "a number in [0, 1)")


def validate_config(raw: dict) -> dict:
    """Return the config ``raw`` completed with the defaults, or raise ValueError naming the bad key and value."""
    if not isinstance(raw, dict):
        raise ValueError(f"the config is {type(raw).__name__}, expected a mapping of sections "
                         f"({', '.join(DEFAULTS)})")
    config = _merge(DEFAULTS, raw, "")
    _check_model(config["model"])
    _check_scheduler(config["scheduler"])
    _check_data(config["data"], config["model"])
    _check_train(config["train"])
    return config


def load_config(path: str | Path) -> dict:
    """Read a YAML training config and return it validated and completed with the defaults."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    with path.open() as file:
        raw = yaml.safe_load(file) or {}
    return validate_config(raw)


# --- building blocks -----------------------------------------------------------------------


def build_unet(config: dict):
    """Return the untrained ``UNet2DModel`` that ``config["model"]`` describes."""
    from diffusers import UNet2DModel

    model = dict(config["model"])
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        model[key] = tuple(model[key])
    return UNet2DModel(**model)


def build_scheduler(config: dict):
    """Return the ``DDPMScheduler`` for epsilon prediction that ``config["scheduler"]`` describes."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**config["scheduler"], prediction_type="epsilon")


def load_training_images(config: dict) -> torch.Tensor:
    """Return the training split of the configured dataset; test images are never used here."""
    from diffinv.data import load_dataset

    data = config["data"]
    return load_dataset(data["dataset"], "train", data["size"]).images


def load_heldout_images(config: dict) -> torch.Tensor:
    """Return the test split, used only to report the held-out loss."""
    from diffinv.data import load_dataset

    data = config["data"]
    return load_dataset(data["dataset"], "test", data["size"]).images


def learning_rate(step: int, train: dict) -> float:
    """Return the learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine."""
    base, warmup, total = train["lr"], train["warmup_steps"], train["steps"]
    if step < warmup:
        return base * (step + 1) / warmup
    if train["lr_schedule"] == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def update_ema(ema, model, decay: float, step: int) -> None:
    """Move the EMA weights toward the model: ``ema <- d ema + (1 - d) model``.

    The decay is ``d = min(decay, (1 + step) / (10 + step))``, so in the first steps,
    while the weights change fast, the random initialisation decays out of the average quickly.
    """
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def draw_batch(images: torch.Tensor, batch_size: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Draw ``batch_size`` distinct images (with replacement across steps), each flipped with probability 1/2."""
    count = len(images)
    if batch_size <= count:
        index = torch.randperm(count, generator=generator)[:batch_size]
    else:
        index = torch.randint(count, (batch_size,), generator=generator)
    x0 = images[index]
    if hflip:
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    return x0


def epsilon_loss(unet, scheduler, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Return the DDPM loss ``mean |eps_theta(x_t, t) - eps|^2`` with ``x_t`` from the forward process."""
    x_t = scheduler.add_noise(x0, eps, t)
    return torch.mean((unet(x_t, t).sample - eps) ** 2)


@torch.no_grad()
def fixed_draw_loss(unet, scheduler, images: torch.Tensor, draws: int, batch_size: int = 160) -> float:
    """Return the epsilon loss over ``draws`` fixed (t, eps) pairs per image, the same on every call.

    The pairs come from a generator seeded with :data:`EVAL_SEED`, drawn on the CPU, so
    two models (or two checkpoints) are scored on exactly the same noisy inputs.
    """
    generator = torch.Generator().manual_seed(EVAL_SEED)
    T = scheduler.config.num_train_timesteps
    x0 = images.repeat_interleave(draws, dim=0)
    t = torch.randint(T, (len(x0),), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    device = next(unet.parameters()).device
    total = 0.0
    for start in range(0, len(x0), batch_size):
        part = slice(start, start + batch_size)
        x_t = scheduler.add_noise(x0[part], eps[part], t[part]).to(device)
        out = unet(x_t, t[part].to(device)).sample
        total += float(((out - eps[part].to(device)) ** 2).sum())
    return total / eps.numel()


# --- checkpoints ---------------------------------------------------------------------------


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """Return the checkpoint with the highest step in ``out_dir/checkpoints``, or None."""
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def save_checkpoint(out_dir: Path, state: dict, keep: int) -> Path:
    """Write ``state`` as ``checkpoints/step_XXXXXXX.pt`` and delete all but the newest ``keep``."""
    folder = Path(out_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{state['step']:07d}.pt"
    _atomic_save(state, path)
    for old in sorted(folder.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


def _check_resumable(saved: dict, config: dict, path: Path) -> None:
    """Reject a checkpoint whose model, scheduler or data differ from the config."""
    for section in ("model", "scheduler", "data"):
        if saved[section] != config[section]:
            raise ValueError(
                f"checkpoint {path} was trained with {section} = {saved[section]}, but the config has "
                f"{config[section]}; use another out_dir or resume=False"
            )


def save_pipeline(ema_unet, scheduler, history: dict, folder: Path) -> None:
    """Save the EMA network and scheduler in diffusers layout, plus ``loss_history.json``."""
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=ema_unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    _atomic_write_text(json.dumps(history, indent=1), Path(folder) / "loss_history.json")


# --- the loop ------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _log_config(config: dict, out_dir: Path, device: torch.device, parameters: int, images: int) -> None:
    logger.info("training config:\n%s", yaml.safe_dump(config, sort_keys=False).rstrip())
    logger.info(
        "output %s, device %s, %d parameters (%.1f MB in float32), %d training images",
        out_dir, device, parameters, parameters * 4 / 1e6, images,
    )


def train(
    config_path: str | Path | dict,
    out_dir: str | Path,
    resume: bool = True,
    max_steps: int | None = None,
    device: str | torch.device | None = None,
) -> Path:
    """Train the configured UNet, save its EMA weights in diffusers layout and return that folder.

    ``config_path`` is a YAML file or an already validated config dict. With ``resume`` the
    run continues from the newest checkpoint in ``out_dir``. ``max_steps`` stops the run once
    that many steps are done in total without changing the learning-rate schedule, which is
    set by ``train.steps``, so a run split into pieces matches an uninterrupted one.
    Resuming reproduces the uninterrupted run bit for bit on the CPU; on a GPU, kernels
    need not be deterministic.
    """
    config = validate_config(config_path) if isinstance(config_path, dict) else load_config(config_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = out_dir / "model"
    device = _resolve_device(device)
    opts = config["train"]
    stop = opts["steps"] if max_steps is None else min(max_steps, opts["steps"])

    torch.manual_seed(opts["seed"])
    unet = build_unet(config).to(device)
    state = {
        "step": 0, "wall_seconds": 0.0, "config": config, "unet": unet,
        "ema": copy.deepcopy(unet).requires_grad_(False),
        "optimizer": torch.optim.AdamW(unet.parameters(), lr=opts["lr"], weight_decay=opts["weight_decay"]),
        "generator": torch.Generator().manual_seed(opts["seed"]),
        "history": {"train": [], "heldout": []},
    }
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        _restore(state, checkpoint, device)
        if state["step"] >= stop and (model_dir / "unet" / "config.json").is_file():
            logger.info("%s is already trained to step %d; nothing to do", out_dir, state["step"])
            return model_dir

    scheduler = build_scheduler(config)
    images, heldout = load_training_images(config), load_heldout_images(config)
    _log_config(config, out_dir, device, sum(p.numel() for p in unet.parameters()), len(images))
    _run_steps(state, scheduler, images, heldout, stop, out_dir, device)

    ema, history = state["ema"].eval(), state["history"]
    history["summary"] = _summarise(config, ema, scheduler, images, heldout, state)
    save_pipeline(ema.to("cpu"), scheduler, history, model_dir)
    _log_summary(history["summary"], model_dir)
    return model_dir


def _restore(state: dict, checkpoint: Path, device: torch.device) -> None:
    """Load a checkpoint into the live objects of ``state``, after checking that it fits the config."""
    saved = torch.load(checkpoint, map_location=device, weights_only=False)
    _check_resumable(saved["config"], state["config"], checkpoint)
    for key in ("unet", "ema", "optimizer"):
        state[key].load_state_dict(saved[key])
    state["generator"].set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    state["history"], state["step"] = saved["history"], saved["step"]
    state["wall_seconds"] = saved.get("wall_seconds", 0.0)
    logger.info("resuming from %s at step %d", checkpoint, state["step"])


def _snapshot(state: dict) -> dict:
    """Return what a checkpoint stores: state dicts in place of the live objects, plus the RNG states."""
    snapshot = {key: value for key, value in state.items() if key not in ("unet", "ema", "optimizer", "generator")}
    for key in ("unet", "ema", "optimizer"):
        snapshot[key] = state[key].state_dict()
    snapshot["generator"] = state["generator"].get_state()
    snapshot["torch_rng"] = torch.get_rng_state()
    return snapshot


def _run_steps(state: dict, scheduler, images, heldout, stop: int, out_dir: Path, device: torch.device) -> None:
    """Run optimizer steps until ``stop``, logging and checkpointing at the configured intervals."""
    opts = state["config"]["train"]
    unet, ema, optimizer, generator = state["unet"], state["ema"], state["optimizer"], state["generator"]
    history = state["history"]
    started, first_step, window = time.perf_counter(), state["step"], []
    progress = tqdm(total=stop, initial=first_step, desc="train", unit="step", mininterval=5,
                    disable=first_step >= stop)

    for step in range(first_step, stop):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, opts)

        # One DDPM step: x_0 from the data, t ~ U{0..T-1}, eps ~ N(0, I), all from the run's generator.
        x0 = draw_batch(images, opts["batch_size"], state["config"]["data"]["hflip"], generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        loss = epsilon_loss(unet, scheduler, x0.to(device), t.to(device), eps.to(device))

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opts["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), opts["grad_clip"])
        optimizer.step()
        update_ema(ema, unet, opts["ema_decay"], step)
        state["step"] = done = step + 1
        window.append(loss.item())
        progress.update(1)

        if done % opts["log_every"] == 0 or done == stop:
            mean = sum(window) / len(window)
            history["train"].append({"step": done, "loss": mean, "lr": learning_rate(step, opts)})
            logger.info("step %d/%d: loss %.5f (mean of the last %d steps)", done, opts["steps"], mean, len(window))
            window = []

        if done % opts["checkpoint_every"] == 0 or done == stop:
            heldout_loss = fixed_draw_loss(ema.eval(), scheduler, heldout, opts["eval_draws"])
            history["heldout"].append({"step": done, "loss": heldout_loss})
            # Wall time counts every piece of a resumed run, checkpoint evaluations included.
            state["wall_seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            save_checkpoint(out_dir, _snapshot(state), opts["keep_checkpoints"])
    progress.close()


def _summarise(config, ema, scheduler, images, heldout, state: dict) -> dict:
    history, batch_size = state["history"], config["train"]["batch_size"]
    draws = config["train"]["eval_draws"]
    wall = state["wall_seconds"]
    return {
        "steps": state["step"],
        "batch_size": batch_size,
        "wall_seconds": wall,
        "images_per_second": state["step"] * batch_size / wall if wall > 0 else float("nan"),
        "final_train_loss": history["train"][-1]["loss"] if history["train"] else float("nan"),
        "train_loss_fixed_draws": fixed_draw_loss(ema, scheduler, images, draws),
        "heldout_loss_fixed_draws": fixed_draw_loss(ema, scheduler, heldout, draws),
        "eval_draws_per_image": draws,
        "eval_seed": EVAL_SEED,
    }


def _log_summary(summary: dict, model_dir: Path) -> None:
    logger.info(
        "done: %d steps in %.0f s, %.1f images/s; train loss %.5f (last log window); "
        "EMA epsilon loss on fixed draws: train %.5f, held-out %.5f; model saved to %s",
        summary["steps"], summary["wall_seconds"],
        summary["images_per_second"], summary["final_train_loss"], summary["train_loss_fixed_draws"],
        summary["heldout_loss_fixed_draws"], model_dir,
    )


def main_from_args(argv: list[str] | None = None) -> Path:
    """Parse ``CONFIG OUT_DIR [--no-resume] [--max-steps N] [--device D]`` and run :func:`train`."""
    parser = argparse.ArgumentParser(prog="diffinv train", description="Train a DDPM UNet on a face set.")
    parser.add_argument("config", help="YAML training config, e.g. lib/diffinv/configs/embedded.yaml")
    parser.add_argument("out_dir", help="output folder for checkpoints/ and model/")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many steps in total (the learning-rate schedule still follows train.steps)")
    parser.add_argument("--device", default=None, help="torch device; default cuda when available, else cpu")
    args = parser.parse_args(argv)
    return train(args.config, args.out_dir, resume=not args.no_resume, max_steps=args.max_steps, device=args.device)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main_from_args()
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
