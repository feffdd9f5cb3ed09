"""Training: --resume checked against its checkpoint, training that diverges, the pipeline's conflicting
inputs, and re-probing.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from peft import get_peft_model

from aletheia_lora import aletheia_lora_config, apply_aletheia_lora
from aletheia_lora.config import LoraSettings
from aletheia_lora.data import DataConfig, pad_collate
from aletheia_lora.files import write_json
from aletheia_lora.models import ModelConfig
from aletheia_lora.pipeline import RunConfig, run_pipeline
from aletheia_lora.prefix_cache import PrefixCache
from aletheia_lora.reprobe import ReprobeCallback, set_trainable_layers
from aletheia_lora.resume import check_checkpoint_files, check_resume
from aletheia_lora.train import TrainConfig
from error_cases.base import Case, Ctx, Exit2, Raises
from tiny_models import token_rows


def _checkpoint(ctx: Ctx, damaged: str | None = None, **adapter) -> Path:
    """A checkpoint folder with the files a resume reads; ``damaged`` names one to damage."""
    folder = ctx.tmp_path / "checkpoints" / "checkpoint-2"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text('{"global_step": 2}')
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "layers_to_transform": [0, 3], **adapter}))
    torch.save({"state": {0: {"exp_avg": torch.zeros(64)}}}, folder / "optimizer.pt")
    if damaged == "optimizer.pt":
        (folder / damaged).write_bytes((folder / damaged).read_bytes()[:100])
    elif damaged == "trainer_state.json":
        (folder / damaged).write_text('{"global_step": ')
    elif damaged == "adapter_model.safetensors":
        (folder / damaged).write_bytes(b"garbage" * 100)
    return folder


def _resume_other(ctx: Ctx, **settings):
    lora = aletheia_lora_config(**{"selected_layers": [0, 3], "r": 4, **settings})
    return check_resume(_checkpoint(ctx), lora)


def _cli_resume_other_rank(ctx: Ctx) -> list[str]:
    _checkpoint(ctx)
    ctx.file("run_config.json", '{"lora": {"r": 4}}')
    args = ["--general-data", "none", "--max-length", "16", "--layers", "0", "3", "--r", "8", "--out", "."]
    return ["train", *ctx.cli_model_args(), *args, "--resume"]


def _run_config(ctx: Ctx, **lora) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model=str(ctx.checkpoint_dir)),
        data=DataConfig(data=str(ctx.corpus_dir / "target.txt"), general_data=None, max_length=16),
        lora=LoraSettings(r=4, **lora),
        train=TrainConfig(max_steps=1, batch_size=2, save_steps=0, progress=False),
    )


def _cache_with_reprobing(ctx: Ctx) -> None:
    config = _run_config(ctx)
    config.train = TrainConfig(max_steps=1, batch_size=2, save_steps=0, progress=False, cache_prefix=True,
                               reprobe_every=2)  # fmt: skip
    run_pipeline(config, "o")


def _cli_scores_of_another_model(ctx: Ctx) -> list[str]:
    meta = '"meta": {"model_type": "gpt2", "num_layers": 4}'
    ctx.file("s.json", '{"scores": {"0": 1.0, "1": 2.0, "2": 3.0, "3": 4.0}, ' + meta + "}")
    return ["train", *ctx.cli_model_args(), "--general-data", "none", "--max-length", "16", "--scores", "s.json"]


def _cli_diverges(ctx: Ctx) -> list[str]:
    args = ["--general-data", "none", "--max-length", "16", "--layers", "2", "3", "--max-steps", "6"]
    return ["train", *ctx.cli_model_args(), *args, "--learning-rate", "1e30", "--max-grad-norm", "0", "--out", "t"]


def _move_to_bare_block(ctx: Ctx) -> None:
    model = ctx.model()
    set_trainable_layers(get_peft_model(model, apply_aletheia_lora(model, [1], r=2)), [0, 1])


def _optimizer_without_adapters(ctx: Ctx) -> None:
    model = ctx.model()
    peft_model = get_peft_model(model, apply_aletheia_lora(model, [0, 1], r=2))
    set_trainable_layers(peft_model, [1])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad])
    ReprobeCallback(token_rows(2), 2, layers=[1]).on_train_begin(
        SimpleNamespace(world_size=1), SimpleNamespace(global_step=0), None, model=peft_model, optimizer=optimizer
    )


def _cache_model(ctx: Ctx, arch: str = "llama", layers=(1,), **config):
    """A 2-block tiny model with LoRA on ``layers``; ``config`` set on its config first."""
    model = ctx.model(arch)
    for key, value in config.items():
        setattr(model.config, key, value)
    return get_peft_model(model, apply_aletheia_lora(model, list(layers), r=2))


def _cache_trainable_embedding(ctx: Ctx) -> None:
    model = _cache_model(ctx)
    model.get_input_embeddings().weight.requires_grad_(True)
    PrefixCache.build(model, token_rows(2))


def _cache_changed_row(ctx: Ctx) -> None:
    model, rows = _cache_model(ctx), token_rows(2)
    cache = PrefixCache.build(model, rows)
    rows[0]["input_ids"][3] = rows[0]["input_ids"][3] % 90 + 1  # the dataset changes after the build
    dataset, collate = cache.indexed(rows), cache.collator(partial(pad_collate, pad_token_id=0))
    with cache.attach(model):
        model(**collate([dataset[0], dataset[1]]))


CASES: list[Case] = [
    # resume: checked against the checkpoint, which is never changed
    Case("resume-truncated-optimizer", "check_checkpoint_files", "a truncated optimizer.pt",
         lambda c: check_checkpoint_files(_checkpoint(c, "optimizer.pt")),
         Raises(ValueError, "--resume: .*optimizer.pt' is damaged or truncated \\(File is not a zip file\\); left")),
    Case("resume-broken-trainer-state", "check_checkpoint_files", "a broken trainer_state.json",
         lambda c: check_checkpoint_files(_checkpoint(c, "trainer_state.json")),
         Raises(ValueError, "--resume: .*trainer_state.json' is damaged or truncated \\(Expecting value")),
    Case("resume-garbage-adapter", "check_checkpoint_files", "a garbage adapter_model.safetensors",
         lambda c: check_checkpoint_files(_checkpoint(c, "adapter_model.safetensors")),
         Raises(ValueError, "--resume: .*adapter_model.safetensors' is damaged or truncated \\(Error while")),
    Case("resume-other-layers", "check_resume", "resuming layers [1, 2] from a checkpoint of layers [0, 3]",
         lambda c: _resume_other(c, selected_layers=[1, 2]),
         Raises(ValueError, "checkpoint-2 was trained with --layers 0 3, this run has --layers 1 2; resume with the")),
    Case("resume-other-rank", "check_resume", "resuming with r=8 from a checkpoint of r=4",
         lambda c: _resume_other(c, r=8), Raises(ValueError, "was trained with --r 4, this run has --r 8")),
    Case("cli-resume-other-rank", "aletheia-lora train", "--resume --r 8 on a run started with --r 4",
         _cli_resume_other_rank,
         Exit2("--resume: the run in '.' was started with --r 4, this run has --r 8; resume with the run's settings")),
    # training health and valid JSON
    Case("cli-train-diverges", "aletheia-lora train", "--learning-rate 1e30 --max-grad-norm 0 (the loss goes NaN)",
         _cli_diverges,
         Exit2("training diverged at step .*: the loss is nan; stopped, no adapter saved. Lower --learning-rate "
               "\\(now 1e\\+30\\), set --max-grad-norm 1, or check the data")),
    Case("write-json-nan", "write_json", "a NaN in the payload (JSON has none)",
         lambda c: write_json(c.tmp_path / "m.json", {"train": {"loss": math.nan}}),
         Raises(ValueError, "refusing to write .*m.json': train.loss is nan, and JSON has no NaN or infinity")),
    # conflicting or wrong inputs to the pipeline
    Case("pipeline-layers-and-scores", "run_pipeline", "layers and scores_file together",
         lambda c: run_pipeline(_run_config(c), "o", layers=[1], scores_file=c.scores_file()),
         Raises(ValueError, "give --layers or --scores, not both")),
    Case("pipeline-score-ranks-with-layers", "run_pipeline", 'layers with rank_allocation="scores"',
         lambda c: run_pipeline(_run_config(c, rank_allocation="scores"), "o", layers=[1]),
         Raises(ValueError, "--rank-allocation scores needs probe scores: drop --layers .*or give --scores FILE")),
    Case("cli-scores-of-another-model", "aletheia-lora train", "--scores probed on a gpt2, --model a Llama",
         _cli_scores_of_another_model,
         Exit2("--scores 's.json' was probed on a gpt2 model of 4 layers, this run's --model is a llama of 4 layers")),
    # re-probing
    Case("reprobe-every-zero", "ReprobeCallback", "every=0", lambda c: ReprobeCallback(token_rows(2), 0),
         Raises(ValueError, r"every \(--reprobe-every\) must be a positive integer, got 0")),
    Case("reprobe-block-without-adapter", "set_trainable_layers", "a block whose modules hold no LoRA adapter",
         _move_to_bare_block, Raises(ValueError, r"layers \[0\] hold no LoRA adapter")),
    Case("reprobe-optimizer-missing-adapters", "ReprobeCallback", "a Trainer optimizer built after freezing "
         "the other blocks' adapters", _optimizer_without_adapters,
         Raises(ValueError, r"the optimizer does not hold the adapters of blocks \[0\]")),
    # prefix caching (--cache-prefix)
    Case("prefix-cache-block-0", "PrefixCache.build", "adapters on block 0 (nothing below them to cache)",
         lambda c: PrefixCache.build(_cache_model(c, layers=(0, 1)), token_rows(2)),
         Raises(ValueError, "--cache-prefix: the lowest adapted block is 0, so there is no frozen prefix to skip")),
    Case("prefix-cache-trainable-embedding", "PrefixCache.build", "a trainable embedding below the adapted blocks",
         _cache_trainable_embedding,
         Raises(ValueError, "--cache-prefix: .*embed_tokens.weight is trainable but lies outside the adapted "
                "blocks 1 and above")),
    Case("prefix-cache-router-loss", "PrefixCache.build", "a Mixtral with config.output_router_logits=True",
         lambda c: PrefixCache.build(_cache_model(c, "mixtral", output_router_logits=True), token_rows(2)),
         Raises(ValueError, "--cache-prefix: the model's router auxiliary loss is on "
                "\\(config.output_router_logits\\)")),
    Case("prefix-cache-random-prefix", "PrefixCache.build", "an OPT with its default dropout 0.1 (functional, "
         "no module)", lambda c: PrefixCache.build(_cache_model(c, "opt"), token_rows(2)),
         Raises(ValueError, "--cache-prefix: the blocks below block 1 are random in train mode \\(dropout or "
                "router noise: dropout=0.1\\)")),
    Case("prefix-cache-over-budget", "PrefixCache.build", "a cache over budget_gib and no folder",
         lambda c: PrefixCache.build(_cache_model(c), token_rows(2), budget_gib=1e-9),
         Raises(ValueError, "--cache-prefix: the cache needs .*, over --cache-budget 1e-09 GiB, and no folder was "
                "given for its memory-mapped files")),
    Case("prefix-cache-changed-row", "PrefixCache.attach", "a training row whose tokens changed after the build",
         _cache_changed_row,
         Raises(ValueError, "--cache-prefix: the tokens of training row 0 differ from those cached; the dataset "
                "changed after the cache was built")),
    Case("pipeline-cache-prefix-reprobe", "run_pipeline", "--cache-prefix with --reprobe-every 2",
         _cache_with_reprobing,
         Raises(ValueError, "--cache-prefix does not combine with --reprobe-every: re-probing moves the adapted")),
]  # fmt: skip
