"""What a downloaded checkpoint, scores file or config file can make this package do: nothing but data.

* Code shipped with a checkpoint runs only with ``trust_remote_code=True`` (``--trust-remote-code``).
* Scores, selections and config files are read with ``json``/``yaml.safe_load``; nothing is unpickled, and any
  ``torch.load`` (ours, and the HF Trainer's when it resumes a checkpoint) passes ``weights_only=True``.
* An output path named in a config file stays inside the working folder, symlinks resolved
  (``check_config_output_path``); the files a run writes have fixed names inside ``--out``, and no output is
  written through a symlink or into a device or FIFO (tests/test_outputs.py).
"""

from __future__ import annotations

import ast
import inspect
import json
import pickle
from pathlib import Path

import pytest
import transformers
import yaml

from aletheia_lora.cli import main
from aletheia_lora.files import MANIFEST_NAME, check_config_output_path
from aletheia_lora.models import ModelConfig, load_model_and_tokenizer
from aletheia_lora.probe import LayerScores

SRC = Path(__file__).resolve().parents[1] / "src" / "aletheia_lora"


def _calls(path: Path):
    """(dotted callee name, call node) of every call in a source file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def _keyword(node: ast.Call, name: str):
    for keyword in node.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else keyword.value
    return None


# --- remote code ----------------------------------------------------------------------------------------------


@pytest.fixture
def spy_loads(monkeypatch):
    """Record the trust_remote_code every transformers loader is called with (the loading itself goes on)."""
    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "missing"))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return seen


def test_loading_passes_trust_remote_code_false_unless_asked(spy_loads, tiny_checkpoint):
    load_model_and_tokenizer(str(tiny_checkpoint))
    ModelConfig(model=str(tiny_checkpoint)).load()
    assert spy_loads == [False] * 4
    assert ModelConfig().trust_remote_code is False
    assert inspect.signature(load_model_and_tokenizer).parameters["trust_remote_code"].default is False


def test_the_command_line_passes_trust_remote_code_only_with_the_flag(spy_loads, tiny_checkpoint, tmp_path, capsys):
    argv = ["config", "--layers", "0", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "a.json"), "-q"]
    assert main(argv) == 0
    assert spy_loads == [False, False]
    assert main([*argv, "--trust-remote-code"]) == 0
    assert spy_loads[2:] == [True, True]


def test_trust_remote_code_must_be_a_real_boolean(tiny_checkpoint):
    with pytest.raises(TypeError, match="trust_remote_code must be True or False, got 'false'"):
        load_model_and_tokenizer(str(tiny_checkpoint), trust_remote_code="false")  # a truthy string
    with pytest.raises(ValueError, match="--trust-remote-code must be true or false, got 1"):
        ModelConfig(trust_remote_code=1)


def test_a_config_file_cannot_switch_on_remote_code(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("trust_remote_code: true\nmodel: /nonexistent\n")
    assert main(["probe", "--config", str(config)]) == 2
    assert "--trust-remote-code on the command line" in capsys.readouterr().err


# --- no unpickling --------------------------------------------------------------------------------------------

FORBIDDEN_CALLS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "cPickle.load",
    "dill.load",
    "dill.loads",
    "joblib.load",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "eval",
    "exec",
}


def test_the_package_never_unpickles_or_evaluates_what_it_reads():
    found = [
        f"{path.name}:{node.lineno} {name}"
        for path in sorted(SRC.glob("*.py"))
        for name, node in _calls(path)
        if name in FORBIDDEN_CALLS
    ]
    assert not found, f"use json / yaml.safe_load / safetensors instead: {found}"


def test_every_torch_load_in_the_package_is_weights_only():
    loads = [(path, node) for path in sorted(SRC.glob("*.py")) for name, node in _calls(path) if name == "torch.load"]
    unsafe = [f"{path.name}:{node.lineno}" for path, node in loads if _keyword(node, "weights_only") is not True]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    allow_pickle = [
        f"{path.name}:{node.lineno}"
        for path in sorted(SRC.glob("*.py"))
        for name, node in _calls(path)
        if name.endswith(("np.load", "numpy.load")) and _keyword(node, "allow_pickle") is not False
    ]
    assert not allow_pickle, f"numpy.load must pass allow_pickle=False: {allow_pickle}"


def test_resuming_a_checkpoint_loads_it_weights_only():
    # `--resume` hands a checkpoint folder to the HF Trainer, which torch.loads its optimizer, scheduler and RNG
    # state: those files come from disk like any download, so every such load must be weights_only.
    source = Path(inspect.getsourcefile(transformers.Trainer))
    loads = [node for name, node in _calls(source) if name == "torch.load"]
    assert loads
    assert all(_keyword(node, "weights_only") is True for node in loads)


def test_a_pickle_disguised_as_scores_is_refused_unread(tmp_path, monkeypatch):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    path = tmp_path / "scores.json"
    path.write_bytes(pickle.dumps({"scores": {"0": Boom()}}))

    def never(*args, **kwargs):
        raise AssertionError("something unpickled the scores file")

    monkeypatch.setattr(pickle, "loads", never)
    monkeypatch.setattr(pickle, "load", never)
    with pytest.raises(ValueError, match="cannot read scores file|is not valid JSON"):
        LayerScores.from_json(path)


def test_a_config_file_with_python_tags_is_refused_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pwned = tmp_path / "pwned"
    config = tmp_path / "c.yaml"
    config.write_text(f"top_pct: !!python/object/apply:os.system ['touch {pwned}']\n")
    with pytest.raises(yaml.YAMLError):  # what safe_load does with it
        yaml.safe_load(config.read_text())
    assert main(["select", "--config", str(config), "--scores", "s.json"]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    assert not pwned.exists()


# --- output paths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["runs/demo", "out", "./runs/a b", "runs/x/y.json"])
def test_a_config_file_may_name_a_relative_output_path(value):
    assert check_config_output_path(value) == value


@pytest.mark.parametrize("value", ["/etc", "/tmp/run", "../outside", "runs/../../x", "~/.ssh", "~", "//host/share"])
def test_a_config_file_may_not_send_outputs_out_of_the_working_folder(value):
    with pytest.raises(ValueError, match=r"--config: --out .* leaves the working folder; .*command line"):
        check_config_output_path(value)


@pytest.mark.parametrize("value", [None, "", "  ", 3, ["runs"]])
def test_a_config_file_output_path_must_be_a_path(value):
    with pytest.raises(ValueError, match="--config: --out must be a relative folder path"):
        check_config_output_path(value)


def test_a_run_writes_only_inside_its_output_folder(tiny_checkpoint, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps({"max_length": 16, "probe_batches": 1}))
    before = set(tmp_path.rglob("*"))
    argv = ["probe", "--model", str(tiny_checkpoint), "--data", str(tiny_corpus / "target.txt"), "-q"]
    assert main([*argv, "--config", "c.json", "--out", "runs/p"]) == 0
    created = set(tmp_path.rglob("*")) - before
    out = tmp_path / "runs" / "p"
    assert created and all(p == out.parent or out in (p, *p.parents) for p in created)
    # the four outputs, and the manifest of what this tool wrote there (what --overwrite may replace)
    names = {"scores.json", "selection.json", "layer_scores.png", "speed_quality.png", MANIFEST_NAME}
    assert {p.name for p in out.iterdir()} == names
