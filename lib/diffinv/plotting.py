"""Figures of image batches: grids, and the trajectory of a reverse diffusion run.

Images arrive as tensors in [-1, 1] and are shown with the fixed map ``(x + 1) / 2``
clipped to [0, 1]. They are never stretched to their own minimum and maximum, so grey levels
are comparable across panels and a washed-out restoration looks washed out. Every
function returns a closed matplotlib Figure: a notebook shows it once (as the value of
the cell, or through ``glue``) instead of twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure


def to_display(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Map one image in [-1, 1] to a numpy array in [0, 1]: (H, W) for one channel, else (H, W, C).

    Accepts (H, W), (C, H, W) or (1, C, H, W). Values outside [-1, 1] are clipped.
    """
    array = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        if array.shape[0] not in (1, 3):
            raise ValueError(f"image has shape {array.shape}, expected 1 or 3 channels first")
        array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    elif array.ndim != 2:
        raise ValueError(f"image has shape {array.shape}, expected (H, W), (C, H, W) or (1, C, H, W)")
    return np.clip((array + 1) / 2, 0, 1)


def show_image(ax, image, title: str | None = None) -> None:
    """Draw one image on ``ax`` with the fixed grey scale 0..1 and no axis ticks."""
    ax.imshow(to_display(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=9)


def signed_panel(ax, image: torch.Tensor | np.ndarray, title: str | None = None,
                 marker: tuple[int, int] | None = None, exclude: int | None = None) -> None:
    """Draw a signed map (C, H, W) or (H, W): red positive, blue negative, on a scale symmetric about 0.

    Several channels are shown as their mean. The scale is the map's own largest magnitude,
    leaving out pixel ``exclude`` if given, so that a Jacobian column's large diagonal entry
    does not wash out the rest. ``exclude`` is a row-major flat index over (C, H, W) or
    (H, W), as :func:`diffinv.analysis.pixel_index` returns; its channel is ignored. ``marker`` (row,
    column) draws a cross on one pixel.
    """
    image = torch.as_tensor(image).detach()
    panel = image.float().cpu()
    panel = panel.mean(0) if panel.ndim == 3 else panel
    if panel.ndim != 2 or panel.numel() == 0:
        raise ValueError(f"image has shape {tuple(image.shape)}, expected a non-empty (C, H, W) or (H, W)")
    if not bool(torch.isfinite(panel).all()):
        raise ValueError(f"image has {int((~torch.isfinite(panel)).sum())} non-finite pixels (NaN or inf), "
                         "expected finite values to scale the colours by")
    scaled = panel.flatten().clone()
    if exclude is not None:
        if isinstance(exclude, bool) or not isinstance(exclude, int) or not 0 <= exclude < image.numel():
            raise ValueError(f"exclude = {exclude!r}, expected a flat pixel index in [0, {image.numel()})")
        scaled[exclude % scaled.numel()] = 0
    limit = float(scaled.abs().max()) or 1.0
    ax.imshow(panel.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    if marker is not None:
        ax.plot(marker[1], marker[0], marker="+", color="black", markersize=7)
    if title:
        ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def image_grid(images: torch.Tensor | Sequence, titles: Sequence[str] | None = None,
               ncols: int | None = None, size: float = 1.8, row_labels: Sequence[str] | None = None,
               suptitle: str | None = None) -> Figure:
    """Draw ``images`` ((N, C, H, W) or a list of (C, H, W)) in a grid, row by row.

    ``ncols`` defaults to all images in one row. ``row_labels`` name the rows on the left;
    ``size`` is the side of one panel in inches.
    """
    images = list(images)
    count = len(images)
    if count == 0:
        raise ValueError("image_grid received no images")
    if titles is not None and len(titles) != count:
        raise ValueError(f"{len(titles)} titles for {count} images, expected one title per image")
    ncols = ncols or count
    nrows = math.ceil(count / ncols)
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"{len(row_labels)} row labels for {nrows} rows, expected one per row")

    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for position, ax in enumerate(axes.flat):
        if position < count:
            show_image(ax, images[position], titles[position] if titles is not None else None)
        else:
            ax.axis("off")
    for row, label in enumerate(row_labels or []):
        axes[row, 0].set_ylabel(label, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def evenly_spaced(items: Sequence, count: int | None) -> list:
    """Return ``count`` items spread evenly over ``items``, first and last included (all when count is None)."""
    items = list(items)
    if count is None or count >= len(items):
        return items
    if count < 2:
        raise ValueError(f"count = {count}, expected at least 2 to keep the first and the last item")
    positions = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in positions]


def trajectory_figure(trajectory: Sequence[tuple[int, torch.Tensor, torch.Tensor]], index: int = 0,
                      columns: int | None = None, size: float = 1.3) -> Figure:
    """Draw ``x_t`` (top row) and ``x0_hat`` (bottom row) of image ``index`` at each recorded t.

    ``trajectory`` is :attr:`diffinv.solvers.SolverResult.trajectory`, a list of
    ``(t, x_t, x0_hat)`` with batched tensors, from the noisiest step to t = 0. ``columns``
    caps the number of snapshots shown, spread evenly over the run.
    """
    if not trajectory:
        raise ValueError("the trajectory is empty; pass record_every to the solver to record one")
    snapshots = evenly_spaced(trajectory, columns)
    frames = [x_t[index] for _, x_t, _ in snapshots] + [x0_hat[index] for _, _, x0_hat in snapshots]
    titles = [f"t = {t}" for t, _, _ in snapshots] + [""] * len(snapshots)
    return image_grid(frames, titles, ncols=len(snapshots), size=size,
                      row_labels=[r"$x_t$", r"$\hat{x}_0(x_t)$"])
