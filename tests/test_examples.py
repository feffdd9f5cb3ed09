"""The examples run as a user runs them (a subprocess from the repository root) and print what they promise."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The tiny models are faster on one thread than on several contending for a busy machine's cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_example(name: str, *args: str, timeout: int = 600) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=EXAMPLES.parent,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def layers_after(label: str, text: str) -> list[int]:
    match = re.search(re.escape(label) + r"[^:\n]*: (\[[\d, ]+\])", text)
    assert match, f"no {label!r} line in:\n{text}"
    return ast.literal_eval(match.group(1))


def check_quick_start(text: str) -> None:
    scores = re.search(r"layer scores: (.+)", text)
    assert scores and len(scores.group(1).split(", ")) == 8  # every block of the tiny model scored
    selected = layers_after("selected layers", text)
    assert len(selected) == 4
    speedup = float(re.search(r"predicted speedup over LoRA on all layers: ([\d.]+)x", text).group(1))
    assert speedup >= 1.0
    for strategy in ("score", "truncation", "contiguous"):
        assert re.search(rf"{strategy}: \[[\d, ]+\] -> [\d.]+x", text), strategy
    assert re.search(r"LoRA on \[.*'q_proj'.*\]: [\d,]+ trainable parameters", text)
    step = re.search(r"training step: loss ([\d.]+); the backward pass stopped at block (\d+)", text)
    assert step, text
    assert float(step.group(1)) > 0
    assert int(step.group(2)) == min(selected)  # the backward pass stops at the lowest adapted block


def check_trainer_run(text: str) -> None:
    selected = layers_after("selected layers", text)
    assert len(selected) == 4
    assert f"the backward pass reached down to block {min(selected)}" in text
    depths = ast.literal_eval(re.search(r"backward depth per step: (\[.*\])", text).group(1))
    assert depths == [(step, min(selected)) for step in range(1, 5)]


def test_quick_start():
    check_quick_start(run_example("quick_start.py"))


def test_trainer_callback():
    text = run_example("trainer_callback.py")
    check_trainer_run(text)
    ranks = re.search(r"ranks by layer: (\{.*?\}) \((\d+) LoRA parameters, uniform r=8: (\d+)\)", text)
    assert ranks, text
    assert int(ranks.group(2)) <= int(ranks.group(3))
    assert re.search(r"trained 4 steps, final loss [\d.]+", text)


def test_sft_trl():
    pytest.importorskip("trl")
    text = run_example("sft_trl.py")
    check_trainer_run(text)
    assert "gradient checkpointing: True" in text
    assert int(re.search(r"input-grad hooks removed: (\d+)", text).group(1)) >= 1


def test_sft_trl_conversational():
    pytest.importorskip("trl")
    text = run_example("sft_trl.py", "--conversational")
    check_trainer_run(text)
    row = re.search(r"first row: (\d+) tokens, (\d+) of them trained \(the assistant's\)", text)
    assert row, text
    assert 0 < int(row.group(2)) < int(row.group(1))  # the system and user turns do not train


def test_quick_start_notebook(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(EXAMPLES / "quick_start.ipynb", as_version=4)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits this process's environment
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream" and out.name == "stdout")
    check_quick_start(text)


@pytest.mark.slow
def test_quick_start_on_the_bundled_model():
    text = run_example("quick_start.py", "--model", "smollm2-135m", timeout=900)
    scores = re.search(r"layer scores: (.+)", text).group(1).split(", ")
    assert len(scores) == 30
    selected = layers_after("selected layers", text)
    assert len(selected) == 15
    assert f"the backward pass stopped at block {min(selected)}" in text


def test_reprobe_trainer():
    text = run_example("reprobe_trainer.py")
    steps = [int(s) for s in re.findall(r"^step (\d+): training layers \[[\d, ]+\]", text, flags=re.M)]
    assert steps == [0, 2, 4]  # the probe at the start, then every 2 steps before the last
    first = ast.literal_eval(re.search(r"^step 0: training layers (\[[\d, ]+\])", text, flags=re.M).group(1))
    assert len(first) == 4
    assert re.search(r"re-probed 2 times in [\d.]+ s", text)
    ever = layers_after("layers trained at some point", text)
    assert set(first) <= set(ever)
    assert re.search(r"trained 6 steps, final loss [\d.]+", text)
