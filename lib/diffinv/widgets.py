"""Sliders over images: a static one for the rendered book and a live one for a running kernel.

ipywidgets need a kernel to redraw after each slider move, so in a rendered page they do nothing.
:func:`scrub_animation` renders every frame up front into a matplotlib JavaScript animation
(``FuncAnimation.to_jshtml``), whose slider works in any browser without a kernel.
:func:`live_slider` wraps ``ipywidgets.interactive`` for readers running the notebook.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import HTML
from matplotlib import animation

from .plotting import show_image, to_display

# Upper bound, in MB, on the frames embedded in one animation (matplotlib's default is 20).
EMBED_LIMIT_MB = 20.0

# matplotlib's animation template draws its buttons with Font Awesome icons loaded from a CDN
# (matplotlib/_animation_data.py, checked for matplotlib 3.11). Plain characters replace the
# icons so that the controls render offline.
BUTTON_ICONS = {
    "fa fa-minus": "\u2212",
    "fa fa-fast-backward": "|\u25c0\u25c0",
    "fa fa-step-backward": "|\u25c0",
    "fa fa-play fa-flip-horizontal": "\u25c0",
    "fa fa-pause": "||",
    "fa fa-play": "\u25b6",
    "fa fa-step-forward": "\u25b6|",
    "fa fa-fast-forward": "\u25b6\u25b6|",
    "fa fa-plus": "+",
}
FONT_AWESOME_LINK = re.compile(r"<link[^>]*font-awesome[^>]*>", re.IGNORECASE)
ICON = re.compile(r'<i class="(fa [^"]+)"></i>')


def _panels(frame) -> list:
    """Split one frame into its panels: a (K, C, H, W) array or a list gives K, an image gives 1."""
    if isinstance(frame, (torch.Tensor, np.ndarray)) and frame.ndim == 4:
        return list(frame)
    if isinstance(frame, (list, tuple)):
        return list(frame)
    return [frame]


def without_remote_icons(html: str) -> str:
    """Drop the Font Awesome stylesheet link from an animation's HTML and put characters in place of its icons."""
    html = FONT_AWESOME_LINK.sub("", html)
    return ICON.sub(lambda match: BUTTON_ICONS.get(match.group(1), "?"), html)


def scrub_animation(frames: Sequence, titles: Sequence[str] | None = None,
                    frame_labels: Sequence[str] | None = None, size: float = 1.6, dpi: int = 72,
                    interval_ms: int = 300) -> HTML:
    """Return an HTML slider over ``frames`` that works without a kernel.

    Each frame is one image (C, H, W) or K panels side by side ((K, C, H, W) or a list).
    Every frame has the same number of panels; each panel is ``size`` inches high, and its width
    follows its aspect ratio. ``titles`` name the panels, ``frame_labels``
    (for example ``"t = 999"``) label each frame. Frames are embedded as PNG at ``dpi``, so
    the page size grows with frames x panels x (size x dpi)^2.
    """
    frames = [_panels(frame) for frame in frames]
    if not frames:
        raise ValueError("scrub_animation received no frames")
    if not size > 0:
        raise ValueError(f"size = {size!r}, expected a positive panel height in inches")
    panel_count = len(frames[0])
    if panel_count == 0 or any(len(panels) != panel_count for panels in frames):
        raise ValueError(f"frames have {sorted({len(p) for p in frames})} panels, expected the same positive "
                         f"number in every frame")
    shapes = [tuple(panel.shape) for panel in frames[0]]
    for index, panels in enumerate(frames):
        for position, panel in enumerate(panels):
            if tuple(panel.shape) != shapes[position]:
                raise ValueError(f"panel {position} of frame {index} has shape {tuple(panel.shape)}, expected "
                                 f"{shapes[position]} as in the first frame")
    if isinstance(titles, str):
        raise ValueError(f"titles = {titles!r} is one string, expected one title per panel")
    if titles is not None and len(titles) != panel_count:
        raise ValueError(f"{len(titles)} titles for {panel_count} panels, expected one per panel")
    if frame_labels is not None and len(frame_labels) != len(frames):
        raise ValueError(f"{len(frame_labels)} frame labels for {len(frames)} frames, expected one per frame")

    # A panel keeps its aspect ratio: a strip of several maps side by side gets a wider axis, not smaller maps.
    widths = [panel.shape[-1] / panel.shape[-2] for panel in frames[0]]
    fig, axes = plt.subplots(1, panel_count, figsize=(size * sum(widths), size + 0.5), dpi=dpi, squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, image, title in zip(axes[0], frames[0], titles or [None] * panel_count):
        show_image(ax, image, title)
    artists = [ax.images[0] for ax in axes[0]]
    label = fig.suptitle(frame_labels[0] if frame_labels else "", fontsize=10)
    fig.tight_layout()

    def draw(index: int):
        for artist, image in zip(artists, frames[index]):
            artist.set_data(to_display(image))
        if frame_labels:
            label.set_text(frame_labels[index])
        return [*artists, label]

    movie = animation.FuncAnimation(fig, draw, frames=len(frames), interval=interval_ms, blit=False)
    with plt.rc_context({"animation.embed_limit": EMBED_LIMIT_MB, "animation.frame_format": "png"}):
        html = movie.to_jshtml(default_mode="once")
    plt.close(fig)
    return HTML(without_remote_icons(html))


def live_slider(fn: Callable, **ranges):
    """Return an ``ipywidgets.interactive`` calling ``fn`` with one slider per keyword.

    Each keyword follows ``ipywidgets.interact``: ``(min, max)`` or ``(min, max, step)`` for
    a slider, a list for a dropdown, a widget as is. The widget needs a running kernel; in
    the book the cell's output is removed and a :func:`scrub_animation` follows it.
    """
    import ipywidgets

    if not ranges:
        raise ValueError("live_slider received no ranges, expected at least one keyword such as step=(0, 10)")
    return ipywidgets.interactive(fn, **ranges)
