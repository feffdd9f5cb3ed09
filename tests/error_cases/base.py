"""The machinery every case module uses: a case, its context, its outcomes, and helpers several stages share.

``tests/test_errors.py`` imports this module too (it runs the cases and renders the table); nothing here imports a
case module or ``test_errors``, so there is no cycle.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aletheia_lora import gradient_probe
from tiny_models import tiny_model, token_rows

CLI_PREFIX = "aletheia-lora: error: "


# --- outcomes -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raises:
    """The call raises ``error`` with a message matching ``match``."""

    error: type[BaseException]
    match: str

    def describe(self) -> tuple[str, str]:
        return f"`{self.error.__name__}`", readable(self.match)


@dataclass(frozen=True)
class Exit2:
    """``run`` returns CLI arguments: exit status 2, one stderr line matching ``match``, a traceback with --debug."""

    match: str
    debug_raises: bool = True

    def describe(self) -> tuple[str, str]:
        return "exit 2", f"{CLI_PREFIX}{readable(self.match)}"


@dataclass(frozen=True)
class Warns:
    """The call succeeds (its own assertions hold) and logs a warning matching ``match``."""

    match: str

    def describe(self) -> tuple[str, str]:
        return "works, warns", readable(self.match)


@dataclass(frozen=True)
class Works:
    """The call succeeds and its own assertions hold; ``what`` says what it guarantees."""

    what: str

    def describe(self) -> tuple[str, str]:
        return "works", self.what


def readable(pattern: str) -> str:
    """A match pattern as a reader sees the message: escapes dropped, wildcards as an ellipsis."""
    text = pattern.replace(".*", "…")
    return re.sub(r"\\(.)", r"\1", text)


# --- the cases ------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a case may use: a scratch folder, pytest's monkeypatch, and the tiny checkpoint and corpus."""

    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch
    checkpoint_dir: Path
    corpus_dir: Path

    def model(self, arch: str = "llama", n_layers: int = 2):
        return copy.deepcopy(cached_model(arch, n_layers))

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return path

    def scores_file(self, name: str = "scores.json", scores: str = '{"0": 1.0, "1": 3.0, "2": 2.0}') -> str:
        return str(self.file(name, f'{{"scores": {scores}}}'))

    def cli_model_args(self) -> list[str]:
        return ["--model", str(self.checkpoint_dir), "--data", str(self.corpus_dir / "target.txt"), "-q"]


@functools.lru_cache(maxsize=8)
def cached_model(arch: str, n_layers: int):
    """A tiny model, built once per process (cases get a deep copy through :meth:`Ctx.model`)."""
    return tiny_model(arch, n_layers=n_layers)


@dataclass(frozen=True)
class Case:
    """One bad input: its table id, where it goes in, what it is, how to run it, and what it gets.

    A ``pending`` case is a gap in a module this test's authors do not own; it runs as a strict xfail that names
    the change to make.
    """

    id: str
    area: str
    given: str
    run: Callable[[Ctx], Any]
    outcome: Raises | Exit2 | Warns | Works
    pending: str = field(default="")


# --- helpers shared by several stages -------------------------------------------------------------------------


def probe(ctx: Ctx, model=None, rows=None, **kwargs):
    """``gradient_probe`` on a fresh tiny Llama and two token rows unless given, without a progress bar."""
    return gradient_probe(
        ctx.model() if model is None else model, token_rows(2) if rows is None else rows, progress=False, **kwargs
    )


def config_file(ctx: Ctx, name: str, content: str, *argv: str) -> list[str]:
    """CLI arguments ``argv`` plus ``--config`` naming a file ``name`` written with ``content``."""
    return [*argv, "--config", str(ctx.file(name, content))]
