"""Several processes on the CPU (gloo): the probe shared between ranks, DDP and FSDP models, and the command line
under torchrun. Each launch runs in its own process group with a hard timeout, so a hang fails the test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from aletheia_lora import distributed, gradient_probe
from aletheia_lora.data import DataConfig, build_datasets
from aletheia_lora.distributed import agree, fail_together, is_main_process, on_main_process
from aletheia_lora.files import MANIFEST_NAME
from aletheia_lora.models import ModelConfig
from aletheia_lora.pipeline import RunConfig, run_probe
from aletheia_lora.probe import ProbeConfig
from aletheia_lora.train import evaluate_loss
from dist_workers import METRICS, PROBE, probe_rows
from tiny_models import tiny_model

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with the gloo backend"
)

WORKERS = Path(__file__).with_name("dist_workers.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run_bounded(command: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run in a new session; past ``timeout`` seconds kill the whole session (the launcher and its ranks)."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(command[:6])} ... hung for {timeout} s; stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of two gloo ranks measured (tests/dist_workers.py probe)."""
    out = tmp_path_factory.mktemp("dist-probe")
    proc = run_bounded([sys.executable, str(WORKERS), "probe", str(out), "2"], timeout=240)
    errors = "".join(p.read_text() for p in out.glob("*.error"))
    assert proc.returncode == 0, f"workers failed:\n{errors or proc.stderr[-3000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def single() -> dict:
    """The single-process scores over the same global batches, in this (uninitialised) process."""
    return {metric: gradient_probe(tiny_model("llama", 4), probe_rows(), metric=metric, **PROBE) for metric in METRICS}


def max_relative_difference(got: list[float], expected) -> float:
    return max(abs(g - expected[i]) / abs(expected[i]) for i, g in enumerate(got))


@pytest.mark.parametrize("metric", METRICS)
def test_two_ranks_share_the_batches_and_get_the_single_process_scores(ranks, single, metric):
    name = f"plain-{metric}"
    assert ranks[0]["scores"][name] == ranks[1]["scores"][name]  # bit-identical: the same selection everywhere
    assert max_relative_difference(ranks[0]["scores"][name], single[metric]) < 1e-5
    meta = ranks[0]["meta"][name]
    assert meta["world_size"] == 2 and meta["sharded"] is False
    assert meta["probe_batches"] == single[metric].meta["probe_batches"] == 5
    assert meta["tokens"] == single[metric].meta["tokens"]


def test_a_ddp_model_is_probed_through_its_module_without_gradient_sync(ranks, single):
    scores = ranks[0]["scores"]["ddp-grad_norm"]
    assert scores == ranks[1]["scores"]["ddp-grad_norm"]
    assert max_relative_difference(scores, single["grad_norm"]) < 1e-5
    for rank in ranks:
        assert rank["state"]["ddp"], "the DDP model was not left as found"
        assert rank["state"]["ddp_step_synchronised"], "DDP no longer averages gradients after the probe"


@pytest.mark.parametrize(
    "name", [f"fsdp1-FULL_SHARD-{m}" for m in METRICS] + ["fsdp1-NO_SHARD-grad_norm"] + [f"fsdp2-{m}" for m in METRICS]
)
def test_sharded_gradients_are_combined_per_weight_before_the_root(ranks, single, name):
    metric = name.rsplit("-", 1)[1]
    scores = ranks[0]["scores"][name]
    assert scores == ranks[1]["scores"][name]
    # a sum of per-shard norms would be far off (up to sqrt(2) for two shards); per weight, the squares add up
    assert max_relative_difference(scores, single[metric]) < 1e-5
    assert ranks[0]["meta"][name]["sharded"] is True and ranks[0]["meta"][name]["world_size"] == 2


def test_wrapped_models_are_left_as_found_and_still_train(ranks):
    for rank in ranks:
        state = rank["state"]
        assert state["fsdp1-FULL_SHARD"] and state["fsdp1-NO_SHARD"] and state["fsdp2"]
        assert state["fsdp1_trains_after"]


def test_errors_reach_every_rank_and_leave_the_group_working(ranks):
    first, second = (rank["errors"] for rank in ranks)
    for errors in (first, second):
        assert errors["flat"].startswith("ValueError: an FSDP model wrapped with use_orig_params=False")
        assert errors["different_data"].startswith("ValueError: the ranks sampled different probe batches")
    assert second["one_rank_fails"] == "RuntimeError: device lost"
    assert first["one_rank_fails"] == "RuntimeError: device lost (raised on rank 1)"
    assert all(rank["state"]["group_alive_after_errors"] for rank in ranks)


def test_a_rank_failing_inside_a_collective_makes_the_others_fail_at_once(ranks):
    first, second = ranks
    assert second["errors"]["lost"] == "ValueError: rank one broke mid-training"
    assert first["errors"]["lost"].startswith("ConnectionError: rank 0 of 2 lost contact with the other ranks")
    assert first["state"]["lost_seconds"] < 30  # the group's timeout is 60 s
    assert all(rank["state"]["group_left"] for rank in ranks)  # launched_job destroyed the group it created


def test_shared_evaluation_equals_the_single_process_one(ranks):
    expected = evaluate_loss(tiny_model("llama", 4), probe_rows(), batch_size=5)
    for rank in ranks:
        for name in ("plain", "fsdp2"):
            got = rank["eval"][name]
            assert got["tokens"] == expected["tokens"]
            assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_single_process_helpers_need_no_process_group():
    assert on_main_process(lambda x: x + 1, 1) == 2
    assert fail_together(lambda: "ok") == "ok"
    agree(None)
    with pytest.raises(ValueError, match="bad input"):
        fail_together(lambda: (_ for _ in ()).throw(ValueError("bad input")))
    with pytest.raises(ValueError, match="distributed=True but torch.distributed is not initialised"):
        gradient_probe(tiny_model("llama", 2), probe_rows(), distributed=True, progress=False)


def test_the_launcher_rank_counts_when_no_group_is_left(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.rank() == 1 and not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("RANK", "1")  # without a launcher's WORLD_SIZE, a stray RANK means nothing
    assert distributed.rank() == 0 and is_main_process()


def test_run_probe_in_one_process_writes_scores_selection_and_plot(tiny_checkpoint, tiny_corpus, tmp_path):
    config = RunConfig(
        model=ModelConfig(model=str(tiny_checkpoint)),
        data=DataConfig(data=str(tiny_corpus / "target.txt"), max_length=16),
        probe=ProbeConfig(probe_batches=2),
    )
    result = run_probe(config, tmp_path / "p", progress=False)
    written = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert written == sorted([MANIFEST_NAME, "layer_scores.png", "scores.json", "selection.json", "speed_quality.png"])
    assert result["scores"].meta["world_size"] == 1 and result["scores"].meta["sharded"] is False
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        run_probe(config, tmp_path / "p", progress=False)


def cli_args(checkpoint, corpus, out) -> list[str]:
    return [
        "--model", str(checkpoint),
        "--data", str(corpus / "target.txt"),
        "--general-data", str(corpus / "general.txt"),
        "--max-length", "16",
        "--probe-batches", "3",
        "--top-pct", "50",
        "--max-steps", "4",
        "--batch-size", "2",
        "--save-steps", "2",
        "--logging-steps", "1",
        "--dist-timeout", "60",
        "--out", str(out),
        "-q",
    ]  # fmt: skip


def test_torchrun_run_two_ranks_rank_zero_writes_and_the_adapter_loads(tiny_checkpoint, tiny_corpus, tmp_path):
    out, record = tmp_path / "run", tmp_path / "writes"
    record.mkdir()
    command = [*TORCHRUN, str(WORKERS), "cli", "run", *cli_args(tiny_checkpoint, tiny_corpus, out)]
    proc = run_bounded(command, timeout=240, ALETHEIA_TEST_RECORD=str(record))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # only rank 0 wrote the outputs; both ranks selected the same layers from the reduced scores
    rank0, rank1 = ((record / f"rank{r}.txt").read_text().splitlines() for r in range(2))
    written = {line.split()[1] for line in rank0 if line.startswith("write ")}
    assert {"run_config.json", "scores.json", "selection.json", "layer_scores.png", "adapter", "metrics.json",
            "loss_curve.png"} <= written  # fmt: skip
    assert not [line for line in rank1 if line.startswith("write ")]
    selected = [line for line in rank0 if line.startswith("selected ")]
    assert selected and selected == [line for line in rank1 if line.startswith("selected ")]

    report = json.loads((out / "metrics.json").read_text())
    scores = json.loads((out / "scores.json").read_text())
    assert report["train"]["processes"] == 2 and scores["meta"]["world_size"] == 2
    assert report["train"]["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # no temporary files left behind (the manifest of what the run wrote is the one dot-file)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != MANIFEST_NAME]
    # the adapter loads with plain PEFT and reproduces the loss the run reported (evaluated by both ranks together)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), out / "adapter")
    data = DataConfig(data=str(tiny_corpus / "target.txt"), general_data=None, max_length=16)
    eval_rows = build_datasets(data, tokenizer)[1]
    loss = evaluate_loss(model, eval_rows, batch_size=2, pad_token_id=tokenizer.pad_token_id or 0)["loss"]
    assert loss == pytest.approx(report["eval_after"]["target"]["loss"], rel=1e-5)
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == set(report["selection"]["selected_layers"])


def test_an_error_on_one_rank_stops_every_rank_with_its_message(tiny_checkpoint, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    command = [*TORCHRUN, str(WORKERS), "cli", "train", *cli_args(tiny_checkpoint, tiny_corpus, out)]
    proc = run_bounded(command, timeout=180, ALETHEIA_TEST_FAIL_RANK="1")
    assert proc.returncode != 0
    # rank 1 says what went wrong; rank 0 (waiting at the next check point) says the same and where it came from
    assert "aletheia-lora: error: this rank's data is unreadable\n" in proc.stderr
    assert "aletheia-lora: error: this rank's data is unreadable (raised on rank 1)" in proc.stderr
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
