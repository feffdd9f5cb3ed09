"""The training benchmark (`aletheia-lora bench`) end to end on a tiny random model, and its settings."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from aletheia_lora.bench import (
    ARM_KINDS,
    BenchConfig,
    _pick_frontier,
    learning_rate_at,
    load_result,
    render_markdown,
    render_outputs,
    run_bench,
)
from aletheia_lora.cli import main
from aletheia_lora.config import LoraSettings
from aletheia_lora.data import DataConfig
from aletheia_lora.models import ModelConfig
from aletheia_lora.probe import ProbeConfig
from aletheia_lora.select import FrontierPoint, SelectConfig
from aletheia_lora.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
STEPS, EVAL_EVERY, LAYERS = 8, 2, 6
TINY = {
    "name": "t",
    "model": "tiny",
    "tiny_layers": LAYERS,
    "tiny_hidden": 32,
    "tiny_vocab": 64,
    "max_length": 16,
    "eval_blocks": 4,
    "general_blocks": 4,
    "batch_size": 2,
    "max_steps": STEPS,
    "untimed_steps": 1,
    "learning_rate": 0.003,
    "r": 2,
    "lora_alpha": 4,
    "frontier_points": 2,
    "eval_steps": EVAL_EVERY,
    "eval_batch_size": 4,
    "probe_batches": 2,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole benchmark through the CLI on a 6-layer random Llama, with a probe table to include in the docs."""
    folder = tmp_path_factory.mktemp("bench")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = folder / "results"
    out.mkdir()
    (out / "probe_vs_reference.md").write_text("# Probe table\n\n| arm | s |\n|---|---|\n| ours | 1.0 |\n")
    docs = folder / "docs" / "BENCHMARKS.md"
    argv = ["bench", "--config", str(config), "--out", str(out), "--docs", str(docs), "-q"]
    assert main(argv) == 0
    return {"out": out, "docs": docs, "result": json.loads((out / "train_t.json").read_text())}


def _arms(result):
    return {arm["name"]: arm for arm in result["arms"]}


def test_writes_json_markdown_plots_and_the_docs_page(tiny_run, capsys):
    out, result = tiny_run["out"], tiny_run["result"]
    for name in ("train_t.json", "train_t.md", "train_t_loss_vs_time.png", "train_t_speedup.png"):
        assert (out / name).stat().st_size > 0
    keys = "config model machine versions load_average probe frontier base equal_time_seconds quality step_order arms"
    assert set(keys.split()) | {"targets", "cli_layers", "command"} <= set(result)
    assert result["model"] == {"name": "tiny", "type": "llama", "num_layers": LAYERS}
    assert len(result["load_average"]["before"]) == 3 and result["load_average"]["during"]
    assert result["probe"]["seconds"] > 0 and len(result["probe"]["scores"]) == LAYERS
    assert 0 < result["cpu_seconds"] and "min of CPU" in (out / "train_t.md").read_text()
    docs = tiny_run["docs"].read_text()
    assert "## Training benchmark `t`" in docs and "results/train_t_loss_vs_time.png" in docs
    assert "## Gradient probe benchmark" in docs and "### Probe table" in docs
    assert "--config" in result["command"] and "--docs" in result["command"]


def test_arms_adapt_the_budget_and_the_backward_stops_at_their_lowest_layer(tiny_run):
    result = tiny_run["result"]
    arms = _arms(result)
    assert list(arms)[:4] == ["all", "score", "truncation", "contiguous"]
    frontier = [a for a in result["arms"] if a["kind"] == "frontier"]
    assert 1 <= len(frontier) <= 2 and all(a["name"] == f"frontier-{a['lowest_layer']}" for a in frontier)
    layer_sets = [tuple(a["layers"]) for a in result["arms"] if a["kind"] in ("all", "frontier")]
    assert len(set(layer_sets)) == len(layer_sets)  # a frontier point never repeats another arm
    assert arms["all"]["layers"] == list(range(LAYERS))
    assert arms["contiguous"]["layers"] == [3, 4, 5]
    for arm in result["arms"]:
        if arm["kind"] != "all":
            assert arm["num_adapted"] == LAYERS // 2
        assert arm["lowest_layer_reached"] == arm["lowest_layer"] == min(arm["layers"])
        assert arm["predicted_speedup"] > 0 and arm["measured_speedup"] > 0 and arm["tokens_per_second"] > 0
        assert arm["memory"]["trainable_parameters"] > 0 and arm["memory"]["saved_activations_mb"] > 0
        assert arm["prediction_error"] == pytest.approx(arm["predicted_speedup"] / arm["measured_speedup"] - 1)
        assert arm["calibrated_error"] == pytest.approx(arm["calibrated_speedup"] / arm["measured_speedup"] - 1)
    assert arms["all"]["measured_speedup"] == 1.0 and arms["all"]["predicted_speedup"] == pytest.approx(1.0)
    assert arms["all"]["calibrated_speedup"] == pytest.approx(1.0)
    for kind in ("score", "truncation", "contiguous"):
        assert result["cli_layers"][kind] == arms[kind]["layers"]


def test_arms_take_turns_on_the_same_batches(tiny_run):
    result = tiny_run["result"]
    names = [a["name"] for a in result["arms"]]
    n = len(names)
    equal_steps = [s for s in result["step_order"] if s["phase"] == "equal_steps"]
    assert len(equal_steps) == n * STEPS
    for r in range(STEPS):  # round r: every arm's step r + 1, the first arm rotating
        chunk = equal_steps[r * n : (r + 1) * n]
        assert [s["arm"] for s in chunk] == names[r % n :] + names[: r % n]
        assert {s["step"] for s in chunk} == {r + 1}
    # LoRA starts as the identity, so on the same first batch every arm has the same loss
    first = [a["train_losses"][0] for a in result["arms"]]
    assert max(first) - min(first) < 1e-5


def test_equal_time_gives_faster_arms_more_steps_up_to_the_all_layer_time(tiny_run):
    result = tiny_run["result"]
    arms, budget = _arms(result), result["equal_time_seconds"]
    base = arms["all"]
    assert base["views"]["equal_time"]["steps"] == STEPS
    assert budget == pytest.approx(base["views"]["equal_steps"]["seconds"])
    for arm in result["arms"]:
        view = arm["views"]["equal_time"]
        half_step = arm["median_step_seconds"] / 2
        if arm["median_step_seconds"] < base["median_step_seconds"]:
            assert view["steps"] >= STEPS and not view["interpolated"]
        if view["steps"] > STEPS:  # it stopped at the step that brought it nearest to the all-layer time
            assert view["seconds"] >= budget - half_step - 1e-9
            assert view["general_loss"] is not None and view["forgetting"] is not None
        assert view["target_vs_all"] == pytest.approx(
            view["target_loss"] / base["views"]["equal_steps"]["target_loss"]
        )
        assert len(arm["step_seconds"]) >= view["steps"]


def test_time_to_quality_is_read_off_each_curve(tiny_run):
    result = tiny_run["result"]
    goal, cap = result["quality"]["target_loss"], result["quality"]["cap_seconds"]
    assert goal == _arms(result)["all"]["views"]["equal_steps"]["target_loss"]
    assert cap == pytest.approx(1.5 * result["equal_time_seconds"])
    for arm in result["arms"]:
        curve, ttq = arm["curve"], arm["time_to_quality"]
        assert curve[0] == {"step": 0, "seconds": 0.0, "loss": result["base"]["target_loss"], "phase": "base"}
        assert [p["step"] for p in curve] == sorted({p["step"] for p in curve})
        assert all(p["step"] % EVAL_EVERY == 0 or p["phase"] != "equal_steps" for p in curve)
        assert ttq["trained_seconds"] == curve[-1]["seconds"]
        if ttq["seconds"] is None:  # not reached: it trained on to the cap
            assert ttq["ratio_to_all"] is None and min(p["loss"] for p in curve) > goal
            # the runner's stopping rule: half a step of the arm's median timed step over the equal-steps view
            charge = statistics.median(arm["step_seconds"][TINY["untimed_steps"] : TINY["max_steps"]])
            assert ttq["trained_seconds"] + charge / 2 >= cap - 1e-9
            continue
        assert ttq["ratio_to_all"] == pytest.approx(ttq["seconds"] / result["equal_time_seconds"])
        before = [p for p in curve if p["seconds"] <= ttq["seconds"]]
        after = [p for p in curve if p["seconds"] >= ttq["seconds"]]
        assert all(p["loss"] > goal for p in before[:-1]) and after[0]["loss"] <= goal
    assert _arms(result)["all"]["time_to_quality"]["ratio_to_all"] <= 1.0


def test_markdown_renders_from_the_json_alone(tiny_run, tmp_path):
    result = tiny_run["result"]
    text = (tiny_run["out"] / "train_t.md").read_text()
    assert text == render_markdown(result)
    for arm in result["arms"]:
        assert sum(line.startswith(f"| {arm['name']} |") for line in text.splitlines()) == 4  # one row per table
    for heading in ("## Equal steps", "## Equal time", "## Time to quality", "## Targets", "## Reading"):
        assert heading in text
    verdicts = [line for line in text.splitlines() if line.endswith(("| met |", "| MISSED |"))]
    assert len(verdicts) == len(result["targets"]) + 1 == 8  # the header ends in "| met |" too
    assert "Default strategy by these figures" in text
    # --render-only rebuilds the same table from the JSON in another folder
    (tmp_path / "train_t.json").write_text(json.dumps(result))
    assert main(["bench", "--render-only", "--name", "t", "--out", str(tmp_path), "-q"]) == 0
    assert (tmp_path / "train_t.md").read_text() == text
    assert (tmp_path / "train_t_speedup.png").stat().st_size > 0


def test_render_only_without_a_result_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--render-only", "--name", "missing", "--out", str(tmp_path)]) == 2
    assert "no benchmark result" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="train_missing.json"):
        render_outputs(tmp_path, "missing")


def test_a_checkpoint_with_text_files_runs_the_real_data_path(tiny_checkpoint, tiny_corpus, tmp_path):
    config = BenchConfig(
        **{**TINY, "model": str(tiny_checkpoint), "max_steps": 3, "eval_steps": 3, "arms": ["all", "contiguous"]},
        data=str(tiny_corpus / "target.txt"),
        general_data=str(tiny_corpus / "general.txt"),
        progress=False,
    )
    result = run_bench(config, tmp_path)
    arms = _arms(result)
    assert list(arms) == ["all", "contiguous"] and arms["contiguous"]["layers"] == [2, 3]
    assert math.isfinite(result["base"]["general_loss"]) and math.isfinite(
        arms["all"]["views"]["equal_steps"]["forgetting"]
    )
    assert "target.txt eval split" in (tmp_path / "train_t.md").read_text()
    assert result["targets"] == []  # no truncation arm, no targets to assess


def test_committed_configs_load_and_smollm2_is_the_default():
    assert BenchConfig.from_file(REPO / "bench" / "configs" / "smollm2.yaml") == BenchConfig()
    tiny = BenchConfig.from_file(REPO / "bench" / "configs" / "tiny.yaml")
    assert tiny.model == "tiny" and tiny.arms == list(ARM_KINDS)
    # the second SmolLM2 experiment changes only its arms (and name) against the first
    beyond = BenchConfig.from_file(REPO / "bench" / "configs" / "smollm2_beyond.yaml")
    assert beyond.arms == ["all", "score", "ranks", "reprobe"]
    assert replace(beyond, name="smollm2", arms=BenchConfig().arms) == BenchConfig()


def test_settings_shared_with_a_stage_carry_its_name_and_help():
    stages = (ModelConfig, DataConfig, LoraSettings, SelectConfig, ProbeConfig, TrainConfig)
    bench = {f.name: f for f in dataclasses.fields(BenchConfig)}
    shared = set()
    for stage in stages:
        for f in dataclasses.fields(stage):
            if f.name in bench:
                assert bench[f.name].metadata["help"].startswith(f.metadata["help"]), (stage.__name__, f.name)
                shared.add(f.name)
    assert {"r", "lora_alpha", "top_pct", "warmup_steps", "eval_steps", "learning_rate", "data"} <= shared
    # one name, one meaning: the untimed steps are not the learning-rate warm-up
    assert "untimed_steps" not in shared and "budget_pct" not in bench and "lr_warmup_steps" not in bench


def test_each_arm_is_predicted_by_the_cost_model_and_by_a_calibration_timed_before_training(tiny_run):
    result = tiny_run["result"]
    calibration = result["calibration"]
    placements = [t["layers"] for t in calibration["timings"]]
    assert placements == [list(range(LAYERS)), [3, 4, 5], [1, 3, 5]]  # --calibrate's default placements
    assert calibration["seconds"] > 0 and all(t["seconds"] > 0 for t in calibration["timings"])
    assert calibration["description"].startswith("calibrated on this hardware from 3 timed placements")
    contiguous = _arms(result)["contiguous"]
    assert contiguous["calibrated_speedup"] > 0
    text = (tiny_run["out"] / "train_t.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| contiguous | 3: 3-5 | 3 |"))
    assert f"| {contiguous['calibrated_speedup']:.2f}x | {contiguous['calibrated_error']:+.1%} |" in row
    target = next(t for t in result["targets"] if t["target"].startswith("calibrated prediction"))
    speedup, error = (_arms(result)["truncation"][k] for k in ("calibrated_speedup", "calibrated_error"))
    assert target["met"] == (abs(error) <= 0.05) and target["value"] == f"{speedup:.2f}x predicted, {error:+.1%}"


def test_committed_results_render_their_committed_tables():
    """Results written before the settings were renamed still render byte for byte (load_result maps the names)."""
    results = sorted((REPO / "bench" / "results").glob("train_*.json"))
    assert results
    for path in results:
        assert render_markdown(load_result(path)) == path.with_suffix(".md").read_text(), path.name


def test_older_setting_names_are_mapped_in_results_and_named_in_config_files(tmp_path):
    # the first names (before `untimed_steps`), then `steps`/`lr_schedule` (before `run`'s names): both mapped
    old = {"steps": 60, "warmup_steps": 2, "lr_warmup_steps": 0, "budget_pct": 50, "eval_every": 10}
    (tmp_path / "train_old.json").write_text(json.dumps({"config": old, "arms": []}))
    config = load_result(tmp_path / "train_old.json")["config"]
    assert config == {"max_steps": 60, "untimed_steps": 2, "warmup_steps": 0, "top_pct": 50, "eval_steps": 10}
    middle = {"steps": 60, "untimed_steps": 2, "lr_schedule": "constant", "warmup_steps": 1}
    (tmp_path / "train_middle.json").write_text(json.dumps({"config": middle, "arms": []}))
    config = load_result(tmp_path / "train_middle.json")["config"]
    assert config == {"max_steps": 60, "untimed_steps": 2, "lr_scheduler_type": "constant", "warmup_steps": 1}
    assert list(config) == ["max_steps", "untimed_steps", "lr_scheduler_type", "warmup_steps"]  # order kept
    new = {"max_steps": 60, "untimed_steps": 2, "warmup_steps": 1, "lr_scheduler_type": "cosine"}
    (tmp_path / "train_new.json").write_text(json.dumps({"config": new, "arms": []}))
    assert load_result(tmp_path / "train_new.json")["config"] == new
    # bench/families.py's result (no arms) keeps `steps`: there it is its own timed steps
    families = {"untimed_steps": 2, "steps": 10}
    (tmp_path / "families.json").write_text(json.dumps({"config": families, "families": []}))
    assert load_result(tmp_path / "families.json")["config"] == families
    (tmp_path / "old.yaml").write_text("budget_pct: 50\neval_every: 10\n")
    with pytest.raises(ValueError, match=r"renamed: budget_pct -> top_pct, eval_every -> eval_steps"):
        BenchConfig.from_file(tmp_path / "old.yaml")
    (tmp_path / "older.yaml").write_text("steps: 60\nlr_schedule: constant\n")
    with pytest.raises(ValueError, match=r"renamed: lr_schedule -> lr_scheduler_type, steps -> max_steps"):
        BenchConfig.from_file(tmp_path / "older.yaml")


def test_the_bench_and_run_share_the_names_of_steps_and_schedule():
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    assert {"max_steps", "lr_scheduler_type"} <= fields and not {"steps", "lr_schedule"} & fields
    train = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"max_steps", "lr_scheduler_type"} <= train
    for path in sorted((REPO / "bench" / "configs").glob("*.yaml")):
        # read by their own scripts
        if path.name in ("families.yaml", "families_tuned.yaml", "prefix_cache.yaml", "probe_vs_reference.yaml"):
            continue
        assert {"steps", "lr_schedule"}.isdisjoint(yaml.safe_load(path.read_text())), path.name


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"arms": ["all", "bogus"]}, ValueError, r"--arms: unknown arm\(s\) \['bogus'\]"),
        ({"arms": ["score", "truncation"]}, ValueError, "--arms must include 'all'"),
        ({"arms": ["all"]}, ValueError, "needs a selective arm"),
        ({"arms": ["all", "score", "score"]}, ValueError, r"lists \['score'\] more than once"),
        ({"arms": "all"}, TypeError, "--arms must be a list"),
        ({"arms": ["all", "frontier"], "frontier_points": 0}, ValueError, "--frontier-points is 0"),
        ({"top_pct": 0}, ValueError, r"--top-pct must be in \[1, 100\).*got 0"),
        ({"top_pct": 100}, ValueError, r"--top-pct must be in \[1, 100\).*got 100"),
        ({"max_steps": 2, "untimed_steps": 2}, ValueError, r"--max-steps \(2\) must exceed --untimed-steps \(2\)"),
        ({"untimed_steps": 0}, ValueError, "--untimed-steps must be >= 1, got 0"),
        ({"max_steps": "ten"}, TypeError, "--max-steps must be an integer, got 'ten'"),
        ({"eval_steps": 0}, ValueError, "--eval-steps must be >= 1"),
        ({"quality_cap": 0.5}, ValueError, "--quality-cap must be >= 1"),
        ({"learning_rate": math.nan}, TypeError, "--learning-rate must be a finite number"),
        ({"learning_rate": 0}, ValueError, "--learning-rate must be positive"),
        (
            {"lr_scheduler_type": "linear"},
            ValueError,
            "--lr-scheduler-type must be one of constant, cosine, got 'linear' .linear reaches 0 at --max-steps",
        ),
        (
            {"lr_scheduler_type": "step"},
            ValueError,
            "--lr-scheduler-type must be one of constant, cosine, got 'step'$",
        ),
        ({"name": "a/b"}, ValueError, "--name must be letters"),
        ({"tiny_hidden": 30}, ValueError, "--tiny-hidden must be a multiple of 4"),
        ({"threads": 0}, ValueError, "--threads must be >= 1"),
        ({"progress": "yes"}, TypeError, "--progress must be true or false"),
        ({"arms": ["all", "ranks"]}, ValueError, r"--arms \['ranks'\] are compared with the 'score' arm: add it"),
        ({"reprobe_every": 0}, ValueError, "--reprobe-every must be >= 1, got 0"),
    ],
)
def test_bad_settings_name_the_flag_and_value(change, error, message):
    with pytest.raises(error, match=message):
        BenchConfig(**{**TINY, **change})


def test_bad_settings_from_the_command_line_or_a_file_exit_with_one_line(tmp_path, capsys):
    assert main(["bench", "--arms", "all", "bogus", "--out", str(tmp_path)]) == 2
    assert "--arms: unknown arm(s) ['bogus']" in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text("max_steps: 10\nbudget: 50\n")
    assert main(["bench", "--config", str(config), "--out", str(tmp_path)]) == 2
    assert "unknown setting(s) ['budget']" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['budget'\]"):
        BenchConfig.from_file(config)
    assert not list(tmp_path.glob("train_*"))


def test_learning_rate_schedules():
    constant = BenchConfig(**{**TINY, "warmup_steps": 2})
    assert [learning_rate_at(i, constant) for i in range(4)] == pytest.approx([0.0015, 0.003, 0.003, 0.003])
    cosine = BenchConfig(**{**TINY, "lr_scheduler_type": "cosine"})
    values = [learning_rate_at(i, cosine) for i in range(STEPS + 5)]
    assert values[0] == pytest.approx(0.003) and values[STEPS] == pytest.approx(0.0003)
    assert values[STEPS:] == pytest.approx([0.0003] * 5)  # held at the floor: equal-time steps still learn
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_frontier_points_divide_the_frontier_and_skip_arms_already_there():
    points = [FrontierPoint((m, m + 1), m, 0.5, 1.0) for m in range(11)]
    assert [p.lowest_layer for p in _pick_frontier(points, [], 3)] == [2, 5, 7]
    assert [p.lowest_layer for p in _pick_frontier(points, [(5, 6), (0, 1), (10, 11)], 3)] == [2, 4, 7]
    assert [p.lowest_layer for p in _pick_frontier(points[:3], [(0, 1), (2, 3)], 3)] == [1]


@pytest.fixture(scope="module")
def beyond_run(tmp_path_factory):
    """Score-proportional ranks and re-probing against the score selection, on the tiny model."""
    config = BenchConfig(**{**TINY, "name": "b", "arms": ["all", "score", "ranks", "reprobe"], "reprobe_every": 2})
    config.progress = False
    out = tmp_path_factory.mktemp("beyond")
    return {"out": out, "result": run_bench(config, out)}


def test_ranks_arm_keeps_the_score_blocks_within_the_uniform_parameter_budget(beyond_run):
    arms = _arms(beyond_run["result"])
    ranks, score = arms["ranks"], arms["score"]
    assert ranks["layers"] == score["layers"]
    info = ranks["beyond"]
    assert info["uniform_parameters"] == score["memory"]["trainable_parameters"]
    assert ranks["memory"]["trainable_parameters"] == info["lora_parameters"] <= info["uniform_parameters"]
    assert sorted(int(layer) for layer in info["ranks"]) == score["layers"]
    assert all(rank >= 2 and rank % 2 == 0 for rank in info["ranks"].values())


def test_reprobe_arm_moves_on_schedule_and_its_clock_pays_for_the_probes(beyond_run):
    result = beyond_run["result"]
    arm, score = _arms(result)["reprobe"], _arms(result)["score"]
    info = arm["beyond"]
    assert info["history"][0] == {"step": 0, "layers": score["layers"]}
    steps = [h["step"] for h in info["history"][1:]]
    assert steps == list(range(2, len(arm["step_seconds"]) + 1, 2)) and info["probes"] == len(steps)
    for before, entry in zip(info["history"], info["history"][1:]):
        assert len(entry["layers"]) == LAYERS // 2 and sorted(entry["scores"], key=int) == [str(i) for i in range(6)]
        assert entry["moved_in"] == sorted(set(entry["layers"]) - set(before["layers"]))
        assert entry["moved_out"] == sorted(set(before["layers"]) - set(entry["layers"]))
    assert info["final_layers"] == info["history"][-1]["layers"]
    assert set(info["layers_ever_trained"]) == {i for h in info["history"] for i in h["layers"]}
    # the clock at the end is its step times plus every probe before its last step
    warm, n = result["config"]["untimed_steps"], len(arm["step_seconds"])
    charge = arm["median_step_seconds"]
    expected = sum(arm["step_seconds"][warm:n]) + charge * warm + sum(h["seconds"] for h in info["history"][1:-1])
    last = info["history"][-1]
    expected += last["seconds"] if last["step"] < n else 0.0
    assert arm["time_to_quality"]["trained_seconds"] == pytest.approx(expected)
    assert 0 < info["share_of_clock"] < 1
    # only the selected blocks train: the backward pass of the first step stopped at the first selection
    assert arm["lowest_layer_reached"] == min(score["layers"])
    assert arm["memory"]["trainable_parameters"] == score["memory"]["trainable_parameters"]


def test_beyond_section_compares_both_arms_with_score(beyond_run):
    text = (beyond_run["out"] / "train_b.md").read_text()
    section = text.split("## Beyond one-shot selection with uniform rank")[1].split("## Reading")[0]
    assert [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:] == [
        "score", "ranks", "reprobe"
    ]  # fmt: skip
    assert "- `ranks`:" in section and "- `reprobe`:" in section and "re-probes took" in section
    assert (beyond_run["out"] / "train_b_reprobe.png").stat().st_size > 0


def test_the_command_lists_only_the_files_of_its_own_run(tmp_path, capsys):
    (tmp_path / "train_t_seed1.json").write_text("{}")  # another run whose name starts with this one's
    config = tmp_path / "t.yaml"
    config.write_text(yaml.safe_dump({**TINY, "max_steps": 3, "eval_steps": 3, "arms": ["all", "contiguous"]}))
    assert main(["bench", "--config", str(config), "--out", str(tmp_path), "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.removeprefix("wrote ") for line in lines if line.startswith("wrote ")]
    names = ["train_t.json", "train_t.md", "train_t_loss_vs_time.png", "train_t_speedup.png"]
    assert listed == [str(tmp_path / name) for name in names]


def test_the_docs_page_links_the_other_runs_of_the_folder(tiny_run, beyond_run, tmp_path):
    result = tiny_run["result"]
    (tmp_path / "train_t.json").write_text(json.dumps(result))
    other = {**beyond_run["result"], "name": "u", "command": "aletheia-lora bench --seed 1"}
    (tmp_path / "train_u.json").write_text(json.dumps(other))
    docs = tmp_path / "docs" / "BENCHMARKS.md"
    render_outputs(tmp_path, "t", docs=docs)
    text = docs.read_text()
    section = text.split("## Other training benchmarks in the same folder")[1].split("## Gradient probe")[0]
    rows = [line for line in section.splitlines() if line.startswith("| [")]
    assert len(rows) == 1 and "[`u`](../train_u.md)" in rows[0] and "`aletheia-lora bench --seed 1`" in rows[0]
    score = _arms(other)["score"]
    assert f"score {score['measured_speedup']:.2f}x" in rows[0]
    # the ranks and reprobe arms against their run's score arm
    table = text.split("### Ranks and re-probing against one-shot `score` selection")[1]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `u`")]
    assert [row[2] for row in rows] == ["ranks", "reprobe"]
    reprobe = _arms(other)["reprobe"]
    assert rows[1][6] == f"{reprobe['beyond']['share_of_clock']:.1%} |" and rows[0][6] == "- |"


def test_general_data_none_skips_forgetting_and_says_why_once(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    """`--general-data none` as `run` takes it: no general rows, null in the JSON, '-' in the tables; the run is
    named after the checkpoint folder when --name is not given."""
    settings = {k: v for k, v in TINY.items() if k != "name"}
    settings.update(max_steps=3, eval_steps=3, arms=["all", "truncation"], data=str(tiny_corpus / "target.txt"))
    config = tmp_path / "none.yaml"
    config.write_text(yaml.safe_dump({**settings, "model": str(tiny_checkpoint) + "/"}))
    out = tmp_path / "out"
    argv = ["bench", "--config", str(config), "--general-data", "none", "--no-calibrate", "--out", str(out), "-q"]
    assert main(argv) == 0
    name = tiny_checkpoint.name  # e.g. tiny-llama0: the checkpoint folder, not train_smollm2
    assert f"wrote {out / f'train_{name}.json'}" in capsys.readouterr().out
    result = load_result(out / f"train_{name}.json")
    assert result["name"] == name and result["config"]["general_data"] is None
    assert result["base"]["general_loss"] is None
    for arm in result["arms"]:
        for view in arm["views"].values():
            assert view["general_loss"] is None and view["forgetting"] is None and view["forgetting_vs_all"] is None
    forgetting = next(t for t in result["targets"] if t["target"].startswith("forgetting"))
    assert forgetting["met"] is None and forgetting["value"] == "not measured (no general corpus)"
    text = (out / f"train_{name}.md").read_text()
    assert text == render_markdown(result)
    assert text.count("Forgetting is not measured") == 1 and "general corpus for forgetting" not in text
    assert "| forgetting no worse than all-layer LoRA (equal steps) | not measured (no general corpus) | - |" in text
    # --no-calibrate: no calibration, '-' for its prediction and target
    assert result["calibration"] is None and all(a["calibrated_speedup"] is None for a in result["arms"])
    assert "| calibrated prediction within 5% of measured | not calibrated | - |" in text
    headline = [line for line in text.splitlines() if line.startswith("| truncation |")][0]
    assert headline.split(" | ")[6] == "-"  # the forgetting column
    assert "forgetting" not in text.split("## Reading")[1].split("Default strategy")[0].lower()
    # the API takes None as well as the word
    assert BenchConfig(**{**TINY, "general_data": None}).general_data is None
    assert BenchConfig(**{**TINY, "general_data": "None"}).general_data is None


def test_the_run_name_comes_from_the_model_when_not_given(tiny_checkpoint):
    from aletheia_lora.bench import default_name

    assert BenchConfig().name == "smollm2"  # the bundled model: the committed configs' and results' name
    for alias in ("smollm2-135m", "bundled", "default"):
        assert BenchConfig(model=alias).name == default_name(alias) == "smollm2"
    assert BenchConfig(**{k: v for k, v in TINY.items() if k != "name"}).name == "tiny"
    assert default_name("/data/ckpts/My Model (v2)/") == "My_Model_v2"
    assert default_name("Qwen/Qwen2.5-0.5B") == "Qwen2.5-0.5B"
    assert default_name("C:\\models\\llama") == "llama" and default_name("///") == "model"
    assert BenchConfig(model=str(tiny_checkpoint)).name == tiny_checkpoint.name
    assert BenchConfig(model=str(tiny_checkpoint), name="mine").name == "mine"  # --name wins


def test_plot_titles_name_the_model_not_its_path(tiny_run, monkeypatch, tmp_path):
    from aletheia_lora.bench import plot_loss_vs_time, plot_speedups, render

    titles = []
    monkeypatch.setattr(render, "save_figure", lambda fig, path: titles.append(fig.axes[0].get_title()) or path)
    result = {**tiny_run["result"], "model": {**tiny_run["result"]["model"], "name": "/home/me/ckpts/my-llama/"}}
    plot_loss_vs_time(result, tmp_path / "a.png")
    plot_speedups(result, tmp_path / "b.png")
    assert titles == ["my-llama: held-out loss vs wall-clock", "my-llama: step speedup by arm"]
    assert render.model_label({"model": {"name": "Qwen/Qwen2.5-0.5B"}}) == "Qwen/Qwen2.5-0.5B"  # a Hub id: whole
    assert render.model_label({"model": {"name": "./ckpt"}}) == "ckpt"
    assert render.model_label({"model": {"name": "smollm2-135m"}}) == "smollm2-135m"


def test_rendering_leaves_the_matplotlib_backend_and_pyplot_alone(tiny_run, tmp_path):
    """The bench's plots draw on their own Agg canvas: no backend switch, pyplot never imported."""
    import subprocess
    import sys

    (tmp_path / "train_t.json").write_text(json.dumps(tiny_run["result"]))
    code = (
        "import sys, matplotlib; matplotlib.use('svg')\n"
        "from aletheia_lora.bench import render_outputs\n"
        f"render_outputs({str(tmp_path)!r}, 't')\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["svg", "False"]
    assert (tmp_path / "train_t_loss_vs_time.png").read_bytes()[:4] == b"\x89PNG"
