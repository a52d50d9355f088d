"""Face images as float32 tensors ``(N, C, H, W)`` in [-1, 1].

Three sources load through :func:`load_dataset`:

- ``"faces"``, the embedded default: the 100 face images of ``skimage.data.lfw_subset()``
  (indices 0-99; indices 100-199 are non-faces), 25x25 grayscale, resized to 32x32 with
  anti-aliased bilinear interpolation. The split is fixed: the 20 test indices in
  :data:`TEST_INDICES` (``sorted(numpy.random.default_rng(2024).permutation(100)[:20])``,
  written out so that no NumPy version can change it) and the other 80 for training.
- ``"olivetti"``: the 400 Olivetti faces (64x64, 40 people) through scikit-learn's fetcher.
  Offline, its cache is seeded from ``olivetti/olivettifaces.mat`` in the shared data folder.
  The split keeps the last two images of each person for testing (80 of 400).
- any folder of images, all of it in the ``"test"`` split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TEST_INDICES = (2, 5, 11, 17, 29, 33, 41, 45, 48, 49, 52, 55, 58, 60, 61, 67, 75, 77, 78, 84)
TRAIN_INDICES = tuple(i for i in range(100) if i not in TEST_INDICES)
SPLITS = ("train", "test", "all")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class FaceSet:
    """Images in [-1, 1] with the dataset index of each one."""

    images: torch.Tensor
    indices: list[int]
    name: str

    def __len__(self) -> int:
        return len(self.indices)

    def take(self, count: int) -> FaceSet:
        """Return the first ``count`` images."""
        if not 1 <= count <= len(self):
            raise ValueError(f"{count} images requested, but the {self.name} split holds {len(self)}")
        return FaceSet(self.images[:count], self.indices[:count], self.name)


def shared_data_dir() -> Path | None:
    """Return the folder of offline copies of downloaded files, or None when there is none.

    ``DIFFINV_SHARED_DATA`` takes precedence; otherwise ``shared/data`` beside the checkout
    that contains this package is used when it exists.
    """
    env = os.environ.get("DIFFINV_SHARED_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    beside_checkout = Path(__file__).resolve().parents[3] / "shared" / "data"
    return beside_checkout if beside_checkout.is_dir() else None


def to_model_range(images: np.ndarray, size: int | None) -> torch.Tensor:
    """Convert images in [0, 1] of shape (N, H, W) or (N, H, W, C) to (N, C, size, size) in [-1, 1]."""
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 3:
        array = array[..., None]
    x = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
    if size is not None and x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (2 * x - 1).clamp(-1, 1)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not valid, expected one of {', '.join(SPLITS)}")


def load_faces(split: str = "test", size: int = 32) -> FaceSet:
    """Load the embedded LFW faces shipped in scikit-image, resized to ``size`` x ``size``."""
    from skimage.data import lfw_subset

    _check_split(split)
    indices = {"train": TRAIN_INDICES, "test": TEST_INDICES, "all": tuple(range(100))}[split]
    faces = lfw_subset()[list(indices)]
    return FaceSet(to_model_range(faces, size), list(indices), f"faces/{split}")


def _seed_olivetti_cache(data_home: Path) -> None:
    """Write scikit-learn's Olivetti cache file from the shared offline copy, if one exists."""
    import joblib
    from scipy.io import loadmat

    target = data_home / "olivetti_py3.pkz"
    shared = shared_data_dir()
    if target.exists() or shared is None or not (shared / "olivetti" / "olivettifaces.mat").exists():
        return
    faces = loadmat(shared / "olivetti" / "olivettifaces.mat")["faces"]
    data_home.mkdir(parents=True, exist_ok=True)
    joblib.dump(faces.T, target, compress=6)


def load_olivetti(split: str = "test", size: int = 64) -> FaceSet:
    """Load the Olivetti faces through ``sklearn.datasets.fetch_olivetti_faces``."""
    from sklearn.datasets import fetch_olivetti_faces, get_data_home

    _check_split(split)
    _seed_olivetti_cache(Path(get_data_home()))
    try:
        faces = fetch_olivetti_faces(shuffle=False).images
    except OSError as error:
        raise RuntimeError(
            "the Olivetti faces could not be downloaded; place olivettifaces.mat in "
            "$DIFFINV_SHARED_DATA/olivetti/ to load them offline"
        ) from error
    is_test = np.arange(400) % 10 >= 8
    keep = {"train": ~is_test, "test": is_test, "all": np.ones(400, bool)}[split]
    indices = np.flatnonzero(keep).tolist()
    return FaceSet(to_model_range(faces[keep], size), indices, f"olivetti/{split}")


def load_folder(path: str | Path, size: int, channels: int = 3) -> FaceSet:
    """Load every image in a folder (sorted by name), center-cropped to a square and resized."""
    from PIL import Image

    folder = Path(path)
    if channels not in (1, 3):
        raise ValueError(f"channels = {channels}, expected 1 or 3")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {folder}")
    arrays = []
    for file in files:
        image = Image.open(file).convert("L" if channels == 1 else "RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    return FaceSet(to_model_range(np.stack(arrays), None), list(range(len(files))), str(folder))


def load_dataset(name: str, split: str = "test", size: int | None = None) -> FaceSet:
    """Load ``"faces"`` (embedded, 32 px), ``"olivetti"`` (64 px) or a folder of images (256 px, RGB)."""
    if name == "faces":
        return load_faces(split, size or 32)
    if name == "olivetti":
        return load_olivetti(split, size or 64)
    if Path(name).is_dir():
        return load_folder(name, size or 256)
    raise ValueError(f"dataset {name!r} is not valid, expected 'faces', 'olivetti' or an existing folder of images")
