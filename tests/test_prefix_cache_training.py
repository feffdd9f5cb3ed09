"""Prefix caching in training (`TrainConfig(cache_prefix=True)`, `--cache-prefix`): the Trainer's losses, evaluations
and adapters equal those of the uncached run, with gradient accumulation, resume, memory-mapped storage and two
gloo ranks; the saved adapter is an ordinary PEFT adapter; what cannot be cached is refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from peft import PeftModel
from transformers import AutoModelForCausalLM

from aletheia_lora import apply_aletheia_lora
from aletheia_lora.cli import main
from aletheia_lora.evaluation import evaluate_loss
from aletheia_lora.files import read_manifest
from aletheia_lora.train import TrainConfig, train_lora
from test_cli import TRAIN, tiny_args
from test_distributed import TORCHRUN, WORKERS, cli_args, run_bounded
from tiny_models import tiny_model, token_rows


def _train(tmp_path, name, arch="llama", layers=(2, 3), rows=None, resume=False, **settings):
    model = tiny_model(arch, n_layers=4)
    rows = rows or token_rows(16, 16, vary=True)
    config = TrainConfig(batch_size=4, eval_steps=3, logging_steps=1, save_steps=3, progress=False, **settings)
    result = train_lora(model, apply_aletheia_lora(model, list(layers), r=4, lora_alpha=8), rows, rows[:4], config,
                        output_dir=tmp_path / name, resume=resume)  # fmt: skip
    losses = [(h["step"], h["loss"]) for h in result.log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in result.log_history if "eval_loss" in h]
    return result, losses, evals


def _lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("arch,accumulation", [("llama", 1), ("llama", 2), ("falcon", 1)])
def test_cached_training_equals_the_full_forward(tmp_path, arch, accumulation):
    plain, losses, evals = _train(tmp_path, "plain", arch, max_steps=6, gradient_accumulation_steps=accumulation)
    cached, c_losses, c_evals = _train(tmp_path, "cached", arch, max_steps=6, gradient_accumulation_steps=accumulation,
                                       cache_prefix=True)  # fmt: skip
    assert [s for s, _ in c_losses] == [s for s, _ in losses] == list(range(1, 7))
    assert [v for _, v in c_losses] == pytest.approx([v for _, v in losses], abs=1e-6)
    assert [v for _, v in c_evals] == pytest.approx([v for _, v in evals], abs=1e-6)  # evaluation runs uncached
    a, b = _lora_state(plain.model), _lora_state(cached.model)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert plain.prefix_cache is None
    summary = cached.prefix_cache
    assert summary["block"] == 2 and summary["rows"] == 16 and summary["memory_mapped"] is False
    assert summary["batches_served"] == 6 * accumulation  # every micro-batch skipped the prefix
    assert cached.lowest_layer_reached == 2


def test_the_adapter_is_an_ordinary_peft_adapter_that_gives_the_reported_loss(tmp_path):
    rows = token_rows(16, 16, vary=True)
    result, _, evals = _train(tmp_path, "run", rows=rows, max_steps=6, cache_prefix=True)
    base = tiny_model("llama", n_layers=4)
    loaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    assert evaluate_loss(loaded, rows[:4], batch_size=4)["loss"] == pytest.approx(evals[-1][1], abs=1e-6)
    # the trained model is left unhooked: no row-id hook or skipping forward stays behind
    assert not any("forward" in vars(m) for m in result.model.modules())


def test_a_memory_mapped_cache_is_listed_removed_or_kept_and_reused(tmp_path):
    result, losses, _ = _train(tmp_path, "run", max_steps=3, cache_prefix=True, cache_budget=1e-9)
    assert result.prefix_cache["memory_mapped"] is True and result.prefix_cache["reused"] is False
    assert not (tmp_path / "run" / "prefix-cache" / "states.bin").exists()  # removed at the end
    manifest = read_manifest(tmp_path / "run")
    assert "prefix-cache" in manifest.folders and "prefix-cache/states.bin" in manifest.entries
    kept, _, _ = _train(tmp_path, "kept", max_steps=3, cache_prefix=True, cache_budget=1e-9, keep_cache=True)
    assert (tmp_path / "kept" / "prefix-cache" / "states.bin").is_file()
    again, again_losses, _ = _train(tmp_path, "kept", max_steps=3, cache_prefix=True, cache_budget=1e-9)
    assert again.prefix_cache["reused"] is True
    assert [v for _, v in again_losses] == pytest.approx([v for _, v in losses], abs=1e-6)


def test_resume_with_the_cache_continues_like_an_uncached_run(tmp_path):
    resumed = {}
    for name, cache in (("plain", False), ("cached", True)):
        _train(tmp_path, name, max_steps=3, cache_prefix=cache)
        result, losses, _ = _train(tmp_path, name, max_steps=6, cache_prefix=cache, resume=True)
        resumed[name] = [(s, v) for s, v in losses if s > 3]
        assert len(result.step_times) == 3
    assert [s for s, _ in resumed["cached"]] == [4, 5, 6]
    assert [v for _, v in resumed["cached"]] == pytest.approx([v for _, v in resumed["plain"]], abs=1e-6)


def test_block_zero_and_moving_blocks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="the lowest adapted block is 0, so there is no frozen prefix to skip"):
        _train(tmp_path, "zero", layers=(0, 3), max_steps=2, cache_prefix=True)
    with pytest.raises(ValueError, match="--cache-budget must be positive, got 0"):
        TrainConfig(cache_prefix=True, cache_budget=0)
    with pytest.raises(ValueError, match="--cache-dtype must be auto or bfloat16, got 'float16'"):
        TrainConfig(cache_prefix=True, cache_dtype="float16")


def test_run_cache_prefix_end_to_end_and_its_refusals(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(tiny_checkpoint, tiny_corpus, out, *TRAIN, "--strategy", "contiguous", "--top-pct", "50")
    assert main(["run", *args, "--cache-prefix"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    cache = report["train"]["prefix_cache"]
    assert cache["block"] == min(report["selection"]["selected_layers"]) > 0
    assert cache["batches_served"] == report["train"]["steps"] == 4
    assert cache["predicted_speedup"] > 1  # the cost model's cached step against LoRA on every block
    summary = (out / "report.md").read_text()
    assert f"prefix cache    blocks 0-{cache['block'] - 1} skipped: " in summary and "4 batches served" in summary
    progressive = tiny_args(tiny_checkpoint, tiny_corpus, tmp_path / "prog", *TRAIN, "--strategy", "progressive")
    assert main(["run", *progressive, "--freeze-every", "2", "--cache-prefix", "--max-steps", "12"]) == 0
    cache = json.loads((tmp_path / "prog" / "metrics.json").read_text())["train"]["prefix_cache"]
    assert cache["progressive"] is True and cache["stable_steps"] >= 1
    assert "prefix cache    built: " in (tmp_path / "prog" / "report.md").read_text()
    capsys.readouterr()
    refused = tiny_args(tiny_checkpoint, tiny_corpus, tmp_path / "p", *TRAIN, "--reprobe-every", "2")
    assert main(["run", *refused, "--cache-prefix"]) == 2
    assert "--cache-prefix does not combine with --reprobe-every" in capsys.readouterr().err


def _freeze_one_block_at_a_time(previous, current, frozen, limit):
    return min(frozen + 1, limit)


def test_progressive_freezing_caches_the_prefix_once_it_has_settled_for_an_epoch(tmp_path, monkeypatch):
    from aletheia_lora import freeze
    from aletheia_lora.freeze import FreezeCallback

    monkeypatch.setattr(freeze, "settled_prefix", _freeze_one_block_at_a_time)
    rows = token_rows(16, 16, vary=True)  # 4 steps an epoch
    runs = {}
    for cached in (False, True):
        model = tiny_model("llama", n_layers=4)
        freezing = FreezeCallback(4, 50)  # decisions every 4 steps: block 0 frozen at 8, block 1 at 12 (the limit)
        config = TrainConfig(max_steps=20, batch_size=4, logging_steps=1, save_steps=0, progress=False,
                             learning_rate=1e-3, cache_prefix=cached)  # fmt: skip
        result = train_lora(model, apply_aletheia_lora(model, [0, 1, 2, 3], r=4, lora_alpha=8), rows, None, config,
                            output_dir=tmp_path / str(cached), callbacks=[freezing])  # fmt: skip
        runs[cached] = ([h["loss"] for h in result.log_history if "loss" in h], result, freezing)
    (plain, _, plain_freezing), (losses, result, freezing) = runs[False], runs[True]
    assert [t["step"] for t in freezing.timeline] == [t["step"] for t in plain_freezing.timeline] == [0, 8, 12]
    assert losses == pytest.approx(plain, abs=1e-6)  # the cache changes no number
    summary = result.prefix_cache
    # blocks 0-1 frozen since step 12: one epoch (4 steps) later the cache is built, and steps 17-20 use it; the
    # prefix below block 1 (frozen at 8) never stayed for an epoch, since block 1 froze at 12
    assert summary["progressive"] is True and summary["stable_steps"] == 4
    assert [(b["step"], b["block"]) for b in summary["builds"]] == [(16, 2)]
    assert summary["batches_served"] == 4
    assert not any("forward" in vars(m) for m in result.model.modules())


def test_progressive_freezing_with_the_cache_refuses_lora_dropout_in_the_blocks_that_may_freeze(tmp_path):
    from aletheia_lora.freeze import FreezeCallback

    model = tiny_model("llama", n_layers=4)
    config = TrainConfig(max_steps=2, batch_size=4, save_steps=0, progress=False, cache_prefix=True)
    lora = apply_aletheia_lora(model, [0, 1, 2, 3], r=4, lora_alpha=8, lora_dropout=0.1)
    with pytest.raises(ValueError, match="progressive: a dropout of p=0.1 runs in the blocks that may freeze"):
        train_lora(model, lora, token_rows(8, 16, vary=True), None, config, output_dir=tmp_path / "run",
                   callbacks=[FreezeCallback(4, 50)])  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_two_gloo_ranks_train_alike_with_and_without_the_cache(tiny_checkpoint, tiny_corpus, tmp_path):
    losses = {}
    for name, extra in (("plain", []), ("cached", ["--cache-prefix"])):
        out = tmp_path / name
        argv = [*cli_args(tiny_checkpoint, tiny_corpus, out), "--strategy", "contiguous", "--top-pct", "50", *extra]
        proc = run_bounded([*TORCHRUN, str(WORKERS), "cli", "run", *argv], timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((out / "metrics.json").read_text())
        assert report["train"]["processes"] == 2
        losses[name] = (report["train"]["mean_train_loss"], report["eval_after"]["target"]["loss"])
        if extra:
            assert report["train"]["prefix_cache"]["batches_served"] == report["train"]["steps"]
    assert losses["cached"] == pytest.approx(losses["plain"], abs=1e-6)
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint), tmp_path / "cached" / "adapter"
    )
    assert any("lora_" in n for n, _ in loaded.named_parameters())


def test_the_documented_recipe_for_your_own_trainer(tmp_path):
    """PrefixCache's docstring: build, indexed rows, the collator, attach around a plain transformers Trainer."""
    from functools import partial

    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from aletheia_lora.data import pad_collate
    from aletheia_lora.prefix_cache import PrefixCache

    rows = token_rows(16, 16, vary=True)
    losses = {}
    for cached in (False, True):
        model = tiny_model("llama", n_layers=4)
        torch.manual_seed(0)
        peft_model = get_peft_model(model, apply_aletheia_lora(model, [2, 3], r=4, lora_alpha=8))
        args = TrainingArguments(output_dir=str(tmp_path / str(cached)), max_steps=4, per_device_train_batch_size=4,
                                 logging_steps=1, report_to=[], use_cpu=True, remove_unused_columns=False,
                                 save_strategy="no", disable_tqdm=True, seed=0)  # fmt: skip
        collate = partial(pad_collate, pad_token_id=0)
        if cached:
            cache = PrefixCache.build(peft_model, rows)
            trainer = Trainer(model=peft_model, args=args, train_dataset=cache.indexed(rows),
                              data_collator=cache.collator(collate))  # fmt: skip
            with cache.attach(peft_model):
                trainer.train()
            cache.close()
            assert cache.hits == 4
        else:
            trainer = Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=collate)
            trainer.train()
        losses[cached] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], abs=1e-6)


def test_a_run_too_short_for_the_cache_to_pay_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="aletheia_lora.train"):
        _train(tmp_path, "short", max_steps=2, cache_prefix=True)  # 8 of 16 rows
    assert "--cache-prefix: 2 steps see 8 of the 16 training rows, each at most once" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="aletheia_lora.train"):
        _train(tmp_path, "long", max_steps=8, cache_prefix=True)  # two epochs
    assert "cannot pay back" not in caplog.text
