import json
import logging
from functools import partial

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from aletheia_lora import apply_aletheia_lora, find_decoder_stack
from aletheia_lora.data import pad_collate
from aletheia_lora.integrations import (
    AletheiaCallback,
    AletheiaReport,
    _TokenizedView,
    configure_aletheia_lora,
    prepare_aletheia_model,
)
from aletheia_lora.train import EMBEDDINGS, count_input_require_grads_hooks
from tiny_models import tiny_model, token_rows

# Scores that make the choice obvious: the top half by score is blocks 3, 4, 5.
SCORES = {0: 1.0, 1: 2.0, 2: 3.0, 3: 9.0, 4: 8.0, 5: 7.0}


def adapted(peft_model):
    """Block indices that hold trainable LoRA weights."""
    stack = find_decoder_stack(peft_model)
    return sorted(
        {
            stack.layer_of(n.removeprefix("base_model.model."))
            for n, p in peft_model.named_parameters()
            if p.requires_grad and ".lora_" in n
        }
    )


def train(model, rows, tmp_path, callbacks, steps=2, **args):
    training_args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        **args,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=rows,
        data_collator=partial(pad_collate, pad_token_id=0),
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def test_prepare_probes_selects_and_wraps():
    model = tiny_model("llama", 6)
    peft_model, report = prepare_aletheia_model(model, token_rows(8), top_pct=50, r=4, lora_alpha=8)
    assert isinstance(peft_model, PeftModel)
    assert isinstance(report, AletheiaReport)
    assert sorted(report.layer_scores) == list(range(6))
    assert report.layer_scores.meta["metric"] == "grad_norm"
    assert len(report.selected_layers) == 3
    assert adapted(peft_model) == report.selected_layers
    assert report.lora_config.layers_to_transform == report.selected_layers
    assert report.trainable_parameters == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert report.predicted_speedup >= 1.0
    assert count_input_require_grads_hooks(peft_model) == 0
    assert "selected layers (score)" in report.summary()
    summary = json.loads(json.dumps(report.to_dict()))
    assert summary["selected_layers"] == report.selected_layers
    assert summary["rank_allocation"] is None


def test_given_scores_skip_the_probe_and_drive_the_selection():
    model = tiny_model("llama", 6)
    report = configure_aletheia_lora(model, token_rows(4), layer_scores=SCORES, top_pct=50)
    assert report.selected_layers == [3, 4, 5]
    assert dict(report.layer_scores) == SCORES
    assert not isinstance(model, PeftModel) and not any("lora_" in n for n, _ in model.named_parameters())


def test_rank_allocation_from_scores_reaches_the_model():
    model = tiny_model("gpt2", 6)
    peft_model, report = prepare_aletheia_model(
        model, token_rows(4), layer_scores=SCORES, top_pct=50, r=8, lora_alpha=16, rank_allocation="scores"
    )
    allocation = report.rank_allocation
    assert allocation is not None and allocation.layers == (3, 4, 5)
    assert allocation.ranks[3]["attention"] >= allocation.ranks[4]["attention"] >= allocation.ranks[5]["attention"]
    ranks = {
        n.removeprefix("base_model.model."): m.r["default"]
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})
    }
    assert ranks == allocation.module_ranks
    assert report.trainable_parameters == allocation.total_params <= allocation.uniform_params
    assert "ranks by layer" in report.summary()


def test_strategy_and_lora_arguments_pass_through():
    model = tiny_model("llama", 6)
    report = configure_aletheia_lora(
        model, token_rows(4), layer_scores=SCORES, top_k=2, strategy="contiguous", target_modules=["q_proj"]
    )
    assert report.selected_layers == [4, 5]
    assert report.selection.strategy == "contiguous"
    assert set(report.lora_config.target_modules) == {"q_proj"}


@pytest.mark.parametrize(
    "rows",
    [
        [{"text": "def add(a, b):\n    return a + b\n"}] * 4,
        [{"messages": [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}]}] * 4,
        [{"prompt": "Question: two plus two?", "completion": " Answer: four."}] * 4,
    ],
    ids=["text", "messages", "prompt-completion"],
)
def test_text_rows_are_tokenized_for_the_probe(rows, tiny_tokenizer):
    model = tiny_model("llama", 4)
    model.resize_token_embeddings(len(tiny_tokenizer))
    report = configure_aletheia_lora(model, Dataset.from_list(rows), tokenizer=tiny_tokenizer, probe_batches=2)
    assert report.layer_scores.meta["tokens"] > 0
    assert len(report.selected_layers) == 2


def test_iterable_datasets_and_data_loaders_are_probed():
    rows = token_rows(8)
    streamed = Dataset.from_list(rows).to_iterable_dataset()
    loader = torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=partial(pad_collate, pad_token_id=0))
    for data in (streamed, loader, iter(rows)):
        report = configure_aletheia_lora(tiny_model("llama", 4), data, probe_batches=2)
        assert report.layer_scores.meta["tokens"] > 0
        assert len(report.selected_layers) == 2


def test_prompt_completion_rows_mask_the_prompt(tiny_tokenizer):
    view = _TokenizedView([{"prompt": "Question: two?", "completion": " four"}], tiny_tokenizer, max_length=64)
    row = view[0]
    prompt = tiny_tokenizer("Question: two?")["input_ids"]
    assert row["input_ids"][: len(prompt)] == prompt
    assert row["labels"][: len(prompt)] == [-100] * len(prompt)
    assert row["labels"][len(prompt) :] == row["input_ids"][len(prompt) :]
    assert row["input_ids"][-1] == tiny_tokenizer.eos_token_id
    long = _TokenizedView([{"text": "word " * 100}], tiny_tokenizer, max_length=16)
    assert len(long[0]["input_ids"]) == 16


def test_bad_inputs_are_named(tiny_tokenizer):
    model = tiny_model("llama", 4)
    rows = token_rows(4)
    with pytest.raises(ValueError, match="pass tokenizer="):
        configure_aletheia_lora(model, [{"text": "hello"}])
    with pytest.raises(ValueError, match=r"none of 'input_ids', 'text'.*\['question'\]"):
        configure_aletheia_lora(model, [{"question": "hello"}], tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="train_dataset is empty"):
        configure_aletheia_lora(model, [])
    with pytest.raises(ValueError, match="dataset is empty"):
        configure_aletheia_lora(model, iter([]))
    with pytest.raises(TypeError, match="train_dataset must be a dataset"):
        configure_aletheia_lora(model, "rows.jsonl")
    with pytest.raises(ValueError, match="rank_allocation must be one of"):
        configure_aletheia_lora(model, rows, rank_allocation="fisher")
    with pytest.raises(ValueError, match="rank_by must be one of"):
        configure_aletheia_lora(model, rows, rank_by="module")
    with pytest.raises(ValueError, match="cannot be combined with attention_r"):
        configure_aletheia_lora(model, rows, rank_allocation="scores", attention_r=4)
    with pytest.raises(TypeError, match="layer_scores must map layer index -> score, got list"):
        configure_aletheia_lora(model, rows, layer_scores=[1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match=r"layer_scores covers layers \[0, 1\]"):
        configure_aletheia_lora(model, rows, layer_scores={0: 1.0, 1: 2.0})
    with pytest.raises(TypeError, match="max_length must be an integer"):
        configure_aletheia_lora(model, rows, max_length="long")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        configure_aletheia_lora("llama", rows)
    wrapped = get_peft_model(tiny_model("llama", 4), apply_aletheia_lora(tiny_model("llama", 4), [3]))
    with pytest.raises(TypeError, match="already a PeftModel"):
        prepare_aletheia_model(wrapped, rows)
    with pytest.raises(TypeError, match="report must be an AletheiaReport"):
        AletheiaCallback(report={"layers": [1]})
    with pytest.raises(TypeError, match="remove_input_grad_hooks must be True or False"):
        AletheiaCallback(remove_input_grad_hooks=1)


def test_callback_keeps_the_backward_short_under_trainer_checkpointing(tmp_path):
    torch.manual_seed(0)
    rows = token_rows(8)
    peft_model, report = prepare_aletheia_model(tiny_model("llama", 6), rows, layer_scores=SCORES, r=4)
    callback = AletheiaCallback(report)
    # The Trainer's own checkpointing registers an input-grad hook after the model was prepared.
    train(peft_model, rows, tmp_path, [callback], activation_checkpointing=True)
    assert callback.removed_hooks >= 1
    assert count_input_require_grads_hooks(peft_model) == 0
    assert report.lowest_layer_reached == 3 == report.selected_layers[0]
    assert report.backward_depths == [(1, 3), (2, 3)]
    # the monitor's hooks are gone after training
    assert not any(block._forward_hooks for block in find_decoder_stack(peft_model).blocks)


def test_callback_reports_a_backward_pass_that_runs_to_the_embeddings(tmp_path, caplog):
    rows = token_rows(8)
    peft_model, report = prepare_aletheia_model(tiny_model("llama", 6), rows, layer_scores=SCORES, r=4)
    callback = AletheiaCallback(report, remove_input_grad_hooks=False)
    with caplog.at_level(logging.WARNING, logger="aletheia_lora.integrations"):
        train(peft_model, rows, tmp_path, [callback], activation_checkpointing=True)
    assert callback.removed_hooks == 0
    assert report.lowest_layer_reached == EMBEDDINGS
    assert "the backward pass reached the embeddings, below the lowest adapted block 3" in caplog.text


def test_reentrant_checkpointing_keeps_the_hooks_and_says_so(tmp_path, caplog):
    rows = token_rows(8)
    peft_model, report = prepare_aletheia_model(tiny_model("llama", 6), rows, layer_scores=SCORES, r=4)
    callback = AletheiaCallback(report)
    with caplog.at_level(logging.WARNING, logger="aletheia_lora.integrations"):
        train(
            peft_model,
            rows,
            tmp_path,
            [callback],
            steps=1,
            activation_checkpointing=True,
            activation_checkpointing_kwargs={"use_reentrant": True},
        )
    assert callback.removed_hooks == 0
    assert count_input_require_grads_hooks(peft_model) >= 1
    assert "reentrant activation checkpointing needs" in caplog.text
    assert report.lowest_layer_reached == EMBEDDINGS


def test_callback_without_a_report_monitors_any_peft_model(tmp_path):
    rows = token_rows(8)
    model = tiny_model("gpt2", 4)
    peft_model = get_peft_model(model, apply_aletheia_lora(model, [2, 3], r=4))
    callback = AletheiaCallback()
    train(peft_model, rows, tmp_path, [callback])
    assert callback.expected_lowest == 2
    assert callback.lowest_layer_reached == 2
    assert [depth for _, depth in callback.backward_depths] == [2, 2]


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # TRL's own argument
def test_trl_sft_trainer_with_a_peft_config(tmp_path, tiny_tokenizer):
    trl = pytest.importorskip("trl")
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    model = tiny_model("llama", 6)
    model.resize_token_embeddings(len(tiny_tokenizer))
    dataset = Dataset.from_list([{"text": "def add(a, b):\n    return a + b\n"}] * 8)
    report = configure_aletheia_lora(model, dataset, tokenizer=tiny_tokenizer, layer_scores=SCORES, r=4)
    callback = AletheiaCallback(report)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=32,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    assert args.gradient_checkpointing  # TRL's default, which makes SFTTrainer add input-grad hooks
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
        peft_config=report.lora_config,
        callbacks=[callback],
    )
    trainer.train()
    assert adapted(trainer.model) == [3, 4, 5]
    assert callback.removed_hooks >= 1
    assert report.lowest_layer_reached == 3


def test_expected_depth_counts_trainable_embeddings_but_not_the_head(tmp_path):
    rows = token_rows(8)
    model = tiny_model("llama", 4)
    peft_model = get_peft_model(model, apply_aletheia_lora(model, [2, 3], r=4))
    peft_model.get_base_model().lm_head.weight.requires_grad_(True)  # above the blocks: the backward still stops at 2
    head_only = AletheiaCallback()
    train(peft_model, rows, tmp_path, [head_only], steps=1)
    assert head_only.expected_lowest == 2 == head_only.lowest_layer_reached
    peft_model.get_input_embeddings().weight.requires_grad_(True)  # new tokens: the backward must reach them
    with_embeddings = AletheiaCallback()
    train(peft_model, rows, tmp_path, [with_embeddings], steps=1)
    assert with_embeddings.expected_lowest == EMBEDDINGS == with_embeddings.lowest_layer_reached
