import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from peft import LoraConfig, get_peft_model

from aletheia_lora import LayerScores, find_decoder_stack, gradient_probe
from aletheia_lora.data import pad_collate
from tiny_models import ARCHITECTURES, VOCAB, tiny_model, token_rows


def naive_scores(model, rows, metric="grad_norm"):
    """Independent computation: one full backward per row, every block parameter, then the metric."""
    stack = find_decoder_stack(model)
    totals = [0.0] * stack.num_layers
    for row in rows:
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([row["input_ids"]])
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        grads = torch.autograd.grad(loss, [p for b in stack.blocks for p in b.parameters()], allow_unused=True)
        k = 0
        for i, block in enumerate(stack.blocks):
            for p in block.parameters():
                g = grads[k]
                k += 1
                if g is None:
                    continue
                if metric == "grad_norm":
                    totals[i] += g.norm().item()
                elif metric == "fisher":
                    totals[i] += g.pow(2).sum().item()
                elif metric == "grad_weight":
                    totals[i] += (g * p).abs().sum().item()
    return totals


def sampled_rows(rows, n, seed=42):
    """The rows the reference draws: DataLoader(shuffle=True, generator=seed), batch size 1."""
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(range(len(rows)), batch_size=1, shuffle=True, generator=g)
    return [rows[int(index)] for index in list(loader)[:n]]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_score_is_the_reference_definition(arch):
    model = tiny_model(arch, n_layers=3)
    rows = token_rows(8)
    scores = gradient_probe(model, rows, num_layers=3, probe_batches=3, progress=False)
    expected = naive_scores(model, sampled_rows(rows, 3))
    assert list(scores) == [0, 1, 2]
    for i in range(3):
        assert scores[i] == pytest.approx(expected[i], rel=1e-4)
    assert scores.meta["metric"] == "grad_norm" and scores.meta["probe_batches"] == 3
    assert scores.meta["tokens"] == 3 * 11


@pytest.mark.parametrize("metric", ["fisher", "grad_weight"])
def test_other_metrics_match_their_definitions(metric):
    model = tiny_model("qwen2", n_layers=2)
    rows = token_rows(4)
    scores = gradient_probe(model, rows, probe_batches=2, metric=metric, progress=False)
    expected = naive_scores(model, sampled_rows(rows, 2), metric)
    assert [scores[i] for i in range(2)] == pytest.approx(expected, rel=1e-4)


def test_grad_rms_is_fisher_normalised_by_size():
    model = tiny_model("llama", n_layers=2)
    rows = token_rows(1)
    fisher = gradient_probe(model, rows, probe_batches=1, metric="fisher", progress=False)
    rms = gradient_probe(model, rows, probe_batches=1, metric="grad_rms", progress=False)
    sizes = [sum(p.numel() for p in b.parameters()) for b in find_decoder_stack(model).blocks]
    for i in range(2):
        assert rms[i] == pytest.approx(math.sqrt(fisher[i] / sizes[i]), rel=1e-5)


def test_one_forward_backward_per_batch_whatever_the_chunk_size():
    model = tiny_model("llama", n_layers=6)
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        gradient_probe(model, token_rows(8), probe_batches=4, chunk_size=2, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 4


def test_gradients_are_freed_as_they_arrive():
    """At any time during the backward pass, at most one block parameter holds a gradient."""
    model = tiny_model("llama", n_layers=4)
    params = [p for b in find_decoder_stack(model).blocks for p in b.parameters()]
    live = []
    handles = [p.register_hook(lambda g: live.append(sum(q.grad is not None for q in params)) or g) for p in params]
    try:
        gradient_probe(model, token_rows(2), probe_batches=2, chunk_size=1, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert live and max(live) <= 1


def test_padding_is_masked_out_of_the_loss():
    model = tiny_model("llama", n_layers=3)
    rows = token_rows(4, length=10, vary=True)
    unpadded = [gradient_probe(model, [row], probe_batches=1, progress=False) for row in rows]
    for row, alone in zip(rows, unpadded):
        padded = dict(pad_collate([row], 0))
        width = 14
        for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", 0)):
            padded[key] = F.pad(padded[key], (0, width - padded[key].shape[1]), value=fill)
        # labels say 0 on the padding: the attention mask must still keep it out of the loss
        scores = gradient_probe(model, [{k: v[0] for k, v in padded.items()}], probe_batches=1, progress=False)
        assert [scores[i] for i in range(3)] == pytest.approx([alone[i] for i in range(3)], rel=1e-5)


def test_batched_padding_gives_finite_scores_over_real_tokens():
    model = tiny_model("gpt2", n_layers=2)
    scores = gradient_probe(model, token_rows(8, vary=True), probe_batches=2, batch_size=4, progress=False)
    assert all(math.isfinite(v) and v > 0 for v in scores.values())
    assert scores.meta["tokens"] == sum(12 - (i % 4) - 1 for i in range(8))


def test_sft_labels_are_honoured():
    model = tiny_model("llama", n_layers=2)
    ids = token_rows(1, length=12)[0]["input_ids"]
    full = gradient_probe(model, [{"input_ids": ids}], probe_batches=1, progress=False)
    masked = gradient_probe(
        model, [{"input_ids": ids, "labels": [-100] * 6 + ids[6:]}], probe_batches=1, progress=False
    )
    assert masked.meta["tokens"] == 6
    assert masked[0] != pytest.approx(full[0])


@pytest.mark.parametrize("kind", ["list", "dataset", "torch_format", "iterable", "dataloader"])
def test_accepts_every_dataset_kind(kind):
    model = tiny_model("llama", n_layers=2)
    rows = token_rows(6)
    if kind == "dataset":
        data = Dataset.from_list(rows)
    elif kind == "torch_format":
        data = Dataset.from_list(rows).with_format("torch")
    elif kind == "iterable":
        data = IterableDataset.from_generator(lambda: iter(rows))
    elif kind == "dataloader":
        data = torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=lambda b: pad_collate(b, 0))
    else:
        data = rows
    scores = gradient_probe(model, data, probe_batches=2, progress=False)
    assert len(scores) == 2 and all(v > 0 for v in scores.values())
    if kind in ("dataset", "torch_format"):
        assert dict(scores) == pytest.approx(dict(gradient_probe(model, rows, probe_batches=2, progress=False)))


def snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "post_acc_hooks": {
            n: len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for n, p in model.named_parameters()
        },
    }


def assert_same_state(before, after):
    assert before["requires_grad"] == after["requires_grad"]
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    assert before["post_acc_hooks"] == after["post_acc_hooks"]
    for name, p in before["params"].items():
        assert torch.equal(p, after["params"][name]), name
    for name, g in before["grads"].items():
        other = after["grads"][name]
        assert (g is None and other is None) or torch.equal(g, other), name


def _user_state(model):
    model.train()
    model.model.layers[0].eval()
    for n, p in model.named_parameters():
        p.requires_grad_("embed" in n or "layers.1." in n)
    model.model.embed_tokens.weight.grad = torch.ones_like(model.model.embed_tokens.weight)
    model.model.layers[1].mlp.up_proj.weight.grad = torch.full_like(model.model.layers[1].mlp.up_proj.weight, 2.0)


def test_model_is_left_exactly_as_found():
    model = tiny_model("llama", n_layers=3)
    _user_state(model)
    before = snapshot(model)
    gradient_probe(model, token_rows(4), probe_batches=2, progress=False)
    assert_same_state(before, snapshot(model))


def test_model_is_left_exactly_as_found_when_the_probe_fails_half_way():
    model = tiny_model("llama", n_layers=3)
    _user_state(model)
    calls = []

    def fail_on_second_batch(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")

    handle = model.model.layers[2].register_forward_hook(fail_on_second_batch)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="device lost"):
        gradient_probe(model, token_rows(4), probe_batches=3, progress=False)
    assert_same_state(before, snapshot(model))
    handle.remove()


def test_token_ids_outside_the_vocabulary():
    rows = [{"input_ids": [1, 2, VOCAB + 50, 4]}]
    with pytest.raises(ValueError, match=rf"token ids outside the model's vocabulary \[0, {VOCAB}\)"):
        gradient_probe(tiny_model("llama", n_layers=2), rows, progress=False)


def test_peft_model_probes_base_weights_and_keeps_adapters():
    model = tiny_model("llama", n_layers=3)
    rows = token_rows(4)
    plain = gradient_probe(model, rows, probe_batches=2, progress=False)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = snapshot(peft_model)
    wrapped = gradient_probe(peft_model, rows, probe_batches=2, progress=False)
    assert dict(wrapped) == pytest.approx(dict(plain), rel=1e-5)
    assert_same_state(before, snapshot(peft_model))


def test_bf16_model_gives_finite_float32_scores():
    model = tiny_model("llama", n_layers=2, dtype=torch.bfloat16)
    scores = gradient_probe(model, token_rows(2), probe_batches=2, progress=False)
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in scores.values())


def test_non_finite_values_raise_naming_the_problem():
    model = tiny_model("llama", n_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        gradient_probe(model, token_rows(2), probe_batches=1, progress=False)


def test_fewer_rows_than_batches_uses_what_exists(caplog):
    model = tiny_model("llama", n_layers=2)
    scores = gradient_probe(model, token_rows(2), probe_batches=5, progress=False)
    assert scores.meta["probe_batches"] == 2
    assert "fewer than probe_batches=5" in caplog.text


def test_same_seed_same_scores_other_seed_other_batches():
    model = tiny_model("llama", n_layers=3)
    rows = token_rows(16)
    a = gradient_probe(model, rows, probe_batches=3, seed=1, progress=False)
    b = gradient_probe(model, rows, probe_batches=3, seed=1, progress=False)
    c = gradient_probe(model, rows, probe_batches=3, seed=2, progress=False)
    assert dict(a) == dict(b)
    assert dict(a) != dict(c)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_layers": 5}, ValueError, r"num_layers=5 does not match the model: model.layers holds 2 blocks"),
        ({"num_layers": "2"}, TypeError, r"num_layers must be a positive integer, got '2'"),
        ({"probe_batches": 0}, ValueError, r"probe_batches must be a positive integer, got 0"),
        ({"chunk_size": -1}, ValueError, r"chunk_size must be a positive integer, got -1"),
        ({"batch_size": 1.5}, TypeError, r"batch_size must be a positive integer, got 1.5"),
        ({"metric": "l1"}, ValueError, r"metric must be one of .*got 'l1'"),
        ({"seed": None}, TypeError, r"seed must be an integer, got None"),
        ({"compute_dtype": "bf16"}, TypeError, r"compute_dtype must be a torch.dtype or None, got 'bf16'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        gradient_probe(tiny_model("llama", n_layers=2), token_rows(2), progress=False, **kwargs)


@pytest.mark.parametrize(
    "data, error, match",
    [
        ([], ValueError, "dataset is empty"),
        (Dataset.from_list([{"text": "a"}]), ValueError, r"dataset row 0 has no 'input_ids' \(got \['text'\]\)"),
        ("some text", TypeError, "dataset must be a tokenized dataset"),
        ([{"input_ids": [5]}], ValueError, "no tokens to predict"),
    ],
)
def test_bad_datasets(data, error, match):
    with pytest.raises(error, match=match):
        gradient_probe(tiny_model("llama", n_layers=2), data, progress=False)


def test_model_without_a_stack():
    with pytest.raises(ValueError, match="no decoder-block stack found in Linear"):
        gradient_probe(torch.nn.Linear(3, 3), token_rows(1), progress=False)


def test_scores_json_round_trip(tmp_path):
    scores = gradient_probe(tiny_model("llama", n_layers=3), token_rows(2), probe_batches=2, progress=False)
    path = tmp_path / "scores.json"
    scores.to_json(path)
    loaded = LayerScores.from_json(path)
    assert dict(loaded) == dict(scores) and loaded.meta == scores.meta
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "is not valid JSON"),
        ('{"scores": {}}', "holds no layer scores"),
        ('{"scores": {"a": 1.0}}', "layer key 'a' is not an integer"),
        ('{"scores": {"0": NaN}}', "score of layer 0 is nan, not a finite number"),
        ('{"scores": {"0": "1"}}', "score of layer 0 is '1', not a finite number"),
    ],
)
def test_corrupted_scores_json(tmp_path, text, match):
    path = tmp_path / "scores.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        LayerScores.from_json(path)
    with pytest.raises(ValueError, match="cannot read scores file"):
        LayerScores.from_json(tmp_path / "missing.json")
