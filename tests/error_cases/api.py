"""Bad input to the public API: gradient_probe, select_layers, aletheia_lora_config, apply_aletheia_lora and
predict_speedup.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from aletheia_lora import aletheia_lora_config, apply_aletheia_lora, gradient_probe, predict_speedup, select_layers
from aletheia_lora.cost import CostModel
from error_cases.base import Case, Ctx, Raises, Warns, Works, probe
from tiny_models import VOCAB, token_rows


def _probe_frozen(ctx: Ctx) -> None:
    model = ctx.model()
    for p in model.parameters():
        p.requires_grad_(False)
    scores = probe(ctx, model, probe_batches=2)
    assert len(scores) == 2 and all(v > 0 for v in scores.values())
    assert not any(p.requires_grad for p in model.parameters())


def _probe_peft(ctx: Ctx) -> None:
    model = ctx.model()
    plain = probe(ctx, model, probe_batches=2)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    adapters = {n: p.detach().clone() for n, p in wrapped.named_parameters() if "lora_" in n}
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert dict(probe(ctx, wrapped, probe_batches=2)) == pytest.approx(dict(plain), rel=1e-5)
    assert all(torch.equal(p, adapters[n]) for n, p in wrapped.named_parameters() if "lora_" in n)
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == trainable


def _nan_weights(ctx: Ctx):
    model = ctx.model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = math.nan
    return probe(ctx, model, probe_batches=1)


def _fewer_rows(ctx: Ctx) -> None:
    scores = probe(ctx, rows=token_rows(2), probe_batches=5)
    assert scores.meta["probe_batches"] == 2


def _unsorted_layers(ctx: Ctx) -> None:
    assert aletheia_lora_config([3, 0, 2]).layers_to_transform == [0, 2, 3]


def _apply_to_peft_model(ctx: Ctx) -> None:
    wrapped = get_peft_model(ctx.model(), LoraConfig(r=2, target_modules=["q_proj"]))
    config = apply_aletheia_lora(wrapped, [1], r=4)
    assert config.layers_to_transform == [1] and "q_proj" in config.target_modules


CASES: list[Case] = [
    # gradient_probe
    Case("probe-model-not-a-module", "gradient_probe", 'model="gpt2"', lambda c: probe(c, model="gpt2"),
         Raises(TypeError, "model must be a torch.nn.Module, got str")),
    Case("probe-no-decoder-stack", "gradient_probe", "a model with no decoder stack (nn.Linear)",
         lambda c: probe(c, model=torch.nn.Linear(3, 3)),
         Raises(ValueError, "no decoder-block stack found in Linear")),
    Case("probe-num-layers-mismatch", "gradient_probe", "num_layers=5 for a 2-block model",
         lambda c: probe(c, num_layers=5),
         Raises(ValueError, "num_layers=5 does not match the model: model.layers holds 2 blocks")),
    Case("probe-num-layers-string", "gradient_probe", 'num_layers="2"', lambda c: probe(c, num_layers="2"),
         Raises(TypeError, "num_layers must be a positive integer, got '2'")),
    Case("probe-batches-zero", "gradient_probe", "probe_batches=0", lambda c: probe(c, probe_batches=0),
         Raises(ValueError, "probe_batches must be a positive integer, got 0")),
    Case("probe-batch-size-float", "gradient_probe", "batch_size=1.5", lambda c: probe(c, batch_size=1.5),
         Raises(TypeError, "batch_size must be a positive integer, got 1.5")),
    Case("probe-chunk-size-negative", "gradient_probe", "chunk_size=-1", lambda c: probe(c, chunk_size=-1),
         Raises(ValueError, "chunk_size must be a positive integer, got -1")),
    Case("probe-metric-unknown", "gradient_probe", 'metric="l1"', lambda c: probe(c, metric="l1"),
         Raises(ValueError, "metric must be one of .*got 'l1'")),
    Case("probe-metric-list", "gradient_probe", 'metric=["grad_norm"]', lambda c: probe(c, metric=["grad_norm"]),
         Raises(ValueError, r"metric must be one of .*got \['grad_norm'\]")),
    Case("probe-seed-none", "gradient_probe", "seed=None", lambda c: probe(c, seed=None),
         Raises(TypeError, "seed must be an integer, got None")),
    Case("probe-seed-too-large", "gradient_probe", "seed=2**70", lambda c: probe(c, seed=2**70),
         Raises(ValueError, "seed must be an integer from 0 to 2\\*\\*64 - 1, got 1180591620717411303424")),
    Case("probe-compute-dtype-string", "gradient_probe", 'compute_dtype="bf16"',
         lambda c: probe(c, compute_dtype="bf16"),
         Raises(TypeError, "compute_dtype must be a torch.dtype or None, got 'bf16'")),
    Case("probe-compute-dtype-integer", "gradient_probe", "compute_dtype=torch.int8",
         lambda c: probe(c, compute_dtype=torch.int8),
         Raises(ValueError, "compute_dtype must be a floating-point dtype, got torch.int8")),
    Case("probe-device-unknown", "gradient_probe", 'device="tpu9"', lambda c: probe(c, device="tpu9"),
         Raises(ValueError, "device must be a torch device such as 'cpu' or 'cuda', got 'tpu9'")),
    Case("probe-pad-token-string", "gradient_probe", 'pad_token_id="0"',
         lambda c: probe(c, pad_token_id="0", batch_size=2),
         Raises(TypeError, "pad_token_id must be an integer token id, got '0'")),
    Case("probe-progress-string", "gradient_probe", 'progress="no"',
         lambda c: gradient_probe(c.model(), token_rows(2), progress="no"),
         Raises(TypeError, "progress must be True or False, got 'no'")),
    Case("probe-dataset-text", "gradient_probe", 'dataset="some text"', lambda c: probe(c, rows="some text"),
         Raises(TypeError, "dataset must be a tokenized dataset")),
    Case("probe-dataset-empty", "gradient_probe", "dataset=[] (zero rows)", lambda c: probe(c, rows=[]),
         Raises(ValueError, "dataset is empty: the probe needs at least one tokenized row")),
    Case("probe-dataset-empty-hf", "gradient_probe", "an HF Dataset with zero rows",
         lambda c: probe(c, rows=Dataset.from_dict({"input_ids": []})), Raises(ValueError, "dataset is empty")),
    Case("probe-rows-not-tokenized", "gradient_probe", '[{"text": ...}] (not tokenized)',
         lambda c: probe(c, rows=[{"text": "a"}]),
         Raises(ValueError, r"dataset row 0 has no 'input_ids' \(got \['text'\]\); tokenize the dataset first")),
    Case("probe-rows-ids-are-text", "gradient_probe", '[{"input_ids": "hello"}]',
         lambda c: probe(c, rows=[{"input_ids": "hello"}]),
         Raises(TypeError, "dataset row 0: 'input_ids' must be a list of integers, got text")),
    Case("probe-rows-ids-are-floats", "gradient_probe", '[{"input_ids": [1.5, 2.0]}]',
         lambda c: probe(c, rows=[{"input_ids": [1.5, 2.0]}]),
         Raises(TypeError, "dataset row 0: 'input_ids' must hold integers, got torch.float32")),
    Case("probe-row-one-token", "gradient_probe", "rows of a single token (nothing to predict)",
         lambda c: probe(c, rows=[{"input_ids": [5]}]),
         Raises(ValueError, r"a probe batch has no tokens to predict \(every label is masked or padding\)")),
    Case("probe-ids-outside-vocabulary", "gradient_probe", "token ids >= the vocabulary size",
         lambda c: probe(c, rows=[{"input_ids": [1, 2, VOCAB + 50]}]),
         Raises(ValueError, rf"input_ids hold token ids outside the model's vocabulary \[0, {VOCAB}\)")),
    Case("probe-fewer-rows-than-batches", "gradient_probe", "2 rows, probe_batches=5", _fewer_rows,
         Warns("dataset holds 2 probe batches, fewer than probe_batches=5: using those")),
    Case("probe-non-finite-weights", "gradient_probe", "a NaN weight (non-finite loss/gradients)", _nan_weights,
         Raises(ValueError, r"probe batch 0: the loss is nan \(not finite\)")),
    Case("probe-longer-than-context", "gradient_probe", "rows longer than the model's context (GPT-2, 1024)",
         lambda c: probe(c, model=c.model("gpt2"), rows=[{"input_ids": [1] * 1100}]),
         Raises(ValueError, "probe batch length 1100 is longer than the model's context of 1024 tokens")),
    Case("probe-dataloader-bad-batches", "gradient_probe", "a DataLoader yielding lists, not dicts",
         lambda c: probe(c, rows=torch.utils.data.DataLoader([[1, 2, 3]], batch_size=1)),
         Raises(ValueError, "DataLoader batches must be dicts with 'input_ids'")),
    Case("probe-fully-frozen-model", "gradient_probe", "every parameter requires_grad=False", _probe_frozen,
         Works("scores every block (the probe sets requires_grad itself) and restores every flag")),
    Case("probe-peft-model", "gradient_probe", "a model already wrapped in a PeftModel", _probe_peft,
         Works("scores the base weights (equal to the unwrapped model's); adapters and their flags untouched")),
    # select_layers
    Case("select-scores-list", "select_layers", "layer_scores=[1.0, 2.0]", lambda c: select_layers([1.0, 2.0]),
         Raises(TypeError, "layer_scores must be a mapping of layer index -> score, got list")),
    Case("select-scores-empty", "select_layers", "layer_scores={}", lambda c: select_layers({}),
         Raises(ValueError, "layer_scores is empty")),
    Case("select-score-nan", "select_layers", "a NaN score", lambda c: select_layers({0: 1.0, 1: math.nan}),
         Raises(ValueError, r"layer_scores\[1\] = nan is not finite; re-run the probe")),
    Case("select-score-inf", "select_layers", "an infinite score", lambda c: select_layers({0: math.inf}),
         Raises(ValueError, r"layer_scores\[0\] = inf is not finite")),
    Case("select-score-string", "select_layers", 'a score "1.0"', lambda c: select_layers({0: "1.0"}),
         Raises(TypeError, r"layer_scores\[0\] = '1.0' is not a number")),
    Case("select-layer-negative", "select_layers", "a layer key -1", lambda c: select_layers({-1: 1.0}),
         Raises(ValueError, "layer_scores key -1 is not a layer index")),
    Case("select-top-pct-string", "select_layers", 'top_pct="50"', lambda c: select_layers({0: 1.0}, top_pct="50"),
         Raises(TypeError, r"top_pct must be a number between 1 and 100, got '50' \(str\)")),
    Case("select-top-pct-zero", "select_layers", "top_pct=0", lambda c: select_layers({0: 1.0}, top_pct=0),
         Raises(ValueError, "top_pct must be between 1 and 100, got 0")),
    Case("select-top-k-too-large", "select_layers", "top_k=3 of 2 layers",
         lambda c: select_layers({0: 1.0, 1: 2.0}, top_k=3),
         Raises(ValueError, r"top_k must be between 1 and the number of layers \(2\), got 3")),
    Case("select-top-k-float", "select_layers", "top_k=1.0", lambda c: select_layers({0: 1.0}, top_k=1.0),
         Raises(TypeError, "top_k must be an integer, got 1.0")),
    Case("select-both-budgets", "select_layers", "top_pct=30 and top_k=1",
         lambda c: select_layers({0: 1.0}, top_pct=30, top_k=1),
         Raises(ValueError, "give top_pct or top_k, not both")),
    Case("select-strategy-unknown", "select_layers", 'strategy="best"',
         lambda c: select_layers({0: 1.0}, strategy="best"),
         Raises(ValueError, r"strategy must be one of \['score', 'contiguous', 'truncation'\], got 'best'")),
    Case("select-target-speedup-without-truncation", "select_layers", "target_speedup=1.2, strategy='score'",
         lambda c: select_layers({0: 1.0, 1: 2.0}, target_speedup=1.2),
         Raises(ValueError, "target_speedup applies to strategy='truncation', not 'score'")),
    Case("select-target-speedup-negative", "select_layers", "target_speedup=-1",
         lambda c: select_layers({0: 1.0, 1: 2.0}, strategy="truncation", target_speedup=-1),
         Raises(ValueError, "target_speedup must be a finite number > 0, got -1")),
    Case("select-target-speedup-unreachable", "select_layers", "target_speedup=100",
         lambda c: select_layers({0: 1.0, 1: 2.0, 2: 3.0}, top_k=1, strategy="truncation", target_speedup=100),
         Raises(ValueError, r"target_speedup=100 is out of reach with 1 of 3 layers: .*predicted at 1.500x")),
    Case("select-cost-wrong-type", "select_layers", 'cost="flops"',
         lambda c: select_layers({0: 1.0, 1: 2.0}, cost="flops"),
         Raises(TypeError, "cost must be a CostModel, a Calibration or a callable .*got str")),
    Case("select-cost-too-few-layers", "select_layers", "a 2-layer cost model for 3 scored layers",
         lambda c: select_layers({0: 1.0, 1: 2.0, 2: 3.0}, strategy="truncation", cost=CostModel.uniform(2)),
         Raises(ValueError, "layer_scores holds layer 2, but the cost model has 2 layers")),
    # aletheia_lora_config
    Case("config-layers-empty", "aletheia_lora_config", "selected_layers=[]", lambda c: aletheia_lora_config([]),
         Raises(ValueError, "selected_layers is empty; PEFT would read an empty list as 'all layers'")),
    Case("config-layers-duplicated", "aletheia_lora_config", "selected_layers=[1, 1]",
         lambda c: aletheia_lora_config([1, 1]), Raises(ValueError, r"selected_layers holds duplicates: \[1\]")),
    Case("config-layers-negative", "aletheia_lora_config", "selected_layers=[-1]",
         lambda c: aletheia_lora_config([-1]), Raises(ValueError, "selected_layers holds a negative index: -1")),
    Case("config-layers-out-of-range", "aletheia_lora_config", "selected_layers=[4], num_layers=4",
         lambda c: aletheia_lora_config([4], num_layers=4),
         Raises(ValueError, "selected_layers holds 4, out of range for a model with 4 layers")),
    Case("config-layers-unsorted", "aletheia_lora_config", "selected_layers=[3, 0, 2]", _unsorted_layers,
         Works("sorted: layers_to_transform=[0, 2, 3]")),
    Case("config-layers-string", "aletheia_lora_config", 'selected_layers="0,1"',
         lambda c: aletheia_lora_config("0,1"),
         Raises(TypeError, "selected_layers must be a list of layer indices, got str")),
    Case("config-layers-float", "aletheia_lora_config", "selected_layers=[0.5]",
         lambda c: aletheia_lora_config([0.5]), Raises(TypeError, r"selected_layers must hold integers, got 0.5")),
    Case("config-num-layers-string", "aletheia_lora_config", 'num_layers="4"',
         lambda c: aletheia_lora_config([0], num_layers="4"),
         Raises(TypeError, "num_layers must be a positive integer or None, got '4'")),
    Case("config-r-zero", "aletheia_lora_config", "r=0", lambda c: aletheia_lora_config([0], r=0),
         Raises(ValueError, "r must be positive, got 0")),
    Case("config-r-fraction", "aletheia_lora_config", "attention_r=2.5",
         lambda c: aletheia_lora_config([0], attention_r=2.5), Raises(TypeError, "attention_r must be an integer")),
    Case("config-alpha-nan", "aletheia_lora_config", "lora_alpha=nan",
         lambda c: aletheia_lora_config([0], lora_alpha=math.nan), Raises(ValueError, "lora_alpha must be finite")),
    Case("config-dropout-one", "aletheia_lora_config", "lora_dropout=1.0",
         lambda c: aletheia_lora_config([0], lora_dropout=1.0),
         Raises(ValueError, r"lora_dropout must be a number in \[0, 1\), got 1.0")),
    Case("config-target-modules-string", "aletheia_lora_config", 'target_modules="q_proj"',
         lambda c: aletheia_lora_config([0], target_modules="q_proj"),
         Raises(TypeError, "target_modules must be a list of module names, got 'q_proj'")),
    Case("config-target-modules-empty", "aletheia_lora_config", "target_modules=[]",
         lambda c: aletheia_lora_config([0], target_modules=[]),
         Raises(ValueError, "target_modules is empty: it must name at least one module")),
    Case("config-fan-in-fan-out-string", "aletheia_lora_config", 'fan_in_fan_out="yes"',
         lambda c: aletheia_lora_config([0], fan_in_fan_out="yes"),
         Raises(TypeError, "fan_in_fan_out must be True or False, got 'yes'")),
    Case("config-module-kinds-list", "aletheia_lora_config", 'module_kinds=["q_proj"]',
         lambda c: aletheia_lora_config([0], module_kinds=["q_proj"]),
         Raises(TypeError, "module_kinds must be a mapping of module name -> kind, got list")),
    Case("config-task-type-unknown", "aletheia_lora_config", 'task_type="CHAT"',
         lambda c: aletheia_lora_config([0], task_type="CHAT"),
         Raises(ValueError, r"task_type must be one of \[.*'CAUSAL_LM'.*\], got 'CHAT'")),
    Case("config-unknown-keyword", "aletheia_lora_config", "rank=8 (not a LoraConfig field)",
         lambda c: aletheia_lora_config([0], rank=8), Raises(TypeError, "unexpected keyword argument 'rank'")),
    # apply_aletheia_lora
    Case("apply-model-not-a-module", "apply_aletheia_lora", 'model="gpt2"',
         lambda c: apply_aletheia_lora("gpt2", [0]), Raises(TypeError, "model must be a torch.nn.Module, got str")),
    Case("apply-no-decoder-stack", "apply_aletheia_lora", "nn.Linear",
         lambda c: apply_aletheia_lora(torch.nn.Linear(2, 2), [0]),
         Raises(ValueError, "no decoder-block stack found in Linear")),
    Case("apply-target-module-missing", "apply_aletheia_lora", 'target_modules=["qkv"] on Llama',
         lambda c: apply_aletheia_lora(c.model(), [0], target_modules=["q_proj", "qkv"]),
         Raises(ValueError, "target module 'qkv' is not in LlamaForCausalLM; its blocks have")),
    Case("apply-layer-out-of-range", "apply_aletheia_lora", "selected_layers=[2] on 2 blocks",
         lambda c: apply_aletheia_lora(c.model(), [2]),
         Raises(ValueError, "selected_layers holds 2, out of range for a model with 2 layers")),
    Case("apply-target-experts-string", "apply_aletheia_lora", 'target_experts="yes"',
         lambda c: apply_aletheia_lora(c.model(), [0], target_experts="yes"),
         Raises(TypeError, "target_experts must be True or False, got 'yes'")),
    Case("apply-peft-model", "apply_aletheia_lora", "a model already wrapped in a PeftModel", _apply_to_peft_model,
         Works("builds the config from the base model's blocks")),
    # predict_speedup
    Case("speedup-model-string", "predict_speedup", 'model_or_config="llama"',
         lambda c: predict_speedup("llama", [0]),
         Raises(TypeError, "model_or_config must be a torch model or a transformers PretrainedConfig, got str")),
    Case("speedup-layers-out-of-range", "predict_speedup", "selected_layers=[5] on 2 blocks",
         lambda c: predict_speedup(c.model(), [5]),
         Raises(ValueError, "selected_layers holds 5, out of range for a model with 2 layers")),
    Case("speedup-layers-empty", "predict_speedup", "selected_layers=[]", lambda c: predict_speedup(c.model(), []),
         Raises(ValueError, "selected_layers is empty")),
    Case("speedup-seq-len-zero", "predict_speedup", "seq_len=0",
         lambda c: predict_speedup(c.model(), [1], seq_len=0),
         Raises(ValueError, "seq_len must be a positive integer, got 0")),
    Case("speedup-r-string", "predict_speedup", 'r="8"', lambda c: predict_speedup(c.model(), [1], r="8"),
         Raises(TypeError, r"r must be a positive integer, got '8' \(str\)")),
    Case("speedup-batch-size-float", "predict_speedup", "batch_size=2.0",
         lambda c: predict_speedup(c.model(), [1], batch_size=2.0),
         Raises(TypeError, "batch_size must be a positive integer, got 2.0")),
    Case("speedup-checkpointing-string", "predict_speedup", 'gradient_checkpointing="yes"',
         lambda c: predict_speedup(c.model(), [1], gradient_checkpointing="yes"),
         Raises(TypeError, "gradient_checkpointing must be True or False, got 'yes'")),
    Case("speedup-optimizer-negative", "predict_speedup", "optimizer_flops_per_param=-1",
         lambda c: predict_speedup(c.model(), [1], optimizer_flops_per_param=-1),
         Raises(ValueError, "optimizer_flops_per_param must be a finite number >= 0, got -1")),
    Case("speedup-calibration-wrong-type", "predict_speedup", 'calibration="fast"',
         lambda c: predict_speedup(c.model(), [1], calibration="fast"),
         Raises(TypeError, r"calibration must be a Calibration from calibrate\(\), got str")),
    Case("speedup-target-module-missing", "predict_speedup", 'target_modules=["qkv"] on Llama',
         lambda c: predict_speedup(c.model(), [1], target_modules=["qkv"]),
         Raises(ValueError, "target module 'qkv' is not in llama's blocks")),
]  # fmt: skip
