"""Progressive freezing: the rule on synthetic norms, frozen adapters (weights, optimizer, backward depth), the
all-reduce of the norms across two gloo ranks, resume, and `run --strategy progressive`."""

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import aletheia_lora.freeze as freeze_module
from aletheia_lora import find_decoder_stack
from aletheia_lora.cli import main
from aletheia_lora.freeze import FreezeCallback, drop_from_optimizer, max_frozen, relative_changes, settled_prefix
from aletheia_lora.select import SelectConfig, Selection
from aletheia_lora.train import BackwardDepthMonitor, TrainConfig
from test_cli import TRAIN, tiny_args
from test_integrations import train
from test_reprobe import block_state, lora_everywhere
from tiny_models import token_rows

# -- the rule --------------------------------------------------------------------------------------------------


def test_rule_freezes_the_settled_blocks_contiguously_from_the_bottom():
    previous = [1.0] * 6
    # changes 0, 0.01, 0.5, 0.02, 1, 2: median 0.26; blocks 0 and 1 settled, block 2 not, so block 3 stays too
    current = [1.0, 1.01, 1.5, 1.02, 2.0, 3.0]
    assert relative_changes(previous, current) == pytest.approx([0, 0.01, 0.5, 0.02, 1, 2])
    assert settled_prefix(previous, current, frozen=0, limit=3) == 2
    # the lowest block unsettled: nothing freezes, whatever lies above
    assert settled_prefix(previous, [2.0, 1.0, 1.0, 1.0, 1.0, 1.0], frozen=0, limit=3) == 0


def test_rule_stops_at_the_limit_ignores_frozen_blocks_and_only_moves_up():
    previous = [1.0] * 6
    current = [1.01, 1.02, 1.03, 1.5, 1.6, 1.7]  # three settled blocks
    assert settled_prefix(previous, current, frozen=0, limit=2) == 2
    assert settled_prefix(previous, current, frozen=0, limit=6) == 3
    # blocks 0-1 frozen already: their entries do not count (even a huge change); over blocks 2-5 the changes are
    # 0.03, 0.5, 0.6, 0.7, the median 0.55: blocks 2 and 3 settle
    assert settled_prefix([1, 1, 1, 1, 1, 1], [9, 9, 1.03, 1.5, 1.6, 1.7], frozen=2, limit=6) == 4
    # never fewer than already frozen, never the last trainable block
    assert settled_prefix(previous, [5.0] * 6, frozen=2, limit=6) == 2
    assert settled_prefix([1, 1], [1, 1.001], frozen=1, limit=2) == 1
    assert settled_prefix([1, 1, 1], [1.0, 1.0, 1.0], frozen=0, limit=3) == 0  # all alike: none below the median


def test_rule_edge_cases():
    assert relative_changes([0.0, 0.0, 2.0], [0.0, 1.0, 1.0]) == [0.0, float("inf"), 0.5]
    assert max_frozen(30, 50) == 15 and max_frozen(4, 50) == 2 and max_frozen(4, 0) == 0 and max_frozen(5, 50) == 2
    assert settled_prefix([1, 1, 1, 1], [1.0, 1.1, 3, 3], frozen=0, limit=0) == 0
    with pytest.raises(ValueError, match="norms of 2 and 3 blocks"):
        settled_prefix([1, 1], [1, 1, 1], 0, 1)


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"every \(--freeze-every\) must be a positive integer, got 0"):
        FreezeCallback(0)
    with pytest.raises(ValueError, match=r"max_frozen_pct \(--max-frozen-pct\) must be a number in \[0, 100\]"):
        FreezeCallback(2, 101)
    with pytest.raises(ValueError, match="--freeze-every must be a positive integer, got 0"):
        TrainConfig(freeze_every=0)
    for config in (TrainConfig, SelectConfig):  # one flag in both groups, one message
        with pytest.raises(ValueError, match=r"--max-frozen-pct must be a number in \[0, 100\], got 150"):
            config(max_frozen_pct=150)
    assert SelectConfig(strategy="progressive").strategy == "progressive"
    selection = Selection.progressive([0, 1, 2])
    assert selection.to_dict() == {"strategy": "progressive", "selected_layers": [0, 1, 2], "probe_seconds": 0.0}
    assert Selection.from_dict(selection.to_dict()) == selection


# -- frozen means frozen ---------------------------------------------------------------------------------------


def scripted_rule(monkeypatch, frozen_after: list[int]):
    """Replace the rule's decisions: at the k-th decision (from the second interval) freeze ``frozen_after[k]``."""
    decisions = iter(frozen_after)
    monkeypatch.setattr(freeze_module, "settled_prefix", lambda prev, cur, frozen, limit: next(decisions, frozen))


def adapter_snapshot(model, layer):
    block = find_decoder_stack(model).blocks[layer]
    return {n: p.detach().clone() for n, p in block.named_parameters() if "lora_" in n}


def test_frozen_blocks_keep_their_weights_leave_the_optimizer_and_the_backward_pass(tmp_path, monkeypatch):
    model = lora_everywhere(n_layers=4)
    scripted_rule(monkeypatch, [1, 2])  # decisions at steps 4 and 6 (every 2 steps, from the second interval)
    snapshots = {}
    callback = FreezeCallback(2, 50, on_freeze=[lambda step, frozen: snapshots.update(
        {b: adapter_snapshot(model, b) for b in frozen if b not in snapshots})])  # fmt: skip
    with BackwardDepthMonitor(model) as depth:
        callback.depth_monitor = depth
        trainer = train(model, token_rows(16), tmp_path, [callback], steps=9, learning_rate=0.01, weight_decay=0.1)
    assert [(e["step"], e["lowest_trainable"], e["frozen"]) for e in callback.timeline] == [
        (0, 0, []), (4, 1, [0]), (6, 2, [0, 1])
    ]  # fmt: skip
    assert sorted(snapshots) == [0, 1] and callback.frozen_blocks.keys() == {"0", "1"}
    assert callback.frozen_blocks["0"]["step"] == 4 and callback.frozen_blocks["0"]["score"] > 0
    for layer, before in snapshots.items():  # bit for bit, though weight decay and a high rate ran on
        after = adapter_snapshot(model, layer)
        assert all(torch.equal(after[n], before[n]) for n in before)
    assert adapter_snapshot(model, 2) != {}  # the blocks above kept training
    frozen_params = {id(p) for b in (0, 1) for p in find_decoder_stack(model).blocks[b].parameters()}
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around the AdamW the Trainer built once
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held and not held & frozen_params
    assert not {id(p) for p in optimizer.state} & frozen_params  # the AdamW moments are freed
    assert len(optimizer.state) == len(held)
    assert block_state(model)[:2] == [(True, False, False)] * 2  # applied, not trainable
    # the backward pass stopped at the lowest trainable block from the step after each freeze
    assert callback.reached == [[s, 0] for s in range(1, 5)] + [[5, 1], [6, 1], [7, 2], [8, 2], [9, 2]]


def test_the_learning_rate_schedule_goes_on_unchanged(tmp_path, monkeypatch):
    def rates(frozen_after):
        scripted_rule(monkeypatch, frozen_after)
        trainer = train(lora_everywhere(), token_rows(16), tmp_path, [FreezeCallback(2, 50)], steps=8,
                        learning_rate=0.01, lr_scheduler_type="cosine", warmup_steps=2)  # fmt: skip
        return [r["learning_rate"] for r in trainer.state.log_history if "learning_rate" in r]

    assert rates([1, 2]) == rates([])


def test_drop_from_optimizer_keeps_the_groups():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([{"params": [a, b]}, {"params": [], "weight_decay": 0.0}], lr=0.1)
    (a.sum() + b.sum()).backward()
    optimizer.step()
    assert drop_from_optimizer(optimizer, [a]) == 1
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 0] and list(optimizer.state) == [b]


def test_the_callback_needs_lora_on_every_block_and_restore_before_a_resumed_train(tmp_path):
    from aletheia_lora import apply_aletheia_lora
    from aletheia_lora.train import prepare_lora_model
    from tiny_models import tiny_model

    model = tiny_model("llama", 4)
    partial = prepare_lora_model(model, apply_aletheia_lora(model, [2, 3], r=4, lora_alpha=8))
    with pytest.raises(ValueError, match=r"progressive freezing needs LoRA on every block; blocks \[0, 1\]"):
        train(partial, token_rows(4), tmp_path, [FreezeCallback(2)], steps=1)
    with pytest.raises(ValueError, match="needs the freeze state .*missing"):
        FreezeCallback(2).restore(lora_everywhere(), tmp_path)


# -- distributed: the norms are all-reduced, every rank decides alike ------------------------------------------


def _rank(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        callback = FreezeCallback(2, 50)
        # each rank saw other batches: other per-block sums of squared gradient norms
        callback._sums = torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=torch.float64) * (rank + 1)
        norms = callback._interval_norms()
        decision = settled_prefix([2.0, 2.0, 4.0, 4.0], norms, 0, 2)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"norms": norms, "decision": decision, "sums": callback._sums.tolist()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_two_gloo_ranks_reduce_the_norms_and_freeze_alike(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1]
    assert results[0]["norms"] == pytest.approx([1.5**0.5 * x for x in (1, 2, 3, 4)])  # the mean of the squares
    assert results[0]["sums"] == [0.0] * 4  # the next interval starts from zero


# -- the command line: run end to end, resume --------------------------------------------------------------------


def test_run_progressive_end_to_end(tiny_checkpoint, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_checkpoint, tiny_corpus, out, *TRAIN, "--strategy", "progressive", "--freeze-every", "4")
    assert main(["run", *args, "--max-steps", "20", "--learning-rate", "0.01"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["selection"] == {"strategy": "progressive", "selected_layers": [0, 1, 2, 3], "probe_seconds": 0.0}
    freeze = report["freeze"]
    assert freeze["every"] == 4 and freeze["blocks"] == [0, 1, 2, 3]
    assert [d["step"] for d in freeze["decisions"]] == [4, 8, 12, 16, 20]
    assert freeze["decisions"][0]["changes"] is None and set(freeze["decisions"][1]["norms"]) == {"0", "1", "2", "3"}
    lowest = [e["lowest_trainable"] for e in freeze["timeline"]]
    assert lowest == sorted(lowest) and lowest[-1] <= 2  # only upward, at most half of 4 blocks
    assert freeze["lowest_trainable"] == lowest[-1] and len(freeze["frozen_blocks"]) == lowest[-1]
    # each step's backward pass reached exactly the lowest block trainable in that step
    for step, reached in freeze["reached"]:
        assert reached == [e for e in freeze["timeline"] if e["step"] < step or e["step"] == 0][-1]["lowest_trainable"]
    assert [s for s, _ in freeze["step_seconds"]] == list(range(1, 21))
    assert (out / "freeze.png").stat().st_size > 0 and "freeze.png" in report["files"]
    assert not (out / "scores.json").exists()  # no probe
    assert "frozen          every 4 steps" in (out / "report.md").read_text()


def test_resumed_progressive_run_ends_where_an_uninterrupted_one_does(
    tiny_checkpoint, tiny_corpus, tmp_path, monkeypatch
):
    # one more block at each decision, up to the limit (2 of 4)
    monkeypatch.setattr(freeze_module, "settled_prefix", lambda prev, cur, frozen, limit: min(frozen + 1, limit))
    out = tmp_path / "run"
    args = tiny_args(tiny_checkpoint, tiny_corpus, out, *TRAIN, "--strategy", "progressive", "--freeze-every", "2")
    args += ["--max-steps", "8", "--learning-rate", "0.01"]
    assert main(["train", *args]) == 0  # freezes block 0 at step 4, block 1 at step 6
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    state = json.loads((out / "checkpoints" / "checkpoint-8" / "freeze.json").read_text())
    assert state["frozen"] == 2 and [e["step"] for e in state["timeline"]] == [0, 4, 6]
    # lose the end of the run: resume from checkpoint-6, whose optimizer holds blocks 2-3 only
    shutil.rmtree(out / "checkpoints" / "checkpoint-8")
    shutil.rmtree(out / "adapter")
    assert main(["train", *args, "--resume"]) == 0
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert final.keys() == resumed.keys()
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], rtol=1e-6, atol=1e-6)
    again = json.loads((out / "checkpoints" / "checkpoint-8" / "freeze.json").read_text())
    assert again["timeline"] == state["timeline"] and again["frozen_blocks"] == state["frozen_blocks"]


def test_progressive_refuses_what_it_does_not_combine_with(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    args = tiny_args(tiny_checkpoint, tiny_corpus, tmp_path / "r", *TRAIN, "--strategy", "progressive")
    assert main(["run", *args, "--reprobe-every", "2"]) == 2
    assert "--strategy progressive does not combine with --reprobe-every" in capsys.readouterr().err
    assert main(["probe", *tiny_args(tiny_checkpoint, tiny_corpus, tmp_path / "p", "--strategy", "progressive")]) == 2
    assert "--strategy progressive is a way of training, not a selection" in capsys.readouterr().err
