"""Prefix caching (``aletheia_lora.prefix_cache``): exact against the full forward on every family, leaves the
model as it was, refuses what it cannot serve exactly, stores and reuses its states safely."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from peft import get_peft_model

from aletheia_lora import apply_aletheia_lora
from aletheia_lora.data import pad_collate
from aletheia_lora.layers import find_decoder_stack
from aletheia_lora.prefix_cache import (
    ROW_IDS,
    PrefixCache,
    _run_prefix,
    dropout_modules,
    estimate_bytes,
    lowest_trainable_block,
    row_checksum,
)
from tiny_models import ARCHITECTURES, tiny_model, token_rows

HIDDEN = 32  # the tiny models' hidden size
BATCH = (5, 0, 3)  # rows of lengths 11, 12, 9: a padded batch, not in cache order
_DROPOUT_FLOATS = ("dropout", "attention_dropout", "activation_dropout", "layerdrop")


def _no_dropout(model: torch.nn.Module) -> None:
    """Switch off every dropout: config floats, nn.Dropout modules and OPT-style float attributes on modules."""
    for key, value in model.config.to_dict().items():
        if "drop" in key and isinstance(value, float):
            setattr(model.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in _DROPOUT_FLOATS:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def _lora_model(arch: str = "llama", layers=(2, 3), *, dropout: bool = False, seed: int = 0, **config):
    """A 4-block tiny model with LoRA on ``layers``; lora_B random so that every LoRA weight gets a gradient."""
    model = tiny_model(arch, n_layers=4, seed=seed)
    if not dropout:
        _no_dropout(model)
    for key, value in config.items():
        setattr(model.config, key, value)
    peft_model = get_peft_model(
        model, apply_aletheia_lora(model=model, selected_layers=list(layers), r=4, lora_alpha=8)
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return peft_model


def _rows(n: int = 6, seed: int = 0) -> list[dict]:
    return token_rows(n, 12, seed=seed, vary=True)


def _batch(cache: PrefixCache, rows, which=BATCH) -> dict:
    dataset = cache.indexed(rows)
    return cache.collator(partial(pad_collate, pad_token_id=0))([dataset[i] for i in which])


def _plain(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != ROW_IDS}


def _forward_backward(model, batch: dict):
    """Loss, logits and the LoRA gradients (by name) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


def _hooks(model: torch.nn.Module) -> dict:
    """Every module's hooks and instance ``forward``, to compare before and after attach()."""
    return {
        name: (
            dict(m._forward_hooks),
            dict(m._forward_pre_hooks),
            dict(m._forward_hooks_with_kwargs),
            dict(m._forward_pre_hooks_with_kwargs),
            set(m._forward_hooks_always_called),
            "forward" in vars(m),
        )
        for name, m in model.named_modules()
    }


# --- exactness on every family --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_forward_equals_the_full_forward(arch):
    model = _lora_model(arch)
    rows = _rows()
    cache = PrefixCache.build(model, rows, pad_token_id=0, batch_size=4)
    assert cache.block == 2 and cache.hits == 0 and not cache.reused and cache.folder is None
    batch = _batch(cache, rows)
    assert batch[ROW_IDS].tolist() == list(BATCH)
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # rows of different lengths: the batch is padded
    for hits, train in enumerate((True, False), start=1):
        model.train(train)
        loss, logits, grads = _forward_backward(model, _plain(batch))
        with cache.attach(model):
            c_loss, c_logits, c_grads = _forward_backward(model, batch)
            assert cache.hits == hits
            # without row ids the whole model runs, and it is no hit
            f_loss, f_logits, _ = _forward_backward(model, _plain(batch))
            assert cache.hits == hits
        torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c_logits[mask], logits[mask], rtol=1e-5, atol=1e-5)
        assert c_grads.keys() == grads.keys() and grads and all("lora_" in n for n in grads)
        for name, grad in grads.items():
            assert grad.abs().sum() > 0, name  # the comparison means something
            torch.testing.assert_close(c_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(f_loss, loss, rtol=0, atol=0)
        torch.testing.assert_close(f_logits, logits, rtol=0, atol=0)


def test_cached_forward_equals_the_full_forward_with_gradient_checkpointing():
    model = tiny_model("llama", n_layers=4)
    kwargs = {"use_reentrant": False}  # as prepare_lora_model sets it up
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    peft_model = get_peft_model(model, apply_aletheia_lora(model=model, selected_layers=[2, 3], r=4))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    rows = _rows()
    cache = PrefixCache.build(peft_model, rows)
    batch = _batch(cache, rows)
    peft_model.train()
    loss, _, grads = _forward_backward(peft_model, _plain(batch))
    with cache.attach(peft_model):
        c_loss, _, c_grads = _forward_backward(peft_model, batch)
    assert cache.hits == 1  # the recomputation of block 2 in the backward is no second hit
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(c_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_build_stops_at_the_cached_block_and_keeps_the_mode():
    model = _lora_model()
    model.eval()
    calls = []
    handle = find_decoder_stack(model).blocks[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        cache = PrefixCache.build(model, _rows(), batch_size=4)
    finally:
        handle.remove()
    assert calls == []  # block 2 and above never run while building
    assert not model.training
    assert cache.lengths == [12, 11, 10, 9, 12, 11]
    assert cache.offsets == [0, 12, 23, 33, 42, 54]
    assert cache.checksums == [row_checksum(torch.tensor(r["input_ids"])) for r in _rows()]
    assert cache.states.shape == (sum(cache.lengths), HIDDEN)


# --- attach() leaves the model as it was --------------------------------------------------------------------


def _raise_in_block(module, args, kwargs):
    raise RuntimeError("boom in block 3")


def test_attach_leaves_the_model_as_it_was():
    model = _lora_model()
    model.train()
    rows = _rows()
    cache = PrefixCache.build(model, rows)
    stack = find_decoder_stack(model)
    before, keys = _hooks(model), list(model.state_dict())
    assert not any(any(state[:5]) or state[5] for state in (before[""], *(_hooks(b)[""] for b in stack.blocks)))
    batch = _batch(cache, rows)
    loss, logits, _ = _forward_backward(model, _plain(batch))

    def check_restored():
        assert _hooks(model) == before
        assert all("forward" not in vars(block) for block in stack.blocks)
        assert list(model.state_dict()) == keys
        assert cache._batch_rows is None
        torch.testing.assert_close(_forward_backward(model, _plain(batch))[1], logits, rtol=0, atol=0)

    with cache.attach(model):
        assert "forward" in vars(stack.blocks[0]) and "forward" in vars(stack.blocks[1])
        assert "forward" not in vars(stack.blocks[2])
        assert list(model.state_dict()) == keys
        _forward_backward(model, batch)
    check_restored()

    bad = dict(batch, **{ROW_IDS: torch.tensor([99, 0, 3])})
    with pytest.raises(ValueError, match="row id 99"), cache.attach(model):
        model(**bad)
    check_restored()

    handle = stack.blocks[3].register_forward_pre_hook(_raise_in_block, with_kwargs=True)
    try:
        with cache.attach(model):
            with pytest.raises(RuntimeError, match="boom in block 3"):
                model(**batch)
            assert cache._batch_rows is None  # a failed forward does not leak its rows into the next one
    finally:
        handle.remove()
    check_restored()

    with pytest.raises(KeyError, match="raised in the with block"), cache.attach(model):
        raise KeyError("raised in the with block")
    check_restored()
    assert loss.isfinite()


def test_a_failed_cached_forward_leaves_the_next_plain_forward_whole():
    model = _lora_model()
    rows = _rows()
    cache = PrefixCache.build(model, rows)
    batch = _batch(cache, rows)
    _, logits, _ = _forward_backward(model, _plain(batch))
    stack = find_decoder_stack(model)
    with cache.attach(model):
        handle = stack.blocks[3].register_forward_pre_hook(_raise_in_block, with_kwargs=True)
        with pytest.raises(RuntimeError):
            model(**batch)
        handle.remove()
        torch.testing.assert_close(_forward_backward(model, _plain(batch))[1], logits, rtol=0, atol=0)
    assert cache.hits == 1  # block 2 got the cached states before block 3 failed


# --- refusals ----------------------------------------------------------------------------------------------


def test_refuses_the_lowest_adapted_block_0():
    with pytest.raises(ValueError, match="the lowest adapted block is 0, so there is no frozen prefix to skip"):
        PrefixCache.build(_lora_model(layers=(0, 3)), _rows())


def test_refuses_a_model_without_trainable_block():
    model = _lora_model()
    model.requires_grad_(False)
    assert lowest_trainable_block(model) is None
    with pytest.raises(ValueError, match="the model has no trainable parameter in its decoder blocks"):
        PrefixCache.build(model, _rows())


def test_refuses_a_trainable_embedding_below_the_cached_block():
    model = _lora_model()
    model.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"embed_tokens\.weight is trainable but lies outside the adapted blocks 2"):
        PrefixCache.build(model, _rows())


def test_refuses_the_router_auxiliary_loss():
    with pytest.raises(ValueError, match=r"router auxiliary loss is on \(config\.output_router_logits\)"):
        PrefixCache.build(_lora_model("mixtral", output_router_logits=True), _rows())


def test_refuses_a_dropout_module_below_the_cached_block():
    with pytest.raises(ValueError, match="a dropout of p=0.1 runs below block 2 in training"):
        PrefixCache.build(_lora_model("gpt2", dropout=True), _rows())


def test_dropout_modules_scans_the_blocks_below_and_given_the_model_what_lies_outside_the_stack():
    model = _lora_model("gpt2", dropout=True)
    stack = find_decoder_stack(model)
    below = dropout_modules(stack, 2)
    inside_below = {id(m) for b in stack.blocks[:2] for m in b.modules()}
    assert below and all(id(d) in inside_below for d in below)
    embedding_dropout = model.base_model.model.transformer.drop
    assert dropout_modules(stack, 2, model) == [*below, embedding_dropout]  # the blocks first, then the rest
    for module in below:
        module.p = 0.0
    assert dropout_modules(stack, 2) == [] and dropout_modules(stack, 2, model) == [embedding_dropout]
    with pytest.raises(ValueError, match="a dropout of p=0.1 runs below block 2 in training"):
        PrefixCache.build(model, _rows())


def test_the_prefix_run_says_so_when_the_block_never_runs():
    model, other = _lora_model(), _lora_model()
    with pytest.raises(RuntimeError, match="block 2 never ran: the model's forward finished without reaching it"):
        _run_prefix(model, find_decoder_stack(other), _rows(2), 0, 2)  # a stack the model's forward never enters
    rows = _rows(2)
    hidden = _run_prefix(model, find_decoder_stack(model), rows, 0, 2)
    assert hidden.shape == (*pad_collate(rows)["input_ids"].shape, HIDDEN)


def test_refuses_functional_dropout_and_keeps_the_random_state():
    model = _lora_model("opt", dropout=True)  # OPT's dropout is F.dropout on a float attribute: no module to see
    model.eval()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=r"blocks below block 2 are random in train mode \(.*dropout=0\.1"):
        PrefixCache.build(model, _rows())
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not model.training  # the check put the model back in its mode


def test_the_determinism_check_keeps_the_random_state_of_a_successful_build():
    model = _lora_model()
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    PrefixCache.build(model, _rows())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_refuses_a_cache_over_the_budget_without_a_folder():
    with pytest.raises(ValueError, match=r"the cache needs 8\.1 KiB, over --cache-budget 1e-09 GiB, and no folder"):
        PrefixCache.build(_lora_model(), _rows(), budget_gib=1e-9)


def test_refuses_an_empty_dataset():
    with pytest.raises(ValueError, match="the training dataset is empty"):
        PrefixCache.build(_lora_model(), [])


def test_refuses_a_row_changed_after_the_build():
    model = _lora_model()
    rows = _rows()
    cache = PrefixCache.build(model, rows)
    rows[0]["input_ids"][4] = rows[0]["input_ids"][4] % 90 + 1  # another token
    batch = _batch(cache, rows)
    with cache.attach(model), pytest.raises(ValueError, match="the tokens of training row 0 differ from those cached"):
        model(**batch)
    assert cache.hits == 0


def test_refuses_a_row_id_out_of_range():
    model = _lora_model()
    rows = _rows()
    cache = PrefixCache.build(model, rows)
    batch = dict(_batch(cache, rows), **{ROW_IDS: torch.tensor([5, 6, 3])})
    with cache.attach(model), pytest.raises(ValueError, match="row id 6 is not one of the 6 cached rows"):
        model(**batch)
    assert cache.hits == 0


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_refuses_hidden_states_or_attentions_with_row_ids(flag):
    model = _lora_model()
    rows = _rows()
    cache = PrefixCache.build(model, rows)
    batch = _batch(cache, rows)
    with cache.attach(model):
        with pytest.raises(ValueError, match="a forward that skips the prefix has no hidden states or attentions"):
            model(**batch, **{flag: True})
        assert len(model(**_plain(batch), output_hidden_states=True).hidden_states) == 5  # without row ids: fine


def test_refuses_a_dataset_of_another_length():
    model = _lora_model()
    cache = PrefixCache.build(model, _rows())
    with pytest.raises(ValueError, match="the dataset has 3 rows; the prefix cache was built for 6"):
        cache.indexed(_rows(3))


def test_attach_refuses_a_block_below_that_became_trainable():
    model = _lora_model()
    cache = PrefixCache.build(model, _rows())
    before = _hooks(model)
    next(find_decoder_stack(model).blocks[1].parameters()).requires_grad_(True)
    with pytest.raises(ValueError, match="a block below the cached prefix's end has become trainable"):
        with cache.attach(model):
            pass
    assert _hooks(model) == before


# --- storage ------------------------------------------------------------------------------------------------


def test_estimate_bytes():
    assert estimate_bytes([3, 5], 4, torch.float32) == 8 * 4 * 4
    assert estimate_bytes([3, 5], 4, torch.bfloat16) == 8 * 4 * 2
    assert estimate_bytes([], 4, torch.float32) == 0


def test_memory_mapped_cache_equals_the_in_memory_one(tmp_path):
    model = _lora_model()
    rows = _rows()
    folder = tmp_path / "pc"
    in_memory = PrefixCache.build(model, rows)
    mapped = PrefixCache.build(model, rows, budget_gib=0, folder=folder)
    size = estimate_bytes([12, 11, 10, 9, 12, 11], HIDDEN, torch.float32)
    assert in_memory.folder is None and in_memory.nbytes == size
    assert mapped.folder == folder and mapped.nbytes == size
    assert (folder / "states.bin").stat().st_size == size
    meta = json.loads((folder / "prefix_cache.json").read_text())
    assert meta["fingerprint"] == mapped.fingerprint == in_memory.fingerprint
    assert meta["block"] == 2 and meta["dtype"] == "float32"
    assert torch.equal(mapped.states, in_memory.states)
    batch = _batch(mapped, rows)
    model.train()
    loss, logits, grads = _forward_backward(model, _plain(batch))
    with mapped.attach(model):
        m_loss, m_logits, m_grads = _forward_backward(model, batch)
    torch.testing.assert_close(m_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(m_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    mapped.close()
    assert not folder.exists() and mapped.nbytes == 0


@pytest.mark.parametrize("arch", ["llama", "bloom"])  # bloom: blocks return tuples, probed again on reuse
def test_a_kept_cache_is_reused(tmp_path, arch):
    model = _lora_model(arch)
    rows = _rows()
    folder = tmp_path / "pc"
    first = PrefixCache.build(model, rows, budget_gib=0, folder=folder)
    states = first.states.clone()
    first.close(keep=True)
    assert (folder / "states.bin").is_file() and (folder / "prefix_cache.json").is_file()
    (folder / "marker").write_text("a file of the user's: never removed")
    again = PrefixCache.build(model, rows, budget_gib=0, folder=folder)
    assert again.reused and again.build_seconds == 0.0 and (folder / "marker").is_file()
    assert again._tuple_len == first._tuple_len
    assert torch.equal(again.states, states)
    batch = _batch(again, rows)
    model.train()
    loss, logits, _ = _forward_backward(model, _plain(batch))
    with again.attach(model):
        c_loss, c_logits, _ = _forward_backward(model, batch)
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(c_logits[mask], logits[mask], rtol=1e-5, atol=1e-5)
    again.close()
    assert sorted(p.name for p in folder.iterdir()) == ["marker"]  # the cache's files went, the user's stayed


def _perturb_embedding(model, rows):
    with torch.no_grad():
        model.get_input_embeddings().weight[rows[0]["input_ids"][0]] += 0.5
    return rows


def _change_data(model, rows):
    rows[2]["input_ids"][0] = rows[2]["input_ids"][0] % 90 + 1
    return rows


@pytest.mark.parametrize("change", [_perturb_embedding, _change_data], ids=["weights", "data"])
def test_a_kept_cache_of_other_weights_or_data_is_rebuilt(tmp_path, change):
    model = _lora_model()
    rows = _rows()
    folder = tmp_path / "pc"
    first = PrefixCache.build(model, rows, budget_gib=0, folder=folder)
    states = first.states.clone()
    first.close(keep=True)
    (folder / "marker").write_text("a file of the user's: never removed")
    rows = change(model, rows)
    again = PrefixCache.build(model, rows, budget_gib=0, folder=folder)
    assert not again.reused and (folder / "marker").read_text() == "a file of the user's: never removed"
    assert again.fingerprint != first.fingerprint
    assert json.loads((folder / "prefix_cache.json").read_text())["fingerprint"] == again.fingerprint
    assert not torch.equal(again.states, states)
    assert torch.equal(again.states, PrefixCache.build(model, rows).states)


def test_a_kept_cache_is_not_reused_for_a_prefix_that_became_random(tmp_path):
    model = _lora_model("opt")
    rows = _rows()
    folder = tmp_path / "pc"
    PrefixCache.build(model, rows, budget_gib=0, folder=folder).close(keep=True)
    model.get_base_model().config.dropout = 0.1
    for module in model.modules():
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.1
    with pytest.raises(ValueError, match=r"random in train mode \(.*dropout=0\.1"):
        PrefixCache.build(model, rows, budget_gib=0, folder=folder)


def test_close_keeps_the_folder_when_asked(tmp_path):
    model = _lora_model()
    folder = tmp_path / "pc"
    cache = PrefixCache.build(model, _rows(), budget_gib=0, folder=folder)
    cache.close(keep=True)
    assert (folder / "states.bin").is_file() and cache.nbytes == 0
    in_memory = PrefixCache.build(model, _rows(), folder=folder)  # within the budget: the folder is not its own
    assert in_memory.folder is None
    in_memory.close()
    assert (folder / "states.bin").is_file()


def test_bfloat16_storage(tmp_path):
    model = _lora_model()
    rows = _rows()
    cache = PrefixCache.build(model, rows, dtype=torch.bfloat16)
    assert cache.states.dtype == torch.bfloat16
    assert cache.nbytes == estimate_bytes(cache.lengths, HIDDEN, torch.bfloat16) == 65 * HIDDEN * 2
    batch = _batch(cache, rows)
    model.train()
    loss, _, _ = _forward_backward(model, _plain(batch))
    with cache.attach(model):
        c_loss, c_logits, _ = _forward_backward(model, batch)
    assert c_logits.dtype == torch.float32
    torch.testing.assert_close(c_loss, loss, rtol=1e-2, atol=1e-2)
    mapped = PrefixCache.build(model, rows, dtype=torch.bfloat16, budget_gib=0, folder=tmp_path / "pc")
    assert mapped.states.dtype == torch.bfloat16 and torch.equal(mapped.states, cache.states)
    assert (tmp_path / "pc" / "states.bin").stat().st_size == cache.nbytes


# --- the collator and the indexed rows --------------------------------------------------------------------


def test_indexed_rows_carry_their_index():
    rows = _rows()
    cache = PrefixCache.build(_lora_model(), rows)
    dataset = cache.indexed(rows)
    assert len(dataset) == 6
    for i in range(6):
        assert dataset[i] == {**rows[i], ROW_IDS: i}
    assert ROW_IDS not in rows[0]  # the rows themselves are left alone


def test_the_collator_passes_row_ids_on():
    rows = _rows()
    cache = PrefixCache.build(_lora_model(), rows)
    seen = []

    def collate(features):
        seen.append(features)
        return pad_collate(features, pad_token_id=0)

    with_ids = cache.collator(collate)
    batch = with_ids([cache.indexed(rows)[i] for i in (4, 1)])
    assert batch[ROW_IDS].dtype == torch.long and batch[ROW_IDS].tolist() == [4, 1]
    assert all(ROW_IDS not in f for f in seen[-1])  # the wrapped collator never sees them
    torch.testing.assert_close(_plain(batch), pad_collate([rows[4], rows[1]], pad_token_id=0))
    plain = with_ids([rows[4], rows[1]])  # eval rows: no ids, none in the batch
    assert ROW_IDS not in plain
    torch.testing.assert_close(plain, pad_collate([rows[4], rows[1]], pad_token_id=0))


# --- end to end -----------------------------------------------------------------------------------------------


def _train(model, batches, cache=None) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = model(**(batch if cache is not None else _plain(batch))).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_with_the_cache_equals_training_without():
    rows = _rows(8)
    plain_model, cached_model = _lora_model(seed=3), _lora_model(seed=3)
    cache = PrefixCache.build(cached_model, rows)
    order = [(0, 5, 2), (7, 1), (3, 4, 6), (2, 7), (5, 0, 1)]
    batches = [_batch(cache, rows, which) for which in order]
    torch.manual_seed(0)
    plain_losses = _train(plain_model, batches)
    torch.manual_seed(0)
    with cache.attach(cached_model):
        cached_losses = _train(cached_model, batches, cache)
    assert cache.hits == 5
    assert plain_losses[-1] < plain_losses[0]  # it trained
    torch.testing.assert_close(cached_losses, plain_losses, rtol=0, atol=1e-6)
    plain_state = {n: p for n, p in plain_model.named_parameters() if p.requires_grad}
    cached_state = {n: p for n, p in cached_model.named_parameters() if p.requires_grad}
    assert plain_state.keys() == cached_state.keys() and plain_state
    for name, param in plain_state.items():
        torch.testing.assert_close(cached_state[name], param, rtol=1e-5, atol=1e-6, msg=name)
