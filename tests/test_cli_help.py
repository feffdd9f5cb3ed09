"""`--help` of every subcommand, and the help text built from the settings dataclasses."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field

import pytest

from aletheia_lora import __version__
from aletheia_lora.cli import _add_dataclass, build_parser, main

_, PARSERS = build_parser()


def _help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _entries(text: str) -> list[str]:
    """The help text of each option: from a line starting with "  -" to the next one (or a group title)."""
    entries: list[str] = []
    for line in text.splitlines():
        if line.startswith("  -"):
            entries.append(line)
        elif entries and line.startswith(" "):
            entries[-1] += " " + line.strip()
        else:
            entries.append("")
    return [entry for entry in entries if entry]


def _check_help(text: str) -> None:
    assert "%(" not in text
    for entry in _entries(text):
        assert len(re.findall(r"\bdefault:", entry, re.IGNORECASE)) <= 1, entry
        assert "(default: None)" not in entry, entry


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_subcommand_help_exits_0_and_names_its_flags(command, capsys):
    out = _help_of([command, "--help"], capsys)
    assert out.startswith("usage: aletheia-lora " + command)
    flags = [option for action in PARSERS[command]._actions for option in action.option_strings]
    assert "--config" in flags and len(flags) > 4
    missing = [flag for flag in flags if flag not in out]
    assert not missing, missing
    _check_help(out)


def test_top_level_help_names_every_subcommand(capsys):
    out = _help_of(["--help"], capsys)
    assert out.startswith("usage: aletheia-lora")
    assert all(command in out for command in PARSERS)
    _check_help(out)


def test_version(capsys):
    assert _help_of(["--version"], capsys).strip() == f"aletheia-lora {__version__}"


def test_bench_help_shows_a_percent_sign(capsys):
    out = _help_of(["bench", "--help"], capsys)
    assert "10% of the peak" in " ".join(out.split())


def _setting(default=None, help_text: str = "", **kwargs):
    return field(default=default, metadata={"help": help_text}, **kwargs)


@dataclass
class _Settings:
    share: float = _setting(10, "Share of layers, in % (10% by default).")
    cap: int | None = _setting(None, "Optional cap.")
    device: str | None = _setting(None, "Device (default: cuda if present).")
    names: list[str] = field(default_factory=lambda: ["a", "b"], metadata={"help": "Names."})
    fast: bool = _setting(False, "Go fast.")
    seed: int = _setting(0, "Seed.")


def test_help_strings_are_plain_text_and_show_a_default_once():
    parser = argparse.ArgumentParser(prog="x")
    _add_dataclass(parser, _Settings, "settings", set())
    entries = {entry.split()[0]: entry for entry in _entries(parser.format_help())}
    # the text states its default: argparse's is not appended; "%" is printed as it is
    assert entries["--share"].endswith("Share of layers, in % (10% by default).")
    assert entries["--cap"].endswith("Optional cap.")  # None: not set, no "(default: None)"
    assert entries["--device"].endswith("Device (default: cuda if present).")
    assert entries["--names"].endswith("Names. (default: a b)")
    assert entries["--fast,"].endswith("Go fast. (default: False)")
    assert entries["--seed"].endswith("Seed. (default: 0)")
    args = parser.parse_args(["--no-fast", "--names", "c", "--cap", "3"])
    assert (args.fast, args.names, args.cap, args.share) == (False, ["c"], 3, 10)


def test_a_field_shared_by_two_groups_is_one_flag():
    @dataclass
    class Other:
        seed: int = 0
        extra: str = "x"

    parser = argparse.ArgumentParser(prog="x")
    seen: set[str] = set()
    _add_dataclass(parser, _Settings, "settings", seen)
    _add_dataclass(parser, Other, "other", seen)
    assert parser.format_help().count("--seed") == 2  # usage line and one option entry
    assert parser.parse_args(["--seed", "3", "--extra", "y"]).seed == 3


def test_merge_help_names_the_adapter_and_its_flags(capsys):
    out = " ".join(_help_of(["merge", "--help"], capsys).split())
    assert out.startswith("usage: aletheia-lora merge") and "ADAPTER" in out
    assert "merge a saved LoRA adapter into its base model" in out
    for flag in ("--out DIR", "--base-model MODEL", "--dtype {float32,bfloat16,float16,auto}", "--overwrite"):
        assert flag in out, flag
