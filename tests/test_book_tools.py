"""Tests of the book pipeline: pins, notebook sources, profiles, the execute and check scripts,
and the plotting and widget helpers the chapters use."""

from __future__ import annotations

import ast
import base64
import io
import re
import shutil
import socket
import struct
import sys
import tomllib
from pathlib import Path

import jupytext
import matplotlib.pyplot as plt
import nbformat
import numpy as np
import papermill
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "tools"))

import check_rendered  # noqa: E402
import devtools  # noqa: E402
import execute  # noqa: E402

from diffinv.plotting import evenly_spaced, image_grid, signed_panel, to_display, trajectory_figure  # noqa: E402
from diffinv.widgets import live_slider, scrub_animation  # noqa: E402

NOTEBOOK_SOURCES = sorted((ROOT / "notebooks").glob("*.md"))
CHAPTERS = execute.toc_chapters(ROOT / "_toc.yml")
PROFILES = ("ci", "full")


def pin_set(requirements) -> set[tuple[str, str]]:
    """Return ``{(normalised name, version)}`` for ``name==version`` lines, ignoring anything else."""
    pins = set()
    for line in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*(\S+)\s*", line)
        if match:
            pins.add((re.sub(r"[-_.]+", "-", match.group(1)).lower(), match.group(2)))
    return pins


def parameters_cells(notebook) -> list:
    return [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]


# ---------------------------------------------------------------------------------------------
# Pins, notebook sources and profiles


def test_environment_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pyproject_lines = list(project["dependencies"])
    for extra in ("book", "test"):
        pyproject_lines += project["optional-dependencies"][extra]

    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))

    assert pin_set(pip_section) == pin_set(pyproject_lines)


def test_environment_python_version():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in environment["dependencies"]


def test_notebook_sources_exist():
    assert NOTEBOOK_SOURCES, "no notebook sources in notebooks/"


@pytest.mark.parametrize("source", NOTEBOOK_SOURCES, ids=lambda path: path.stem)
def test_notebook_header(source):
    text = source.read_text()
    assert text.startswith("---\n"), f"{source.name} has no YAML header"
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["jupytext"]["text_representation"]["format_name"] == "myst"
    assert header["kernelspec"]["name"] == "python3"
    assert header["kernelspec"]["language"] == "python"


@pytest.mark.parametrize("source", NOTEBOOK_SOURCES, ids=lambda path: path.stem)
def test_notebook_parameters_cell(source, tmp_path):
    notebook = jupytext.read(source)
    cells = parameters_cells(notebook)
    assert len(cells) == 1, f"{source.name} has {len(cells)} cells tagged parameters, expected 1"

    # papermill must read every assignment of the cell, or a profile cannot set it.
    assigned = {target.id for node in ast.parse(cells[0].source).body if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)}
    path = tmp_path / f"{source.stem}.ipynb"
    jupytext.write(notebook, path)
    assert set(papermill.inspect_notebook(str(path))) == assigned


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_toc_chapter_has_source(chapter):
    assert (ROOT / "notebooks" / f"{chapter}.md").exists()


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_toc_chapter_in_profile(chapter, profile):
    assert chapter in execute.load_profile(profile)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_profile_sets_known_parameters(chapter, profile):
    source = ROOT / "notebooks" / f"{chapter}.md"
    if not source.exists():
        pytest.skip(f"{source.name} is missing (reported by test_toc_chapter_has_source)")
    cells = parameters_cells(jupytext.read(source))
    defined = {target.id for node in ast.parse(cells[0].source).body if isinstance(node, ast.Assign)
               for target in node.targets if isinstance(target, ast.Name)}
    parameters = execute.load_profile(profile).get(chapter, {})
    assert set(parameters) <= defined, f"unknown parameters {sorted(set(parameters) - defined)}"


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_chapters_in_toc(profile):
    assert set(execute.load_profile(profile)) <= set(CHAPTERS)


def test_toc_chapters_unique():
    assert len(CHAPTERS) == len(set(CHAPTERS))


# ---------------------------------------------------------------------------------------------
# execute.py


def test_toc_chapters_nested_parts(tmp_path):
    toc = tmp_path / "_toc.yml"
    toc.write_text(yaml.safe_dump({
        "format": "jb-book", "root": "book/intro",
        "parts": [{"caption": "One", "chapters": [{"file": "notebooks/_executed/01_a"},
                                                   {"file": "book/notation"}]},
                  {"caption": "Two", "chapters": [{"file": "notebooks/_executed/02_b.ipynb",
                                                   "sections": [{"file": "notebooks/_executed/03_c"}]}]}],
    }))
    assert execute.toc_chapters(toc) == ["01_a", "02_b", "03_c"]


def notebook_with_outputs(*outputs):
    cell = nbformat.v4.new_code_cell("pass")
    cell.outputs = list(outputs)
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("text"), cell])


@pytest.mark.parametrize("text", [
    "Traceback (most recent call last):\n  File ...",
    "ValueError: sigma_y = -1, expected a positive finite number\n",
    "torch.cuda.OutOfMemoryError: out of memory\n",
    "ERROR:diffinv:the run diverged\n",
    "usage: tool [-h]\ntool: error: unrecognised arguments\n",
])
def test_stderr_errors_flags(text):
    notebook = notebook_with_outputs(nbformat.v4.new_output("stream", name="stderr", text=text))
    assert len(execute.stderr_errors(notebook)) == 1


@pytest.mark.parametrize("text", [
    "UserWarning: the default of this option will change\n",
    "sampling: 100%|##########| 100/100\n",
])
def test_stderr_errors_ignores_warnings(text):
    notebook = notebook_with_outputs(nbformat.v4.new_output("stream", name="stderr", text=text))
    assert execute.stderr_errors(notebook) == []


def test_stderr_errors_ignores_stdout():
    notebook = notebook_with_outputs(nbformat.v4.new_output("stream", name="stdout", text="ValueError: shown\n"))
    assert execute.stderr_errors(notebook) == []


def test_stderr_errors_flags_error_output():
    error = nbformat.v4.new_output("error", ename="RuntimeError", evalue="boom", traceback=[])
    assert execute.stderr_errors(notebook_with_outputs(error)) == ["cell 1: RuntimeError: boom"]


def test_finish_notebook_drops_widget_state():
    notebook = notebook_with_outputs()
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"a": {}}}}
    execute.finish_notebook(notebook, "ci")
    assert "widgets" not in notebook.metadata


def test_finish_notebook_names_profile():
    notebook = notebook_with_outputs()
    injected = nbformat.v4.new_code_cell("# Parameters\nimages = 4\n", metadata={"tags": ["injected-parameters"]})
    notebook.cells.append(injected)
    execute.finish_notebook(notebook, "full")
    assert notebook.cells[-1].source == "# Parameters of the full profile\nimages = 4\n"


def test_write_atomically(tmp_path):
    target = tmp_path / "out" / "01_a.ipynb"
    execute.write_atomically(notebook_with_outputs(), target)
    assert nbformat.read(target, as_version=4).cells[0].source == "text"
    assert sorted(p.name for p in target.parent.iterdir()) == ["01_a.ipynb"]


def test_load_profile_missing():
    with pytest.raises(execute.ChapterFailed, match="profile 'nonexistent' not found"):
        execute.load_profile("nonexistent")


# ---------------------------------------------------------------------------------------------
# check_rendered.py and devtools.py (pure parts)


def clean_report(**changes):
    report = {"images": 1, "brokenImages": [], "math": 2, "mathUntypeset": [], "mathContainers": 2,
              "mathErrors": [], "rawTex": [], "rawTables": [], "widgetPlaceholders": 0, "tracebacks": [], "stderr": [],
              "remoteReferences": [], "staticSliders": 0}
    report.update(changes)
    return report


def test_report_failures_clean():
    assert check_rendered.report_failures(clean_report()) == []


@pytest.mark.parametrize("changes, expected", [
    ({"brokenImages": ["fig.png"]}, "image did not load: fig.png"),
    ({"mathUntypeset": ["x^2"]}, "math not typeset by MathJax: x^2"),
    ({"mathContainers": 0}, "2 math elements but no MathJax output"),
    ({"mathErrors": ["Undefined control sequence"]}, "MathJax error: Undefined control sequence"),
    ({"rawTex": ["$$x$$"]}, "raw TeX in the text"),
    ({"rawTables": ["| t0 | PSNR | |---|---|"]}, "Markdown table left as text"),
    ({"widgetPlaceholders": 1}, "widget placeholder"),
    ({"tracebacks": ["Traceback (most recent call last)"]}, "error output"),
    ({"stderr": ["ValueError: bad"]}, "stderr output with an error"),
    ({"remoteReferences": ["https://cdn.example/mathjax.js"]}, "remote reference"),
])
def test_report_failures_flags(changes, expected):
    failures = check_rendered.report_failures(clean_report(**changes))
    assert len(failures) == 1
    assert expected in failures[0]


def test_report_failures_passes_stderr_warning():
    assert check_rendered.report_failures(clean_report(stderr=["UserWarning: slow"])) == []


def test_event_failures():
    events = [
        {"method": "Network.requestWillBeSent", "params": {"requestId": "1", "request": {"url": "file:///b/x.png"}}},
        {"method": "Network.requestWillBeSent", "params": {"requestId": "2", "request": {"url": "https://cdn.x/a.js"}}},
        {"method": "Network.loadingFailed", "params": {"requestId": "1", "errorText": "net::ERR_FILE_NOT_FOUND"}},
        {"method": "Network.loadingFailed", "params": {"requestId": "2", "errorText": "net::ERR_NAME_NOT_RESOLVED"}},
        {"method": "Runtime.exceptionThrown", "params": {"exceptionDetails": {"text": "Uncaught",
                                                                              "exception": {"description": "SyntaxError: x"}}}},
    ]
    assert check_rendered.event_failures(events) == [
        "requested a remote resource: https://cdn.x/a.js",
        "could not load file:///b/x.png: net::ERR_FILE_NOT_FOUND",
        "script exception: SyntaxError: x",
    ]


def test_redirect_target(tmp_path):
    page = tmp_path / "index.html"
    page.write_text('<meta http-equiv="Refresh" content="0; url=book/intro.html" />')
    assert check_rendered.redirect_target(page) == (tmp_path / "book" / "intro.html").resolve()


def test_redirect_target_none(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<html><body>text</body></html>")
    assert check_rendered.redirect_target(page) is None


def test_book_pages_skip_asset_folders(tmp_path):
    for name in ("index.html", "_static/x.html", "_sources/y.html", "notebooks/_executed/01_a.html"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    pages = [str(p.relative_to(tmp_path)) for p in check_rendered.book_pages(tmp_path)]
    assert pages == ["index.html", "notebooks/_executed/01_a.html"]


def websocket_pair():
    """Return a devtools.WebSocket on one end of a socket pair, and the raw other end."""
    client_end, server_end = socket.socketpair()
    websocket = devtools.WebSocket.__new__(devtools.WebSocket)
    websocket.sock, websocket.buffer = client_end, b""
    return websocket, server_end


def read_client_frame(server_end) -> tuple[int, bytes]:
    """Read one masked client frame from the raw socket; return its opcode and unmasked payload."""
    def read(count):
        data = b""
        while len(data) < count:
            data += server_end.recv(count - len(data))
        return data

    first, second = read(2)
    assert second & 0x80, "client frames must be masked"
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", read(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", read(8))[0]
    mask = read(4)
    payload = bytes(byte ^ mask[i % 4] for i, byte in enumerate(read(length)))
    return first & 0x0F, payload


def server_frame(opcode: int, payload: bytes, final: bool = True) -> bytes:
    length = len(payload)
    if length < 126:
        header = bytes([(0x80 if final else 0) | opcode, length])
    elif length < 1 << 16:
        header = bytes([(0x80 if final else 0) | opcode, 126]) + struct.pack("!H", length)
    else:
        header = bytes([(0x80 if final else 0) | opcode, 127]) + struct.pack("!Q", length)
    return header + payload


@pytest.mark.parametrize("size", [5, 300, 70000])
def test_websocket_send_masks_payload(size):
    websocket, server_end = websocket_pair()
    text = "x" * size
    websocket.send_text(text)
    assert read_client_frame(server_end) == (devtools.OPCODE_TEXT, text.encode())


@pytest.mark.parametrize("size", [5, 300, 70000])
def test_websocket_receive_lengths(size):
    websocket, server_end = websocket_pair()
    server_end.sendall(server_frame(devtools.OPCODE_TEXT, b"y" * size))
    assert websocket.receive_text() == "y" * size


def test_websocket_receive_fragments_and_ping():
    websocket, server_end = websocket_pair()
    server_end.sendall(server_frame(devtools.OPCODE_TEXT, b"ab", final=False)
                       + server_frame(devtools.OPCODE_PING, b"p")
                       + server_frame(devtools.OPCODE_CONTINUATION, b"cd"))
    assert websocket.receive_text() == "abcd"
    assert read_client_frame(server_end) == (devtools.OPCODE_PONG, b"p")


# ---------------------------------------------------------------------------------------------
# check_rendered.py end to end, on a tiny site, when Chromium is installed


def chromium_available() -> bool:
    return any(shutil.which(name) for name in check_rendered.CHROMIUM_NAMES)


@pytest.mark.skipif(not chromium_available(), reason="Chromium is not installed")
def test_check_rendered_site(tmp_path, capsys):
    buffer = io.BytesIO()
    plt.imsave(buffer, np.zeros((4, 4)), format="png")
    pixel = base64.b64encode(buffer.getvalue()).decode()
    site = tmp_path / "html"
    site.mkdir()
    (site / "index.html").write_text(f'<html><body><p>fine</p><img src="data:image/png;base64,{pixel}"></body></html>')
    (site / "bad.html").write_text(
        '<html><body><p>$$x^2$$</p><p>| a | b | |---|---| | 1 | 2 |</p><img src="missing.png">'
        '<div class="cell_output"><div class="output traceback">Traceback (most recent call last)</div></div>'
        '<script src="https://cdn.invalid/lib.js"></script></body></html>')

    # A rule row inside code, a keyboard hint or a rendered table cell is content, not a table left as text.
    (site / "docs.html").write_text(
        '<html><body><pre>|---|---|</pre><p>type <kbd>|---|</kbd></p>'
        '<table><tr><td>|---|---|</td></tr></table><p>x |-1| y, a - b | c</p></body></html>')
    (site / "short.html").write_text('<html><body><p>| a | b | |-|-| | 1 | 2 |</p></body></html>')

    status = check_rendered.main(["--html", str(site), "--screenshots", str(tmp_path / "shots")])
    output = capsys.readouterr().out

    assert status == 1
    assert "ok   index.html" in output
    assert "FAIL bad.html" in output
    assert "image did not load: missing.png" in output
    assert "raw TeX in the text" in output
    assert "Markdown table left as text" in output
    assert "ok   docs.html" in output
    assert "FAIL short.html" in output
    assert "error output: Traceback" in output
    assert "remote reference (the book must work offline): https://cdn.invalid/lib.js" in output
    assert (tmp_path / "shots" / "index.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# plotting.py and widgets.py


def test_to_display_endpoints():
    image = torch.tensor([[[-1.0, 0.0, 1.0]]])
    assert to_display(image).tolist() == [[0.0, 0.5, 1.0]]


def test_to_display_clips():
    image = torch.tensor([[[-3.0, 2.0]]])
    assert to_display(image).tolist() == [[0.0, 1.0]]


def test_to_display_never_stretches():
    # A flat image must stay flat at its own grey level, not be stretched to 0..1.
    image = torch.full((1, 4, 4), -0.5)
    assert (to_display(image) == 0.25).all()


def test_to_display_shapes():
    assert to_display(torch.zeros(1, 1, 5, 6)).shape == (5, 6)
    assert to_display(torch.zeros(3, 5, 6)).shape == (5, 6, 3)
    assert to_display(torch.zeros(5, 6).numpy()).shape == (5, 6)


def test_to_display_rejects_channels():
    with pytest.raises(ValueError, match="expected 1 or 3 channels"):
        to_display(torch.zeros(2, 5, 6))


def test_image_grid_layout():
    figure = image_grid(torch.zeros(5, 1, 8, 8), titles=list("abcde"), ncols=3)
    axes = figure.get_axes()
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes[:5]] == list("abcde")
    assert not axes[5].axison


def test_image_grid_fixed_grey_scale():
    figure = image_grid(torch.full((1, 1, 4, 4), 0.5))
    image = figure.get_axes()[0].images[0]
    assert image.get_clim() == (0, 1)


def test_image_grid_rejects_title_count():
    with pytest.raises(ValueError, match="2 titles for 3 images"):
        image_grid(torch.zeros(3, 1, 4, 4), titles=["a", "b"])


def test_signed_panel_symmetric_scale():
    image = torch.zeros(2, 4, 4)
    image[0, 1, 1], image[1, 1, 1] = -3.0, -1.0   # channel mean -2 at (1, 1)
    image[:, 2, 3] = 0.5
    fig, ax = plt.subplots()
    signed_panel(ax, image, "a map", marker=(1, 1))
    artist = ax.get_images()[0]
    assert artist.get_clim() == (-2.0, 2.0)
    assert float(artist.get_array()[1, 1]) == -2.0
    plt.close(fig)


def test_signed_panel_scale_excludes_pixel():
    image = torch.zeros(1, 3, 3)
    image[0, 0, 2], image[0, 2, 2] = 10.0, -0.25
    fig, ax = plt.subplots()
    signed_panel(ax, image, exclude=2)   # row-major flat index of (0, 2)
    assert ax.get_images()[0].get_clim() == (-0.25, 0.25)
    plt.close(fig)


def test_signed_panel_flat_maps():
    fig, ax = plt.subplots()
    signed_panel(ax, torch.zeros(3, 3))
    signed_panel(ax, np.ones((2, 2)))
    assert ax.get_images()[0].get_clim() == (-1.0, 1.0)
    assert ax.get_images()[1].get_clim() == (-1.0, 1.0)
    plt.close(fig)


@pytest.mark.parametrize(("image", "options", "message"), [
    (torch.zeros(1, 1, 3, 3), {}, "expected a non-empty"),
    (torch.zeros(0, 4), {}, "expected a non-empty"),
    (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), {}, "1 non-finite"),
    (torch.zeros(1, 3, 3), {"exclude": 9}, "exclude = 9"),
    (torch.zeros(1, 3, 3), {"exclude": True}, "exclude = True"),
])
def test_signed_panel_rejects_bad_input(image, options, message):
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match=message):
        signed_panel(ax, image, **options)
    plt.close(fig)


def test_evenly_spaced_keeps_ends():
    assert evenly_spaced(range(11), 3) == [0, 5, 10]
    assert evenly_spaced(range(4), 10) == [0, 1, 2, 3]


def test_trajectory_figure_grid():
    trajectory = [(t, torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)) for t in (999, 500, 0)]
    figure = trajectory_figure(trajectory, index=1)
    assert len(figure.get_axes()) == 6
    assert [ax.get_title() for ax in figure.get_axes()[:3]] == ["t = 999", "t = 500", "t = 0"]


def test_trajectory_figure_empty():
    with pytest.raises(ValueError, match="trajectory is empty"):
        trajectory_figure([])


def test_scrub_animation_embeds_frames_offline():
    frames = [torch.full((2, 1, 8, 8), value) for value in (-1.0, 0.0, 1.0)]
    html = scrub_animation(frames, titles=["a", "b"], frame_labels=["t = 2", "t = 1", "t = 0"], dpi=20).data
    assert html.count("data:image/png;base64") == 3
    assert 'type="range"' in html
    assert "http" not in html
    assert 'class="fa' not in html


def test_scrub_animation_keeps_panel_aspect():
    # A square panel and one three times as wide: the figure is size * (1 + 3) inches wide.
    frames = [[torch.zeros(1, 8, 8), torch.zeros(1, 8, 24)] for _ in range(2)]
    html = scrub_animation(frames, size=1.0, dpi=20).data
    first = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html).group(1))
    width, height = struct.unpack(">II", first[16:24])
    assert (width, height) == (80, 30)


def test_scrub_animation_rejects_changing_panel_shapes():
    frames = [[torch.zeros(1, 8, 8)], [torch.zeros(1, 8, 24)]]
    with pytest.raises(ValueError, match="panel 0 of frame 1 has shape"):
        scrub_animation(frames)


def test_scrub_animation_splits_numpy_frames():
    frames = [np.zeros((2, 1, 4, 4)) for _ in range(2)]
    html = scrub_animation(frames, titles=["a", "b"], dpi=20).data
    assert html.count("data:image/png;base64") == 2


@pytest.mark.parametrize(("frames", "options", "message"), [
    ([torch.zeros(2, 1, 4, 4)] * 2, {"titles": "ab"}, "one string"),
    ([torch.zeros(2, 1, 4, 4)] * 2, {"size": 0}, "size = 0"),
    ([[], []], {}, "panels"),
])
def test_scrub_animation_rejects_bad_arguments(frames, options, message):
    with pytest.raises(ValueError, match=message):
        scrub_animation(frames, **options)


def test_scrub_animation_rejects_ragged_frames():
    with pytest.raises(ValueError, match="panels"):
        scrub_animation([torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4)])


def test_live_slider_builds_sliders():
    widget = live_slider(lambda step=0: step, step=(0, 9))
    slider = widget.children[0]
    assert (slider.min, slider.max) == (0, 9)


def test_live_slider_needs_ranges():
    with pytest.raises(ValueError, match="no ranges"):
        live_slider(lambda: None)
