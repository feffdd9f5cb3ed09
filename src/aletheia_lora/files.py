"""Output files and folders: one rule for everything this package writes (details: :func:`prepare_output_dir`).

* Atomic: every file goes through :func:`write_text`, :func:`write_json`, :func:`atomic_path` or :func:`atomic_dir`
  (a crash leaves the old file or none, never half of one); an ``OSError`` names the file, not its temporary.
* Regular files only: an existing symlink, FIFO, socket or device at an output path is refused, never followed or
  replaced. Valid JSON only: :func:`write_json` refuses NaN and infinity, naming the file and the key.
* Only its own files: an output folder's manifest (:data:`MANIFEST_NAME`) lists what this tool wrote there;
  ``--overwrite`` replaces only that, and checkpoints are rotated only if listed
  (:func:`~aletheia_lora.resume.rotate_checkpoints`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from aletheia_lora.checks import read_data_file

logger = logging.getLogger(__name__)

# The HF Trainer writes a checkpoint's trainer_state.json last: a folder without it is an interrupted save.
TRAINER_STATE_NAME = "trainer_state.json"
# What this tool wrote in an output folder (see OutputManifest).
MANIFEST_NAME = ".aletheia-lora-manifest.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Temporary names made by this module (mkstemp, mkdtemp, the write test): left behind only by a hard kill.
_TEMPORARY = re.compile(r"^\.(?:write-test-.*|.+\.tmp(?:\.\w+)?|.+\.(?:tmp|old)-\w+)$")


def _naming(exc: OSError, path: Path) -> OSError:
    """The same error (same errno, so the same subclass) naming ``path`` instead of a temporary file."""
    if exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, which races with other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _default_mode(folder: bool = False) -> int:
    """Permission bits of an ordinary new file or folder (mkstemp's private 0o600 would hide the outputs)."""
    return (0o777 if folder else 0o666) & ~_umask()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; not every file system can, and that is not an error."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def path_kind(path: str | os.PathLike) -> str | None:
    """What is at ``path``, a symlink not followed: None (nothing), ``"a file"``, ``"a folder"``, ``"a symlink
    (to '...')"``, ``"a FIFO"``, ``"a socket"``, ``"a character device"`` or ``"a block device"``."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        try:
            return f"a symlink (to {os.readlink(path)!r})"
        except OSError:
            return "a symlink"
    kinds = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device")]
    return next((name for test, name in kinds if test(mode)), "a block device")


def check_output_file(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Refuse to write ``path`` unless it is absent or a regular file (with ``folder``: a real folder); a
    symlink, FIFO, socket or device is never followed or replaced. Raises a ``ValueError`` naming it."""
    path, kind = Path(path), path_kind(path)
    if kind not in (None, "a folder" if folder else "a file"):
        raise ValueError(
            f"refusing to write {str(path)!r}: it is {kind}{', not a folder' if folder else ''}; outputs are written "
            "only as regular files and folders, never through a link or into a device or pipe (remove it or "
            "choose another path)"
        )
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, rename it to ``path``.

    For writers that need a file name (``savefig``, ``save_file``): the temporary name keeps the suffix, so
    writers that pick a format from it still do. On any error (``KeyboardInterrupt`` included) the temporary
    file is removed and ``path`` keeps its old content. An existing ``path`` keeps its permission bits.

    Args:
        path: The file to write.

    Yields:
        The temporary path to write to.

    Raises:
        ValueError: ``path`` exists and is not a regular file (a symlink, FIFO, socket, device or folder).
        OSError: from creating, writing or renaming, naming ``path`` (e.g. ENOSPC, EACCES, ENOTDIR).
    """
    path = check_output_file(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        try:
            mode = path.stat().st_mode & 0o7777
        except OSError:
            mode = _default_mode()
        os.chmod(tmp, mode)
        check_output_file(path)  # again: something may have appeared there while the file was written
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from exc
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` so that a crash leaves the old file or the new one, never half of one.

    Raises:
        ValueError: ``path`` exists and is not a regular file.
        OSError: naming ``path``: the folder is missing or not a folder, not writable, or the disk is full.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return path


def _non_finite(payload: Any, key: str = "") -> tuple[str, float] | None:
    """The first (key path, value) in ``payload`` holding a NaN or an infinity, or None."""
    if isinstance(payload, numbers.Real) and not isinstance(payload, numbers.Integral):
        return None if math.isfinite(float(payload)) else (key or "(the value itself)", float(payload))
    if isinstance(payload, dict):
        items = ((f"{key}.{k}" if key else str(k), v) for k, v in payload.items())
    elif isinstance(payload, (list, tuple)):
        items = ((f"{key}[{i}]", v) for i, v in enumerate(payload))
    else:
        return None
    for inner_key, value in items:
        found = _non_finite(value, inner_key)
        if found is not None:
            return found
    return None


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically.

    Raises:
        ValueError: ``payload`` holds a NaN or an infinity (JSON has neither: the file would not load), naming
            the file and the key; or ``path`` exists and is not a regular file.
    """
    found = _non_finite(payload)
    if found is not None:
        raise ValueError(f"refusing to write {str(path)!r}: {found[0]} is {found[1]}, and JSON has no NaN or infinity")
    return write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block succeeds, it replaces ``path`` whole.

    For writers of several files (``save_pretrained``). On any error the temporary folder is removed and
    ``path`` is left as it was. An existing ``path`` is first renamed aside and removed only once the new
    folder is in place, so at every moment ``path`` is the old folder, the new one, or (for the instant
    between two renames) absent with the old one still on disk beside it. Whatever the old folder holds is
    removed with it: callers that do not own all of it check first (:func:`claim_outputs`).

    Args:
        path: The folder to write.

    Yields:
        The temporary folder to fill.

    Raises:
        ValueError: ``path`` exists and is not a real folder (a symlink, file, FIFO, socket or device).
    """
    path = check_output_file(path, folder=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as exc:
        raise _naming(exc, path) from exc
    try:
        os.chmod(tmp, _default_mode(folder=True))
        yield tmp
        check_output_file(path, folder=True)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the old folder back rather than leave nothing at ``path``
                os.replace(old / path.name, path)
                old.rmdir()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from exc
        raise


def last_complete_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The highest-step ``checkpoint-N`` folder in ``folder`` that the HF Trainer finished writing.

    The Trainer writes a checkpoint in place and its ``trainer_state.json`` last, so a run killed while saving
    leaves a folder without it; resuming from that folder fails. Such folders are skipped with a warning.

    Args:
        folder: The Trainer's output folder (``<out>/checkpoints``).

    Returns:
        The checkpoint folder, or None when there is none (or ``folder`` does not exist).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    for _, child in sorted(found, reverse=True):
        if (child / TRAINER_STATE_NAME).is_file():
            return child
        logger.warning("skipping %s: it has no %s (the run stopped while saving it)", child, TRAINER_STATE_NAME)
    return None


def check_config_output_path(value: Any, key: str = "out") -> str:
    """Check an output path that comes from a config file rather than from the command line.

    A config file may be shared or downloaded; it must not be able to send outputs anywhere on the machine.
    So an output path named in one is relative, without ``..`` and without ``~``, and it resolves (symlinks
    followed, as far as they exist) inside the folder the command runs in: ``link/victim.txt`` with ``link``
    pointing elsewhere is refused. Any path can still be given on the command line, where the user sees it.

    Args:
        value: The value the config file gives.
        key: The setting's name, for the message.

    Returns:
        The path, as a string.

    Raises:
        ValueError: naming the setting and the value.
    """
    flag = "--" + key.replace("_", "-")
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"--config: {flag} must be a relative folder path, got {value!r}")
    text = str(value).strip()
    pure = PurePath(text)
    if pure.is_absolute() or text.startswith("~") or ".." in pure.parts or text.startswith(("\\", "/")):
        raise ValueError(
            f"--config: {flag} {text!r} leaves the working folder; a config file may only name a relative path "
            f"inside it (give {flag} on the command line to write elsewhere)"
        )
    base = Path.cwd().resolve()
    resolved = (base / text).resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(
            f"--config: {flag} {text!r} leaves the working folder; through a symlink it resolves to "
            f"{str(resolved)!r}, and a config file may only name a path inside it (give {flag} on the command "
            "line to write elsewhere)"
        )
    return text


# --- what this tool wrote: the manifest -----------------------------------------------------------------------


@dataclass(frozen=True)
class OutputManifest:
    """What this tool wrote in one output folder, as its :data:`MANIFEST_NAME` records it (:func:`read_manifest`).

    ``entries``: relative ``/``-separated names of files, and of folders written whole (``checkpoints/checkpoint-8``).
    ``folders``: folders made to hold entries (``adapter``, ``checkpoints``); what is in one is the tool's only if
    listed. ``complete``: False while a run writes into the folder. ``found``: the folder has a manifest at all.
    """

    entries: frozenset[str] = field(default_factory=frozenset)
    folders: frozenset[str] = field(default_factory=frozenset)
    complete: bool = True
    found: bool = False

    def owns(self, name: str) -> bool:
        """Whether this tool wrote ``name`` (relative, ``/``-separated), or made it as a folder of its outputs."""
        parts = PurePosixPath(name).parts
        if "/".join(parts) in self.folders:
            return True
        return any("/".join(parts[: i + 1]) in self.entries for i in range(len(parts)))


def _valid_name(name: Any) -> bool:
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    pure = PurePosixPath(name)
    return not pure.is_absolute() and ".." not in pure.parts and "." not in name.split("/")


def read_manifest(folder: str | os.PathLike) -> OutputManifest:
    """The manifest of ``folder`` (an empty one, ``found=False``, where there is none).

    Raises:
        ValueError: the manifest is not a regular file, or not one this tool wrote (damaged), naming it.
    """
    path = Path(folder) / MANIFEST_NAME
    kind = path_kind(path)
    if kind is None:
        return OutputManifest()
    if kind != "a file":
        raise ValueError(f"{str(path)!r} is {kind}, not a regular file; remove it or choose another --out")
    try:
        payload = read_data_file(path, fmt="json")
        entries, folders, complete = payload["entries"], payload["folders"], payload["complete"]
        if not (isinstance(entries, list) and isinstance(folders, list) and isinstance(complete, bool)):
            raise ValueError("entries, folders and complete have the wrong types")
        bad = [name for name in [*entries, *folders] if not _valid_name(name)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a relative name inside the folder")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{str(path)!r} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): it "
            f"records which files in {str(folder)!r} this tool wrote; remove the tool's files and it, or choose "
            "another --out"
        ) from None
    return OutputManifest(frozenset(entries), frozenset(folders), complete, found=True)


def update_manifest(
    folder: str | os.PathLike,
    *,
    claim: Iterable[str] = (),
    forget: Iterable[str] = (),
    complete: bool | None = None,
) -> OutputManifest:
    """Record in ``folder``'s manifest (atomically, on one process, before the writes it records) the names to
    ``claim`` (a trailing ``/``: a folder made to hold entries), the entries to ``forget`` (deleted by this tool),
    and whether the run in the folder is ``complete`` (None: unchanged). Returns the manifest as written."""
    folder = Path(folder)
    old = read_manifest(folder)
    entries, folders = set(old.entries), set(old.folders)
    for name in claim:
        if not _valid_name(name.rstrip("/")):
            raise ValueError(f"cannot record {name!r}: not a relative name inside {str(folder)!r}")
        (folders if name.endswith("/") else entries).add(name.rstrip("/"))
    entries -= set(forget)
    new = OutputManifest(frozenset(entries), frozenset(folders), old.complete if complete is None else complete, True)
    write_json(
        folder / MANIFEST_NAME,
        {
            "written_by": "aletheia-lora",
            "about": "what aletheia-lora wrote in this folder; --overwrite replaces only these, nothing else",
            "complete": new.complete,
            "folders": sorted(new.folders),
            "entries": sorted(new.entries),
        },
    )
    return new


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _survey(folder: Path, manifest: OutputManifest, writes: Iterable[str]) -> tuple[list[str], list[str]]:
    """(names that are not regular files or folders, names this tool did not write) at or inside ``writes``."""
    odd, foreign = [], []
    for write in writes:
        name = write.rstrip("/")
        kind = path_kind(folder / name)
        if kind is None:
            continue
        if not write.endswith("/") or kind != "a folder":
            if kind != ("a folder" if write.endswith("/") else "a file"):
                odd.append(f"{name} ({kind})")
            elif not manifest.owns(name):
                foreign.append(name)
            continue
        for child in sorted(os.listdir(folder / name)):
            inner, inner_kind = f"{name}/{child}", path_kind(folder / name / child)
            if inner_kind not in ("a file", "a folder"):
                odd.append(f"{inner} ({inner_kind})")
            elif not manifest.owns(inner):
                foreign.append(inner + ("/" if inner_kind == "a folder" else ""))
    return odd, foreign


def claim_outputs(
    folder: str | os.PathLike, writes: Iterable[str], *, adopt: bool = False, complete: bool | None = None
) -> OutputManifest:
    """Check that a run may write ``writes`` in ``folder`` (it exists), and record them in its manifest first.

    Args:
        folder: The output folder.
        writes: Names relative to ``folder``; a trailing ``/`` marks a folder this tool fills (``adapter/``),
            in which every entry must be the tool's.
        adopt: In a folder without a manifest (older versions), take what is at these names as the tool's.
        complete: Also mark the run in the folder finished or started (see :func:`update_manifest`).

    Raises:
        ValueError: a symlink, FIFO, socket or device at or in one of ``writes``; or something (not adopted) that
            this tool did not write there.
    """
    folder, writes = Path(folder), list(writes)
    manifest = read_manifest(folder)
    odd, foreign = _survey(folder, manifest, writes)
    if odd:
        raise ValueError(
            f"refusing to write in {str(folder)!r}: {_listing(odd)}; outputs are written only as regular files and "
            "folders, never through a link or into a device or pipe (remove it, or choose another --out)"
        )
    adopted = []
    if foreign and adopt and not manifest.found:
        logger.warning(
            "%s has no %s (written before this version?): taking %s as the files of the run to resume",
            folder,
            MANIFEST_NAME,
            _listing(foreign),
        )
        adopted = [name.rstrip("/") for name in foreign]
    elif foreign:
        raise ValueError(
            f"output folder {str(folder)!r} holds files this tool did not write where this run writes its "
            f"outputs: {_listing(foreign)}; they are never replaced or deleted (--overwrite replaces only this "
            "tool's files): move them, or choose another --out"
        )
    return update_manifest(folder, claim=[*writes, *adopted], complete=complete)


def owned_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """This tool's ``checkpoint-N`` folders in ``folder/checkpoints`` (by its manifest), oldest step first."""
    folder = Path(folder)
    found = []
    for name in read_manifest(folder).entries:
        parts = PurePosixPath(name).parts
        match = _CHECKPOINT.match(parts[-1]) if len(parts) == 2 and parts[0] == "checkpoints" else None
        if match and path_kind(folder / name) == "a folder":
            found.append((int(match.group(1)), folder / name))
    return [path for _, path in sorted(found)]


def _unowned(folder: Path, manifest: OutputManifest) -> list[str]:
    """What in ``folder`` this tool did not write (its manifest and its temporary leftovers aside)."""
    names = [n for n in sorted(os.listdir(folder)) if n != MANIFEST_NAME and not _TEMPORARY.match(n)]
    containers = [f"{n}/" for n in names if n in manifest.folders]
    return [n for n in names if n not in manifest.folders and not manifest.owns(n)] + _survey(
        folder, manifest, containers
    )[1]


def prepare_output_dir(
    path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False, writes: Iterable[str] = ()
) -> Path:
    """Create the output folder, or accept an existing one; record in its manifest that a run has started.

    The rules, the same for every output folder of the package:

    * **The folder.** A real folder, or created. A symlink is accepted only as the folder itself, since the
      caller named it (``--out`` on the command line; a config file's ``out:`` was resolved inside the working
      folder by :func:`check_config_output_path`), and only when it resolves to a real folder. A file, FIFO,
      socket, device or dangling symlink is refused.
    * **Reuse.** An existing folder is taken when it is empty, with ``overwrite`` or ``resume``, or, without
      either, when it holds nothing but this tool's files from a run that did not finish (the manifest says
      so) and no checkpoint: a run that failed before training never blocks its corrected rerun. A folder
      holding checkpoints of an unfinished run needs ``resume`` (continue) or ``overwrite`` (start again).
    * **Ownership.** ``overwrite`` replaces only files the manifest lists. A file this tool did not write at one
      of ``writes`` (or inside one of its folders, e.g. ``adapter/notes.tex``) is refused before the run starts,
      with ``overwrite`` too; nothing else is ever replaced or deleted. With ``resume``, a folder written before
      manifests existed has its files at ``writes`` taken as the run's own.
    * **Kinds.** A symlink, FIFO, socket or device at one of ``writes`` is refused: never followed or replaced.

    ``writes`` (see :func:`claim_outputs`) is what the run will write, recorded in the manifest before any of it.

    Raises:
        ValueError: ``path`` is not a folder; something at ``writes`` is foreign, a link or special; or the
            manifest is damaged.
        FileExistsError: a non-empty folder without ``overwrite``/``resume`` (that is no unfinished run's).
        PermissionError: the folder cannot be created or written (read-only, a parent that is a file, ...).
    """
    path = Path(path).expanduser()
    kind = path_kind(path)
    if kind not in (None, "a folder") and not (kind.startswith("a symlink") and path.is_dir()):
        raise ValueError(f"--out {str(path)!r} is {kind}, not a folder")
    if path.is_dir() and not (overwrite or resume):
        manifest = read_manifest(path)
        leftovers = [
            n for n in os.listdir(path) if n != MANIFEST_NAME and not (manifest.found and _TEMPORARY.match(n))
        ]
        reusable = manifest.found and not manifest.complete and not _unowned(path, manifest)
        if leftovers and reusable and owned_checkpoints(path):
            raise FileExistsError(
                f"output folder {str(path)!r} holds checkpoints of a run that did not finish: pass --resume to "
                "continue it, or --overwrite to start again (only this tool's files are replaced)"
            )
        if leftovers and not reusable:
            raise FileExistsError(
                f"output folder {str(path)!r} exists and is not empty; pass --overwrite to write into it "
                "(files not written by this run are kept) or choose another --out"
            )
        if leftovers:
            logger.info("%s holds only the files of a run that did not finish: writing over them", path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-")
        probe.close()
    except OSError as exc:
        raise PermissionError(f"cannot write to output folder {str(path)!r}: {exc.strerror or exc}") from None
    claim_outputs(path, writes, adopt=resume, complete=False)
    return path
