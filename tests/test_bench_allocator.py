"""bench/allocator.py: the pairwise summary, and the committed table rendered from its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "allocator.py"
RESULT = REPO / "bench" / "results" / "allocator.json"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_allocator", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(mode: str, all_s: float, top_s: float, rss: float) -> dict:
    return {"mode": mode, "median_step_seconds": {"all": all_s, "top half": top_s}, "peak_rss_mb": rss}


def test_each_pair_is_compared_on_its_own(bench):
    runs = [_run("default", 4.0, 3.0, 3700), _run("tuned", 3.8, 2.7, 3850),
            _run("default", 5.0, 4.0, 3690), _run("tuned", 4.9, 3.8, 3800)]  # fmt: skip
    summary = bench.summarize(runs)
    assert summary["all_faster_pct"] == pytest.approx([2.0, 5.0])
    assert summary["top_faster_pct"] == pytest.approx([5.0, 10.0])
    assert summary["rss_more_mb"] == pytest.approx([110, 150])


def test_the_committed_table_is_rendered_from_the_json(bench, tmp_path):
    result = json.loads(RESULT.read_text())
    assert [r["mode"] for r in result["runs"]] == ["default", "tuned"] * (len(result["runs"]) // 2)
    assert all((r["allocator"]["tuned"] is not None) == (r["mode"] == "tuned") for r in result["runs"])
    assert result["summary"] == bench.summarize(result["runs"])
    assert (REPO / "bench" / "results" / "allocator.md").read_text() == bench.render(result)
    (tmp_path / "allocator.json").write_text(RESULT.read_text())
    assert bench.main(["--render-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "allocator.md").read_text() == bench.render(result)
