"""The command line's console: one line per fact on stderr, clean when redirected.

Our logger's records and Python warnings are written one line each (``aletheia-lora: ...``,
``aletheia-lora: warning: ...``); other libraries' INFO chatter (matplotlib's "generated new fontManager", httpx
requests) stays out and their warnings stay in; progress bars are shown only where they can be drawn. Used by
:func:`aletheia_lora.cli.main` for one command at a time, and undone afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Warnings a user can do nothing about, each filtered by its message (shown again under --debug):
NOISE = (
    # PEFT still calls `is_gradient_checkpointing`, a transformers alias deprecated in v5; fixed upstream, not here
    ".*is_gradient_checkpointing.* is deprecated",
)


class _ConsoleFormatter(logging.Formatter):
    """``aletheia-lora: message``, ``aletheia-lora: warning: message``; under --debug, level and logger name."""

    def __init__(self, debug: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s" if debug else None)
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        if self.debug:
            return super().format(record)
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"aletheia-lora: {level}{record.getMessage()}"


class _ConsoleHandler(logging.Handler):
    """Writes each record as one line to the current ``sys.stderr`` through ``tqdm.write``, which lifts an open
    progress bar out of the way and redraws it below the line, so that lines and bars never cut each other."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's own rule: a failing handler must not break the program
            self.handleError(record)


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """A Python warning as one line: the message (whitespace folded), its category and where it was raised."""
    where = "/".join(Path(filename).parts[-2:])
    text = " ".join(str(message).split())
    logging.getLogger("aletheia_lora.warnings").warning("%s (%s, %s:%s)", text, category.__name__, where, lineno)


def wants_progress(*, quiet: bool, setting: bool, asked: bool, terminal: bool) -> bool:
    """Whether to show progress bars: not with -q or ``--no-progress`` (``setting`` False); with ``--progress``
    given on the command line (``asked``); else only when stderr is a terminal (``terminal``): in a file, a bar's
    carriage returns and escape sequences are junk."""
    return not quiet and setting and (asked or terminal)


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (False when it is redirected, replaced by an object without ``isatty``, or
    closed)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def say(line: str) -> None:
    """Write one line to stderr in one write: several ranks share stderr, and print() writes the newline apart."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@contextlib.contextmanager
def console_session(debug: bool, quiet: bool) -> Iterator[Callable[[bool], None]]:
    """Set up the console for one command, and put everything back afterwards (main() may run in a notebook or a
    test): our logger gets its own handler (propagation off, so a root handler someone configured prints nothing
    twice) at INFO, WARNING with -q or on ranks other than 0, DEBUG with --debug; Python warnings are logged as one
    line each.

    Yields a function that applies the progress-bar decision to transformers, datasets and huggingface_hub,
    called once the command line is parsed (parsing imports them anyway).
    """
    ours = logging.getLogger("aletheia_lora")
    saved = ours.handlers[:], ours.level, ours.propagate
    handler = _ConsoleHandler()
    handler.setFormatter(_ConsoleFormatter(debug))
    ours.handlers = [handler]
    # the other ranks of a multi-process run (a launcher's RANK) would repeat rank 0's lines: they say what goes wrong
    others = os.environ.get("RANK", "0").strip() not in ("", "0")
    ours.setLevel(logging.DEBUG if debug else logging.WARNING if quiet or others else logging.INFO)
    ours.propagate = False
    restore: list[Callable[[], None]] = []

    def libraries(progress: bool) -> None:
        import datasets
        import huggingface_hub.utils as hub
        import transformers

        hf = transformers.utils.logging
        levels = {"transformers": hf.get_verbosity(), "datasets": datasets.logging.get_verbosity()}
        bars = (hf.is_progress_bar_enabled(), datasets.is_progress_bar_enabled(), not hub.are_progress_bars_disabled())
        # Their warnings are kept (WARNING), their INFO is not; a level set in the environment wins.
        if not os.environ.get("TRANSFORMERS_VERBOSITY"):
            hf.set_verbosity_warning()
        if not os.environ.get("DATASETS_VERBOSITY"):
            datasets.logging.set_verbosity_warning()
        if not progress:
            hf.disable_progress_bar()
            datasets.disable_progress_bars()
            hub.disable_progress_bars()

        def back() -> None:
            hf.set_verbosity(levels["transformers"])
            datasets.logging.set_verbosity(levels["datasets"])
            for on, enable, disable in zip(
                bars,
                (hf.enable_progress_bar, datasets.enable_progress_bars, hub.enable_progress_bars),
                (hf.disable_progress_bar, datasets.disable_progress_bars, hub.disable_progress_bars),
            ):
                (enable if on else disable)()

        restore.append(back)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if not debug:
                for pattern in NOISE:
                    warnings.filterwarnings("ignore", message=pattern)
            yield libraries
    finally:
        for back in restore:
            back()
        ours.handlers, ours.level, ours.propagate = saved
