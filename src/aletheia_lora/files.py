"""Output files: written atomically (a temporary file, then a rename), into folders that are never wiped.

Every file this package writes goes through :func:`write_text`, :func:`atomic_path` or :func:`atomic_dir`: a
crash, a full disk or Ctrl-C leaves the old file (or no file), never a truncated one, and no temporary file.
An ``OSError`` raised while writing names the file that was being written, not its temporary sibling.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

logger = logging.getLogger(__name__)

# The HF Trainer writes a checkpoint's trainer_state.json last: a folder without it is an interrupted save.
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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
        OSError: from creating, writing or renaming, naming ``path`` (e.g. ENOSPC, EACCES, ENOTDIR).
    """
    path = Path(path)
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
        OSError: naming ``path``: the folder is missing or not a folder, not writable, or the disk is full.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return path


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block succeeds, it replaces ``path`` whole.

    For writers of several files (``save_pretrained``). On any error the temporary folder is removed and
    ``path`` is left as it was. An existing ``path`` is first renamed aside and removed only once the new
    folder is in place, so at every moment ``path`` is the old folder, the new one, or (for the instant
    between two renames) absent with the old one still on disk beside it.

    Args:
        path: The folder to write.

    Yields:
        The temporary folder to fill.
    """
    path = Path(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as exc:
        raise _naming(exc, path) from exc
    try:
        os.chmod(tmp, _default_mode(folder=True))
        yield tmp
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
    So an output path named in one is relative, without ``..`` and without ``~``: it resolves inside the folder
    the command runs in. Any path can still be given on the command line, where the user sees it.

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
    return text


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the output folder, or accept an existing one only with ``overwrite``/``resume``.

    Existing files are never deleted: with ``overwrite`` the run's own files are replaced one by one.

    Raises:
        ValueError: ``path`` is a file.
        FileExistsError: ``path`` is a non-empty folder and neither ``overwrite`` nor ``resume`` is set.
        PermissionError: the folder cannot be created or written (read-only, a parent that is a file, ...).
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(path)!r} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise FileExistsError(
            f"output folder {str(path)!r} exists and is not empty; pass --overwrite to write into it "
            "(files not written by this run are kept) or choose another --out"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-")
        probe.close()
    except OSError as exc:
        raise PermissionError(f"cannot write to output folder {str(path)!r}: {exc.strerror or exc}") from None
    return path
