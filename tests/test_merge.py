"""merge_adapter: a saved LoRA adapter folded into its base model, written as a plain checkpoint (issue 17).

Train-free: the adapters are PEFT LoRA adapters on tiny checkpoints with random non-zero B weights, so the merged
model's logits differ from the base's and must equal the PeftModel's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import transformers
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors import safe_open

from aletheia_lora.merge import MERGE_MARKER, merge_adapter
from aletheia_lora.models import check_checkpoint_folder, load_model_and_tokenizer

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def save_checkpoint(folder: Path, tokenizer, arch: str = "llama", layers: int = 4, hidden: int = 32, dtype=None):
    """A tiny random checkpoint folder with the tiny tokenizer."""
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4)
    else:
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_adapter(base: Path, folder: Path, arch: str = "llama", seed: int = 1, **lora):
    """A LoRA adapter on ``base`` with random non-zero B weights (a fresh LoRA is the identity), and the PeftModel."""
    model, _ = load_model_and_tokenizer(str(base))
    settings = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[arch], **lora}
    peft_model = get_peft_model(model, LoraConfig(**settings))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(folder)
    return folder, peft_model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def ids():
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def adapter(tiny_checkpoint, tmp_path):
    return save_adapter(tiny_checkpoint, tmp_path / "adapter")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_merged_checkpoint_gives_the_adapted_models_logits(arch, tmp_path, tiny_tokenizer, ids):
    base = save_checkpoint(tmp_path / "base", tiny_tokenizer, arch)
    folder, peft_model = save_adapter(base, tmp_path / "adapter", arch, fan_in_fan_out=arch == "gpt2")  # Conv1D
    expected = logits(peft_model, ids)

    out = merge_adapter(folder, tmp_path / "merged")  # the base named by adapter_config.json

    assert out == tmp_path / "merged" and names(tmp_path) == ["adapter", "base", "merged"]  # no temporary folder
    assert "adapter_config.json" not in names(out) and "model.safetensors" in names(out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert not [key for key in handle.keys() if "lora" in key]
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no PEFT
    assert merged.dtype == torch.float32
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=0)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(base)
    assert (logits(base_model, ids) - expected).abs().max() > 1e-2  # the adapter does change the model
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("def f(): pass")["input_ids"] == tiny_tokenizer("def f(): pass")["input_ids"]
    check_checkpoint_folder(out)
    marker = json.loads((out / MERGE_MARKER).read_text())
    assert marker["adapter"] == str(folder) and marker["base_model"] == str(base) and marker["dtype"] == "float32"
    assert marker["files"] == [name for name in names(out) if name != MERGE_MARKER]


def test_base_model_given_wins_over_the_adapters_config(adapter, tiny_checkpoint, tmp_path, ids):
    folder, peft_model = adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        merge_adapter(folder, tmp_path / "merged")
    message = str(info.value)
    assert message.startswith("cannot load the adapter's base model ") and "moved-away" in message
    assert "base_model_name_or_path in " in message and "--base-model" in message
    assert not (tmp_path / "merged").exists()

    out = merge_adapter(folder, tmp_path / "merged", base_model=tiny_checkpoint)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged, ids), logits(peft_model, ids), atol=1e-5, rtol=0)


def test_an_adapter_without_a_base_model_needs_one(adapter, tmp_path):
    folder, _ = adapter
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"names no base model \(base_model_name_or_path\); give base_model"):
        merge_adapter(folder, tmp_path / "merged")


def test_the_bundled_models_cache_is_named_by_its_alias(monkeypatch, tmp_path):
    from aletheia_lora import merge

    monkeypatch.setenv("ALETHEIA_LORA_CACHE", str(tmp_path))
    settings = {"base_model_name_or_path": str(tmp_path / "smollm2-135m-instruct")}
    assert merge._base_model(tmp_path, settings, None) == ("smollm2-135m", True)
    assert merge._base_model(tmp_path, settings, " other ") == ("other", False)


def test_dtype_explicit_or_the_bases_own(tmp_path, tiny_tokenizer, ids):
    base = save_checkpoint(tmp_path / "base", tiny_tokenizer)
    folder, peft_model = save_adapter(base, tmp_path / "adapter")
    out = merge_adapter(folder, tmp_path / "bf16", dtype="bfloat16")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert merged.dtype == torch.bfloat16 and json.loads((out / MERGE_MARKER).read_text())["dtype"] == "bfloat16"
    assert (logits(merged, ids) - logits(peft_model, ids)).abs().max() < 0.1
    assert merge_adapter(folder, tmp_path / "auto", dtype="auto")  # auto: float32, as on the CPU
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "float32"

    half_base = save_checkpoint(tmp_path / "half-base", tiny_tokenizer, dtype=torch.float16)
    folder, _ = save_adapter(half_base, tmp_path / "half-adapter")
    out = merge_adapter(folder, tmp_path / "half")  # no dtype: the base checkpoint's own
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.float16


def test_an_existing_output_folder(adapter, tmp_path, ids):
    folder, peft_model = adapter
    out = tmp_path / "merged"
    out.mkdir()
    merge_adapter(folder, out)  # an empty folder is taken
    with pytest.raises(FileExistsError, match=r"exists and is not empty; pass overwrite=True \(--overwrite\)"):
        merge_adapter(folder, out)
    before = (out / "model.safetensors").stat().st_mtime_ns
    merge_adapter(folder, out, overwrite=True)  # a merge's own folder: replaced whole
    assert (out / "model.safetensors").stat().st_mtime_ns != before
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files merge_adapter did not write \(notes\.txt\)"):
        merge_adapter(folder, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=r"did not write \(README\.md, adapter_config\.json, "):
        merge_adapter(folder, folder, overwrite=True)  # never over the adapter itself
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match=r"out '.*file' is a file, not a folder"):
        merge_adapter(folder, file)


def test_a_failed_write_leaves_the_old_output_and_no_temporary_folder(adapter, tmp_path, monkeypatch):
    folder, _ = adapter
    out = merge_adapter(folder, tmp_path / "merged")
    old = (out / "model.safetensors").read_bytes()

    def half_save(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "tokenizer.json").write_text("half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", half_save)
    with pytest.raises(OSError, match="No space left on device"):
        merge_adapter(folder, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == old and "half" not in (out / "tokenizer.json").read_text()
    with pytest.raises(OSError):
        merge_adapter(folder, tmp_path / "new")
    assert names(tmp_path) == ["adapter", "merged"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "nope", r"^adapter folder not found: .*nope$"),
        (lambda tmp: (tmp / "f").write_text("x") and tmp / "f", r"^adapter .*/f is a file; give the adapter's folder"),
        (
            lambda tmp: tmp / "empty",
            r"^adapter folder .*empty has no adapter_config\.json, so it is not a PEFT adapter$",
        ),
        ("", r"^adapter must be the folder of a saved LoRA adapter, got ''"),
        (None, r"^adapter must be the folder of a saved LoRA adapter, got None"),
    ],
    ids=["missing", "file", "empty", "blank", "none"],
)
def test_a_bad_adapter_path(make, message, tmp_path):
    (tmp_path / "empty").mkdir()
    adapter = make(tmp_path) if callable(make) else make
    with pytest.raises(ValueError, match=message):
        merge_adapter(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_run_folder_or_a_model_is_not_an_adapter(adapter, tiny_checkpoint, tmp_path):
    folder, _ = adapter
    run = tmp_path / "run"
    run.mkdir()
    folder.rename(run / "adapter")
    with pytest.raises(ValueError, match=r"a run's adapter is in its adapter/ folder: .*run/adapter$"):
        merge_adapter(run, tmp_path / "merged")
    with pytest.raises(ValueError, match=r"it holds a full model \(config\.json\), which has nothing to merge"):
        merge_adapter(tiny_checkpoint, tmp_path / "merged")


def test_a_damaged_or_weightless_adapter(adapter, tmp_path):
    folder, _ = adapter
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has adapter_config\.json but no weights \(adapter_model\.safetensors or"):
        merge_adapter(folder, tmp_path / "merged")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        merge_adapter(folder, tmp_path / "merged")


def test_only_lora_adapters_are_merged(tiny_checkpoint, tmp_path):
    model, _ = load_model_and_tokenizer(str(tiny_checkpoint))
    ia3 = get_peft_model(model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(
        ValueError, match=r"is a 'IA3' adapter \(adapter_config\.json: peft_type\); .*LoRA adapters only"
    ):
        merge_adapter(tmp_path / "ia3", tmp_path / "merged")


@pytest.mark.parametrize(
    ("arch", "layers", "hidden", "message"),
    [
        ("gpt2", 4, 32, r"Target modules .* not found in the base model"),
        ("llama", 4, 64, r"size mismatch for .*lora_A"),
        ("llama", 2, 32, r"12 of the adapter's tensors have no module to go to in it .*deeper or different model"),
    ],
    ids=["other-architecture", "other-width", "shallower"],
)
def test_a_base_that_does_not_fit_the_adapter(adapter, arch, layers, hidden, message, tmp_path, tiny_tokenizer):
    folder, _ = adapter
    other = save_checkpoint(tmp_path / "other", tiny_tokenizer, arch, layers=layers, hidden=hidden)
    with pytest.raises(ValueError, match=rf"^the base model '.*other' does not match the adapter in .*: {message}"):
        merge_adapter(folder, tmp_path / "merged", base_model=other)
    assert not (tmp_path / "merged").exists()


def test_a_deeper_base_than_the_adapters(tmp_path, tiny_tokenizer, tiny_checkpoint):
    shallow = save_checkpoint(tmp_path / "shallow", tiny_tokenizer, layers=2)
    folder, _ = save_adapter(shallow, tmp_path / "adapter")
    with pytest.raises(
        ValueError, match=r"adapted module tensors of the base get no weights .*shallower or different"
    ):
        merge_adapter(folder, tmp_path / "merged", base_model=tiny_checkpoint)


def test_a_broken_adapter_is_not_merged(adapter, tmp_path):
    folder, _ = adapter
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"^merging the adapter in .* failed: .*NaN"):
        merge_adapter(folder, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"overwrite": "yes"}, TypeError, "overwrite must be True or False, got 'yes'"),
        ({"trust_remote_code": 1}, TypeError, "trust_remote_code must be True or False, got 1"),
        ({"dtype": "fp8"}, ValueError, "dtype must be one of float32, bfloat16, float16, auto or a torch.dtype"),
        ({"base_model": ""}, ValueError, "base_model must be a model name, a folder or a Hub id, got ''"),
    ],
)
def test_bad_arguments_are_named_before_anything_is_loaded(kwargs, error, message, adapter, tmp_path, monkeypatch):
    from aletheia_lora import merge

    def never(*args, **kwargs):
        raise AssertionError("loaded a model before checking the arguments")

    monkeypatch.setattr(merge, "load_model_and_tokenizer", never)
    folder, _ = adapter
    with pytest.raises(error, match=f"^{re.escape(message)}"):
        merge_adapter(folder, tmp_path / "merged", **kwargs)


def test_a_tokenizer_saved_with_the_adapter_is_the_one_kept(adapter, tiny_tokenizer, tmp_path):
    """A Trainer checkpoint holds the tokenizer it trained with; the merged checkpoint carries that one."""
    folder, _ = adapter
    tiny_tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tiny_tokenizer.save_pretrained(folder)
    out = merge_adapter(folder, tmp_path / "merged")
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == tiny_tokenizer.chat_template


@pytest.mark.slow
def test_an_adapter_on_the_bundled_model_merges_by_its_alias(tmp_path, ids):
    """The adapter of a run on the bundled model names its cache folder as base; the merge finds it by its alias."""
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[28]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = logits(peft_model.eval(), ids)
    out = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert json.loads((out / MERGE_MARKER).read_text())["base_model"] == "smollm2-135m"
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(merged) is transformers.LlamaForCausalLM and merged.dtype == torch.float32
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-4, rtol=0)
    assert len(transformers.AutoTokenizer.from_pretrained(out)) == len(tokenizer)
