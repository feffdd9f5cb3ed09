"""The prefix-cache benchmark (bench/prefix_cache.py): its config, its row bookkeeping, the targets' assessment, and a
``--quick`` end-to-end run whose JSON and page are checked (behaviour, not speed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aletheia_lora.bench.workload import Batches
from aletheia_lora.cost import CostModel

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "prefix_cache.py"
CONFIG = REPO / "bench" / "configs" / "prefix_cache.yaml"


def _module():
    # bench/prefix_cache.py imports its siblings (families, prefix_cache_report), as it does when run as a script
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_prefix_cache", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


bench = _module()
report = sys.modules["prefix_cache_report"]


def test_the_config_runs_every_family_and_quick_cuts_it_down():
    cfg = bench.load_config(CONFIG)
    assert len(cfg["families"]["list"]) == 8
    assert cfg["smollm2"]["model"] == "smollm2-135m" and cfg["smollm2"]["arms"][0] == "all"
    assert {a.removesuffix("+cache") for a in cfg["smollm2"]["arms"]} == {"all", "contiguous", "truncation"}
    quick = bench.load_config(CONFIG, quick=True)
    assert quick["smollm2"]["model"] == "tiny" and quick["steps"] == 2
    assert [f["family"] for f in quick["families"]["list"]] == ["Llama-3.1", "Mixtral"]
    assert all(f["real"]["layers"] == 4 for f in quick["families"]["list"])
    assert quick["smollm2"]["data"] == cfg["smollm2"]["data"]  # the other settings stay


def test_the_config_refuses_unknown_arms_and_a_missing_baseline(tmp_path):
    text = CONFIG.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("arms: [all, contiguous, contiguous+cache]", "arms: [all, score+cache]"))
    with pytest.raises(SystemExit, match="unknown arm 'score\\+cache'"):
        bench.load_config(bad)
    bad.write_text(text.replace("arms: [all, contiguous, contiguous+cache]", "arms: [contiguous]"))
    with pytest.raises(SystemExit, match="must include 'all'"):
        bench.load_config(bad)


def test_index_rows_give_each_batch_its_row_indices():
    rows = [{"input_ids": [10 + i] * (3 + i % 2)} for i in range(10)]
    batches = Batches(rows, 3, seed=5, pad_token_id=0, device=torch.device("cpu"))
    ids = Batches(bench.index_rows(len(rows)), 3, seed=5, pad_token_id=0, device=torch.device("cpu"))
    for step in range(7):  # over two epochs
        picked = ids(step)["input_ids"][:, 0].tolist()
        assert batches(step)["input_ids"][:, 0].tolist() == [10 + i for i in picked]


def test_the_flop_prediction_of_a_cached_arm_drops_the_prefix_forward():
    cost = CostModel.uniform(10, head_share=0.2)
    assert bench.flops_speedup(cost, list(range(10)), cached=False) == 1.0
    plain, cached = bench.flops_speedup(cost, [5, 6, 7, 8, 9], False), bench.flops_speedup(cost, [5, 6, 7, 8, 9], True)
    # uniform blocks cost 1 forward and 1 backward; the head 5 in all: 25/20 uncached, 25/15 cached
    assert plain == pytest.approx(25 / 20) and cached == pytest.approx(25 / 15)
    assert bench.head_share(cost) == pytest.approx(2.5 / 12.5)


def _result(smollm2: float | None, families: list[tuple[str, float, float]]) -> dict:
    def arms(speedup):
        return [{"name": "all", "speedup_vs_all": 1.0}] + (
            [] if speedup is None else [{"name": "contiguous+cache", "speedup_vs_all": speedup}]
        )

    return {
        "config": {"targets": {"smollm2": 1.6, "light_head": 1.8, "light_head_share": 0.07}},
        "smollm2": {"arms": arms(smollm2)},
        "families": [{"family": f, "head_share_of_forward": h, "arms": arms(s)} for f, h, s in families],
    }


def test_targets_are_met_or_missed_and_only_light_heads_have_one():
    t = report.assess_targets(_result(1.59, [("A", 0.02, 1.85), ("B", 0.069, 1.79), ("C", 0.2, 1.2)]))
    assert t["smollm2"] == {"threshold": 1.6, "measured": 1.59, "met": False}
    met = {f["family"]: (f["threshold"], f["met"]) for f in t["families"]}
    assert met == {"A": (1.8, True), "B": (1.8, False), "C": (None, None)}
    t = report.assess_targets(_result(None, []))
    assert t["smollm2"]["met"] is None and t["families"] == []


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix_cache")
    out, docs = tmp / "results", tmp / "docs" / "PREFIX_CACHE.md"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--docs", str(docs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cmd, out, docs


def _check_arms(record: dict, steps: int) -> None:
    arms = {a["name"]: a for a in record["arms"]}
    assert arms["all"]["speedup_vs_all"] == 1.0 and arms["all"]["cached"] is False
    for arm in record["arms"]:
        assert len(arm["step_seconds"]) == len(arm["losses"]) == steps
        assert arm["median_step_seconds"] > 0 and arm["predicted_speedup_vs_all"] > 0
        assert arm["lowest_layer"] == min(arm["layers"])
        if arm["name"] != "all":
            assert arm["lowest_layer_reached"] == arm["lowest_layer"]  # the backward stops at the lowest block
        if not arm["cached"]:
            continue
        twin = arms[arm["selection"]]
        assert arm["layers"] == twin["layers"]
        cache = arm["cache"]
        assert cache["block"] == arm["lowest_layer"] and cache["batches_served"] == steps
        assert cache["bytes"] > 0 and cache["build_seconds"] > 0 and cache["dtype"] == "float32"
        # cached and uncached train the same adapters on the same batches: the same losses
        assert arm["vs_uncached"]["max_loss_difference"] < 1e-4
        assert arm["predicted_speedup_vs_all"] > twin["predicted_speedup_vs_all"]
        saving = twin["median_step_seconds"] - arm["median_step_seconds"]
        assert arm["vs_uncached"]["saving_per_step_seconds"] == pytest.approx(saving)
        if saving > 0:
            assert arm["vs_uncached"]["break_even_steps"] == pytest.approx(cache["build_seconds"] / saving, rel=1e-2)
        else:
            assert arm["vs_uncached"]["break_even_steps"] is None
        epochs = arm["epochs"]
        assert epochs["first_epoch_seconds"] == pytest.approx(epochs["later_epoch_seconds"] + cache["build_seconds"])


def test_quick_run_writes_the_json(quick_run):
    _, out, _ = quick_run
    result = json.loads((out / "prefix_cache.json").read_text())
    assert result["quick"] is True and "--quick" in result["command"]
    assert {"torch", "transformers", "peft", "python"} <= set(result["versions"])
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["gpu"] is None
    steps = result["config"]["untimed_steps"] + result["config"]["steps"]
    sm = result["smollm2"]
    assert sm["model"]["name"] == "tiny" and 0 < sm["head_share_of_forward"] < 1
    names = [a["name"] for a in sm["arms"]] + list(sm["skipped_arms"])
    assert sorted(names) == sorted(result["config"]["smollm2"]["arms"])
    assert [a["layers"] for a in sm["arms"] if a["name"] == "contiguous"] == [[3, 4, 5]]
    assert sm["rows"]["rows"] == steps * sm["batch_size"] and sm["rows"]["steps_per_epoch"] == steps
    assert sm["truncation"]["layers"] == next(a["layers"] for a in sm["arms"] if a["name"] == "truncation")
    _check_arms(sm, steps)
    assert [f["family"] for f in result["families"]] == ["Llama-3.1", "Mixtral"]
    for fam in result["families"]:
        assert [a["name"] for a in fam["arms"]] == ["all", "contiguous", "contiguous+cache"]
        assert 0 < fam["head_share_of_forward"] < 1 and fam["scaled"]["layers"] == 4
        _check_arms(fam, steps)
    assert result["targets"] == report.assess_targets(result)


def test_quick_run_renders_the_page_from_the_json(quick_run):
    cmd, out, docs = quick_run
    result = json.loads((out / "prefix_cache.json").read_text())
    page = docs.read_text()
    assert "Smoke test" in page and result["command"] in page and "--render-only" in page
    for arm in result["smollm2"]["arms"]:
        assert f"| {arm['name']} | " in page and f"{arm['median_step_seconds']:.3f}" in page
    for fam in result["families"]:
        cached = next(a for a in fam["arms"] if a["name"] == "contiguous+cache")
        assert f"| {fam['family']} ({fam['model']}) |" in page and f"{cached['speedup_vs_all']:.2f}x" in page
    assert "Build once, then every step cached" in page
    verdict = "**met**" if result["targets"]["smollm2"]["met"] else "**missed**"
    assert f"target >= 1.6x: {verdict}" in page
    # --render-only rebuilds the same page from the JSON alone
    docs.unlink()
    proc = subprocess.run([*cmd, "--render-only"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert docs.read_text() == page


def test_quick_refuses_to_write_into_the_committed_results():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--docs", "none"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "--out other than bench/results" in proc.stderr
