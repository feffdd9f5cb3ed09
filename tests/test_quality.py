"""The quality protocol (`aletheia-lora quality`): the --quick config end to end, resumption, splits, summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from aletheia_lora.bench.quality import ARMS, QualityConfig, choose_rate, run_protocol, unit_path
from aletheia_lora.bench.quality.arms import ArmContext
from aletheia_lora.bench.quality.tasks import load_base, validation_or_test
from aletheia_lora.cli import main
from aletheia_lora.data.corpora import missing_corpus_package
from aletheia_lora.layers import find_decoder_stack
from aletheia_lora.plan import selection_cost

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "bench" / "configs" / "quality_quick.yaml"


def _quick(**change) -> QualityConfig:
    config = QualityConfig.from_file(QUICK)
    if missing_corpus_package("chitchat"):  # the SFT task needs chitchat-dataset; the code task runs without it
        config.tasks = ["python-stdlib"]
    for key, value in change.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    config = _quick()
    argv = ["quality", "--config", str(QUICK), "--out", str(out), "--docs", str(out / "docs" / "QUALITY.md")]
    if config.tasks == ["python-stdlib"]:
        argv += ["--tasks", "python-stdlib"]
    assert main(argv) == 0
    summary = json.loads((out / f"{config.name}.json").read_text())
    return {"out": out, "config": config, "summary": summary, "argv": argv}


def test_the_quick_run_writes_every_unit_the_summary_and_the_page(quick_run):
    out, config, summary = quick_run["out"], quick_run["config"], quick_run["summary"]
    root = out / config.name
    for task in config.tasks:
        for arm in config.arms:
            for rate in config.learning_rates:
                assert unit_path(root, task, arm, rate, config.seeds[0]).is_file()
    assert summary["complete"] and summary["missing_units"] == []
    assert summary["default_arm"] == "score"
    assert set(summary["tasks"]) == set(config.tasks)
    for task in config.tasks:
        arms = summary["tasks"][task]["arms"]
        assert set(arms) == set(config.arms)
        for arm in arms.values():
            assert set(arm["sweep"]) == {f"{r:g}" for r in config.learning_rates}
            assert arm["learning_rate"] in config.learning_rates
            assert len(arm["seeds"]) == len(config.seeds)
            for seed in arm["seeds"]:
                for key in ("test_loss", "time_to_all_quality", "equal_time_test_loss_vs_all"):
                    assert key in seed
                assert seed["equal_time_test_loss_vs_all"] > 0
        all_seed = arms["all"]["seeds"][0]
        assert all_seed["time_to_all_quality"] == pytest.approx(1.0)
        assert all_seed["equal_time_test_loss_vs_all"] == pytest.approx(1.0)
    page = (out / "docs" / "QUALITY.md").read_text()
    assert page.startswith("# Quality protocol\n\nDoes the default (`score`) reach all-layer LoRA's best test loss")
    assert "aletheia-lora quality --config" in page
    assert (out / f"{config.name}.md").is_file()


def test_the_chosen_rate_is_the_validation_argmin(quick_run):
    summary, config = quick_run["summary"], quick_run["config"]
    root = quick_run["out"] / config.name
    for task in config.tasks:
        for name, arm in summary["tasks"][task]["arms"].items():
            losses = {
                r: json.loads(unit_path(root, task, name, r, config.seeds[0]).read_text())["validation_loss"]
                for r in config.learning_rates
            }
            assert arm["learning_rate"] == min(losses, key=losses.get)
            assert arm["sweep"] == {f"{r:g}": v for r, v in losses.items()}
    assert choose_rate({"0.001": 2.0, "0.002": 1.5, "0.004": 1.7}) == 0.002
    assert choose_rate({"0.001": 1.5, "0.002": 1.5}) == 0.001  # a tie goes to the lower rate
    assert choose_rate({"0.001": None}) is None


def test_splits_share_no_document_and_test_rows_take_no_part_in_choices(quick_run):
    root = quick_run["out"] / quick_run["config"].name
    for task in quick_run["config"].tasks:
        splits = json.loads((root / task / "splits.json").read_text())
        train, val, test = (set(splits["sources"][k]) for k in ("train", "validation", "test"))
        assert train and val and test
        assert not train & val and not train & test and not val & test
        assert all(validation_or_test(s) == "validation" for s in val)
        assert all(validation_or_test(s) == "test" for s in test)
    # the choice reads validation losses only: change every test loss and the chosen rates stay
    out = quick_run["out"]
    copy = out.parent / (out.name + "-tampered")
    shutil.copytree(out, copy)
    for path in (copy / quick_run["config"].name).rglob("lr*_seed*.json"):
        unit = json.loads(path.read_text())
        unit["test_loss"] = -unit["test_loss"] * (1 + unit["learning_rate"])
        for point in unit["curve"]:
            point["test_loss"] = 100.0 - point["step"] * unit["learning_rate"]
        path.write_text(json.dumps(unit))
    again = run_protocol(quick_run["config"], copy)
    assert again["units_trained_now"] == 0
    for task, entry in again["tasks"].items():
        for name, arm in entry["arms"].items():
            assert arm["learning_rate"] == quick_run["summary"]["tasks"][task]["arms"][name]["learning_rate"]


def test_a_rerun_trains_no_unit_and_a_lost_unit_is_retrained(quick_run):
    out, config = quick_run["out"], quick_run["config"]
    assert main(quick_run["argv"]) == 0
    assert json.loads((out / f"{config.name}.json").read_text())["units_trained_now"] == 0
    # a stopped run: one unit missing (as after a kill before its atomic write) is the only one trained again
    lost = unit_path(out / config.name, config.tasks[0], "score", config.learning_rates[-1], config.seeds[0])
    before = json.loads(lost.read_text())
    lost.unlink()
    summary = run_protocol(config, out, max_units=0)
    assert summary["units_trained_now"] == 0 and not summary["complete"]
    assert summary["missing_units"] == [str(lost.relative_to(out / config.name))]
    summary = run_protocol(config, out)
    assert summary["units_trained_now"] == 1 and summary["complete"]
    assert json.loads(lost.read_text())["layers"] == before["layers"]


def test_the_seeds_run_at_the_chosen_rate_after_the_sweep(tmp_path):
    config = _quick(tasks=["python-stdlib"], seeds=[0, 1], epochs=1)
    summary = run_protocol(config, tmp_path)
    arms = summary["tasks"]["python-stdlib"]["arms"]
    for name, arm in arms.items():
        assert [s["seed"] for s in arm["seeds"]] == [0, 1]
        for seed in (0, 1):
            assert unit_path(tmp_path / config.name, "python-stdlib", name, arm["learning_rate"], seed).is_file()
    others = [r for r in config.learning_rates if r != arms["all"]["learning_rate"]]
    assert not unit_path(tmp_path / config.name, "python-stdlib", "all", others[0], 1).exists()
    assert summary["gap"]["met"] in (True, False)


def test_every_arm_picks_its_blocks_and_ranks():
    config = _quick(tiny_layers=6)
    model, _ = load_base(config, torch.device("cpu"))
    stack = find_decoder_stack(model)
    cost = selection_cost(model, seq_len=config.max_length, batch_size=config.batch_size, lora={"r": config.r})
    scores = {0: 0.5, 1: 0.1, 2: 0.9, 3: 0.3, 4: 0.8, 5: 0.7}
    ctx = ArmContext(model, stack, scores, cost, config, config.max_length, config.batch_size)
    picks = {name: ARMS[name](ctx, 0) for name in ARMS}
    assert picks["all"].layers == list(range(6))
    assert picks["score"].layers == [2, 4, 5]
    assert picks["contiguous"].layers == [3, 4, 5]
    assert picks["paper"].layers == picks["score"].layers
    assert picks["paper"].lora["attention_r"] == 16 and picks["paper"].lora["mlp_r"] == 64
    matched = picks["param-matched"]
    assert matched.lora["r"] == 2 * config.r  # half the blocks at twice the rank
    assert matched.info["lora_parameters"] == matched.info["all_layer_parameters"]
    assert matched.lora["lora_alpha"] / matched.lora["r"] == config.lora_alpha / config.r
    for name in ("random", "random-above"):
        assert len(picks[name].layers) == 3
    draws = {tuple(ARMS["random"](ctx, seed).layers) for seed in range(8)}
    assert len(draws) > 1  # a different draw per seed
    lowest = min(picks["truncation"].layers)
    for seed in range(5):
        above = ARMS["random-above"](ctx, seed).layers
        assert min(above) == lowest


def test_bad_settings_name_the_flag():
    with pytest.raises(ValueError, match="--arms: unknown"):
        QualityConfig(arms=["all", "nope"])
    with pytest.raises(ValueError, match="--arms must include 'all'"):
        QualityConfig(arms=["score"])
    with pytest.raises(ValueError, match="--learning-rates must be"):
        QualityConfig(learning_rates=[])
    with pytest.raises(ValueError, match="--config: unknown setting"):
        QualityConfig.from_file(REPO / "bench" / "configs" / "tiny.yaml")
    full = QualityConfig.from_file(REPO / "bench" / "configs" / "quality.yaml")
    assert len(full.learning_rates) >= 4 and len(full.seeds) == 3 and full.epochs >= 2
    assert all(b / a == pytest.approx(2) for a, b in zip(full.learning_rates, full.learning_rates[1:]))
