"""What the tool writes, and what it must never touch: one rule for every output (aletheia_lora.files).

* Regular files only: an output that exists as a symlink, FIFO, socket or device is refused, never followed or
  replaced; a config file's ``out:`` resolves, symlinks included, inside the working folder.
* ``--overwrite`` replaces only what the manifest says this tool wrote; a foreign file where a run writes
  (``adapter/notes.tex``, ``checkpoints/checkpoint-7/``) is refused before the run starts and kept.
* A run that failed leaves nothing that blocks its corrected rerun.
* ``--resume`` is checked against the checkpoint (its files and its adapters) and the run's settings.
* Training that diverges stops with the step and a hint; no NaN adapter, checkpoint or JSON is written.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from aletheia_lora import apply_aletheia_lora
from aletheia_lora.cli import main
from aletheia_lora.config import LoraSettings
from aletheia_lora.data import DataConfig
from aletheia_lora.files import (
    MANIFEST_NAME,
    atomic_dir,
    atomic_path,
    claim_outputs,
    prepare_output_dir,
    read_manifest,
    update_manifest,
    write_json,
    write_text,
)
from aletheia_lora.models import ModelConfig
from aletheia_lora.pipeline import RunConfig, run_pipeline
from aletheia_lora.resume import rotate_checkpoints
from aletheia_lora.train import TrainConfig, TrainingDiverged, _atomic_save_adapter, check_resume, train_lora
from tiny_models import tiny_model, token_rows

PREFIX = "aletheia-lora: error: "


def train_args(checkpoint: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    """A two-step training run on the tiny checkpoint, layers 2 and 3, one checkpoint at step 2."""
    return [
        "train", "--model", str(checkpoint), "--data", str(corpus / "target.txt"), "--general-data", "none",
        "--max-length", "16", "--layers", "2", "3", "--r", "4", "--max-steps", "2", "--batch-size", "2",
        "--save-steps", "2", "--logging-steps", "1", "--learning-rate", "1e-3", "--out", str(out), "-q", *extra,
    ]  # fmt: skip


def probe_args(checkpoint: Path, corpus: Path, out: Path | str, *extra: str) -> list[str]:
    return [
        "probe", "--model", str(checkpoint), "--data", str(corpus / "target.txt"), "--max-length", "16",
        "--probe-batches", "1", "--out", str(out), "-q", *extra,
    ]  # fmt: skip


def fails(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with its error as the last stderr line, which is returned."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(PREFIX), err
    return err[-1][len(PREFIX) :]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` and its bytes (symlinks not followed)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def scores_file(path: Path, meta: dict | None = None, layers: int = 4) -> Path:
    payload = {"scores": {str(i): float(i + 1) for i in range(layers)}}
    if meta is not None:
        payload["meta"] = meta
    path.write_text(json.dumps(payload))
    return path


# --- regular files only ---------------------------------------------------------------------------------------


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _socket(path: Path) -> Path:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()
    return path


def _symlink_to_file(path: Path) -> Path:
    victim = path.parent / "victim.json"
    victim.write_text("precious")
    path.symlink_to(victim)
    return path


def _dangling_symlink(path: Path) -> Path:
    path.symlink_to(path.parent / "nowhere" / "x.json")
    return path


SPECIAL = {
    "fifo": (_fifo, "a FIFO"),
    "socket": (_socket, "a socket"),
    "symlink-to-file": (_symlink_to_file, "a symlink"),
    "dangling-symlink": (_dangling_symlink, "a symlink"),
}


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_select_out_never_replaces_or_follows_a_special_file(kind, tmp_path, capsys):
    make, words = SPECIAL[kind]
    target = make(tmp_path / "selection.json")
    before = os.lstat(target)
    message = fails(["select", "--scores", str(scores_file(tmp_path / "s.json")), "--out", str(target)], capsys)
    assert f"refusing to write {str(target)!r}: it is {words}" in message
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)  # the same thing, still there
    if kind == "symlink-to-file":
        assert (tmp_path / "victim.json").read_text() == "precious"
    assert not (tmp_path / "nowhere").exists()


def test_dev_null_is_never_replaced_even_as_root(tmp_path, capsys):
    before = os.stat("/dev/null")
    message = fails(["select", "--scores", str(scores_file(tmp_path / "s.json")), "--out", "/dev/null"], capsys)
    assert message.startswith("refusing to write '/dev/null': it is a character device")
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_rdev, after.st_mode) == (before.st_ino, before.st_rdev, before.st_mode)


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_the_writers_refuse_a_special_target_and_leave_no_temporary_file(kind, tmp_path):
    make, words = SPECIAL[kind]
    target = make(tmp_path / "out.json")
    names = sorted(p.name for p in tmp_path.iterdir())
    for write in (lambda: write_json(target, {}), lambda: write_text(target, "x")):
        with pytest.raises(ValueError, match=f"refusing to write .*out.json'.*it is {words}"):
            write()
    with pytest.raises(ValueError, match="refusing to write"), atomic_path(target):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_atomic_dir_refuses_a_symlinked_or_special_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (tmp_path / "adapter").symlink_to(elsewhere)
    _fifo(tmp_path / "pipe")
    (tmp_path / "file").write_text("a file")
    for name, words in (("adapter", "a symlink"), ("pipe", "a FIFO"), ("file", "a file, not a folder")):
        with (
            pytest.raises(ValueError, match=f"refusing to write .*{name}'.*it is {words}"),
            atomic_dir(tmp_path / name),
        ):
            pass
    assert (elsewhere / "keep.txt").read_text() == "keep" and (tmp_path / "adapter").is_symlink()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("kind", ["fifo", "socket", "symlink-to-file", "dangling-symlink", "dev-null"])
def test_out_folder_must_be_a_folder(kind, tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    if kind == "dev-null":
        out, words = Path("/dev/null"), "a character device"
    else:
        make, words = SPECIAL[kind]
        out = make(tmp_path / "out")
    message = fails(probe_args(tiny_checkpoint, tiny_corpus, out), capsys)
    assert message.startswith(f"--out {str(out)!r} is {words}") and message.endswith("not a folder")
    assert not (tmp_path / "nowhere").exists()


def test_out_named_on_the_command_line_may_be_a_symlink_to_a_real_folder(tiny_checkpoint, tiny_corpus, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert main(probe_args(tiny_checkpoint, tiny_corpus, tmp_path / "link")) == 0
    written = {p.name for p in real.iterdir()}
    assert written == {"scores.json", "selection.json", "layer_scores.png", "speed_quality.png", MANIFEST_NAME}
    assert (tmp_path / "link").is_symlink()


def test_an_output_inside_the_folder_that_is_a_symlink_is_refused(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    victim = outside / "scores.json"
    victim.write_text("theirs")
    assert main(probe_args(tiny_checkpoint, tiny_corpus, out)) == 0
    (out / "scores.json").unlink()
    (out / "scores.json").symlink_to(victim)
    message = fails(probe_args(tiny_checkpoint, tiny_corpus, out, "--overwrite"), capsys)
    assert f"refusing to write in {str(out)!r}: scores.json (a symlink" in message
    assert victim.read_text() == "theirs"


def test_an_adapter_folder_that_is_a_symlink_is_refused(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "adapter_config.json").write_text("theirs")
    (out / "adapter").symlink_to(elsewhere)
    message = fails(train_args(tiny_checkpoint, tiny_corpus, out, "--overwrite"), capsys)
    assert "adapter (a symlink" in message
    assert (elsewhere / "adapter_config.json").read_text() == "theirs"
    assert not (out / "run_config.json").exists()  # refused before anything was written


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder, and beside it (outside it) a folder ``elsewhere`` holding a file of someone else's."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (elsewhere / "victim.json").write_text("precious")
    (elsewhere / "scores.json").write_text("precious")
    (work / "link").symlink_to(elsewhere)
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("out", ["link/victim.json", "link/sub/../victim.json", "link"])
def test_a_config_file_out_through_a_symlink_cannot_leave_the_working_folder(out, workdir, tmp_path, capsys):
    (workdir / "c.json").write_text(json.dumps({"out": out}))
    scores = scores_file(workdir / "s.json")
    message = fails(["select", "--config", "c.json", "--scores", str(scores)], capsys)
    assert message.startswith(f"--config: --out {out!r} leaves the working folder")
    assert (tmp_path / "elsewhere" / "victim.json").read_text() == "precious"


def test_a_config_file_probe_out_through_a_symlink_leaves_scores_outside_alone(
    workdir, tiny_checkpoint, tiny_corpus, tmp_path, capsys
):
    (workdir / "c.yaml").write_text("out: link\noverwrite: true\n")
    argv = probe_args(tiny_checkpoint, tiny_corpus, "x")
    argv = argv[: argv.index("--out")] + ["-q", "--config", "c.yaml"]
    message = fails(argv, capsys)
    assert "--config: --out 'link' leaves the working folder; through a symlink it resolves to" in message
    assert (tmp_path / "elsewhere" / "scores.json").read_text() == "precious"


def test_a_config_file_out_through_a_symlink_that_stays_inside_is_fine(workdir, tmp_path, capsys):
    (workdir / "inside").mkdir()
    (workdir / "in-link").symlink_to(workdir / "inside")
    (workdir / "c.json").write_text(json.dumps({"out": "in-link/sel.json"}))
    assert main(["select", "--config", "c.json", "--scores", str(scores_file(workdir / "s.json"))]) == 0
    assert json.loads((workdir / "inside" / "sel.json").read_text())["selected_layers"]


# --- --overwrite replaces only this tool's files --------------------------------------------------------------


@pytest.fixture
def finished_run(tiny_checkpoint, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_checkpoint, tiny_corpus, out)) == 0
    assert read_manifest(out).complete
    return out


@pytest.mark.parametrize(
    "foreign, named",
    [
        ("adapter/notes.tex", "adapter/notes.tex"),
        ("adapter/README.md", None),  # the tool writes README.md: the manifest lists it, so it is replaced
        ("checkpoints/checkpoint-7/optimizer.pt", "checkpoints/checkpoint-7/"),
        ("checkpoints/checkpoint-2-mine/x", "checkpoints/checkpoint-2-mine/"),
        ("checkpoints/notes.txt", "checkpoints/notes.txt"),
    ],
)
def test_overwrite_refuses_to_touch_files_this_tool_did_not_write(
    foreign, named, finished_run, tiny_checkpoint, tiny_corpus, capsys
):
    path = finished_run / foreign
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("the user's own")
    before = snapshot(finished_run)
    argv = train_args(tiny_checkpoint, tiny_corpus, finished_run, "--overwrite", "--max-steps", "4")
    if named is None:
        assert main(argv) == 0 and path.read_text() != "the user's own"
        return
    message = fails(argv, capsys)
    assert f"holds files this tool did not write where this run writes its outputs: {named}" in message
    assert "never replaced or deleted" in message
    assert snapshot(finished_run) == before  # nothing changed, the manifest included


def test_overwrite_keeps_foreign_files_beside_the_outputs_and_drops_its_own_old_checkpoints(
    finished_run, tiny_checkpoint, tiny_corpus
):
    (finished_run / "notes.tex").write_text("mine")
    (finished_run / "data").mkdir()
    (finished_run / "data" / "x.txt").write_text("mine")
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == ["checkpoint-2"]
    argv = train_args(
        tiny_checkpoint, tiny_corpus, finished_run, "--overwrite", "--max-steps", "3", "--save-steps", "3"
    )
    assert main(argv) == 0
    assert (finished_run / "notes.tex").read_text() == "mine" and (
        finished_run / "data" / "x.txt"
    ).read_text() == "mine"
    # the earlier run's checkpoint-2 would have mixed with this run's: the fresh run removed it (it was the tool's)
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == ["checkpoint-3"]
    assert json.loads((finished_run / "metrics.json").read_text())["train"]["steps"] == 3


def test_a_foreign_top_level_file_at_an_output_name_is_refused(finished_run, tiny_checkpoint, tiny_corpus, capsys):
    fresh = finished_run.parent / "fresh"
    fresh.mkdir()
    (fresh / "metrics.json").write_text("my own metrics")
    message = fails(train_args(tiny_checkpoint, tiny_corpus, fresh, "--overwrite"), capsys)
    assert "where this run writes its outputs: metrics.json" in message
    assert (fresh / "metrics.json").read_text() == "my own metrics"
    assert not (fresh / "adapter").exists()


def test_rotation_deletes_only_checkpoints_the_manifest_lists(tmp_path):
    for step in (1, 2, 4, 6):
        (tmp_path / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    update_manifest(tmp_path, claim=["checkpoints/", *(f"checkpoints/checkpoint-{s}" for s in (2, 4, 6))])
    assert [p.name for p in rotate_checkpoints(tmp_path, 1)] == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-6"]
    assert read_manifest(tmp_path).entries == {"checkpoints/checkpoint-6"}
    rotate_checkpoints(tmp_path, 0)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-1"]  # not the tool's: kept


def test_a_file_appearing_in_adapter_during_training_is_kept_and_the_adapter_saved_beside(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama", n_layers=2), LoraConfig(r=2, target_modules=["q_proj"]))
    claim_outputs(tmp_path, ["adapter/"])
    _atomic_save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / "notes.tex").write_text("mine")
    with pytest.raises(ValueError, match=r"adapter/notes.tex.*the trained adapter was saved to .*adapter-saved-"):
        _atomic_save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "notes.tex").read_text() == "mine"
    (saved,) = tmp_path.glob("adapter-saved-*")
    assert (saved / "adapter_model.safetensors").is_file() and read_manifest(tmp_path).owns(saved.name)


def test_a_damaged_manifest_is_named_and_nothing_is_written(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text('{"entries": ["../../etc/passwd"], "folders": [], "complete": true}')
    with pytest.raises(ValueError, match=f"{MANIFEST_NAME}' is damaged .*not a relative name inside"):
        prepare_output_dir(tmp_path, overwrite=True, writes=["scores.json"])
    (tmp_path / MANIFEST_NAME).write_text("{")
    with pytest.raises(ValueError, match=f"{MANIFEST_NAME}' is damaged"):
        prepare_output_dir(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]


# --- a failed run never blocks its corrected rerun ------------------------------------------------------------


def test_a_run_that_failed_before_training_is_rerun_without_overwrite(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    message = fails(train_args(tiny_checkpoint, tiny_corpus, out, "--layers", "2", "9"), capsys)
    assert "out of range" in message or "9" in message
    assert (out / "run_config.json").exists() and not read_manifest(out).complete
    assert main(train_args(tiny_checkpoint, tiny_corpus, out)) == 0  # no --overwrite needed
    assert json.loads((out / "selection.json").read_text())["selected_layers"] == [2, 3]
    assert read_manifest(out).complete


def test_a_diverged_run_is_rerun_without_overwrite(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    bad = train_args(tiny_checkpoint, tiny_corpus, out, "--learning-rate", "1e30", "--max-grad-norm", "0")
    bad += ["--max-steps", "6", "--save-steps", "50"]
    message = fails(bad, capsys)
    assert message.startswith("training diverged at step ")
    assert main(train_args(tiny_checkpoint, tiny_corpus, out)) == 0


def test_an_unfinished_run_with_checkpoints_asks_for_resume_or_overwrite(
    tiny_checkpoint, tiny_corpus, tmp_path, capsys, monkeypatch
):
    import aletheia_lora.pipeline as pipeline

    out = tmp_path / "run"

    def crash(*args, **kwargs):
        raise ValueError("simulated crash after training")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_write_report", crash)
        assert fails(train_args(tiny_checkpoint, tiny_corpus, out), capsys) == "simulated crash after training"
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and not read_manifest(out).complete
    message = fails(train_args(tiny_checkpoint, tiny_corpus, out), capsys)
    assert "holds checkpoints of a run that did not finish: pass --resume to continue it, or --overwrite" in message
    assert main(train_args(tiny_checkpoint, tiny_corpus, out, "--resume", "--max-steps", "4")) == 0


def test_a_finished_run_or_a_user_file_still_needs_overwrite(finished_run, tiny_checkpoint, tiny_corpus, capsys):
    assert "exists and is not empty; pass --overwrite" in fails(
        train_args(tiny_checkpoint, tiny_corpus, finished_run), capsys
    )
    update_manifest(finished_run, complete=False)
    (finished_run / "notes.tex").write_text("mine")
    rotate_checkpoints(finished_run, 0)
    assert "exists and is not empty" in fails(train_args(tiny_checkpoint, tiny_corpus, finished_run), capsys)


# --- --resume is checked against the checkpoint ---------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (["--layers", "1", "2"], "checkpoint-2 was trained with --layers 2 3, this run has --layers 1 2"),
        (["--r", "8"], "was started with --r 4, this run has --r 8"),
        (["--lora-alpha", "64"], "was started with --lora-alpha 32, this run has --lora-alpha 64;"),
        (["--target-modules", "q_proj"], "was started with --target-modules None, this run has --target-modules"),
        (["--learning-rate", "0.01"], "was started with --learning-rate 0.001, this run has --learning-rate 0.01"),
    ],
)
def test_resume_with_other_settings_is_refused_and_run_config_kept(
    change, message, finished_run, tiny_checkpoint, tiny_corpus, capsys
):
    before = snapshot(finished_run)
    error = fails(
        train_args(tiny_checkpoint, tiny_corpus, finished_run, "--resume", "--max-steps", "4", *change), capsys
    )
    assert error.startswith("--resume: ") and message in error, error
    assert error.endswith("or start again with --overwrite")
    assert snapshot(finished_run) == before


def test_resume_may_extend_max_steps_and_run_config_says_so(finished_run, tiny_checkpoint, tiny_corpus):
    assert main(train_args(tiny_checkpoint, tiny_corpus, finished_run, "--resume", "--max-steps", "4")) == 0
    assert json.loads((finished_run / "run_config.json").read_text())["train"]["max_steps"] == 4
    assert json.loads((finished_run / "metrics.json").read_text())["train"]["steps"] == 2


def test_a_run_written_before_manifests_is_resumed_but_not_overwritten(
    finished_run, tiny_checkpoint, tiny_corpus, capsys
):
    (finished_run / MANIFEST_NAME).unlink()
    message = fails(train_args(tiny_checkpoint, tiny_corpus, finished_run, "--overwrite"), capsys)
    assert "holds files this tool did not write where this run writes its outputs: " in message
    assert main(train_args(tiny_checkpoint, tiny_corpus, finished_run, "--resume", "--max-steps", "4")) == 0
    manifest = read_manifest(finished_run)  # --resume took the run's files as its own
    assert manifest.complete and {"run_config.json", "checkpoints/checkpoint-4"} <= manifest.entries


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor of a torch.save file (torch.load would not notice)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda info: info.compress_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    start = entry.header_offset + 30 + name_length + extra_length
    data[start + entry.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name, damage",
    [
        ("optimizer.pt", _truncate),
        ("scheduler.pt", _flip_a_byte),
        ("adapter_model.safetensors", lambda p: p.write_bytes(b"garbage" * 100)),
        ("adapter_model.safetensors", _truncate),
        ("trainer_state.json", lambda p: p.write_text('{"global_step": ')),
        ("trainer_state.json", lambda p: p.write_text("[]")),
        ("adapter_config.json", lambda p: p.write_text("not json")),
    ],
)
def test_a_damaged_checkpoint_file_is_named_and_left_alone(
    name, damage, finished_run, tiny_checkpoint, tiny_corpus, capsys
):
    path = finished_run / "checkpoints" / "checkpoint-2" / name
    damage(path)
    damaged = path.read_bytes()
    error = fails(train_args(tiny_checkpoint, tiny_corpus, finished_run, "--resume", "--max-steps", "4"), capsys)
    assert error.startswith(f"--resume: {str(path)!r} is damaged or truncated (")
    assert error.endswith(
        "left as it is: move its checkpoint out of the way to resume from the one before, or use --overwrite"
    )
    assert path.read_bytes() == damaged


@pytest.fixture
def api_checkpoint(tmp_path):
    """A train_lora run (layers 2 and 3, r 4, alpha 8) with a checkpoint at step 2."""
    model = tiny_model("llama", n_layers=4)
    config = TrainConfig(max_steps=2, batch_size=2, save_steps=2, progress=False)
    train_lora(
        model, apply_aletheia_lora(model, [2, 3], r=4, lora_alpha=8), token_rows(4), config=config, output_dir=tmp_path
    )
    return tmp_path


@pytest.mark.parametrize(
    "kwargs, flag, before, after",
    [
        ({"selected_layers": [1, 2]}, "--layers", "2 3", "1 2"),
        ({"r": 8}, "--r", "4", "8"),
        ({"lora_alpha": 16}, "--lora-alpha", "8", "16"),
        ({"target_modules": ["q_proj", "v_proj"]}, "--target-modules", "down_proj gate_proj", "q_proj v_proj"),
    ],
)
def test_train_lora_resume_names_the_setting_that_differs(kwargs, flag, before, after, api_checkpoint):
    model = tiny_model("llama", n_layers=4)
    settings = {"selected_layers": [2, 3], "r": 4, "lora_alpha": 8, **kwargs}
    lora = apply_aletheia_lora(model, **settings)
    config = TrainConfig(max_steps=4, batch_size=2, save_steps=2, progress=False)
    with pytest.raises(ValueError, match=f"was trained with {flag} {before}.*this run has {flag} {after}"):
        train_lora(model, lora, token_rows(4), config=config, output_dir=api_checkpoint, resume=True)


def test_check_resume_compares_the_adapter_tensors_too(api_checkpoint):
    from peft import LoraConfig

    from aletheia_lora.train import prepare_lora_model

    checkpoint = api_checkpoint / "checkpoints" / "checkpoint-2"
    model = tiny_model("llama", n_layers=4)
    lora = apply_aletheia_lora(model, [2, 3], r=4, lora_alpha=8)
    check_resume(checkpoint, lora, prepare_lora_model(model, lora))  # the same adapters: fine
    # a config that says the same but adapters of another rank (a hand-edited adapter_config.json)
    other = tiny_model("llama", n_layers=4)
    wider = LoraConfig(**{**lora.to_dict(), "r": 8, "peft_type": None, "target_modules": list(lora.target_modules)})
    with pytest.raises(ValueError, match="adapter_model.safetensors does not fit this run's: .* tensors differ"):
        check_resume(checkpoint, lora, prepare_lora_model(other, wider))


# --- training health ------------------------------------------------------------------------------------------


def test_a_diverging_run_stops_with_the_step_and_a_hint_and_writes_no_nan(
    tiny_checkpoint, tiny_corpus, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = train_args(tiny_checkpoint, tiny_corpus, out, "--learning-rate", "1e30", "--max-grad-norm", "0")
    message = fails([*argv, "--max-steps", "6", "--save-steps", "1"], capsys)
    assert message.startswith("training diverged at step ")
    assert "Lower --learning-rate (now 1e+30), set --max-grad-norm 1, or check the data" in message
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    for checkpoint in (out / "checkpoints").glob("checkpoint-*"):
        from safetensors.torch import load_file

        weights = load_file(str(checkpoint / "adapter_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), checkpoint


def test_a_nan_loss_stops_at_once(tmp_path):
    model = tiny_model("llama", n_layers=4)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan
    config = TrainConfig(max_steps=4, batch_size=2, save_steps=1, progress=False)
    with pytest.raises(
        TrainingDiverged, match=r"training diverged at step 1: the loss is nan; .*lower --max-grad-norm \(now 1\)"
    ):
        train_lora(model, apply_aletheia_lora(model, [2, 3], r=4), token_rows(4), config=config, output_dir=tmp_path)
    assert not (tmp_path / "adapter").exists() and not list((tmp_path / "checkpoints").glob("checkpoint-*"))


class _InfiniteGradients(TrainerCallback):
    """Make every adapter gradient infinite (the loss stays finite): an overflow in the backward pass."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(lambda grad: grad * math.inf)


@pytest.mark.parametrize(
    "save_steps, expected",
    [(1, "step 1: an adapter weight is not finite"), (0, r"step 1: the gradient norm is (nan|inf)")],
)
def test_an_overflowing_gradient_stops_before_a_checkpoint_or_log(save_steps, expected, tmp_path):
    model = tiny_model("llama", n_layers=4)
    config = TrainConfig(max_steps=4, batch_size=2, save_steps=save_steps, logging_steps=1, progress=False)
    logs = []
    with pytest.raises(TrainingDiverged, match=expected):
        train_lora(
            model, apply_aletheia_lora(model, [2, 3], r=4), token_rows(4), config=config, output_dir=tmp_path,
            callbacks=[_InfiniteGradients()], on_log=logs.append,
        )  # fmt: skip
    assert not list((tmp_path / "checkpoints").glob("checkpoint-*")) and not (tmp_path / "adapter").exists()
    assert all(math.isfinite(v) for record in logs for v in record.values() if isinstance(v, float))


@pytest.mark.parametrize(
    "payload, key",
    [
        ({"loss": math.nan}, "loss"),
        ({"train": {"median_step_seconds": math.inf}}, "train.median_step_seconds"),
        ({"log_history": [{"loss": 1.0}, {"grad_norm": -math.inf}]}, r"log_history\[1\].grad_norm"),
        (math.nan, r"\(the value itself\)"),
    ],
)
def test_write_json_never_writes_nan_or_infinity(payload, key, tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"old": true}')
    with pytest.raises(ValueError, match=f"refusing to write .*metrics.json': {key} is .*JSON has no NaN or infinity"):
        write_json(target, payload)
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# --- conflicting and wrong inputs -----------------------------------------------------------------------------


def _run_config(checkpoint: Path, corpus: Path, **lora) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model=str(checkpoint)),
        data=DataConfig(data=str(corpus / "target.txt"), general_data=None, max_length=16),
        lora=LoraSettings(r=4, **lora),
        train=TrainConfig(max_steps=1, batch_size=2, save_steps=0, progress=False),
    )


def test_layers_and_scores_together_are_refused_everywhere(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    scores = scores_file(tmp_path / "s.json")
    with pytest.raises(ValueError, match="give --layers or --scores, not both"):
        run_pipeline(_run_config(tiny_checkpoint, tiny_corpus), tmp_path / "o", layers=[1], scores_file=scores)
    argv = train_args(tiny_checkpoint, tiny_corpus, tmp_path / "o", "--scores", str(scores))
    assert fails(argv, capsys).startswith("give --layers or --scores, not both")
    assert not (tmp_path / "o").exists()


def test_rank_allocation_scores_without_scores_names_the_flags(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    message = fails(train_args(tiny_checkpoint, tiny_corpus, tmp_path / "o", "--rank-allocation", "scores"), capsys)
    assert message.startswith("--rank-allocation scores needs probe scores: drop --layers")
    assert "--scores" in message and not (tmp_path / "o").exists()
    config = _run_config(tiny_checkpoint, tiny_corpus, rank_allocation="scores")
    with pytest.raises(ValueError, match=r"needs probe scores: drop --layers .*or give --scores FILE in its place"):
        run_pipeline(config, tmp_path / "o", layers=[1])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "meta, layers, expected",
    [
        (
            {"model_type": "gpt2", "num_layers": 4},
            4,
            "was probed on a gpt2 model of 4 layers, this run's --model is a llama of 4",
        ),
        ({"model_type": "llama", "num_layers": 12}, 4, "was probed on a llama model of 12 layers"),
        (None, 2, "has 2 layers, the model 4"),
    ],
)
def test_scores_from_another_model_are_refused(meta, layers, expected, tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    scores = scores_file(tmp_path / "s.json", meta, layers)
    argv = train_args(tiny_checkpoint, tiny_corpus, tmp_path / "o", "--scores", str(scores))
    argv.remove("--layers"), argv.remove("2"), argv.remove("3")
    assert expected in fails(argv, capsys)
    assert not (tmp_path / "o" / "adapter").exists()
