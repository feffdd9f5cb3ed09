"""Interrupted runs: atomic output files, and `aletheia-lora train --resume` after SIGINT or SIGKILL.

The resume tests run the real command in a subprocess on the tiny checkpoint, stop it right after a checkpoint
is written (a patched ``Trainer._save_checkpoint`` marks the moment and waits to be killed), resume it, and
compare the final adapter to that of an uninterrupted run. The HF Trainer's checkpoint restores the adapter
weights, the AdamW moments, the scheduler, the RNG states and the position in the data order, so the resumed
run repeats the uninterrupted one: on CPU the adapters agree within ``ADAPTER_ATOL`` (docs/ERRORS.md).
"""

from __future__ import annotations

import ast
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from aletheia_lora import files
from aletheia_lora.files import atomic_dir, atomic_path, last_complete_checkpoint, write_json, write_text
from aletheia_lora.models import CONVERSION_MARKER, write_dir_atomically
from tiny_models import tiny_model

SRC = Path(__file__).resolve().parents[1] / "src" / "aletheia_lora"
# Resumed and uninterrupted adapters, per element. Measured here: bitwise equal on CPU; the margin is for BLAS
# builds whose kernels pick another reduction order for the resumed process's first step.
ADAPTER_ATOL = 1e-6


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- atomic writes --------------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """Stands for Ctrl-C or a crash in the middle of a write."""


def test_an_interrupted_write_leaves_the_old_file_whole_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "scores.json"
    write_json(target, {"scores": {"0": 1.0}})
    real_open = open

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])  # half of the new content reaches the disk, then the crash
            self.f.flush()
            raise Interrupted

    def half_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return HalfWriter(f) if "w" in mode else f

    monkeypatch.setattr("builtins.open", half_open)
    with pytest.raises(Interrupted):
        write_json(target, {"scores": {"0": 2.0, "1": 3.0}})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"scores": {"0": 1.0}}
    assert _names(tmp_path) == ["scores.json"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_failing_disk_names_the_file_not_its_temporary(tmp_path, monkeypatch, code):
    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("os.fsync", fail)
    with pytest.raises(OSError) as info:
        write_text(tmp_path / "metrics.json", "{}")
    assert info.value.errno == code and info.value.filename == str(tmp_path / "metrics.json")
    assert _names(tmp_path) == []


def test_new_files_get_ordinary_permissions_and_replaced_files_keep_theirs(tmp_path):
    fresh = write_text(tmp_path / "a.json", "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600
    kept = tmp_path / "b.json"
    kept.write_text("old")
    kept.chmod(0o640)
    write_text(kept, "new")
    assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_text() == "new"


def test_atomic_path_keeps_the_suffix_and_renames_only_on_success(tmp_path):
    target = tmp_path / "plot.png"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(Interrupted), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise Interrupted
    assert target.read_bytes() == b"new" and _names(tmp_path) == ["plot.png"]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"v1")
        (tmp / "adapter_config.json").write_text("{}")
    assert _names(target) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(Interrupted), atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"v2-trunc")
        raise Interrupted
    assert (target / "adapter_model.safetensors").read_bytes() == b"v1" and _names(tmp_path) == ["adapter"]
    # the final rename fails: the old folder is put back
    real_replace = os.replace

    def refuse_new_folder(src, dst):
        if ".tmp-" in str(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr("os.replace", refuse_new_folder)
    with pytest.raises(OSError, match="Invalid cross-device link"), atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"v3")
    monkeypatch.undo()
    assert (target / "adapter_model.safetensors").read_bytes() == b"v1" and _names(tmp_path) == ["adapter"]
    with atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"v4")
    assert _names(target) == ["adapter_model.safetensors"] and _names(tmp_path) == ["adapter"]


def test_an_interrupted_checkpoint_conversion_leaves_nothing(tmp_path):
    def write(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise Interrupted

    with pytest.raises(Interrupted):
        write_dir_atomically(tmp_path / "cache", write, marker=CONVERSION_MARKER)
    assert _names(tmp_path) == []


def _half_savefig(fig, path, *args, **kwargs):
    Path(path).write_bytes(b"\x89PNG half")
    raise Interrupted


def test_an_interrupted_plot_leaves_the_old_png_and_no_temporary_file(tmp_path, monkeypatch):
    from aletheia_lora.plots import plot_layer_scores

    target = plot_layer_scores({0: 1.0, 1: 2.0}, [1], tmp_path / "layer_scores.png")
    old = target.read_bytes()
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", _half_savefig)
    with pytest.raises(Interrupted):
        plot_layer_scores({0: 2.0, 1: 1.0}, [0], target)
    assert target.read_bytes() == old
    assert _names(tmp_path) == ["layer_scores.png"]


def test_an_interrupted_adapter_save_leaves_the_old_adapter_and_no_temporary_folder(tmp_path, monkeypatch):
    from aletheia_lora.train import _atomic_save_adapter

    model = get_peft_model(tiny_model("llama", n_layers=2), LoraConfig(r=2, target_modules=["q_proj"]))
    target = tmp_path / "adapter"
    _atomic_save_adapter(model, target)
    old = (target / "adapter_model.safetensors").read_bytes()

    def half_save(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
        raise Interrupted

    monkeypatch.setattr(type(model), "save_pretrained", half_save)
    with pytest.raises(Interrupted):
        _atomic_save_adapter(model, target)
    assert (target / "adapter_model.safetensors").read_bytes() == old
    assert _names(tmp_path) == ["adapter"]


# Every place in the package that writes a file, and why it cannot leave a truncated output behind. A new write
# site fails this test until it goes through aletheia_lora.files (write_text, write_json, atomic_path, atomic_dir)
# or is added here with its reason.
REVIEWED_WRITES = {
    ("files.py", "write_text"): "the atomic writer itself (temporary file, fsync, rename)",
    (
        "models/bundled.py",
        "write",
    ): "fills write_dir_atomically's temporary folder, renamed whole once the marker is in",
    ("merge.py", "_fill_checkpoint"): "save_pretrained into atomic_dir's temporary folder, renamed whole",
    ("plots.py", "save_figure"): "savefig into files.atomic_path: a temporary name, then os.replace",
    ("train.py", "_fill_adapter"): "save_pretrained into atomic_dir's temporary folder (renamed whole), or into a "
    "new folder beside adapter/ when files the tool did not write appeared in it during training",
    ("cli.py", "_cmd_config"): "save_pretrained into a TemporaryDirectory, read back, then write_text",
    ("config.py", "export_config"): "save_pretrained into a TemporaryDirectory, read back; the caller writes the text",
    (
        "bench/measure.py",
        "reset_peak_rss",
    ): "writes the kernel's /proc/self/clear_refs to reset the peak RSS, not an output file",
}
_WRITERS = {"write_text", "write_bytes", "savefig", "save_pretrained", "save", "save_file", "to_csv", "to_parquet"}


def _write_sites() -> set[tuple[str, str]]:
    """(file, innermost function) of every call that writes a file: ``Path.write_text`` and the like,
    ``savefig``, ``save_pretrained``, ``torch.save``, and ``open`` in a writing mode. The package's own atomic
    ``write_text`` is called by its bare name, so it is not one of them."""
    sites = set()

    class Finder(ast.NodeVisitor):
        def __init__(self, filename: str) -> None:
            self.filename, self.stack = filename, ["<module>"]

        def visit_FunctionDef(self, node) -> None:
            self.stack.append(node.name)
            self.generic_visit(node)
            self.stack.pop()

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Call(self, node: ast.Call) -> None:
            callee = node.func
            writes = isinstance(callee, ast.Attribute) and callee.attr in _WRITERS
            if isinstance(callee, ast.Name) and callee.id == "open" and len(node.args) > 1:
                mode = node.args[1]
                writes = isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")
            if writes:
                sites.add((self.filename, self.stack[-1]))
            self.generic_visit(node)

    for path in sorted(SRC.rglob("*.py")):  # subpackages (bench/, data/) included
        Finder(path.relative_to(SRC).as_posix()).visit(ast.parse(path.read_text()))
    return sites


def test_every_write_in_the_package_is_reviewed_for_atomicity():
    unreviewed = sorted(_write_sites() - set(REVIEWED_WRITES))
    assert not unreviewed, (
        f"{unreviewed} write files without aletheia_lora.files' atomic helpers: route them through write_text, "
        "write_json, atomic_path or atomic_dir, or add them to REVIEWED_WRITES with the reason they are safe"
    )


# --- checkpoints ----------------------------------------------------------------------------------------------


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"w")
    if complete:
        (path / files.TRAINER_STATE_NAME).write_text("{}")
    return path


def test_the_last_complete_checkpoint_skips_one_cut_off_while_saving(tmp_path, caplog):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    assert last_complete_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, 2)
    ten = _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-99").write_text("a file")
    assert last_complete_checkpoint(tmp_path) == ten  # 10 > 2 numerically, 12 is incomplete
    assert "checkpoint-12: it has no trainer_state.json" in caplog.text


# --- kill and resume the real command -------------------------------------------------------------------------

# Runs the CLI with Trainer._save_checkpoint (or, with STOP_MID_SAVE, the RNG-state save inside it) patched to
# mark the moment STOP_AT_STEP is reached and then wait to be killed.
_WRAPPER = """
import os, sys, time
import transformers
stop, mark = int(os.environ["STOP_AT_STEP"]), os.environ["MARK"]
name = "_save_rng_state" if os.environ.get("STOP_MID_SAVE") else "_save_checkpoint"
real = getattr(transformers.Trainer, name)
def patched(self, *args, **kwargs):
    if name == "_save_checkpoint":
        real(self, *args, **kwargs)
    if self.state.global_step == stop:
        open(mark, "w").close()
        time.sleep(600)
    if name != "_save_checkpoint":
        real(self, *args, **kwargs)
setattr(transformers.Trainer, name, patched)
from aletheia_lora.cli import main
sys.exit(main(sys.argv[1:]))
"""
MAX_STEPS = 8


def _train_args(checkpoint: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(checkpoint), "--data", str(corpus / "target.txt"), "--general-data", "none",
        "--max-length", "16", "--layers", "2", "3", "--r", "4", "--max-steps", str(MAX_STEPS), "--batch-size", "2",
        "--save-steps", "2", "--logging-steps", "1", "--save-total-limit", "3", "--out", str(out), "-q", *extra,
    ]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC.parent), env.get("PYTHONPATH")]))
    return env


def _run(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "aletheia_lora", *args], capture_output=True, text=True, env=_env(), timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _run_and_stop(args: list[str], at_step: int, sig: int, tmp_path: Path, mid_save: bool = False) -> str:
    mark = tmp_path / f"stopped-{at_step}-{sig}"
    env = dict(_env(), STOP_AT_STEP=str(at_step), MARK=str(mark), STOP_MID_SAVE="1" if mid_save else "")
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRAPPER, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 600
        while not mark.exists():
            assert proc.poll() is None, f"the run ended before step {at_step}: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "the run never reached the checkpoint"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    expected = 130 if sig == signal.SIGINT else -sig
    assert proc.returncode == expected, err[-3000:]
    return err


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(resumed: dict, straight: dict) -> None:
    assert resumed.keys() == straight.keys() and resumed
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=ADAPTER_ATOL, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    _run(_train_args(tiny_checkpoint, tiny_corpus, out))
    return _adapter(out)


@pytest.mark.slow
def test_sigint_then_sigkill_then_resume_gives_the_uninterrupted_adapter(
    uninterrupted, tiny_checkpoint, tiny_corpus, tmp_path
):
    out = tmp_path / "run"
    args = _train_args(tiny_checkpoint, tiny_corpus, out)
    err = _run_and_stop(args, 2, signal.SIGINT, tmp_path)
    assert "continue with --resume" in err and "interrupted" in err
    assert last_complete_checkpoint(out / "checkpoints").name == "checkpoint-2"
    assert not (out / "adapter").exists()
    # resume, and kill that run hard after its next checkpoint
    _run_and_stop([*args, "--resume"], 6, signal.SIGKILL, tmp_path)
    assert last_complete_checkpoint(out / "checkpoints").name == "checkpoint-6"
    _run([*args, "--resume"])
    report = json.loads((out / "metrics.json").read_text())
    assert report["train"]["steps"] == MAX_STEPS - 6  # only the steps after the checkpoint were run again
    _assert_same_adapter(_adapter(out), uninterrupted)
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]


@pytest.mark.slow
def test_sigkill_while_saving_a_checkpoint_resumes_from_the_one_before(
    uninterrupted, tiny_checkpoint, tiny_corpus, tmp_path
):
    out = tmp_path / "run"
    args = _train_args(tiny_checkpoint, tiny_corpus, out)
    _run_and_stop(args, 4, signal.SIGKILL, tmp_path, mid_save=True)
    assert not (out / "checkpoints" / "checkpoint-4" / files.TRAINER_STATE_NAME).exists()
    assert last_complete_checkpoint(out / "checkpoints").name == "checkpoint-2"
    _run([*args, "--resume"])
    _assert_same_adapter(_adapter(out), uninterrupted)
