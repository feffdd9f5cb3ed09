"""Output files and folders: atomic writes, regular files only, and --overwrite replacing only this tool's own
files.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from aletheia_lora.files import prepare_output_dir, update_manifest, write_json
from error_cases.base import Case, Ctx, Exit2, Raises, Works


def _disk_full(ctx: Ctx):
    target = ctx.tmp_path / "selection.json"
    write_json(target, {"old": True})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        with ctx.monkeypatch.context() as patch:
            patch.setattr("os.fsync", no_space)
            write_json(target, {"new": True})
    finally:  # the old file is whole, and no temporary file is left
        assert json.loads(target.read_text()) == {"old": True}
        assert [p.name for p in ctx.tmp_path.iterdir()] == ["selection.json"]


def _read_only_out(ctx: Ctx):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    # Root ignores permission bits, so the refusal a read-only folder gives is simulated.
    ctx.monkeypatch.setattr("tempfile.NamedTemporaryFile", refuse)
    return prepare_output_dir(ctx.tmp_path / "out")


def _special(ctx: Ctx, kind: str) -> Path:
    """A FIFO or a symlink to someone else's file, in the working folder."""
    path = ctx.tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    else:
        victim = ctx.tmp_path.parent / "victim.json"
        victim.write_text("precious")
        path.symlink_to(victim)
    return path


def _cli_config_out_through_symlink(ctx: Ctx) -> list[str]:
    elsewhere = ctx.tmp_path.parent / "elsewhere"
    elsewhere.mkdir()
    (ctx.tmp_path / "link").symlink_to(elsewhere)
    ctx.file("c.json", '{"out": "link/victim.json"}')
    return ["select", "--config", "c.json", "--scores", ctx.scores_file()]


def _tool_folder(ctx: Ctx, *, complete: bool, foreign: str | None = None, checkpoint: bool = False) -> Path:
    """An output folder written by this tool (its manifest lists run_config.json, adapter/, checkpoints/)."""
    out = ctx.tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "run_config.json").write_text("{}")
    claims = ["run_config.json", "adapter/", "checkpoints/"]
    if checkpoint:
        (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
        claims.append("checkpoints/checkpoint-2")
    update_manifest(out, claim=claims, complete=complete)
    if foreign:
        (out / foreign).parent.mkdir(parents=True, exist_ok=True)
        (out / foreign).write_text("the user's own")
    return out


def _overwrite_foreign(ctx: Ctx, foreign: str):
    out = _tool_folder(ctx, complete=True, foreign=foreign)
    try:
        return prepare_output_dir(out, overwrite=True, writes=["run_config.json", "adapter/", "checkpoints/"])
    finally:
        assert (out / foreign).read_text() == "the user's own"


def _rerun_after_failure(ctx: Ctx) -> None:
    out = _tool_folder(ctx, complete=False)
    assert prepare_output_dir(out, writes=["run_config.json", "adapter/", "checkpoints/"]) == out


CASES: list[Case] = [
    # output folders and files
    Case("out-exists", "prepare_output_dir", "an output folder that exists and is not empty",
         lambda c: (c.file("mine.txt", "keep"), prepare_output_dir(c.tmp_path)),
         Raises(FileExistsError, "exists and is not empty; pass --overwrite")),
    Case("out-is-a-file", "prepare_output_dir", "--out naming a file", lambda c: prepare_output_dir(c.file("o", "x")),
         Raises(ValueError, "is a file, not a folder")),
    Case("out-parent-is-a-file", "prepare_output_dir", "--out under a regular file (unwritable, even as root)",
         lambda c: prepare_output_dir(c.file("f", "x") / "out"),
         Raises(PermissionError, "cannot write to output folder .*f/out': Not a directory")),
    Case("out-read-only", "prepare_output_dir", "a read-only output folder (EACCES, simulated)", _read_only_out,
         Raises(PermissionError, "cannot write to output folder .*out': Permission denied")),
    Case("out-disk-full", "write_json", "the disk fills up while writing (ENOSPC, simulated)", _disk_full,
         Raises(OSError, r"No space left on device: '.*selection.json'")),
    # outputs: regular files only, never followed or replaced
    Case("out-dev-null", "write_json", "an output path that is /dev/null (a device; never replaced, even as root)",
         lambda c: write_json("/dev/null", {}),
         Raises(ValueError, "refusing to write '/dev/null': it is a character device; outputs are written only as")),
    Case("out-fifo", "write_json", "an output path that is a FIFO", lambda c: write_json(_special(c, "fifo"), {}),
         Raises(ValueError, "refusing to write .*fifo': it is a FIFO")),
    Case("out-symlink", "write_json", "an output path that is a symlink to another file (never followed)",
         lambda c: write_json(_special(c, "link"), {}),
         Raises(ValueError, "refusing to write .*link': it is a symlink \\(to '.*victim.json'\\)")),
    Case("cli-out-dev-null", "aletheia-lora select", "--out /dev/null",
         lambda c: ["select", "--scores", c.scores_file(), "--out", "/dev/null"],
         Exit2("refusing to write '/dev/null': it is a character device")),
    Case("cli-out-folder-fifo", "aletheia-lora probe", "--out naming a FIFO",
         lambda c: ["probe", *c.cli_model_args(), "--out", str(_special(c, "fifo").name)],
         Exit2("--out 'fifo' is a FIFO, not a folder")),
    Case("cli-config-out-symlink", "--config", "out: link/victim.json where link points out of the working folder",
         _cli_config_out_through_symlink,
         Exit2("--config: --out 'link/victim.json' leaves the working folder; through a symlink it resolves to")),
    # outputs: --overwrite replaces only what this tool wrote (its manifest), and a failed run blocks nothing
    Case("overwrite-foreign-in-adapter", "prepare_output_dir", "--overwrite with a user's file in adapter/",
         lambda c: _overwrite_foreign(c, "adapter/notes.tex"),
         Raises(ValueError, "holds files this tool did not write where this run writes its outputs: "
                            "adapter/notes.tex; they are never replaced or deleted")),
    Case("overwrite-foreign-checkpoint", "prepare_output_dir", "--overwrite with a checkpoint the tool did not write",
         lambda c: _overwrite_foreign(c, "checkpoints/checkpoint-7/optimizer.pt"),
         Raises(ValueError, "did not write where this run writes its outputs: checkpoints/checkpoint-7/")),
    Case("out-failed-run-rerun", "prepare_output_dir", "the folder of a run that failed before training, no flag",
         _rerun_after_failure,
         Works("reused without --overwrite: it holds only this tool's files of an unfinished run")),
    Case("out-unfinished-checkpoints", "prepare_output_dir", "an unfinished run's folder with checkpoints, no flag",
         lambda c: prepare_output_dir(_tool_folder(c, complete=False, checkpoint=True)),
         Raises(FileExistsError, "holds checkpoints of a run that did not finish: pass --resume to continue it, or "
                                 "--overwrite to start again")),
]  # fmt: skip
