"""The quality protocol (`aletheia-lora quality`): the --quick config end to end, resumption, splits, summary; the
arms that take another arm's rate (prefix caching, progressive freezing and its fixed-schedule control)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from aletheia_lora import freeze
from aletheia_lora.bench.quality import ARMS, QualityConfig, choose_rate, planned_units, run_protocol, unit_path
from aletheia_lora.bench.quality.arms import AFTER, RATE_FROM, ArmChoice, ArmContext, rate_source, register_arm
from aletheia_lora.bench.quality.protocol import _Session
from aletheia_lora.bench.quality.summary import predicted_time, sweep_losses
from aletheia_lora.bench.quality.tasks import load_base, validation_or_test
from aletheia_lora.bench.quality.unit import _clock, run_unit
from aletheia_lora.cli import main
from aletheia_lora.cost import CostModel
from aletheia_lora.data.corpora import missing_corpus_package
from aletheia_lora.forecast import even_freeze_steps
from aletheia_lora.layers import find_decoder_stack
from aletheia_lora.plan import selection_cost
from aletheia_lora.timeline import predict_timeline
from test_cost import llama_config

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
    shared = {"contiguous+cache": "contiguous", "truncation+cache": "truncation", "progressive": "all",
              "progressive-fixed": "all", "progressive+cache": "all"}  # fmt: skip
    assert set(shared) <= set(config.arms)  # the quick run includes the new arms end to end
    for task in config.tasks:
        for arm in config.arms:
            if arm in shared:  # no sweep: the rate its source chose, every seed, and no other unit
                chosen = summary["tasks"][task]["arms"][shared[arm]]["learning_rate"]
                names = sorted(path.name for path in (root / task / arm).glob("*.json"))
                assert names == sorted(unit_path(root, task, arm, chosen, s).name for s in config.seeds)
                continue
            for rate in config.learning_rates:
                assert unit_path(root, task, arm, rate, config.seeds[0]).is_file()
    assert summary["complete"] and summary["missing_units"] == []
    assert summary["default_arm"] == "score"
    assert set(summary["tasks"]) == set(config.tasks)
    for task in config.tasks:
        arms = summary["tasks"][task]["arms"]
        assert set(arms) == set(config.arms)
        for name, arm in arms.items():
            if name in shared:
                assert arm["rate_from"] == shared[name] and arm["sweep"] == {}
                assert arm["learning_rate"] == arms[shared[name]]["learning_rate"]
                for seed in config.seeds:
                    assert unit_path(root, task, name, arm["learning_rate"], seed).is_file()
            else:
                assert "rate_from" not in arm
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
    assert "| contiguous+cache | " in page and "(= contiguous)" in page and "| progressive-fixed | " in page
    assert "No sweep for `contiguous+cache` (the rate `contiguous` chose)" in page
    assert "`progressive` froze (block@step): seed 0:" in page and "built its prefix cache in" in page
    assert (out / f"{config.name}.md").is_file()


def test_the_chosen_rate_is_the_validation_argmin(quick_run):
    summary, config = quick_run["summary"], quick_run["config"]
    root = quick_run["out"] / config.name
    for task in config.tasks:
        arms = summary["tasks"][task]["arms"]
        for name, arm in arms.items():
            if rate_source(name) is not None:  # no sweep of its own: its source's choice
                assert arm["learning_rate"] == arms[rate_source(name)]["learning_rate"]
                continue
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
    for name in ("contiguous", "truncation"):
        cached = picks[f"{name}+cache"]
        assert (cached.layers, cached.lora) == (picks[name].layers, picks[name].lora)
        assert cached.training == {"prefix_cache": True} and picks[name].training == {}
    for name in ("progressive", "progressive-fixed"):
        assert picks[name].layers == list(range(6)) and picks[name].lora == picks["all"].lora
    rule = {"freeze": "gradient", "every": config.freeze_every, "max_frozen_pct": config.max_frozen_pct}
    assert picks["progressive"].training == rule and picks["progressive-fixed"].training == {"freeze": "fixed"}


def test_bad_settings_name_the_flag():
    with pytest.raises(ValueError, match="--arms: unknown"):
        QualityConfig(arms=["all", "nope"])
    with pytest.raises(ValueError, match="--arms must include 'all'"):
        QualityConfig(arms=["score"])
    with pytest.raises(ValueError, match="--learning-rates must be"):
        QualityConfig(learning_rates=[])
    with pytest.raises(
        ValueError, match="--arms: 'contiguous\\+cache' trains at the learning rate 'contiguous' chose"
    ):
        QualityConfig(arms=["all", "contiguous+cache"])
    with pytest.raises(ValueError, match="--arms: 'progressive-fixed' runs after 'progressive'"):
        QualityConfig(arms=["all", "progressive-fixed"])
    with pytest.raises(ValueError, match="--freeze-every must be an integer >= 1"):
        QualityConfig(freeze_every=0)
    with pytest.raises(ValueError, match="--max-frozen-pct must be at most 100"):
        QualityConfig(max_frozen_pct=150)
    with pytest.raises(ValueError, match="--sweep-extensions must be an integer >= 0, got -1"):
        QualityConfig(sweep_extensions=-1)
    with pytest.raises(ValueError, match="--config: unknown setting"):
        QualityConfig.from_file(REPO / "bench" / "configs" / "tiny.yaml")
    full = QualityConfig.from_file(REPO / "bench" / "configs" / "quality.yaml")
    assert len(full.learning_rates) >= 4 and len(full.seeds) == 3 and full.epochs >= 2
    assert all(b / a == pytest.approx(2) for a, b in zip(full.learning_rates, full.learning_rates[1:]))
    # the arms of the committed units first, in their order: their units keep their places in the plan
    first = ["all", "score", "truncation", "contiguous", "paper", "param-matched", "random", "random-above"]
    assert full.arms == [*first, "contiguous+cache", "truncation+cache", "progressive", "progressive-fixed",
                         "progressive+cache"]  # fmt: skip
    assert full.arms == QualityConfig().arms
    # freeze.py's interval, scaled from its ~200-step runs to the protocol's ~60; its share of blocks as it is
    assert full.freeze_every == QualityConfig().freeze_every == round(freeze.DEFAULT_FREEZE_EVERY * 60 / 200)
    assert full.max_frozen_pct == QualityConfig().max_frozen_pct == freeze.DEFAULT_MAX_FROZEN_PCT


# --- the arms that take another arm's rate ------------------------------------------------------------------------


def test_a_cached_arm_trains_as_its_uncached_arm_on_a_clock_that_includes_the_build(quick_run):
    root, config = quick_run["out"] / quick_run["config"].name, quick_run["config"]
    for task in config.tasks:
        for cached, source in (("contiguous+cache", "contiguous"), ("truncation+cache", "truncation")):
            rate = quick_run["summary"]["tasks"][task]["arms"][source]["learning_rate"]
            for seed in config.seeds:
                a = json.loads(unit_path(root, task, cached, rate, seed).read_text())
                b = json.loads(unit_path(root, task, source, rate, seed).read_text())
                assert a["layers"] == b["layers"] and a["rate_from"] == source
                assert a["train_losses"] == pytest.approx(b["train_losses"], abs=1e-6)
                for p, q in zip(a["curve"], b["curve"], strict=True):
                    assert p["step"] == q["step"]
                    assert p["validation_loss"] == pytest.approx(q["validation_loss"], abs=1e-6)
                    assert p["test_loss"] == pytest.approx(q["test_loss"], abs=1e-6)
                # the prefix was really skipped, every step
                assert a["prefix_cache"]["block"] == min(a["layers"]) > 0
                assert a["prefix_cache"]["batches_served"] == a["steps"]
                # the build is charged at step 0: the curve starts there and every later time includes it
                build = a["cache_build_seconds"]
                assert build >= a["prefix_cache"]["build_seconds"] > 0
                assert a["curve"][0]["seconds"] == build and b["curve"][0]["seconds"] == 0.0
                assert a["train_seconds"] == pytest.approx(_clock(a["step_seconds"], a["steps"]) + build)
                for point in a["curve"][1:]:
                    assert point["seconds"] == pytest.approx(_clock(a["step_seconds"], point["step"]) + build)


def test_a_cached_arm_without_a_frozen_prefix_trains_uncached_and_says_so(tmp_path):
    config = _quick(tasks=["python-stdlib"], epochs=1)
    session = _Session(config, tmp_path)
    task = session.tasks["python-stdlib"]
    assert task.data.train  # loads the data and the base losses
    kw = {"rate": 0.004, "seed": 0, "config": config, "device": session.device, "base_losses": task.base_losses}
    lora = task.context.lora()
    cached = run_unit(session.base, task.data, ArmChoice([0, 1], lora, training={"prefix_cache": True}), arm="x", **kw)
    plain = run_unit(session.base, task.data, ArmChoice([0, 1], lora), arm="y", **kw)
    assert cached["prefix_cache"] is None and cached["cache_build_seconds"] == 0.0
    assert "lowest adapted block is 0" in cached["prefix_cache_skipped"]
    assert cached["train_losses"] == plain["train_losses"]
    assert "prefix_cache" not in plain and "training" not in plain  # a plain arm's record is as it was


def _unit(root: Path, task: str, arm: str, rate: float, seed: int, loss: float) -> None:
    path = unit_path(root, task, arm, rate, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"validation_loss": loss}))


def test_a_sweep_best_at_its_edge_goes_one_rate_further_until_it_is_not_or_the_limit(tmp_path):
    config = _quick(tasks=["python-stdlib"], arms=["all"], seeds=[0, 1], learning_rates=[1e-3, 2e-3, 4e-3])
    config.sweep_extensions = 2

    def plan():
        return [(r, s) for _, _, r, s in planned_units(config, tmp_path)]

    for rate, loss in zip((1e-3, 2e-3, 4e-3), (3.0, 2.0, 1.0)):  # best at the top: 8e-3 next, no seeds yet
        _unit(tmp_path, "python-stdlib", "all", rate, 0, loss)
    assert plan() == [(1e-3, 0), (2e-3, 0), (4e-3, 0), (8e-3, 0)]
    _unit(tmp_path, "python-stdlib", "all", 8e-3, 0, 0.5)  # still the top: 1.6e-2, the second and last extension
    assert plan()[-1] == (1.6e-2, 0) and len(plan()) == 5
    _unit(tmp_path, "python-stdlib", "all", 1.6e-2, 0, 0.7)  # now interior: the seeds at 8e-3
    assert plan()[-1:] == [(8e-3, 1)]
    sweep = sweep_losses(config, tmp_path, "python-stdlib", "all")  # what the summary reads and chooses from
    assert list(sweep) == ["0.001", "0.002", "0.004", "0.008", "0.016"] and choose_rate(sweep) == 8e-3
    # the limit: a third edge is not swept; the best of what ran is chosen
    _unit(tmp_path, "python-stdlib", "all", 1.6e-2, 0, 0.1)
    assert plan()[-1:] == [(1.6e-2, 1)]
    # the low edge goes down by the sweep's ratio; 0 extensions keeps to the listed rates
    low = tmp_path / "low"
    for rate, loss in zip((1e-3, 2e-3, 4e-3), (1.0, 2.0, 3.0)):
        _unit(low, "python-stdlib", "all", rate, 0, loss)
    assert [r for _, _, r, _ in planned_units(config, low)][-1] == pytest.approx(5e-4)
    config.sweep_extensions = 0
    assert planned_units(config, low)[-1] == ("python-stdlib", "all", 1e-3, 1)


def test_rate_from_arms_plan_no_sweep_and_wait_for_their_source(tmp_path):
    config = _quick(tasks=["python-stdlib"], seeds=[0, 1])
    rates = config.learning_rates
    sweeping = [a for a in config.arms if rate_source(a) is None]
    plan = planned_units(config, tmp_path)
    assert plan == [("python-stdlib", a, r, 0) for a in sweeping for r in rates]  # sweeps only, nothing else
    # all's sweep complete: progressive plans every seed (0 included) at all's choice; progressive-fixed waits
    for rate, loss in zip(rates, (2.0, 1.0)):
        _unit(tmp_path, "python-stdlib", "all", rate, 0, loss)
    plan = planned_units(config, tmp_path)
    assert [u for u in plan if u[1] == "progressive"] == [
        ("python-stdlib", "progressive", rates[1], s) for s in (0, 1)
    ]
    assert not [u for u in plan if u[1] in ("progressive-fixed", "contiguous+cache", "truncation+cache")]
    # the sweeping arms' units keep their places: the shared-rate arms come after them
    first_shared = min(i for i, u in enumerate(plan) if rate_source(u[1]) is not None)
    assert all(rate_source(u[1]) is None for u in plan[:first_shared])
    assert all(rate_source(u[1]) is not None for u in plan[first_shared:])
    # progressive's seed-0 unit done: progressive-fixed's seed 0 only
    _unit(tmp_path, "python-stdlib", "progressive", rates[1], 0, 1.0)
    plan = planned_units(config, tmp_path)
    assert [u for u in plan if u[1] == "progressive-fixed"] == [("python-stdlib", "progressive-fixed", rates[1], 0)]
    # a finished contiguous sweep: its cached arm at contiguous's argmin, every seed
    for rate, loss in zip(rates, (1.0, 3.0)):
        _unit(tmp_path, "python-stdlib", "contiguous", rate, 0, loss)
    plan = planned_units(config, tmp_path)
    assert [u for u in plan if u[1] == "contiguous+cache"] == [
        ("python-stdlib", "contiguous+cache", rates[0], s) for s in (0, 1)
    ]
    assert RATE_FROM["contiguous+cache"] == "contiguous" and AFTER["progressive-fixed"] == "progressive"


def test_registering_an_arm_checks_where_its_rate_comes_from():
    before = (dict(ARMS), dict(RATE_FROM), dict(AFTER))
    fn = ARMS["all"]
    with pytest.raises(ValueError, match="rate_from='nope' must name another registered arm"):
        register_arm("x", fn, rate_from="nope")
    with pytest.raises(ValueError, match="after='progressive' takes its rate from 'all', not 'score'"):
        register_arm("x", fn, rate_from="score", after="progressive")
    with pytest.raises(ValueError, match="goes round in a circle"):
        register_arm("all", fn, rate_from="progressive")
    assert (ARMS, RATE_FROM, AFTER) == before  # nothing registered by a refused call


@pytest.fixture
def freezing_run(tmp_path, monkeypatch):
    """all, progressive and progressive-fixed with a rule that freezes at its first decision; every call of
    drop_from_optimizer recorded with the parameters' values at that moment."""
    monkeypatch.setattr(freeze, "settled_prefix", lambda previous, current, frozen, limit: max(frozen, limit))
    dropped = []
    real = freeze.drop_from_optimizer

    def recording(optimizer, params):
        dropped.append((optimizer, [(p, p.detach().clone()) for p in params]))
        return real(optimizer, params)

    monkeypatch.setattr(freeze, "drop_from_optimizer", recording)
    config = _quick(tasks=["python-stdlib"], arms=["all", "progressive", "progressive-fixed", "progressive+cache"],
                    learning_rates=[0.004])  # fmt: skip
    summary = run_protocol(config, tmp_path)
    root = tmp_path / config.name
    units = {a: json.loads(unit_path(root, "python-stdlib", a, 0.004, 0).read_text()) for a in config.arms}
    return {"config": config, "summary": summary, "units": units, "dropped": dropped}


def test_progressive_freezes_and_frozen_adapters_stay_bit_identical_out_of_the_optimizer(freezing_run):
    config, unit, base = freezing_run["config"], freezing_run["units"]["progressive"], freezing_run["units"]["all"]
    every, limit = config.freeze_every, freeze.max_frozen(config.tiny_layers, config.max_frozen_pct)
    assert limit == 2
    record = unit["freeze"]
    # the first decision comes after the second interval (the rule compares two)
    assert record["rule"] == "gradient" and record["frozen_at"] == {"0": 2 * every, "1": 2 * every}
    assert record["timeline"][-1] == {"step": 2 * every, "lowest_trainable": 2, "frozen": [0, 1]}
    assert record["frozen_unchanged"] and record["frozen_out_of_optimizer"] and not record["frozen_still_trainable"]
    assert record["trainable_parameters_end"] == unit["trainable_parameters"] // 2
    # it starts as all-layer LoRA at all's rate: the same losses until the freeze
    assert unit["learning_rate"] == base["learning_rate"] and unit["rate_from"] == "all"
    assert unit["train_losses"][: 2 * every] == base["train_losses"][: 2 * every]
    # checked from outside too: what left the optimizer never changed again and holds no state there
    optimizer, params = freezing_run["dropped"][0]
    assert params
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for p, at_freeze in params:
        assert torch.equal(p, at_freeze) and not p.requires_grad and p.grad is None
        assert id(p) not in in_groups and p not in optimizer.state


def test_progressive_fixed_freezes_as_many_blocks_on_its_schedule(freezing_run):
    unit, progressive = freezing_run["units"]["progressive-fixed"], freezing_run["units"]["progressive"]
    record, steps = unit["freeze"], unit["steps"]
    count = len(progressive["freeze"]["frozen_at"])
    assert record["rule"] == "fixed" and record["count_from"] == {"arm": "progressive", "frozen": count}
    assert record["schedule"] == [{"block": b, "step": s} for b, s in enumerate(even_freeze_steps(count, steps))]
    assert record["frozen_at"] == {str(b): s for b, s in enumerate(even_freeze_steps(count, steps))}
    assert record["frozen_unchanged"] and record["frozen_out_of_optimizer"] and not record["frozen_still_trainable"]
    optimizer, params = freezing_run["dropped"][-1]  # the control's last freeze
    for p, at_freeze in params:
        assert torch.equal(p, at_freeze) and not p.requires_grad
        assert p not in optimizer.state
    # the summary and the page show the timelines
    seeds = freezing_run["summary"]["tasks"]["python-stdlib"]["arms"]["progressive-fixed"]["seeds"]
    assert seeds[0]["frozen_at"] == record["frozen_at"]
    assert (
        even_freeze_steps(2, 18) == [6, 12]
        and even_freeze_steps(3, 48) == [12, 24, 36]
        and even_freeze_steps(0, 60) == []
    )
    assert even_freeze_steps(1, 1) == [1]  # never before the first step


def test_progressive_with_the_cache_trains_alike_and_caches_the_settled_prefix(freezing_run):
    unit, progressive = freezing_run["units"]["progressive+cache"], freezing_run["units"]["progressive"]
    assert unit["freeze"]["frozen_at"] == progressive["freeze"]["frozen_at"]  # the same decisions
    assert unit["train_losses"] == pytest.approx(progressive["train_losses"], abs=1e-6)  # the cache changes no number
    frozen = max(progressive["freeze"]["frozen_at"].values())
    cached = unit["prefix_cache"]
    assert cached["progressive"] is True and cached["stable_steps"] == unit["steps_per_epoch"]
    build_step = frozen + unit["steps_per_epoch"]
    assert build_step < unit["steps"]  # the quick run is long enough for a build
    assert [(b["step"], b["block"]) for b in cached["builds"]] == [(build_step, 2)]
    assert cached["batches_served"] == unit["steps"] - build_step


def test_a_rerun_skips_finished_units_of_the_new_arms_and_retrains_lost_ones(quick_run, tmp_path):
    out, config = tmp_path / "copy", quick_run["config"]
    shutil.copytree(quick_run["out"], out)
    root, task = out / config.name, config.tasks[0]
    rate = quick_run["summary"]["tasks"][task]["arms"]["all"]["learning_rate"]
    lost = [unit_path(root, task, arm, rate, config.seeds[0]) for arm in ("progressive", "progressive-fixed")]
    fixed_before = json.loads(lost[1].read_text())["freeze"]["frozen_at"]
    for path in lost:
        path.unlink()
    summary = run_protocol(config, out, max_units=1)  # progressive first; the control waits for it
    assert summary["units_trained_now"] == 1 and lost[0].is_file() and not lost[1].exists()
    assert summary["missing_units"] == [str(lost[1].relative_to(root))]
    summary = run_protocol(config, out)
    assert summary["units_trained_now"] == 1 and summary["complete"]
    assert json.loads(lost[1].read_text())["freeze"]["frozen_at"] == fixed_before
    assert run_protocol(config, out)["units_trained_now"] == 0


def test_batches_carry_their_row_ids_only_on_request():
    from aletheia_lora.bench.workload import Batches
    from aletheia_lora.prefix_cache import ROW_IDS

    rows = [{"input_ids": [10 + i] * (3 + i % 2)} for i in range(10)]
    cpu = torch.device("cpu")
    plain, indexed = Batches(rows, 3, 5, 0, cpu), Batches(rows, 3, 5, 0, cpu, row_ids=True)
    for step in range(7):  # over two epochs
        a, b = plain(step), indexed(step)
        assert ROW_IDS not in a and set(b) == {*a, ROW_IDS}
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert b[ROW_IDS].dtype == torch.long and (a["input_ids"][:, 0] - 10).tolist() == b[ROW_IDS].tolist()


def test_a_selection_that_changed_since_an_arms_first_units_stops_the_run(quick_run, tmp_path):
    out, config = tmp_path / "copy", quick_run["config"]
    shutil.copytree(quick_run["out"], out)
    folder = out / config.name / config.tasks[0] / "truncation"
    first, second = sorted(folder.glob("*.json"))[:2]
    record = json.loads(first.read_text())
    record["layers"] = [0]  # as if an older cost model had picked other blocks
    first.write_text(json.dumps(record))
    second.unlink()
    with pytest.raises(
        ValueError, match=r"truncation: this code picks blocks \[.*\], .* trained \[0\]; the selection"
    ):
        run_protocol(config, out)
    assert not second.exists()  # nothing trained under the mixed selection


def test_the_gap_line_says_not_reached_for_a_seed_that_never_got_there():
    from aletheia_lora.bench.quality.render import gap_lines

    seeds = [{"seed": 0, "time_to_all_quality": None, "equal_time_test_loss_vs_all": 1.01, "met": False},
             {"seed": 1, "time_to_all_quality": 0.75, "equal_time_test_loss_vs_all": 0.99, "met": True}]  # fmt: skip
    gap = {"arm": "score", "time_limit": 0.8, "met": False, "tasks": {"t": {"met": False, "seeds": seeds}}}
    summary = {"gap": gap, "missing_units": []}
    lines = gap_lines(summary)
    assert lines[1] == "**No: a miss.**"
    assert lines[3] == (
        "- t: missed (seed 0: time not reached, equal-time loss 1.010x; seed 1: time 0.75x, equal-time loss 0.990x)"
    )


def test_the_committed_protocol_is_complete_and_its_page_is_rendered_from_its_json():
    from aletheia_lora.bench.quality.render import render_markdown

    summary = json.loads((REPO / "bench" / "results" / "quality.json").read_text())
    config = QualityConfig.from_file(REPO / "bench" / "configs" / "quality.yaml")
    assert summary["complete"] and not summary["missing_units"]
    assert summary["default_arm"] == "score" and summary["gap"]["met"] is not None
    assert set(summary["tasks"]) == set(config.tasks)
    for entry in summary["tasks"].values():
        assert set(entry["arms"]) == set(config.arms)
        for arm in entry["arms"].values():
            assert [s["seed"] for s in arm["seeds"]] == config.seeds
            assert arm["learning_rate"] is not None
    page = (REPO / "docs" / "QUALITY.md").read_text()
    for task, entry in summary["tasks"].items():  # the plots are named, not listed, in the JSON
        entry["plots"] = [f"../bench/results/{summary['name']}_{task}.png"]
        assert (REPO / "bench" / "results" / f"{summary['name']}_{task}.png").is_file()
    assert page == render_markdown(summary)
    assert "aletheia-lora quality --config bench/configs/quality.yaml" in page


def test_each_seed_holds_its_training_time_predicted_from_its_blocks_freezes_and_cache_builds():
    cost = CostModel.from_model(llama_config(6), seq_len=8, batch_size=2, r=4)
    static = {"layers": [3, 4, 5], "steps": 10}
    assert predicted_time(static, cost) == pytest.approx(1 / cost.speedup([3, 4, 5]))
    cached = {**static, "prefix_cache": {"block": 3, "rows": 40}}
    expected = predict_timeline(cost, [{"step": 0, "lowest_trainable": 3}], 10, blocks=[3, 4, 5],
                                cache_builds=[{"step": 0, "block": 3}], rows=40)  # fmt: skip
    assert predicted_time(cached, cost) == pytest.approx(expected.relative_time)
    cached_step = cost.step_cost([3, 4, 5], cache_block=3).effective / cost.step_cost(range(6)).effective
    assert predicted_time(cached, cost) > cached_step  # the build is charged on top of the cached steps
    timeline = [{"step": 0, "lowest_trainable": 0, "frozen": []}, {"step": 4, "lowest_trainable": 2, "frozen": [0, 1]}]
    progressive = {"layers": list(range(6)), "steps": 10, "freeze": {"timeline": timeline},
                   "prefix_cache": {"builds": [{"step": 8, "block": 2, "build_seconds": 0.1}]}}  # fmt: skip
    expected = predict_timeline(cost, [{k: e[k] for k in ("step", "lowest_trainable")} for e in timeline], 10,
                                cache_builds=[{"step": 8, "block": 2}], rows=40)  # fmt: skip
    assert predicted_time(progressive, cost, train_rows=40) == pytest.approx(expected.relative_time)
    assert 1 / cost.speedup(range(2, 6)) < predicted_time({**progressive, "prefix_cache": {}}, cost) < 1
    wider = CostModel.from_model(llama_config(6), seq_len=8, batch_size=2, r=16)  # another rank than all-layer's
    expected = wider.step_cost([3, 4, 5]).effective / cost.step_cost(range(6)).effective
    assert predicted_time(static, wider, reference=cost) == pytest.approx(expected)
    # a unit with per-module ranks is priced at them, against all-layer LoRA at the protocol's rank
    from aletheia_lora.bench.quality.summary import _predicted

    def cost_at(r, attention_r, mlp_r):
        return CostModel.from_model(llama_config(6), seq_len=8, batch_size=2, r=r, attention_r=attention_r,
                                    mlp_r=mlp_r)  # fmt: skip

    paper = {**static, "lora": {"r": 4, "attention_r": 8, "mlp_r": 32}}
    ranked = cost_at(4, 8, 32)
    expected = ranked.step_cost([3, 4, 5]).effective / cost.step_cost(range(6)).effective
    assert _predicted(paper, cost_at, 4, None) == pytest.approx(expected)
    assert _predicted(paper, cost_at, 4, None) > _predicted({**static, "lora": {"r": 4}}, cost_at, 4, None)


def test_the_summary_sets_predicted_training_time_beside_the_measured_and_the_page_shows_both(quick_run):
    summary = quick_run["summary"]
    info = summary["time_prediction"]
    assert info["cost_model"] and info["max_error"] is not None
    errors = []
    for entry in summary["tasks"].values():
        ref = entry["reference"]
        for name, arm in entry["arms"].items():
            for s in arm["seeds"]:
                r = ref[str(s["seed"])]
                assert s["time_vs_all"] == pytest.approx(s["train_seconds"] / r["train_seconds"])
                assert s["time_prediction_error"] == pytest.approx(s["predicted_time_vs_all"] / s["time_vs_all"] - 1)
                if name == "all":
                    assert s["predicted_time_vs_all"] == pytest.approx(1.0)
                else:
                    errors.append(abs(s["time_prediction_error"]))
    assert info["max_error"] == pytest.approx(max(errors))
    page = (quick_run["out"] / "docs" / "QUALITY.md").read_text()
    assert "## Training time: predicted before training, measured" in page
    assert f"Largest error {info['max_error']:.1%}" in page


def test_the_time_table_names_the_arms_without_a_prediction():
    from aletheia_lora.bench.quality.render import time_prediction_lines

    stats = {"mean": 0.9, "sd": 0.01, "sem": None, "n": 2}
    priced = {"seeds": [{"seed": 0, "time_prediction_error": -0.02}, {"seed": 1, "time_prediction_error": 0.01}],
              "summary": {"predicted_time_vs_all": stats, "time_vs_all": stats}}  # fmt: skip
    arms = {"all": priced, "score": priced, "paper": {"seeds": [{"seed": 0}], "summary": {}}}
    summary = {"time_prediction": {"cost_model": "m", "max_error": 0.02, "median_error": 0.015},
               "tasks": {"code": {"arms": arms}}}  # fmt: skip
    lines = time_prediction_lines(summary)
    assert "| code | score | 0.900 ± 0.010 | 0.900 ± 0.010 | -2.0% / +1.0% |" in lines
    assert not any(line.startswith("| code | all ") or line.startswith("| code | paper ") for line in lines)
    assert "Not predicted: `paper`." in lines
    assert time_prediction_lines({"tasks": {}}) == []
