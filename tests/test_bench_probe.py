"""The probe benchmark (bench/probe_vs_reference.py) end to end, on a very small random model.

The reference (aletheia-lora 0.1.2) comes from PyPI; when it cannot be fetched the benchmark must say so in its
JSON and Markdown and still report our probe, which is what these tests then check instead.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "probe_vs_reference.py"
LAYERS, CHUNK, BATCHES = 6, 4, 5
CONFIG = {
    "model": "tiny",
    "probe": {"probe_batches": BATCHES, "chunk_size": CHUNK, "seed": 42},
    "reference": {"package": "aletheia-lora", "version": "0.1.2"},
    "torch_threads": 1,  # a contended 2-core machine makes 2 spinning threads crawl
    "warmup": False,
    "quiet": None,  # a test must not wait for other processes
    "tiny": {
        "num_layers": LAYERS,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "init_seed": 0,
        "seq_len": 32,
        "num_rows": 32,
        "data_seed": 0,
        "repeats": 1,
    },
    "pretrained": {"bundled_name": "smollm2-135m", "seq_len": 128, "num_rows": 64, "repeats": 1},
}


def run_bench(tmp: Path, *extra: str, env: dict | None = None) -> dict:
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp / "results"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(config), "--model", "tiny", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "probe_vs_reference.json").read_text())
    data["_out"], data["_stderr"] = out, proc.stderr
    return data


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    return run_bench(tmp_path_factory.mktemp("bench"))


def test_ours_one_forward_per_batch_and_model_left_as_loaded(tiny_run):
    ours = tiny_run["runs"]["ours"]
    assert len(ours) == 1 and ours[0]["num_layers"] == LAYERS
    assert ours[0]["forward_passes"] == BATCHES
    assert len(ours[0]["scores"]) == LAYERS and all(s > 0 for s in ours[0]["scores"])
    assert ours[0]["wall_s"] > 0 and ours[0]["peak_rss_delta_bytes"] >= 0
    assert tiny_run["summary"]["checks"]["ours_leaves_model_as_loaded"]
    for key in ("cpu_count", "torch", "transformers"):
        assert tiny_run["machine"][key]
    md = (tiny_run["_out"] / "probe_vs_reference.md").read_text()
    assert "--model tiny" in md and "| ours (one pass per batch) |" in md


def test_reference_compared_or_unavailability_recorded(tiny_run):
    reference = tiny_run["reference"]
    md = (tiny_run["_out"] / "probe_vs_reference.md").read_text()
    if not reference["available"]:
        assert reference["reason"] and "Reference unavailable" in md
        assert "REFERENCE UNAVAILABLE" in tiny_run["_stderr"]
        assert set(tiny_run["runs"]) == {"ours"}
        pytest.skip(f"reference wheel not fetchable here, recorded as unavailable: {reference['reason']}")
    ref = tiny_run["runs"]["reference"]
    assert len(ref) == 1
    assert ref[0]["forward_passes"] == BATCHES * math.ceil(LAYERS / CHUNK)
    checks = tiny_run["summary"]["checks"]
    assert checks["same_model_and_data_in_every_arm"]
    assert checks["reference_forward_passes"]["ok"] and checks["ours_forward_passes"]["ok"]
    assert checks["scores"]["max_rel_diff_on_reference_rows"] <= 1e-4
    assert checks["scores"]["met"]
    ratios = tiny_run["summary"]["ratios_reference_over_ours"]
    assert ratios["forward_passes"] == math.ceil(LAYERS / CHUNK)
    assert "| **reference / ours** |" in md


def test_ours_samples_the_reference_rows(tiny_run):
    """Same seed, same rows: ours with seed 42 draws what the reference's shuffled DataLoader draws."""
    if not tiny_run["reference"]["available"]:
        pytest.skip("reference unavailable")
    order = tiny_run["summary"]["checks"]["row_order"]
    assert order["match"], order
    assert order["ours_default_call"] == order["ours_fed_reference_dataloader"] == order["reference"]
    scores = tiny_run["summary"]["checks"]["scores"]
    assert scores["max_rel_diff_default_call"] <= 1e-4


def test_render_only_reproduces_the_markdown(tiny_run):
    out = tiny_run["_out"]
    md = (out / "probe_vs_reference.md").read_text()
    (out / "probe_vs_reference.md").unlink()
    subprocess.run([sys.executable, str(SCRIPT), "--render-only", "--out", str(out)], check=True, timeout=60)
    assert (out / "probe_vs_reference.md").read_text() == md


def test_unreachable_reference_is_reported_not_hidden(tmp_path):
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    data = run_bench(tmp_path, "--reference-dir", str(tmp_path / "no-reference"), env=offline)
    assert data["reference"]["available"] is False
    assert "pip download" in data["reference"]["reason"]
    assert "REFERENCE UNAVAILABLE" in data["_stderr"]
    assert set(data["runs"]) == {"ours"} and data["runs"]["ours"][0]["forward_passes"] == BATCHES
    assert "Reference unavailable" in (data["_out"] / "probe_vs_reference.md").read_text()
