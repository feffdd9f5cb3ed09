"""Command line: `aletheia-lora probe|select|config|train|run|bench|merge`, each a thin layer over a library function.

User errors (bad flags, files, folders) exit with status 2 and one line on stderr; ``--debug`` shows the
traceback. Flags can also come from a YAML or JSON file (``--config FILE``); flags on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aletheia_lora import __version__
from aletheia_lora.checks import shown
from aletheia_lora.console import console_session, say, stderr_is_terminal, wants_progress

if TYPE_CHECKING:  # the CLI imports the library lazily, so that --help answers fast
    from aletheia_lora.select import Selection

logger = logging.getLogger("aletheia_lora")

# Errors that mean "the input was wrong", answered with one line and exit status 2.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)


class _UsageError(ValueError):
    """A flag argparse could not parse: answered with one line, also under --debug (there is no traceback to show)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block and exit
        raise _UsageError(message)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Hand-written rather than transformers.HfArgumentParser (which reads the same field(metadata={"help"})
# dataclasses): it refuses a field shared by two groups (one flag here), takes bools as `--x [true|false]` with
# `--no_x` only for True defaults (not BooleanOptionalAction), refuses "none" for an optional int or float, names
# flags `--top_pct/--top-pct` in the errors the one-line messages quote, and passes help strings to argparse
# unescaped (the "10%" crash).
def _type_name(annotation: Any) -> str:
    """A field's annotation as text ("int | None", "list[str]"), whether or not it was postponed."""
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "")
    if text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional[") : -1] + " | None"
    return text


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _help(f: dataclasses.Field, default: Any) -> str:
    """The field's help text, escaped for argparse's %-formatting, and its default shown once.

    Help strings are plain text (they may say "10%"). The default is appended unless the text already states
    one, or it is None: for an optional setting None means "not set", and the text says what happens then.
    """
    text = str(f.metadata.get("help", ""))
    if default is not None and not re.search(r"\bdefault:|\bby default\b|\bdefaults to\b", text, re.IGNORECASE):
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        text = f"{text} (default: {shown})" if text else f"(default: {shown})"
    return text.replace("%", "%%")


def _add_dataclass(parser: argparse.ArgumentParser, cls: type, title: str, seen: set[str], values: Any = None) -> None:
    """One flag per dataclass field, with the field's help string; a field name shared by two groups is one flag.

    A field holding a dataclass (a config composed of others) adds that dataclass's flags to the same group, with
    the defaults of the instance it holds; ``values`` is that instance.
    """
    group = parser.add_argument_group(title) if isinstance(parser, argparse.ArgumentParser) else parser
    for f in dataclasses.fields(cls):
        default = getattr(values, f.name) if values is not None else _default(f)
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            _add_dataclass(group, type(default), title, seen, default)
            continue
        if f.name in seen:
            continue
        seen.add(f.name)
        kind = _type_name(f.type)
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("list["):
            item = kind[len("list[") :].split("]")[0].strip()
            kwargs.update(nargs="+", type={"int": int, "float": float}.get(item, str))
            kwargs["metavar"] = item.upper() if item in ("int", "float") else "NAME"
        else:
            base = kind.split("|")[0].strip()
            kwargs["type"] = {"int": int, "float": float}.get(base, str)
            kwargs["metavar"] = base.upper() if base in ("int", "float", "str") else "VALUE"
        action = group.add_argument(_flag(f.name), **kwargs)
        # set after creation: BooleanOptionalAction appends its own "(default: ...)" on some Python versions
        action.help = _help(f, default)


def _build(cls: type, args: argparse.Namespace, values: Any = None):
    """``cls`` from the parsed flags; a field holding a dataclass is built the same way from the same flags."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        default = getattr(values, f.name) if values is not None else _default(f)
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            kwargs[f.name] = _build(type(default), args, default)
        elif hasattr(args, f.name):
            value = getattr(args, f.name)
            # "none" in a flag or config file means None for optional settings
            kwargs[f.name] = None if isinstance(value, str) and value.lower() == "none" else value
    return cls(**kwargs)


def _groups(command: str) -> list[tuple[str, type]]:
    from aletheia_lora.bench import BenchConfig, QualityConfig
    from aletheia_lora.config import LoraSettings
    from aletheia_lora.data import DataConfig
    from aletheia_lora.models import ModelConfig
    from aletheia_lora.probe import ProbeConfig
    from aletheia_lora.select import SelectConfig
    from aletheia_lora.train import TrainConfig

    model = ("model", ModelConfig)
    data = ("data", DataConfig)
    probe = ("probe", ProbeConfig)
    select = ("selection", SelectConfig)
    lora = ("LoRA", LoraSettings)
    train = ("training", TrainConfig)
    return {
        "probe": [model, data, probe, select],
        "select": [select],
        "config": [select, lora],
        "train": [model, data, probe, select, lora, train],
        "run": [model, data, probe, select, lora, train],
        "bench": [("benchmark (defaults: bench/configs/smollm2.yaml)", BenchConfig)],
        "quality": [("quality protocol (defaults: bench/configs/quality.yaml)", QualityConfig)],
        "merge": [],
    }[command]


def _run_config(args: argparse.Namespace):
    from aletheia_lora.pipeline import RunConfig

    return _build(RunConfig, args)  # each group built from the flags of its fields, wherever a field lives


def _cmd_probe(args: argparse.Namespace) -> int:
    from aletheia_lora.distributed import is_main_process
    from aletheia_lora.pipeline import run_probe

    result = run_probe(_run_config(args), args.out, overwrite=args.overwrite, progress=args.progress)
    if is_main_process():
        _print_selection(result["selection"])
        files = [str(path) for path in result.get("files", [])]
        if files:
            print("wrote " + (f"{', '.join(files[:-1])} and {files[-1]}" if len(files) > 1 else files[0]))
    return 0


def _print_selection(selection: Selection) -> None:
    from aletheia_lora.report import selection_lines

    print("\n".join(selection_lines(selection)))


def _make_parent(path: str) -> None:
    parent = Path(path).parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(path))
    parent.mkdir(parents=True, exist_ok=True)


def _selection_from_scores(args: argparse.Namespace) -> Selection:
    from aletheia_lora.probe import LayerScores
    from aletheia_lora.select import SelectConfig, make_selection

    if args.scores is None:
        raise ValueError("give --scores FILE (the scores.json of `aletheia-lora probe`)")
    settings = _build(SelectConfig, args)
    if settings.calibrate:
        raise ValueError("--calibrate times LoRA steps on a model: give it to `aletheia-lora probe`, `train` or `run`")
    return make_selection(LayerScores.from_json(args.scores), **settings.kwargs())


def _cmd_select(args: argparse.Namespace) -> int:
    from aletheia_lora.files import write_json

    selection = _selection_from_scores(args)
    _print_selection(selection)
    if args.out:
        _make_parent(args.out)
        write_json(args.out, selection.to_dict())
        print(f"wrote {args.out}")
    return 0


def _selected_layers(args: argparse.Namespace) -> list[int]:
    if args.layers is not None and args.scores is not None:
        raise ValueError("give --layers or --scores, not both")
    if args.layers is not None:
        return list(args.layers)
    if args.scores is None:
        raise ValueError("give --scores FILE (from `aletheia-lora probe`) or --layers N [N ...]")
    return list(_selection_from_scores(args).layers)


def _cmd_config(args: argparse.Namespace) -> int:
    from aletheia_lora.config import LoraSettings, aletheia_lora_config, apply_aletheia_lora, export_config
    from aletheia_lora.files import write_text
    from aletheia_lora.probe import LayerScores

    layers = _selected_layers(args)
    lora = _build(LoraSettings, args).kwargs()
    model = None
    if lora["rank_allocation"] == "scores" and args.scores is None:
        raise ValueError(
            "--rank-allocation scores needs --scores FILE (which selects the layers too): ranks follow the layers' "
            "probe scores"
        )
    if args.model:
        from aletheia_lora.models import ModelConfig

        model, _ = ModelConfig(model=args.model, trust_remote_code=args.trust_remote_code).load()
        scores = LayerScores.from_json(args.scores) if args.scores and lora["rank_allocation"] == "scores" else None
        config = apply_aletheia_lora(model, layers, layer_scores=scores, **lora)
    else:
        if lora["rank_allocation"] != "uniform":
            raise ValueError("--rank-allocation scores needs --model (ranks are budgeted on its module shapes)")
        if lora["target_experts"]:
            raise ValueError("--target-experts needs --model: fused expert weights are found on the model")
        for key in ("target_experts", "rank_allocation", "rank_by"):
            lora.pop(key)
        config = aletheia_lora_config(layers, **lora)
    text = export_config(config, args.format, model)
    if args.out:
        path = _config_file(args.out, args.format)
        write_text(path, text)
        print(f"wrote {path}{_load_hint(path, args.format)}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


# `config --out FOLDER` writes this file in the folder, by --format
CONFIG_FILE_NAMES = {
    "peft": "adapter_config.json",
    "axolotl": "axolotl_lora.yaml",
    "llamafactory": "llamafactory_lora.yaml",
    "json": "lora_selection.json",
}


def _config_file(out: str, fmt: str) -> Path:
    """The file `config --out` writes: ``out`` itself, or, when ``out`` is an existing folder or ends in a path
    separator, the format's file (:data:`CONFIG_FILE_NAMES`) in that folder, which is created if needed."""
    path = Path(out).expanduser()
    folder = out.endswith(("/", os.sep)) or path.is_dir()
    if folder and path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory (--out ends in / so it names a folder)", out)
    file = path / CONFIG_FILE_NAMES[fmt] if folder else path
    weights = [name for name in ("adapter_model.safetensors", "adapter_model.bin") if (file.parent / name).exists()]
    if file.name == "adapter_config.json" and weights:  # a new config beside trained weights changes how they load
        raise ValueError(
            f"--out {shown(out)}: {file.parent} holds a trained adapter ({weights[0]}); writing adapter_config.json "
            "there would change how it loads: give another folder"
        )
    if folder:
        path.mkdir(parents=True, exist_ok=True)
    else:
        _make_parent(str(path))
    return file


def _load_hint(path: Path, fmt: str) -> str:
    """How to use the file written, as something that can be run as it is."""
    if fmt != "peft":
        return ""
    if path.name != "adapter_config.json":
        return " (peft.LoraConfig.from_pretrained reads a folder's adapter_config.json: give --out a folder)"
    return f" (load with peft.LoraConfig.from_pretrained({str(path.parent)!r}))"


def _cmd_train(args: argparse.Namespace, evaluate: bool = False) -> int:
    from aletheia_lora.distributed import is_main_process
    from aletheia_lora.pipeline import run_pipeline, summary_table

    config = _run_config(args)
    if args.layers is not None and config.lora.rank_allocation == "scores":  # answered before loading the model
        raise ValueError("--rank-allocation scores needs probe scores: drop --layers (the probe or --scores selects)")
    report = run_pipeline(
        config,
        args.out,
        evaluate=evaluate,
        overwrite=args.overwrite,
        resume=args.resume,
        layers=args.layers,
        scores_file=args.scores,
    )
    if is_main_process():
        print()
        print(summary_table(report))  # its last lines name the adapter and the files written
        out = Path(args.out)
        print(f"\nreport: {' and '.join(str(out / n) for n in ('report.md', 'metrics.json') if (out / n).is_file())}")
    return 0


def _cmd_bench(args: argparse.Namespace, command: str = "bench") -> int:
    from aletheia_lora.bench import headline_table, quality_command, render_outputs, run_bench

    if command == "quality":  # the quality protocol: its own settings and runner (aletheia_lora.bench.quality)
        return quality_command(_build(_groups(command)[0][1], args), shlex.join(["aletheia-lora", *args.argv]))
    config = _build(_groups("bench")[0][1], args)
    if args.render_only:
        written = render_outputs(args.out, config.name, docs=args.docs)
    else:
        # the whole command line, so the results say exactly what made them
        command = shlex.join(["aletheia-lora", *args.argv])
        result = run_bench(config, args.out, command=command, render=False)
        print(headline_table(result))
        # the paths render_outputs writes: this run's files only
        rendered = render_outputs(args.out, config.name, docs=args.docs)
        written = [Path(args.out) / f"train_{config.name}.json", *rendered]
    for path in written:
        print(f"wrote {path}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from aletheia_lora.merge import merge_adapter

    if not args.out:
        raise ValueError("give --out DIR: the folder to write the merged checkpoint to")
    options = {name: getattr(args, name) for name in ("base_model", "dtype", "overwrite", "trust_remote_code")}
    out = merge_adapter(args.adapter, args.out, **options)
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def _load_config_file(path: str) -> dict:
    from aletheia_lora.checks import read_data_file

    try:  # YAML for .yaml/.yml, else JSON; within the size, nesting and expanded-size limits of the reader
        values = read_data_file(path)
    except ValueError as exc:
        raise ValueError(f"--config: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config: {shown(path)} must hold a mapping of flag names to values")
    return values


def _group_names(command: str) -> set[str]:
    """Names under which a config file may nest settings: the groups of a run_config.json (``RunConfig``'s
    fields) and any field of the command's settings that holds a dataclass."""
    from aletheia_lora.pipeline import RunConfig

    names: set[str] = set()

    def walk(cls: type, values: Any = None) -> None:
        for f in dataclasses.fields(cls):
            default = getattr(values, f.name) if values is not None else _default(f)
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                names.add(f.name)
                walk(type(default), default)

    walk(RunConfig)
    for _, cls in _groups(command):
        walk(cls)
    return names


def _flatten_config(values: dict, groups: set[str], path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A config file's settings by field name, and how the file spelled each one.

    A top-level key that names a settings group and holds a mapping (the nested layout of run_config.json) is
    flattened into its fields by their names, whichever group they sit in, so files written before a field moved
    between groups still load. A setting given twice (``top-pct`` and ``top_pct``, or flat and nested) is an
    error; only two groups holding the same value of a field they share (one flag sets both) is not.
    """
    flat: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    nested: set[str] = set()

    def put(key: str, value: Any, group: str | None) -> None:
        name, where = key.replace("-", "_"), f"{group}.{key}" if group else key
        if name in flat:
            if not (group and name in nested and flat[name] == value):
                raise ValueError(
                    f"--config: {shown(path)} gives the setting {name} twice, "
                    f"as {shown(spelled[name])} and {shown(where)}"
                )
            return
        flat[name], spelled[name] = value, where
        if group:
            nested.add(name)

    for key, value in values.items():
        key = str(key)
        if key.replace("-", "_") in groups and isinstance(value, dict):
            for inner, inner_value in value.items():
                put(str(inner), inner_value, group=key)
        else:
            put(key, value, group=None)
    return flat, spelled


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The argument parser, and each subcommand's parser by name."""
    parser = _Parser(
        prog="aletheia-lora",
        description="Gradient-guided layer selection for efficient LoRA fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    common.add_argument("--config", metavar="FILE", help="YAML or JSON file of flag values (flags given here win)")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    helps = {
        "probe": "score every layer with the gradient probe; write scores.json, selection.json, layer_scores.png",
        "select": "select layers from a scores.json",
        "config": "write the PEFT LoraConfig (adapter_config.json) for a selection",
        "train": "probe, select and LoRA fine-tune; save an adapter that loads with PeftModel.from_pretrained",
        "run": "train, plus evaluation before/after (target loss, general-corpus loss) and a report",
        "bench": "train LoRA on all layers and on layer selections round-robin: speed, quality, time to quality",
        "quality": "the quality protocol: per-arm rates chosen on validation, test losses, tasks x seeds, resumable",
        "merge": "merge a saved LoRA adapter into its base model and write the full checkpoint",
    }
    parsers = {}
    for name, help_text in helps.items():
        sub = subs.add_parser(name, parents=[common], help=help_text, description=help_text)
        seen: set[str] = set()
        for title, cls in _groups(name):
            _add_dataclass(sub, cls, title, seen)
        if name == "probe":  # train, run and bench have it among their settings (TrainConfig.progress)
            sub.add_argument(
                "--progress",
                action=argparse.BooleanOptionalAction,
                default=True,
                help="progress bars (default: on when stderr is a terminal; off with -q)",
            )
        if name in ("probe", "train", "run"):
            sub.add_argument("--out", default=f"runs/{name}", help="output folder (default: %(default)s)")
            sub.add_argument("--overwrite", action="store_true", help="write into an existing output folder")
        if name in ("train", "run"):
            sub.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
        if name in ("select", "config", "train", "run"):
            sub.add_argument("--scores", help="scores.json from `aletheia-lora probe` (skips the probe)")
        if name in ("config", "train", "run"):
            sub.add_argument("--layers", type=int, nargs="+", metavar="N", help="adapt these layers (skips the probe)")
        if name == "select":
            sub.set_defaults(scores=None)
            sub.add_argument("--out", help="write the selection to this JSON file")
        if name == "config":
            sub.add_argument("--model", help="take module names and layer pattern from this model (else Llama names)")
            sub.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with --model")
            sub.add_argument(
                "--out",
                help="write the config to this file, or into this folder (an existing one, or a path ending in /) as "
                + ", ".join(f"{name} ({fmt})" for fmt, name in CONFIG_FILE_NAMES.items())
                + " (default: stdout)",
            )
            sub.add_argument(
                "--format",
                default="peft",
                choices=["peft", "axolotl", "llamafactory", "json"],
                help="peft: adapter_config.json; axolotl / llamafactory: their YAML LoRA keys; json: the selection "
                "(default: %(default)s)",
            )
        if name == "bench":
            sub.add_argument("--out", default="bench/results", help="folder of train_NAME.* (default: %(default)s)")
            sub.add_argument("--docs", help="also write the benchmark page here, e.g. docs/BENCHMARKS.md")
            sub.add_argument("--render-only", action="store_true", help="re-render tables and plots from the JSON")
        if name == "merge":
            sub.add_argument("adapter", metavar="ADAPTER", help="the adapter's folder (e.g. runs/run/adapter)")
            sub.add_argument("--out", metavar="DIR", help="folder to write the merged checkpoint to (required)")
            sub.add_argument(
                "--base-model",
                metavar="MODEL",
                help="model to merge into: a folder, a Hub id or smollm2-135m (default: the adapter's)",
            )
            sub.add_argument(
                "--dtype",
                choices=["float32", "bfloat16", "float16", "auto"],
                help="dtype of the merged checkpoint (default: the base checkpoint's)",
            )
            sub.add_argument("--overwrite", action="store_true", help="replace a merged checkpoint written to --out")
            sub.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the base model")
        parsers[name] = sub
    return parser, parsers


# Flags that say the same thing two ways (the API refuses both at once): given both, the user meant one of them.
_EXCLUSIVE = (("top_pct", "top_k"), ("layers", "scores"))


def _given_on_command_line(argv: list[str] | None, command: str) -> set[str]:
    """The settings the command line gives, told apart from defaults (``--top-pct 50`` is given, 50 by default
    is not): the command's flags parsed with no defaults at all."""
    parser, parsers = build_parser()
    sub = parsers[command]
    sub._defaults.clear()
    for action in sub._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def _refuse_conflicts(args: argparse.Namespace, given: set[str], from_file: dict[str, Any], path: str | None) -> None:
    """Refuse two flags of :data:`_EXCLUSIVE` given together; one on the command line wins over the other given
    only by the config file (which is dropped from ``from_file``), as the command line wins everywhere."""

    def given_as(name: str, value: Any) -> str:
        return f"{_flag(name)} {' '.join(map(str, value)) if isinstance(value, list) else value}"

    for a, b in _EXCLUSIVE:
        on_line = [name for name in (a, b) if name in given]
        in_file = [name for name in (a, b) if name in from_file and name not in given]
        if len(on_line) == 2:
            raise ValueError(
                f"give {_flag(a)} or {_flag(b)}, not both "
                f"({given_as(a, getattr(args, a))}, {given_as(b, getattr(args, b))})"
            )
        if on_line:
            for name in in_file:
                del from_file[name]
        elif len(in_file) == 2:
            raise ValueError(
                f"--config: {shown(path)} gives both {a} ({shown(from_file[a])}) and {b} "
                f"({shown(from_file[b])}); keep one"
            )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from aletheia_lora.files import check_config_output_path

    parser, parsers = build_parser()
    args = parser.parse_args(argv)
    given = _given_on_command_line(argv, args.command)
    sub = parsers[args.command]
    defaults = {action.dest: action.default for action in sub._actions}
    values: dict[str, Any] = {}
    if args.config:
        values, spelled = _flatten_config(_load_config_file(args.config), _group_names(args.command), args.config)
        unknown = sorted(spelled[name] for name in set(values) - set(defaults))
        if unknown:
            raise ValueError(f"--config: unknown setting(s) {unknown} for `aletheia-lora {args.command}`")
        if values.get("trust_remote_code") is True:
            raise ValueError(
                "--config: trust_remote_code runs code shipped with the checkpoint; "
                "give --trust-remote-code on the command line"
            )
        for key in ("out", "docs"):
            if key in values:
                values[key] = check_config_output_path(values[key], key)
    # a file's value equal to the default gives nothing (a run_config.json holds every setting, top_pct: 50 too)
    set_in_file = {name: value for name, value in values.items() if not _same_setting(value, defaults.get(name))}
    _refuse_conflicts(args, given, set_in_file, args.config)
    if values:
        values = {name: value for name, value in values.items() if name in set_in_file or name in given}
        sub.set_defaults(**values)
        args = parser.parse_args(argv)
    return args


def _same_setting(value: Any, default: Any) -> bool:
    """Whether a config file's value is the flag's default ("none" is None in a config file)."""
    if isinstance(value, str) and value.lower() == "none":
        value = None
    return value == default and isinstance(value, bool) == isinstance(default, bool)


# An error line is at most this long: a message may quote what the user gave, and that may be anything.
MAX_MESSAGE = 400


def _error_line(text: str, fallback: str) -> str:
    """The message's first line, at most :data:`MAX_MESSAGE` characters (an ellipsis marks a cut), with control
    characters escaped so that no quoted input can move the cursor or recolour the terminal."""
    head = text[: 4 * MAX_MESSAGE].strip()  # the first line is in here, or is cut anyway
    line = head.splitlines()[0] if head else fallback
    if len(line) > MAX_MESSAGE:
        line = line[: MAX_MESSAGE - 3] + "..."
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in line)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `aletheia-lora` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    quiet = "-q" in argv or "--quiet" in argv
    with console_session(debug, quiet) as libraries:
        return _main(argv, debug, libraries)


def _main(argv: list[str], debug: bool, libraries: Callable[[bool], None]) -> int:
    try:
        args = _parse(argv)
        args.argv = argv
        setting, asked, terminal = getattr(args, "progress", True), "--progress" in argv, stderr_is_terminal()
        progress = wants_progress(quiet=args.quiet, setting=setting, asked=asked, terminal=terminal)
        if hasattr(args, "progress"):
            args.progress = progress
        libraries(progress)
        commands = {
            "probe": _cmd_probe,
            "select": _cmd_select,
            "config": _cmd_config,
            "train": _cmd_train,
            "run": lambda a: _cmd_train(a, evaluate=True),
            "bench": _cmd_bench,
            "quality": lambda a: _cmd_bench(a, "quality"),
            "merge": _cmd_merge,
        }
        return commands[args.command](args)
    except USER_ERRORS as exc:
        if debug and not isinstance(exc, _UsageError):
            raise
        say(f"aletheia-lora: error: {_error_line(str(exc), type(exc).__name__)}")
        return 2
    except OSError as exc:  # a full disk, a vanished folder: the user's environment, not a bug
        if debug:
            raise
        message = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
        say(f"aletheia-lora: error: {_error_line(message, type(exc).__name__)}")
        return 2
    except KeyboardInterrupt:
        say("aletheia-lora: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
