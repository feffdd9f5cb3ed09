"""Reading local files and folders into records (a ``datasets.Dataset``), offline.

``.txt`` (a single file is split into documents at blank lines; a folder of ``.txt`` files gives one document per
file), ``.jsonl``/``.json``, ``.csv``, ``.parquet``, or a folder written by ``Dataset.save_to_disk``.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from aletheia_lora.data.formats import _check_fields, _required_fields, detect_format

logger = logging.getLogger(__name__)

_JSON_SUFFIXES = (".jsonl", ".json")
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: ``datasets`` wraps parse errors in a generic "error while generating" one."""
    seen = {id(exc)}
    while True:
        inner = exc.__cause__ or exc.__context__
        if inner is None or id(inner) in seen or not str(inner).strip():
            return exc
        seen.add(id(inner))
        exc = inner


def _fail(path: Path, exc: BaseException, what: str) -> ValueError:
    exc = _root_cause(exc)
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if len(reason) > 200:
        reason = reason[:197] + "..."
    return ValueError(f"cannot read {path} as {what}: {reason}")


_NOT_REGULAR = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a device"}


def _check_kind(path: Path) -> bool:
    """Whether ``path`` is a folder (else a regular file), symlinks followed; anything else is refused unopened.

    Opening a FIFO blocks until something writes to it, and a device such as ``/dev/zero`` never ends: neither is
    ever read.
    """
    link = f" (a symlink to {os.readlink(path)})" if path.is_symlink() else ""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ValueError(f"data file not found: {path}{link}") from None
    except OSError as exc:  # a symlink loop, a path through a file, no permission
        raise ValueError(f"cannot read data path {path}{link}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(mode):
        return True
    if not stat.S_ISREG(mode):
        kind = _NOT_REGULAR.get(stat.S_IFMT(mode), "a socket or other special file")
        raise ValueError(f"data path {path}{link} is {kind}, not a regular file or folder; give a data file or folder")
    return False


def _read_path(path: Path) -> Dataset:
    if _check_kind(path):
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            odd = next((p for p in sorted(path.rglob("*")) if not p.is_dir() and not p.is_file()), None)
            if odd is not None:  # a FIFO among the arrow files would hang load_from_disk
                raise ValueError(
                    f"{odd} in the saved dataset {path} is not a regular file (a FIFO, device or broken link)"
                )
            try:
                loaded = load_from_disk(str(path))
            except Exception as exc:  # noqa: BLE001 - any failure becomes one message naming the folder
                raise _fail(path, exc, "a saved dataset") from exc
            if isinstance(loaded, DatasetDict):
                if "train" in loaded:
                    return loaded["train"]
                if len(loaded) == 1:
                    return next(iter(loaded.values()))
                raise ValueError(f"{path} holds the splits {', '.join(loaded)}; pass the folder of one split")
            return loaded
        found = sorted(path.rglob("*.txt"))
        files = [str(p) for p in found if p.is_file()]  # a FIFO or device named x.txt is skipped, never opened
        if len(files) < sum(not p.is_dir() for p in found):
            logger.warning("%s: skipped .txt entries that are not regular files (FIFOs, devices)", path)
        if not files:
            raise ValueError(f"{path} is a folder with neither a saved dataset nor any .txt file")
        try:
            return load_dataset("text", data_files=files, sample_by="document", split="train")
        except Exception as exc:  # noqa: BLE001
            raise _fail(path, exc, "a folder of .txt files") from exc
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"unsupported data file {path}: use .txt, .jsonl, .json, .csv, .parquet, a folder of .txt files "
            "or a folder written by Dataset.save_to_disk"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"data file {path} is empty")
    # A single .txt file holds many documents separated by blank lines (one document per file: use a folder).
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if fmt == "text" else {}
    try:
        return load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001
        if "corresponds to no data" in str(exc):  # e.g. a CSV file with a header and no row
            raise ValueError(f"data file {path} holds no records") from exc
        raise _fail(path, exc, fmt) from exc


def read_records(path: str | os.PathLike) -> Dataset:
    """Read a local data file or folder as :func:`load_records` does, without checking any column.

    Raises:
        ValueError: the file is missing, unreadable, of an unknown type or holds no records.
    """
    path = Path(path).expanduser()
    ds = _read_path(path)
    if len(ds) == 0:
        raise ValueError(f"{path} holds no records")
    return ds


def load_records(
    path: str | os.PathLike,
    *,
    text_field: str | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
    messages_field: str | None = None,
) -> Dataset:
    """Load a local data file or folder as a ``datasets.Dataset``, offline.

    Supported: a ``.txt`` file (split into documents at blank lines, column ``text``), a folder of ``.txt``
    files (one document per file, found recursively in sorted order), ``.jsonl``/``.json``, ``.csv``,
    ``.parquet``, and a folder written by ``Dataset.save_to_disk`` (of a ``DatasetDict``: its ``train`` split,
    or its only split).

    Args:
        path: The file or folder.
        text_field: Column holding plain text (default ``"text"``); checked unless other columns are named.
        prompt_field: Column holding prompts; needs ``response_field``.
        response_field: Column holding responses; needs ``prompt_field``.
        messages_field: Column holding conversations (lists of ``{"role", "content"}`` messages).

    Returns:
        The dataset with all of its columns; the named ones are checked to exist and hold text (or lists, for
        conversations and TRL's conversational prompt/completion).

    Raises:
        ValueError: the file is missing, unreadable or of an unknown type (the message names it), or a field is
            missing (the message names the field, the file and the fields that exist).
    """
    path = Path(path).expanduser()
    required = _required_fields(text_field, prompt_field, response_field)
    ds = read_records(path)
    if messages_field is not None or prompt_field is not None:
        detect_format(
            ds,
            prompt_field=prompt_field,
            response_field=response_field,
            messages_field=messages_field,
            where=str(path),
        )
    else:
        _check_fields(ds, required, str(path))
    return ds
