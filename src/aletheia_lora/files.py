"""Output files: written atomically (a temporary file, then a rename), into folders that are never wiped."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` so that a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the output folder, or accept an existing one only with ``overwrite``/``resume``.

    Existing files are never deleted: with ``overwrite`` the run's own files are replaced one by one.
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
