"""quantdeploy experiment and report: the grid, resuming after a kill, and the HTML page in a real browser."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantdeploy.bench.experiment import cells, read_grid
from quantdeploy.bench.experiment_report import pareto
from quantdeploy.errors import ConfigError


def write_grid(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_cells_drop_axes_a_method_lacks_and_run_duplicates_once(tmp_path):
    spec = read_grid(write_grid(tmp_path / "g.yaml", """model: m
text: t.txt
calibration: {source: c.txt, num_samples: 4}
grid:
  method: [rtn, nf4, awq+gptq]
  bits: [4, 8]
  group_size: [32]
  kv_cache: [null, int8]
"""))
    got = cells(spec)
    labels = [c.label for c in got]
    assert len(got) == 10 and len(set(c.id for c in got)) == 10  # rtn 2x2, nf4 1x2 (no bits), awq+gptq 2x2
    assert "method=nf4 group_size=32" in labels and "method=nf4 group_size=32 kv_cache=int8" in labels
    awq = next(c for c in got if c.axes["method"] == "awq+gptq")
    assert awq.method["type"] == "awq" and awq.method["quantizer"]["type"] == "gptq"
    assert awq.method["calibration"]["source"] == "c.txt"


def test_ablation_axes_reach_the_config_that_has_them(tmp_path):
    """act_order is GPTQ's (inside AWQ too), alpha SmoothQuant's: other methods drop them, so their
    cells are not repeated."""
    spec = read_grid(write_grid(tmp_path / "g.yaml", """model: m
text: t.txt
calibration: {source: c.txt}
grid:
  method: [rtn, gptq, awq+gptq, smoothquant]
  bits: [8]
  group_size: [null]
  act_order: [true, false]
  alpha: [0.5, 0.8]
"""))
    got = cells(spec)
    by_method = {}
    for c in got:
        by_method.setdefault(c.axes["method"], []).append(c)
    assert {m: len(v) for m, v in by_method.items()} == {"rtn": 1, "gptq": 2, "awq+gptq": 2, "smoothquant": 2}
    assert {c.method["act_order"] for c in by_method["gptq"]} == {True, False}
    assert {c.method["quantizer"]["act_order"] for c in by_method["awq+gptq"]} == {True, False}
    assert {c.method["alpha"] for c in by_method["smoothquant"]} == {0.5, 0.8}
    assert "alpha" not in by_method["rtn"][0].axes and "act_order" not in by_method["rtn"][0].axes


@pytest.mark.parametrize("body, message", [
    ("model: m\ntext: t\ngrid: {method: [rtn]}\nspeed: 1\n", "unknown key 'speed'"),
    ("model: m\ntext: t\ngrid: {method: [rtn], bitz: [4]}\n", "unknown axis 'bitz'"),
    ("text: t\ngrid: {method: [rtn]}\n", "'model' is missing"),
    ("model: m\ntext: t\ngrid: {bits: [4]}\n", "needs a 'method' axis"),
])
def test_bad_grid_files_fail_with_one_line(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        read_grid(write_grid(tmp_path / "g.yaml", body))


@pytest.mark.parametrize("grid, message", [
    ("method: [gptq]", "needs calibration data"),
    ("method: [rtn]\n  kv_cache: [int8]", "kv_cache axis needs calibration"),
    ("method: [rtn]\n  bits: [5]", "bits"),
])
def test_cells_that_cannot_run_fail_before_any_work(tmp_path, grid, message):
    spec = read_grid(write_grid(tmp_path / "g.yaml", f"model: m\ntext: t\ngrid:\n  {grid}\n"))
    with pytest.raises(ConfigError, match=message):
        cells(spec)


@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0, 1)), min_size=1, max_size=30))
def test_the_pareto_front_is_exactly_the_undominated_points(points):
    front = set(pareto(points, lower_x=True))
    for i, (x, y) in enumerate(points):
        dominated = any((ox <= x and oy > y) or (ox < x and oy >= y) for ox, oy in points)
        if dominated:
            assert i not in front
    for i in front:
        assert not any((ox <= points[i][0] and oy > points[i][1]) or (ox < points[i][0] and oy >= points[i][1])
                       for ox, oy in points)
    assert front  # the best point at the lowest cost is always on it


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))


def browser_images(chromium: str, page: Path) -> list[dict]:
    """The page's <img> attributes after a headless Chromium loaded it (each image marks load or error)."""
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    parser = _Images()
    parser.feed(dom)
    return parser.images


def quantdeploy(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "quantdeploy", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)


def test_six_cells_resume_after_a_kill_and_the_report_loads_in_a_browser(tiny_llama_dir, tmp_path, data):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        assert not os.environ.get("CI"), "CI installs chromium (.ci/run): the report must be checked in a browser"
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"name": "even", "examples": [
        {"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2)}} for i in range(10)]}))
    text = tmp_path / "text.txt"  # the test text without its first document, a long one: 2,048 tokens span several
    text.write_text((data / "text" / "wiki_en.test.txt").read_text().split("\n\n\n", 1)[1])
    grid = write_grid(tmp_path / "grid.yaml", f"""model: {tiny_llama_dir}
text: {text}
tokens: 2048
tasks: [{task}]
bench: {{batches: [1], steps: 4, prompt_len: 16, max_seq_len: 64}}
grid:
  method: [rtn, nf4]
  bits: [4, 8]
  group_size: [32, 64]
""")
    run = tmp_path / "run"
    proc = quantdeploy("experiment", grid, "-o", run)
    deadline = time.time() + 600
    while len(list((run / "cells").glob("*/result.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in (run / "cells").glob("*/result.json")}
    assert 3 <= len(done) < 7, "the kill came after the original and two cells, before the end"
    proc = quantdeploy("experiment", grid, "-o", run)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    results = sorted((run / "cells").glob("*/result.json"))
    assert len(results) == 7  # the original and six cells
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished cells were not recomputed
    cell = json.loads(next(p for p in results if p.parent.name != "original").read_text())
    assert {"size", "fidelity", "tasks", "speed", "layer_error", "attention_similarity", "kld_buckets"} <= set(cell)
    assert len(cell["layer_error"]) == 2 and len(cell["attention_similarity"][0]) == 4  # 2 layers, 4 heads
    buckets = cell["kld_buckets"]  # every scored token in exactly one bucket of each cut
    scored = cell["fidelity"]["tokens_scored"]
    assert all(sum(r["tokens"] for r in buckets[cut] or []) == scored for cut in ("frequency", "position", "documents"))
    assert len(buckets["documents"]) > 1

    proc = quantdeploy("report", run)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    page = run / "report" / "report.html"
    images = browser_images(chromium, page)
    names = {img["alt"] for img in images}
    assert {"accuracy_vs_bits", "kld_vs_speed", "speed_memory", "layer_error", "kld_buckets"} <= names
    assert len(images) == 11  # the five above and one attention map per cell
    assert "mean KLD by bucket" in page.read_text()
    assert all(img.get("data-loaded") == "1" and "data-failed" not in img for img in images), images
    broken = tmp_path / "broken.html"  # the check can fail: a corrupt image is reported as failed
    broken.write_text(page.read_text().replace("base64,iVBOR", "base64,XXXX", 1))
    assert any("data-failed" in img for img in browser_images(chromium, broken))
