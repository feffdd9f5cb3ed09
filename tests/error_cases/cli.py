"""The command line: flags, files and folders given to `aletheia-lora`, and config files (--config)."""

from __future__ import annotations

import errno
import json

from error_cases.base import Case, Ctx, Exit2, config_file


def _cli_calibrate_distributed(ctx: Ctx) -> list[str]:
    import aletheia_lora.plan as plan

    ctx.monkeypatch.setattr(plan, "is_distributed", lambda: True)
    args = ["--general-data", "none", "--max-length", "16", "--out", "p", "--calibrate"]
    return ["probe", *ctx.cli_model_args(), *args]


def _cli_disk_full(ctx: Ctx) -> list[str]:
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    ctx.monkeypatch.setattr("os.fsync", no_space)
    return ["select", "--scores", ctx.scores_file(), "--out", "selection.json"]


def _cli_out_parent_is_file(ctx: Ctx) -> list[str]:
    ctx.file("f", "a file")
    return ["select", "--scores", ctx.scores_file(), "--out", "f/selection.json"]


def _cli_out_exists(ctx: Ctx) -> list[str]:
    (ctx.tmp_path / "out").mkdir()
    ctx.file("out/mine.txt", "keep")
    return ["probe", *ctx.cli_model_args(), "--out", "out"]


CASES: list[Case] = [
    # the command line
    Case("cli-scores-missing", "aletheia-lora select", "--scores missing.json",
         lambda c: ["select", "--scores", "missing.json"], Exit2("cannot read scores file 'missing.json'")),
    Case("cli-scores-corrupt", "aletheia-lora select", "--scores holding broken JSON",
         lambda c: ["select", "--scores", str(c.file("s.json", "{"))], Exit2("is not valid JSON")),
    Case("cli-scores-nan", "aletheia-lora select", "--scores holding a NaN",
         lambda c: ["select", "--scores", c.scores_file(scores='{"0": 1.0, "1": NaN}')],
         Exit2("score of layer 1 is nan, not a finite number")),
    Case("cli-top-pct-not-a-number", "aletheia-lora select", "--top-pct abc",
         lambda c: ["select", "--scores", c.scores_file(), "--top-pct", "abc"],
         Exit2("argument --top-pct: invalid float value: 'abc'", debug_raises=False)),
    Case("cli-top-k-too-large", "aletheia-lora select", "--top-k 9 of 3 layers",
         lambda c: ["select", "--scores", c.scores_file(), "--top-k", "9"],
         Exit2(r"top_k must be between 1 and the number of layers \(3\), got 9")),
    Case("cli-select-calibrate", "aletheia-lora select", "--calibrate (there is no model to time)",
         lambda c: ["select", "--scores", c.scores_file(), "--calibrate"],
         Exit2("--calibrate times LoRA steps on a model: give it to `aletheia-lora probe`, `train` or `run`")),
    Case("cli-config-calibrate", "aletheia-lora config", "--scores with --calibrate",
         lambda c: ["config", "--scores", c.scores_file(), "--calibrate"],
         Exit2("--calibrate times LoRA steps on a model")),
    Case("cli-target-speedup-unreachable", "aletheia-lora select", "--strategy truncation --target-speedup 100",
         lambda c: ["select", "--scores", c.scores_file(), "--strategy", "truncation", "--target-speedup", "100"],
         Exit2("target_speedup=100.0 is out of reach")),
    Case("cli-target-speedup-without-truncation", "aletheia-lora select", "--target-speedup 1.2 (strategy score)",
         lambda c: ["select", "--scores", c.scores_file(), "--target-speedup", "1.2"],
         Exit2("--target-speedup applies to --strategy truncation, not 'score'")),
    Case("cli-config-needs-layers", "aletheia-lora config", "neither --layers nor --scores", lambda c: ["config"],
         Exit2(r"give --scores FILE \(from `aletheia-lora probe`\) or --layers N \[N ...\]")),
    Case("cli-layers-duplicated", "aletheia-lora config", "--layers 1 1", lambda c: ["config", "--layers", "1", "1"],
         Exit2(r"selected_layers holds duplicates: \[1\]")),
    Case("cli-layers-negative", "aletheia-lora config", "--layers -1", lambda c: ["config", "--layers", "-1"],
         Exit2("selected_layers holds a negative index: -1")),
    Case("cli-lora-dropout", "aletheia-lora config", "--lora-dropout 2",
         lambda c: ["config", "--layers", "0", "--lora-dropout", "2"],
         Exit2(r"--lora-dropout must be a number in \[0, 1\), got 2.0")),
    Case("cli-rank-zero", "aletheia-lora config", "--r 0", lambda c: ["config", "--layers", "0", "--r", "0"],
         Exit2("--r must be a positive number, got 0")),
    Case("cli-target-module-missing", "aletheia-lora config", "--target-modules qkv with --model",
         lambda c: ["config", "--layers", "0", "--model", str(c.checkpoint_dir), "--target-modules", "qkv", "-q"],
         Exit2("target module 'qkv' is not in LlamaForCausalLM")),
    Case("cli-model-missing", "aletheia-lora probe", "--model /nonexistent/model",
         lambda c: ["probe", "--model", "/nonexistent/model"], Exit2("local model folder not found")),
    Case("cli-device-unknown", "aletheia-lora probe", "--device tpu9", lambda c: ["probe", "--device", "tpu9"],
         Exit2("--device must be a torch device such as cpu or cuda, got 'tpu9'")),
    Case("cli-data-missing", "aletheia-lora probe", "--data nope.txt",
         lambda c: ["probe", "--model", str(c.checkpoint_dir), "--data", "nope.txt", "-q"],
         Exit2("data file not found: nope.txt")),
    Case("cli-max-length-one", "aletheia-lora probe", "--max-length 1", lambda c: ["probe", "--max-length", "1"],
         Exit2("--max-length must be an integer >= 2, got 1")),
    Case("cli-max-length-over-context", "aletheia-lora probe", "--max-length 100000 (model context 2048)",
         lambda c: ["probe", *c.cli_model_args(), "--general-data", "none", "--max-length", "100000"],
         Exit2("--max-length 100000 is longer than the model's context of 2048 tokens")),
    Case("cli-probe-batches-zero", "aletheia-lora probe", "--probe-batches 0",
         lambda c: ["probe", "--probe-batches", "0"], Exit2("--probe-batches must be a positive integer, got 0")),
    Case("cli-max-steps-zero", "aletheia-lora run", "--max-steps 0", lambda c: ["run", "--max-steps", "0"],
         Exit2("--max-steps must be a positive integer, got 0")),
    Case("cli-reprobe-every-negative", "aletheia-lora train", "--reprobe-every -1",
         lambda c: ["train", "--reprobe-every", "-1"], Exit2("--reprobe-every must be >= 0, got -1")),
    Case("cli-reprobe-with-score-ranks", "aletheia-lora run", "--reprobe-every 2 --rank-allocation scores",
         lambda c: ["run", *c.cli_model_args(), "--general-data", "none", "--max-length", "16", "--probe-batches",
                    "1", "--out", "r", "--reprobe-every", "2", "--rank-allocation", "scores"],
         Exit2("--reprobe-every does not combine with --rank-allocation scores")),
    Case("cli-calibrate-several-processes", "aletheia-lora probe", "--calibrate under torchrun (2 ranks, simulated)",
         _cli_calibrate_distributed, Exit2("--calibrate times steps in one process")),
    Case("cli-config-calibrate-string", "--config", 'calibrate: "yes" in a config file',
         lambda c: config_file(c, "c.json", '{"calibrate": "yes"}', "probe"),
         Exit2("--calibrate must be true or false, got 'yes'")),
    Case("cli-resume-without-checkpoint", "aletheia-lora train", "--resume with no checkpoint in --out",
         lambda c: ["train", *c.cli_model_args(), "--general-data", "none", "--max-length", "16", "--layers", "1",
                    "--out", "t", "--resume"],
         Exit2("--resume: no checkpoint found in 't/checkpoints'")),
    Case("cli-out-exists", "aletheia-lora probe", "--out naming a non-empty folder", _cli_out_exists,
         Exit2("output folder 'out' exists and is not empty; pass --overwrite")),
    Case("cli-out-under-a-file", "aletheia-lora select", "--out f/selection.json where f is a file",
         _cli_out_parent_is_file, Exit2("Not a directory: f/selection.json")),
    Case("cli-disk-full", "aletheia-lora select", "--out on a full disk (ENOSPC, simulated)", _cli_disk_full,
         Exit2("No space left on device: selection.json")),
    Case("cli-config-file-missing", "--config", "--config nope.yaml",
         lambda c: ["select", "--config", "nope.yaml", "--scores", "x"], Exit2("--config: cannot read 'nope.yaml'")),
    Case("cli-config-file-invalid", "--config", "a config file that is not YAML",
         lambda c: config_file(c, "c.yaml", "top_pct: [1,\n", "select", "--scores", "x"),
         Exit2("--config: '.*c.yaml' is not valid YAML")),
    Case("cli-config-file-not-a-mapping", "--config", "a config file holding a list",
         lambda c: config_file(c, "c.json", "[1, 2]", "select", "--scores", "x"),
         Exit2("--config: '.*c.json' must hold a mapping of flag names to values")),
    Case("cli-config-unknown-key", "--config", "a setting the subcommand does not have",
         lambda c: config_file(c, "c.json", '{"learning_rate": 1}', "select", "--scores", "x"),
         Exit2(r"--config: unknown setting\(s\) \['learning_rate'\] for `aletheia-lora select`")),
    Case("cli-config-unknown-nested-key", "--config", "a run_config.json group the subcommand does not have",
         lambda c: config_file(c, "c.json", '{"select": {"top_pct": 30}, "train": {"max_steps": 3}}', "select",
                                "--scores", "x"),
         Exit2(r"--config: unknown setting\(s\) \['train.max_steps'\] for `aletheia-lora select`")),
    Case("cli-config-key-twice", "--config", "top-pct and top_pct in one config file",
         lambda c: config_file(c, "c.json", '{"top-pct": 30, "top_pct": 40}', "select", "--scores", "x"),
         Exit2("--config: '.*c.json' gives the setting top_pct twice, as 'top-pct' and 'top_pct'")),
    Case("cli-config-flat-and-nested", "--config", "top_pct flat and in the select group of one config file",
         lambda c: config_file(c, "c.json", '{"top_pct": 30, "select": {"top_pct": 40}}', "select", "--scores", "x"),
         Exit2("--config: '.*c.json' gives the setting top_pct twice, as 'top_pct' and 'select.top_pct'")),
    Case("cli-config-top-pct-list", "--config", "top_pct: [1] in a config file",
         lambda c: config_file(c, "c.json", '{"top_pct": [1]}', "select", "--scores", c.scores_file()),
         Exit2(r"--top-pct must be a number between 1 and 100, got \[1\] \(list\)")),
    Case("cli-config-trust-remote-code-string", "--config", 'trust_remote_code: "yes" in a config file',
         lambda c: config_file(c, "c.json", '{"trust_remote_code": "yes"}', "probe"),
         Exit2("--trust-remote-code must be true or false, got 'yes'")),
    Case("cli-config-out-escapes", "--config", "out: /elsewhere/selection.json in a config file",
         lambda c: config_file(c, "c.json", json.dumps({"out": str(c.tmp_path.parent / "selection.json")}),
                                "select", "--scores", c.scores_file()),
         Exit2("--config: --out '.*selection.json' leaves the working folder")),
]  # fmt: skip
