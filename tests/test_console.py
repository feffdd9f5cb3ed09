"""The command line's console (issue 17): one line per fact, other libraries' warnings kept and their INFO chatter
left out, no progress bars when stderr is redirected, and the caller's logging set-up untouched afterwards."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import datasets
import pytest
import transformers

import aletheia_lora.cli as cli
import aletheia_lora.pipeline as pipeline
from aletheia_lora.cli import main

HF = transformers.utils.logging


def _cli(args: list[str], cwd, **env) -> subprocess.CompletedProcess:
    """`python -m aletheia_lora ARGS` with stdout and stderr redirected (pipes: not terminals); their bytes decoded
    as they are (text mode would turn a bar's carriage returns into newlines)."""
    result = subprocess.run(
        [sys.executable, "-m", "aletheia_lora", *args],
        capture_output=True,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        timeout=600,
    )
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def _model_args(checkpoint, corpus, out) -> list[str]:
    return ["--model", str(checkpoint), "--data", str(corpus / "target.txt"), "--general-data",
            str(corpus / "general.txt"), "--max-length", "16", "--probe-batches", "2", "--out", str(out)]  # fmt: skip


def _assert_clean(stderr: str) -> list[str]:
    """No bar, no escape sequence, every line one of ours, no line twice."""
    assert "\r" not in stderr and "\x1b" not in stderr, repr(stderr[:500])
    lines = stderr.strip().splitlines()
    assert all(line.startswith("aletheia-lora: ") for line in lines), lines
    assert len(lines) == len(set(lines)), lines
    return lines


def test_probe_redirected_prints_our_lines_only(tiny_checkpoint, tiny_corpus, tmp_path):
    # a fresh matplotlib cache: the font cache is built, and matplotlib says so at INFO (not on our console)
    result = _cli(["probe", *_model_args(tiny_checkpoint, tiny_corpus, tmp_path / "p")], tmp_path,
                  MPLCONFIGDIR=str(tmp_path / "mpl"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = _assert_clean(result.stderr)
    assert "fontManager" not in result.stderr
    assert any(line.startswith("aletheia-lora: probed 4 blocks") for line in lines), lines
    assert sum(line.startswith("aletheia-lora: data: ") for line in lines) <= 1, lines  # one line per fact
    assert result.stdout.startswith("strategy ") and "wrote " in result.stdout


@pytest.mark.parametrize("bars", [[], ["--progress"]], ids=["redirected", "bars-forced"])
def test_run_logs_one_line_per_step_and_no_trainer_dicts(bars, tiny_checkpoint, tiny_corpus, tmp_path):
    train = ["--max-steps", "2", "--batch-size", "2", "--logging-steps", "1", "--r", "4", *bars]
    result = _cli(["run", *_model_args(tiny_checkpoint, tiny_corpus, tmp_path / "r"), *train], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "{'" not in result.stdout and "{'" not in result.stderr, result.stdout  # no Trainer dicts
    assert result.stdout.lstrip().startswith("model ")  # stdout: the summary only
    # one line per logging step, through our logger
    assert re.search(r"aletheia-lora: step 1/2: loss [\d.]+, grad norm [\d.]+, lr [\d.e-]+\n", result.stderr)
    if bars:
        assert "\r" in result.stderr  # --progress on the command line: bars even when redirected
    else:
        _assert_clean(result.stderr)


@pytest.fixture
def commands(monkeypatch):
    """The library functions behind probe, train and run replaced: what the CLI passed them is recorded."""
    seen: dict = {}

    def record(progress):
        seen.update(progress=progress, bars=(HF.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()))
        raise ValueError("stop")

    def run_probe(config, out, *, overwrite=False, progress=True):
        record(progress)

    def run_pipeline(config, out, **kwargs):
        record(config.train.progress)

    monkeypatch.setattr(pipeline, "run_probe", run_probe)
    monkeypatch.setattr(pipeline, "run_pipeline", run_pipeline)
    return seen


@pytest.mark.parametrize(
    "terminal, flags, progress",
    [
        (True, [], True),
        (True, ["--no-progress"], False),
        (True, ["-q"], False),
        (True, ["--progress", "-q"], False),
        (False, [], False),  # redirected: no bars
        (False, ["--progress"], True),  # asked for on the command line: bars anyway
    ],
)
@pytest.mark.parametrize("command", ["probe", "train", "run"])
def test_progress_bars_follow_the_terminal_and_the_flags(command, terminal, flags, progress, commands, monkeypatch):
    monkeypatch.setattr(cli, "stderr_is_terminal", lambda: terminal)
    before = (HF.is_progress_bar_enabled(), datasets.is_progress_bar_enabled())
    assert main([command, *flags]) == 2  # stopped by the replaced library function
    assert commands["progress"] is progress
    assert commands["bars"] == (progress, progress)  # transformers' bars (model loading) and datasets' follow it
    assert (HF.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()) == before  # put back afterwards


@pytest.fixture
def during(monkeypatch):
    """`aletheia-lora select` runs this function in place of its command, and returns 0."""

    def use(function):
        monkeypatch.setattr(cli, "_cmd_select", lambda args: function() or 0)

    return use


@pytest.mark.parametrize("flag, ours", [(None, logging.INFO), ("-q", logging.WARNING), ("--debug", logging.DEBUG)])
def test_logging_levels_while_a_command_runs_and_the_callers_set_up_restored(flag, ours, during, capsys):
    logger = logging.getLogger("aletheia_lora")
    before = (logger.handlers[:], logger.level, logger.propagate, HF.get_verbosity())
    levels = {}

    def command():
        levels.update(
            ours=logger.getEffectiveLevel(),
            propagate=logger.propagate,
            transformers=HF.get_verbosity(),
            datasets=datasets.logging.get_verbosity(),
            peft=logging.getLogger("peft.tuners.lora").getEffectiveLevel(),
            matplotlib=logging.getLogger("matplotlib.font_manager").getEffectiveLevel(),
        )
        logging.getLogger("aletheia_lora.probe").info("an info line")
        logging.getLogger("aletheia_lora.data").warning("a warning")

    during(command)
    assert main(["select", *([flag] if flag else [])]) == 0
    assert levels["ours"] == ours and levels["propagate"] is False
    # other libraries: warnings kept, not silenced (they were set to ERROR before); their INFO left out
    assert levels["transformers"] == levels["datasets"] == logging.WARNING
    assert levels["peft"] == levels["matplotlib"] == logging.WARNING
    err = capsys.readouterr().err.splitlines()
    if flag is None:
        assert err == ["aletheia-lora: an info line", "aletheia-lora: warning: a warning"]
    elif flag == "-q":
        assert err == ["aletheia-lora: warning: a warning"]
    else:
        assert err[0] == "INFO aletheia_lora.probe: an info line"
    assert (logger.handlers, logger.level, logger.propagate, HF.get_verbosity()) == before


def test_a_python_warning_is_one_line_and_known_noise_is_left_out(during, capsys):
    shown = warnings.showwarning

    def command():
        warnings.warn("something\n   the user should know", UserWarning, stacklevel=1)
        # (pyproject.toml filters the message as transformers words it, so this one is worded otherwise)
        warnings.warn("The `is_gradient_checkpointing` alias is deprecated", FutureWarning, stacklevel=1)

    during(command)
    assert main(["select"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("aletheia-lora: warning: something the user should know (UserWarning, tests/test_console")
    assert main(["select", "--debug"]) == 0  # --debug shows the noise too
    assert "is_gradient_checkpointing" in capsys.readouterr().err
    assert warnings.showwarning is shown  # put back


def test_probe_has_no_progress_like_train_and_run():
    _, parsers = cli.build_parser()
    for command in ("probe", "train", "run", "bench"):
        flags = {option for action in parsers[command]._actions for option in action.option_strings}
        assert {"--progress", "--no-progress"} <= flags, command


def test_ranks_other_than_0_say_only_what_goes_wrong(during, capsys, monkeypatch):
    def command():
        logging.getLogger("aletheia_lora.probe").info("an info line")
        logging.getLogger("aletheia_lora.data").warning("a warning")

    during(command)
    monkeypatch.setenv("RANK", "1")
    assert main(["select"]) == 0
    assert capsys.readouterr().err.splitlines() == ["aletheia-lora: warning: a warning"]
    monkeypatch.setenv("RANK", "0")
    assert main(["select"]) == 0
    assert capsys.readouterr().err.splitlines() == ["aletheia-lora: an info line", "aletheia-lora: warning: a warning"]
