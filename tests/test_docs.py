"""What the README and docs tell users to type exists: imports in their code blocks, attributes they name."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _imports(page: Path) -> list[tuple[str, str]]:
    found = []
    for block in _code_blocks(page.read_text()):
        for module, names in re.findall(r"^\s*from (aletheia_lora[\w.]*) import ([\w, ]+)$", block, flags=re.M):
            found += [(module, name.strip()) for name in names.split(",") if name.strip()]
    return found


def test_the_pages_hold_imports_to_check():
    assert len(_imports(ROOT / "README.md")) >= 3  # the quick start's three names at least


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_import_exists(page):
    missing = [f"{m}.{n}" for m, n in _imports(page) if not hasattr(importlib.import_module(m), n)]
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_report_attributes_exist(page):
    from aletheia_lora.integrations import AletheiaReport

    # `configure_aletheia_lora(...).NAME` and `prepare_aletheia_model(...)[1].NAME` are an AletheiaReport's
    names = re.findall(r"configure_aletheia_lora\(\.\.\.\)\.(\w+)", page.read_text())
    assert [n for n in names if not hasattr(AletheiaReport, n)] == []
