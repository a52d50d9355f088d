"""Tests of PSNR, SSIM, LPIPS and the metric summary against closed forms and reference values."""

import hashlib
import http.server
import math
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import structural_similarity

from diffinv import metrics
from diffinv.data import shared_data_dir

SHARED = shared_data_dir()
needs_shared = pytest.mark.skipif(
    SHARED is None,
    reason="shared data folder not found: set DIFFINV_SHARED_DATA to the folder with lpips-examples/",
)


def from_unit(images: torch.Tensor) -> torch.Tensor:
    return 2 * images - 1


def smooth_images(shape, seed):
    """Blurred noise in [0, 1], float64: images with structure at several scales."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(shape, generator=generator, dtype=torch.float64)
    blurred = F.avg_pool2d(F.pad(noise, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return 0.5 * noise + 0.5 * blurred


def read_example(name: str) -> torch.Tensor:
    array = np.asarray(Image.open(SHARED / "lpips-examples" / name).convert("RGB"), dtype=np.float32)
    return from_unit(torch.from_numpy(array / 255).permute(2, 0, 1)[None])


# PSNR


def test_alexnet_url_is_torchvisions():
    from torchvision.models import AlexNet_Weights

    assert metrics.ALEXNET_URL == AlexNet_Weights.IMAGENET1K_V1.url


def test_psnr_constant_offset():
    ref = 0.8 * smooth_images((2, 1, 32, 32), seed=0)
    for c in (0.01, 0.1, 0.2):
        value = metrics.psnr(from_unit(ref + c), from_unit(ref))
        expected = 10 * math.log10(1 / c**2)
        assert torch.allclose(value, torch.full((2,), expected, dtype=torch.float64), atol=1e-9), (c, value)


def test_psnr_identical_is_inf():
    ref = from_unit(smooth_images((3, 1, 32, 32), seed=1))
    assert torch.isinf(metrics.psnr(ref, ref)).all()


def test_psnr_clips_out_of_range():
    ref = torch.ones(1, 1, 32, 32, dtype=torch.float64)
    assert torch.isinf(metrics.psnr(1.5 * ref, ref)).all()


# SSIM


def test_ssim_identical_is_one():
    ref = from_unit(smooth_images((2, 3, 32, 32), seed=2))
    assert torch.allclose(metrics.ssim(ref, ref), torch.ones(2, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_skimage(channels):
    ref = smooth_images((3, channels, 32, 40), seed=3)
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4), dtype=ref.dtype)
    noisy = (ref + 0.1 * noise).clamp(0, 1)
    dimmed = 0.7 * ref + 0.1
    for x in (noisy, dimmed):
        ours = metrics.ssim(from_unit(x), from_unit(ref))
        for i in range(ref.shape[0]):
            expected = structural_similarity(
                x[i].numpy(),
                ref[i].numpy(),
                channel_axis=0,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1.0,
            )
            assert abs(ours[i].item() - expected) < 1e-4, (i, ours[i].item(), expected)


def test_ssim_rejects_small_images():
    x = torch.zeros(1, 1, 10, 32)
    with pytest.raises(ValueError, match=r"\(1, 1, 10, 32\)"):
        metrics.ssim(x, x)


# Shared input checks


@pytest.mark.parametrize("metric", [metrics.psnr, metrics.ssim, metrics.lpips])
def test_shape_mismatch_names_shapes(metric):
    x = torch.zeros(2, 1, 32, 32)
    ref = torch.zeros(2, 1, 32, 30)
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32\).*\(2, 1, 32, 30\)"):
        metric(x, ref)


def test_all_metrics_keys():
    ref = from_unit(smooth_images((2, 1, 32, 32), seed=5)).float()
    values = metrics.all_metrics(ref.flip(-1), ref)
    assert sorted(values) == ["lpips", "psnr", "ssim"]
    for name, value in values.items():
        assert value.shape == (2,), name


# LPIPS


@needs_shared
def test_lpips_reference_values():
    ref, p0, p1 = (read_example(name) for name in ("ex_ref.png", "ex_p0.png", "ex_p1.png"))
    assert abs(metrics.lpips(ref, p0).item() - 0.722) < 1e-3
    assert abs(metrics.lpips(ref, p1).item() - 0.138) < 1e-3


def test_lpips_grayscale_32px():
    ref = from_unit(smooth_images((8, 1, 32, 32), seed=6)).float()
    x = from_unit(smooth_images((8, 1, 32, 32), seed=7)).float()
    value = metrics.lpips(x, ref)
    assert value.shape == (8,)
    assert torch.isfinite(value).all()
    assert (value > 0).all()
    assert torch.allclose(metrics.lpips(ref, ref), torch.zeros(8), atol=1e-6)


def test_lpips_enlarges_small_images():
    ref = from_unit(smooth_images((2, 3, 32, 32), seed=8)).float()
    x = from_unit(smooth_images((2, 3, 32, 32), seed=9)).float()
    x_64, ref_64 = (
        F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False) for images in (x, ref)
    )
    assert torch.allclose(metrics.lpips(x, ref), metrics.lpips(x_64, ref_64), atol=1e-6)


def test_lpips_rejects_two_channels():
    x = torch.zeros(1, 2, 32, 32)
    with pytest.raises(ValueError, match="2 channels"):
        metrics.lpips(x, x)


def offline_hub(monkeypatch, tmp_path: Path) -> None:
    """Point the torch hub cache at an empty folder and make every download fail."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(metrics, "_download_alexnet", lambda path: "download failed: offline in this test")


@needs_shared
def test_lpips_shared_weights_fallback(monkeypatch, tmp_path):
    offline_hub(monkeypatch, tmp_path)
    network = metrics._build_lpips_network()
    ref, p1 = read_example("ex_ref.png"), read_example("ex_p1.png")
    with torch.no_grad():
        value = network(ref, p1).item()
    assert abs(value - 0.138) < 1e-3


def test_lpips_missing_weights_error(monkeypatch, tmp_path):
    offline_hub(monkeypatch, tmp_path)
    monkeypatch.setenv("DIFFINV_SHARED_DATA", str(tmp_path))
    with pytest.raises(RuntimeError) as raised:
        metrics._build_lpips_network()
    message = str(raised.value)
    assert "alexnet-owt-7be5be79.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "DIFFINV_SHARED_DATA" in message
    assert "alexnet_features.safetensors" in message


@pytest.fixture
def weights_server(monkeypatch):
    """Serve a small stand-in weights file on loopback and point the download URL at it."""
    payload = b"stand-in for the AlexNet weights"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr(metrics, "ALEXNET_URL", f"http://127.0.0.1:{server.server_port}/weights.pth")
    yield payload
    server.shutdown()
    server.server_close()


def test_download_checks_hash(weights_server, tmp_path):
    prefix = hashlib.sha256(weights_server).hexdigest()[:8]
    path = tmp_path / f"alexnet-owt-{prefix}.pth"
    assert metrics._download_alexnet(path) is None
    assert path.read_bytes() == weights_server


def test_download_rejects_bad_hash(weights_server, tmp_path):
    path = tmp_path / "alexnet-owt-00000000.pth"
    error = metrics._download_alexnet(path)
    assert "expected prefix 00000000" in error
    assert list(tmp_path.iterdir()) == []


def test_download_unreachable_host(monkeypatch, tmp_path):
    # A port that was just free on loopback refuses the connection at once.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/weights.pth"
    monkeypatch.setattr(metrics, "ALEXNET_URL", url)
    error = metrics._download_alexnet(tmp_path / "alexnet-owt-00000000.pth")
    assert error.startswith(f"download of {url} failed")
    assert list(tmp_path.iterdir()) == []


# Summary


def test_summarize_t_interval():
    # mean 2.5, s = sqrt(5/3), t_{0.975, 3} = 3.182446305283708 (scipy.stats.t.ppf(0.975, 3)).
    summary = metrics.summarize([1.0, 2.0, 3.0, 4.0])
    half_width = 3.182446305283708 * math.sqrt(5 / 3) / 2
    assert summary["mean"] == pytest.approx(2.5)
    assert summary["low"] == pytest.approx(2.5 - half_width, rel=1e-12)
    assert summary["high"] == pytest.approx(2.5 + half_width, rel=1e-12)


def test_summarize_single_value():
    summary = metrics.summarize(torch.tensor([0.3]))
    assert summary == {"mean": pytest.approx(0.3), "low": pytest.approx(0.3), "high": pytest.approx(0.3)}


def test_summarize_infinite_psnr():
    summary = metrics.summarize([math.inf, 20.0])
    assert summary["mean"] == math.inf
    assert math.isnan(summary["low"])
    assert math.isnan(summary["high"])


def test_summarize_rejects_empty():
    with pytest.raises(ValueError, match="no values"):
        metrics.summarize([])
