import json
import re
import subprocess
import sys

import pytest
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from aletheia_lora.cli import main
from aletheia_lora.data import DataConfig, build_datasets
from aletheia_lora.train import evaluate_loss


def tiny_args(checkpoint, corpus, out, *extra):
    return [
        "--model", str(checkpoint),
        "--data", str(corpus / "target.txt"),
        "--general-data", str(corpus / "general.txt"),
        "--max-length", "16",
        "--probe-batches", "2",
        "--out", str(out),
        "-q",
        *extra,
    ]  # fmt: skip


def reloaded_eval_loss(checkpoint, corpus, adapter_dir):
    """The adapter loaded with plain PEFT onto the checkpoint, and its loss on the target's eval split."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), adapter_dir)
    eval_rows = build_datasets(
        DataConfig(data=str(corpus / "target.txt"), general_data=None, max_length=16), tokenizer
    )[1]
    return model, evaluate_loss(model, eval_rows, batch_size=2, pad_token_id=tokenizer.pad_token_id or 0)["loss"]


TRAIN = ["--max-steps", "4", "--batch-size", "2", "--save-steps", "2", "--logging-steps", "1", "--r", "4"]


def test_run_end_to_end_writes_everything_and_the_adapter_reproduces_the_model(
    tiny_checkpoint, tiny_corpus, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(["run", *tiny_args(tiny_checkpoint, tiny_corpus, out, *TRAIN, "--top-pct", "50")]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"scores.json", "selection.json", "layer_scores.png", "adapter", "checkpoints", "metrics.json",
            "loss_curve.png", "run_config.json"} <= names  # fmt: skip
    report = json.loads((out / "metrics.json").read_text())
    selected = report["selection"]["selected_layers"]
    assert len(selected) == 2 and report["num_layers"] == 4
    assert report["train"]["steps"] == 4
    assert report["train"]["lowest_layer_reached"] == min(selected)
    for part in ("target", "general"):
        assert report["eval_before"][part]["loss"] > 0 and report["eval_after"][part]["loss"] > 0
    printed = capsys.readouterr().out
    assert "target loss" in printed and "metrics.json" in printed
    # the adapter loads with plain PEFT and gives the evaluation the run reported
    model, loss = reloaded_eval_loss(tiny_checkpoint, tiny_corpus, out / "adapter")
    assert loss == pytest.approx(report["eval_after"]["target"]["loss"], rel=1e-5)
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == set(selected)


def test_same_seed_selects_the_same_layers(tiny_checkpoint, tiny_corpus, tmp_path):
    selections = []
    for name in ("a", "b"):
        assert main(["probe", *tiny_args(tiny_checkpoint, tiny_corpus, tmp_path / name)]) == 0
        selections.append(json.loads((tmp_path / name / "selection.json").read_text())["selected_layers"])
        scores = json.loads((tmp_path / name / "scores.json").read_text())["scores"]
        assert len(scores) == 4
    assert selections[0] == selections[1]


def test_probe_select_config_chain(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    assert main(["probe", *tiny_args(tiny_checkpoint, tiny_corpus, tmp_path / "p")]) == 0
    scores = tmp_path / "p" / "scores.json"
    assert main(["select", "--scores", str(scores), "--top-k", "1", "--strategy", "contiguous",
                 "--out", str(tmp_path / "sel.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "sel.json").read_text())["selected_layers"] == [3]
    out = tmp_path / "cfg" / "adapter_config.json"
    assert main(["config", "--scores", str(scores), "--top-k", "2", "--model", str(tiny_checkpoint),
                 "--attention-r", "4", "--mlp-r", "8", "--out", str(out)]) == 0  # fmt: skip
    config = LoraConfig.from_pretrained(str(tmp_path / "cfg"))
    assert len(config.layers_to_transform) == 2
    assert config.rank_pattern["q_proj"] == 4 and config.rank_pattern["down_proj"] == 8
    capsys.readouterr()
    assert main(["config", "--layers", "1", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["layers_to_transform"] == [1, 3]


def test_config_file_gives_defaults_and_flags_win(tiny_checkpoint, tiny_corpus, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("top-k: 1\nstrategy: contiguous\nprobe_seed: 7\n")
    assert main(["probe", "--config", str(config), "--top-k", "2",
                 *tiny_args(tiny_checkpoint, tiny_corpus, tmp_path / "o")]) == 0  # fmt: skip
    selection = json.loads((tmp_path / "o" / "selection.json").read_text())
    assert selection["selected_layers"] == [2, 3]
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert scores["meta"]["seed"] == 7


@pytest.mark.parametrize(
    "argv, message",
    [
        (["select", "--scores", "missing.json"], "cannot read scores file 'missing.json'"),
        (["config"], "give --scores FILE"),
        (["config", "--layers", "1", "1"], r"selected_layers holds duplicates: \[1\]"),
        (["config", "--layers", "0", "--lora-dropout", "2"], r"--lora-dropout must be a number in \[0, 1\), got 2.0"),
        (["probe", "--model", "/nonexistent/model"], "local model folder not found"),
        (["run", "--max-steps", "0"], "--max-steps must be a positive integer, got 0"),
        (["probe", "--probe-batches", "0"], "--probe-batches must be a positive integer, got 0"),
        (["select", "--config", "nope.yaml", "--scores", "x"], "--config: cannot read 'nope.yaml'"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aletheia-lora: error:")
    assert __import__("re").search(message, err[0]), err[0]


def test_existing_output_folder_is_refused_and_never_wiped(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["probe", *tiny_args(tiny_checkpoint, tiny_corpus, out)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["probe", *tiny_args(tiny_checkpoint, tiny_corpus, out, "--overwrite")]) == 0
    assert (out / "mine.txt").read_text() == "keep me"
    assert (out / "scores.json").exists()


def test_unknown_config_key(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"top_pct": 30, "learning_rate": 1}))
    assert main(["select", "--config", str(config), "--scores", "x"]) == 2
    assert "unknown setting(s) ['learning_rate']" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="cannot read scores file"):
        main(["select", "--scores", str(tmp_path / "missing.json"), "--debug"])


@pytest.mark.parametrize("command", ["probe", "select", "config", "train", "run", "merge"])
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: aletheia-lora " + command)
    if command == "run":
        assert "--learning-rate" in out and "Peak learning rate of AdamW" in out
        assert "--attention-r" in out and "--general-data" in out


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "aletheia_lora", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "usage: aletheia-lora" in result.stdout and "probe" in result.stdout and "run" in result.stdout


def test_train_resume_continues(tiny_checkpoint, tiny_corpus, tmp_path):
    out = tmp_path / "t"
    assert main(["train", *tiny_args(tiny_checkpoint, tiny_corpus, out, *TRAIN)]) == 0
    more = ["--max-steps", "6", *TRAIN[2:]]
    assert main(["train", *tiny_args(tiny_checkpoint, tiny_corpus, out, *more, "--resume")]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["train"]["steps"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert not list(out.rglob("*.bin")) or all("training_args" in p.name for p in out.rglob("*.bin"))


def test_config_exports_for_other_tools(tiny_checkpoint, tmp_path, capsys):
    import yaml

    assert main(["config", "--layers", "1", "3", "--model", str(tiny_checkpoint), "--format", "axolotl"]) == 0
    axolotl = yaml.safe_load(capsys.readouterr().out)
    assert axolotl["adapter"] == "lora" and axolotl["peft_layers_to_transform"] == [1, 3]
    assert set(axolotl["lora_target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}  # fmt: skip
    assert main(["config", "--layers", "1", "3", "--model", str(tiny_checkpoint), "--format", "llamafactory"]) == 0
    factory = yaml.safe_load(capsys.readouterr().out)
    names = factory["lora_target"].split(",")
    assert factory["finetuning_type"] == "lora" and len(names) == 14
    assert all(n.startswith(("model.layers.1.", "model.layers.3.")) for n in names)
    # the full names, read back as target_modules, make PEFT adapt exactly the selected layers
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), LoraConfig(target_modules=names))
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == {1, 3}
    assert main(["config", "--layers", "2", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["selected_layers"] == [2]
    assert main(["config", "--layers", "2", "--format", "toml"]) == 2
    assert "invalid choice: 'toml'" in capsys.readouterr().err


def test_probe_with_calibrate_predicts_from_steps_timed_here(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["probe", *tiny_args(tiny_checkpoint, tiny_corpus, out, "--calibrate")]) == 0
    selection = json.loads((out / "selection.json").read_text())
    calibration = selection["calibration"]
    assert [t["layers"] for t in calibration["timings"]] == [[0, 1, 2, 3], [2, 3], [1, 3]]
    assert all(t["seconds"] > 0 for t in calibration["timings"])
    assert selection["cost_model"].startswith("calibrated on this hardware from 3 timed placements")

    def step(layers):
        reached = 4 - min(layers)
        return (
            calibration["fixed_s"]
            + calibration["per_backward_block_s"] * reached
            + calibration["per_adapted_block_s"] * len(layers)
        )

    expected = step(range(4)) / step(selection["selected_layers"])
    assert selection["predicted_speedup"] == pytest.approx(expected)
    assert f"predicted       {expected:.2f}x" in capsys.readouterr().out


def test_probe_plans_the_progressive_prediction_at_the_given_max_frozen_pct(
    tiny_checkpoint, tiny_corpus, tmp_path, capsys
):
    out = tmp_path / "p"
    assert main(["probe", *tiny_args(tiny_checkpoint, tiny_corpus, out, "--max-frozen-pct", "25")]) == 0
    plan = json.loads((out / "selection.json").read_text())["progressive_plan"]
    assert plan["max_frozen_pct"] == 25 and plan["frozen_blocks"] == 1  # a quarter of the 4 blocks
    assert "(--max-frozen-pct 25;" in capsys.readouterr().out
    assert main(["probe", *tiny_args(tiny_checkpoint, tiny_corpus, tmp_path / "q", "--max-frozen-pct", "101")]) == 2
    assert "--max-frozen-pct must be a number in [0, 100], got 101" in capsys.readouterr().err


def test_calibrate_refuses_several_processes(tiny_checkpoint, tiny_corpus, tmp_path, monkeypatch, capsys):
    import aletheia_lora.plan as plan

    monkeypatch.setattr(plan, "is_distributed", lambda: True)
    assert main(["probe", *tiny_args(tiny_checkpoint, tiny_corpus, tmp_path / "p", "--calibrate")]) == 2
    assert "--calibrate times steps in one process" in capsys.readouterr().err


def test_run_with_calibrate_selects_by_the_timed_costs(tiny_checkpoint, tiny_corpus, tmp_path):
    out = tmp_path / "r"
    args = tiny_args(tiny_checkpoint, tiny_corpus, out, *TRAIN, "--calibrate", "--strategy", "truncation")
    assert main(["run", *args]) == 0
    report = json.loads((out / "metrics.json").read_text())
    selection = report["selection"]
    assert len(selection["calibration"]["timings"]) == 3 and selection["cost_model"].startswith("calibrated")
    assert report["train"]["lowest_layer_reached"] == min(selection["selected_layers"])


def test_run_config_json_given_back_to_config_reproduces_the_run(tiny_checkpoint, tiny_corpus, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    settings = ["--max-steps", "2", "--batch-size", "2", "--save-steps", "2", "--r", "4", "--lora-alpha", "8",
                "--top-k", "2", "--strategy", "contiguous", "--probe-seed", "7", "--seed", "3",
                "--learning-rate", "0.001", "--general-data", "none", "--no-pack"]  # fmt: skip
    assert main(["run", *tiny_args(tiny_checkpoint, tiny_corpus, first, *settings)]) == 0
    written = json.loads((first / "run_config.json").read_text())
    assert {"model", "data", "select", "lora", "train"} <= set(written)  # nested by settings group
    second.mkdir()
    argv = ["run", "--config", str(first / "run_config.json"), "--out", str(second), "--overwrite", "-q"]
    assert main(argv) == 0
    # the file names no output folder, so the two runs' settings are the same, every one of them
    assert json.loads((second / "run_config.json").read_text()) == written
    reports = [json.loads((out / "metrics.json").read_text()) for out in (first, second)]
    assert reports[0]["selection"]["selected_layers"] == reports[1]["selection"]["selected_layers"]


def test_config_file_nested_by_group_is_read_by_field_name(tmp_path, capsys):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"scores": {"0": 1.0, "1": 3.0, "2": 2.0, "3": 4.0}}))
    config = tmp_path / "c.json"
    # settings are found by name, whichever group holds them (a file written before a setting moved still loads)
    config.write_text(json.dumps({"select": {"strategy": "contiguous"}, "probe": {"top-k": 1}}))
    assert main(["select", "--config", str(config), "--scores", str(scores)]) == 0
    assert "selected        [3]" in capsys.readouterr().out
    config.write_text(json.dumps({"select": {"top_k": 1}, "train": {"max_steps": 3}}))
    assert main(["select", "--config", str(config), "--scores", str(scores)]) == 2
    assert "unknown setting(s) ['train.max_steps'] for `aletheia-lora select`" in capsys.readouterr().err


def test_a_field_shared_by_two_groups_may_appear_in_both_with_one_value():
    from aletheia_lora.cli import _flatten_config

    flat, spelled = _flatten_config({"a": {"seed": 1}, "b": {"seed": 1}, "top-k": 2}, {"a", "b"}, "c.json")
    assert flat == {"seed": 1, "top_k": 2} and spelled == {"seed": "a.seed", "top_k": "top-k"}
    with pytest.raises(ValueError, match="gives the setting seed twice, as 'a.seed' and 'b.seed'"):
        _flatten_config({"a": {"seed": 1}, "b": {"seed": 2}}, {"a", "b"}, "c.json")
    with pytest.raises(ValueError, match="gives the setting seed twice, as 'seed' and 'b.seed'"):
        _flatten_config({"seed": 1, "b": {"seed": 1}}, {"a", "b"}, "c.json")
    # a key that names a group but holds no mapping is a setting of that name
    assert _flatten_config({"a": "x"}, {"a"}, "c.json")[0] == {"a": "x"}


def _load_hint(printed: str):
    """Run the load hint `config --out` printed (``peft.LoraConfig.from_pretrained('FOLDER')``) as it is."""
    import peft

    hint = re.search(r"load with (peft\.LoraConfig\.from_pretrained\(.*\))\)$", printed.strip())
    assert hint, printed
    return eval(hint.group(1), {"peft": peft})  # noqa: S307 - the printed hint is the thing under test


@pytest.mark.parametrize("how", ["existing folder", "new folder/", "nested new folder/"])
def test_config_out_naming_a_folder_writes_adapter_config_json_there(how, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = {"existing folder": "cfg", "new folder/": "cfg/", "nested new folder/": "a/b/cfg/"}[how]
    if how == "existing folder":
        (tmp_path / "cfg").mkdir()
    assert main(["config", "--layers", "1", "3", "--r", "4", "--out", folder]) == 0
    written = tmp_path / folder / "adapter_config.json"
    assert written.is_file() and sorted(p.name for p in written.parent.iterdir()) == ["adapter_config.json"]
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {written.relative_to(tmp_path)} ")
    config = _load_hint(printed)  # the printed hint works as printed
    assert config.layers_to_transform == [1, 3] and config.r == 4


def test_config_out_folder_takes_the_formats_file_name_and_a_file_path_is_kept(tmp_path, capsys):
    import yaml

    assert main(["config", "--layers", "2", "--format", "axolotl", "--out", f"{tmp_path / 'ax'}/"]) == 0
    assert yaml.safe_load((tmp_path / "ax" / "axolotl_lora.yaml").read_text())["peft_layers_to_transform"] == [2]
    (tmp_path / "lf").mkdir()
    assert main(["config", "--layers", "2", "--format", "llamafactory", "--out", str(tmp_path / "lf")]) == 0
    assert yaml.safe_load((tmp_path / "lf" / "llamafactory_lora.yaml").read_text())["finetuning_type"] == "lora"
    assert main(["config", "--layers", "2", "--format", "json", "--out", str(tmp_path / "js")]) == 0
    assert json.loads((tmp_path / "js").read_text())["selected_layers"] == [2]  # no slash, no folder: a file
    capsys.readouterr()
    assert main(["config", "--layers", "2", "--out", str(tmp_path / "sub" / "my.json")]) == 0
    assert json.loads((tmp_path / "sub" / "my.json").read_text())["layers_to_transform"] == [2]
    assert "give --out a folder" in capsys.readouterr().out  # from_pretrained reads adapter_config.json only


def test_config_out_refuses_a_file_as_a_folder_and_a_trained_adapters_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert main(["config", "--layers", "2", "--out", f"{tmp_path / 'f'}/"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Not a directory" in err[0], err
    assert (tmp_path / "f").read_text() == "mine"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    for out in (str(adapter), str(adapter / "adapter_config.json")):
        assert main(["config", "--layers", "2", "--out", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds a trained adapter (adapter_model.safetensors)" in err[0], err
    assert (adapter / "adapter_config.json").read_text() == "{}"


def _saved_lora_adapter(checkpoint, folder):
    """A PEFT LoRA adapter on the checkpoint with non-zero B weights (a fresh one changes nothing), saved."""
    import torch

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


def test_merge_writes_a_checkpoint_that_gives_the_adapted_models_logits(tiny_checkpoint, tmp_path, capsys):
    import torch

    peft_model = _saved_lora_adapter(tiny_checkpoint, tmp_path / "adapter")
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(ids).logits
    out = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))"
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no PEFT
    assert not [name for name, _ in merged.named_parameters() if "lora" in name]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)
        base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
        assert (base(ids).logits - expected).abs().max() > 1e-2  # the adapter does change the model
    # again into the same folder: refused, then replaced with --overwrite, in another dtype
    capsys.readouterr()  # the bars of the loads above, outside the command
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists and is not empty" in err[0] and "--overwrite" in err[0], err
    argv = ["merge", str(tmp_path / "adapter"), "--out", str(out), "--overwrite", "--dtype", "bfloat16"]
    assert main([*argv, "--base-model", str(tiny_checkpoint), "-q"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "argv, message",
    [
        (["merge", "adapter"], "give --out DIR"),
        (["merge", "missing", "--out", "m"], "adapter folder not found: missing"),
        (["merge", "--out", "m"], "the following arguments are required: ADAPTER"),
        (["merge", "adapter", "--out", "m", "--dtype", "int8"], "invalid choice: 'int8'"),
        (["merge", "adapter", "--out", "m", "--base-model", "/nonexistent/model"], "/nonexistent/model"),
    ],
)
def test_merge_errors_exit_2_with_one_line(argv, message, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _saved_lora_adapter(tiny_checkpoint, tmp_path / "adapter")
    capsys.readouterr()
    assert main([*argv, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aletheia-lora: error:") and message in err[0], err
    assert not (tmp_path / "m").exists()
