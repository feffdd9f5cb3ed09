"""The probe leaves a model exactly as it found it, and the same seed gives the same scores, bit for bit.

The state property: over tiny models of several architectures and random arguments, with some parameters
frozen, submodules in mixed train/eval modes, stale ``.grad`` tensors, user hooks of every kind, and a failure
injected into a random forward or backward pass, ``gradient_probe`` returns (or raises) with parameters and
buffers bitwise unchanged, every ``requires_grad``, training flag, ``.grad`` object and hook as before.
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aletheia_lora import find_decoder_stack, gradient_probe, select_layers
from aletheia_lora.probe import METRICS
from aletheia_lora.select import STRATEGIES
from tiny_models import tiny_model, token_rows

ARCHS = ["llama", "gpt2", "qwen2", "gpt_neox", "opt", "falcon"]
_MODULE_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


@functools.lru_cache(maxsize=len(ARCHS) * 2)
def _model(arch: str, n_layers: int):
    return tiny_model(arch, n_layers=n_layers)


def _bits(tensor: torch.Tensor) -> bytes:
    """The tensor's exact bytes: -0.0 and 0.0 differ, NaN equals itself."""
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _hooks(hook_dict) -> list[tuple[int, int]]:
    # A tensor's hook dict starts as None and stays an empty dict once a hook was added and removed: same state.
    return [(key, id(hook)) for key, hook in (hook_dict or {}).items()]


def snapshot(model: torch.nn.Module) -> dict:
    """Everything about a model that the probe may touch, by identity and by exact bytes."""
    from torch.nn.modules import module as module_globals

    params = {}
    for name, p in model.named_parameters():
        grad = p.grad
        params[name] = {
            "object": id(p),
            "bits": _bits(p),
            "dtype": p.dtype,
            "requires_grad": p.requires_grad,
            "grad": None if grad is None else (id(grad), _bits(grad)),
            "post_accumulate_grad_hooks": _hooks(getattr(p, "_post_accumulate_grad_hooks", None)),
            "tensor_hooks": _hooks(getattr(p, "_backward_hooks", None)),
        }
    return {
        "params": params,
        "buffers": {name: (id(b), _bits(b)) for name, b in model.named_buffers()},
        "training": {name: m.training for name, m in model.named_modules()},
        "module_hooks": {
            name: {attr: _hooks(getattr(m, attr, None)) for attr in _MODULE_HOOK_DICTS}
            for name, m in model.named_modules()
        },
        "global_hooks": {attr: _hooks(getattr(module_globals, attr)) for attr in _GLOBAL_HOOK_DICTS},
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_same_state(before: dict, after: dict) -> None:
    for part in before:
        if before[part] != after[part]:
            keys = before[part].keys() if isinstance(before[part], dict) else [None]
            changed = [k for k in keys if k is None or before[part][k] != after[part].get(k)]
            raise AssertionError(f"the probe changed {part}: {changed[:5]}")


class InjectedFailure(Exception):
    """Raised by a test hook half-way through the probe."""


@st.composite
def setups(draw):
    """A model in a random user state, with hooks, and the probe arguments to run on it."""
    arch = draw(st.sampled_from(ARCHS))
    n_layers = draw(st.integers(2, 3))
    model = copy.deepcopy(_model(arch, n_layers))
    params = list(model.named_parameters())
    modules = list(model.named_modules())
    blocks = list(find_decoder_stack(model).blocks)
    # Freezing: all, none, or a random pattern.
    pattern = draw(st.sampled_from(["all-frozen", "none-frozen", "random"]))
    for _, p in params:
        frozen = pattern == "all-frozen" or (pattern == "random" and draw(st.booleans()))
        p.requires_grad_(not frozen)
    model.train(draw(st.booleans()))
    for _, m in modules:
        if draw(st.integers(0, 4)) == 0:
            m.train(not m.training)
    # Stale gradients the user holds (e.g. between accumulation steps).
    for _, p in params:
        if draw(st.integers(0, 3)) == 0:
            p.grad = torch.randn_like(p)
    calls = {"forward": 0, "backward": 0}

    def count_forward(*_args, **_kwargs):
        calls["forward"] += 1

    def count_backward(*_args, **_kwargs):
        calls["backward"] += 1

    pick = draw(st.randoms(use_true_random=False))
    pick.choice(modules)[1].register_forward_hook(count_forward)
    pick.choice(modules)[1].register_forward_pre_hook(count_forward)
    pick.choice(modules)[1].register_forward_hook(count_forward, with_kwargs=True)
    pick.choice(blocks).register_full_backward_hook(count_backward)
    pick.choice(blocks).register_full_backward_pre_hook(count_backward)
    for kind in ("register_post_accumulate_grad_hook", "register_hook"):
        p = pick.choice(params)[1]
        frozen = not p.requires_grad
        p.requires_grad_(True)  # torch registers tensor hooks only then; they stay when the tensor is frozen again
        getattr(p, kind)(count_backward)
        p.requires_grad_(not frozen)

    probe_batches = draw(st.integers(1, 3))
    failure = draw(st.sampled_from(["none", "forward", "backward"]))
    if failure != "none":
        at_call = draw(st.integers(1, probe_batches))
        block = pick.choice(blocks)
        seen = []

        def fail(*_args):
            seen.append(1)
            if len(seen) == at_call:
                raise InjectedFailure(f"{failure} pass {at_call}")

        if failure == "forward":
            block.register_forward_hook(fail)
        else:
            block.register_full_backward_hook(fail)
    kwargs = {
        "probe_batches": probe_batches,
        "batch_size": draw(st.integers(1, 2)),
        "metric": draw(st.sampled_from(sorted(METRICS))),
        "seed": draw(st.integers(0, 2**31)),
        "chunk_size": draw(st.integers(1, 4)),
    }
    rows = token_rows(draw(st.integers(1, 6)), length=draw(st.integers(5, 10)), vary=draw(st.booleans()))
    return model, rows, kwargs, failure


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(setup=setups())
def test_the_probe_leaves_every_bit_of_state_as_it_found_it(setup):
    model, rows, kwargs, failure = setup
    before = snapshot(model)
    try:
        scores = gradient_probe(model, rows, progress=False, **kwargs)
    except InjectedFailure:
        assert failure != "none"
    else:
        assert len(scores) == find_decoder_stack(model).num_layers
    assert_same_state(before, snapshot(model))


# --- determinism ----------------------------------------------------------------------------------------------

PROBE = {"probe_batches": 3, "batch_size": 2, "seed": 7}


def _scores_bits(scores) -> dict:
    return {layer: float(value).hex() for layer, value in scores.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("metric", sorted(METRICS))
def test_same_seed_gives_bitwise_identical_scores_and_selections(arch, metric):
    rows = token_rows(12, length=10, vary=True)
    first = gradient_probe(tiny_model(arch, n_layers=4), rows, metric=metric, progress=False, **PROBE)
    again = gradient_probe(tiny_model(arch, n_layers=4), rows, metric=metric, progress=False, **PROBE)
    assert _scores_bits(first) == _scores_bits(again)
    assert first.meta == again.meta
    for strategy in STRATEGIES:
        assert select_layers(first, strategy=strategy) == select_layers(again, strategy=strategy)


_SUBPROCESS = """
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from tiny_models import tiny_model, token_rows
from aletheia_lora import gradient_probe
scores = gradient_probe(tiny_model("llama", n_layers=4), token_rows(12, length=10, vary=True), progress=False,
                        **{probe!r})
print(json.dumps({{str(k): float(v).hex() for k, v in scores.items()}}))
"""


def test_another_process_gets_the_same_bits():
    rows = token_rows(12, length=10, vary=True)
    here = gradient_probe(tiny_model("llama", n_layers=4), rows, progress=False, **PROBE)
    code = _SUBPROCESS.format(tests=str(Path(__file__).parent), probe=PROBE)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    there = json.loads(result.stdout.strip().splitlines()[-1])
    assert there == {str(k): v for k, v in _scores_bits(here).items()}


def test_another_seed_samples_other_rows():
    rows = token_rows(12, length=10, vary=True)
    model = tiny_model("llama", n_layers=4)
    a = gradient_probe(model, rows, progress=False, **PROBE)
    b = gradient_probe(model, rows, progress=False, **{**PROBE, "seed": 8})
    assert _scores_bits(a) != _scores_bits(b)
