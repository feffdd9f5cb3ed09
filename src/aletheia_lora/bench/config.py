"""The benchmark's settings: :class:`BenchConfig`, the arm names, and the settings' names in older results.

A setting that means what a stage config's setting means (the model, the data, LoRA, the selection, training)
carries that setting's name and help text, taken from the stage dataclass's field metadata by
:func:`stage_field`, so one flag means one thing in every subcommand (``max_steps`` and ``lr_scheduler_type`` as
in ``aletheia-lora run``). Its default is the stage's unless the benchmark needs another (``dtype``, ``max_steps``,
``lr_scheduler_type``, ``r``, ``lora_alpha``, ``max_train_chars``, ``max_eval_chars``, ``reprobe_every``);
``bench/configs/*.yaml`` state every such value. The other settings are the benchmark's own.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from aletheia_lora.allocator import CPU_ALLOCATORS
from aletheia_lora.checks import check_choice, read_data_file
from aletheia_lora.config import LoraSettings
from aletheia_lora.data import DataConfig
from aletheia_lora.models import BUNDLED_ALIASES, ModelConfig
from aletheia_lora.probe import ProbeConfig
from aletheia_lora.select import SelectConfig
from aletheia_lora.train import TrainConfig

ARM_KINDS = ("all", "score", "truncation", "contiguous", "frontier", "ranks", "reprobe")
# Arms built on the score selection, each compared with the `score` arm (one-shot selection, uniform rank).
BEYOND_ARMS = ("ranks", "reprobe")
BASELINE = "all"
STRATEGY_ARMS = ("score", "truncation", "contiguous")
# The arm the targets are assessed on: the library's truncation-aware rule.
TARGET_ARM = "truncation"
TINY_MODEL = "tiny"
# The run name of the bundled model, which the committed configs and results (train_smollm2.*) carry.
BUNDLED_NAME = "smollm2"
SCHEDULES = ("constant", "cosine")
# A cosine schedule decays to this share of the peak at `max_steps` and stays there, so equal-time steps still learn.
COSINE_FLOOR = 0.1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# --general-data values that mean "no general corpus" (as DataConfig reads them)
_NO_GENERAL = ("", "none", "off")

# The one place that knows the settings' older names. Results written before a rename (so that a name means the
# same in the benchmark as in the stage configs) record the old names in their "config"; load_result() maps them,
# generation by generation, so the committed results render as before. Config files must use today's names.
# The first renames; bench/families.py refuses these in its own config too (which keeps `steps`, its timed steps).
RENAMED_SETTINGS = {
    "warmup_steps": "untimed_steps",  # steps left out of the timings; `warmup_steps` is the learning-rate warm-up
    "lr_warmup_steps": "warmup_steps",  # TrainConfig's name
    "budget_pct": "top_pct",  # SelectConfig's name
    "eval_every": "eval_steps",  # TrainConfig's name
}
# Then `run`'s names for the steps and the schedule.
RENAMED_FOR_RUN = {
    "steps": "max_steps",  # TrainConfig's name (`run --max-steps`)
    "lr_schedule": "lr_scheduler_type",  # TrainConfig's name (`run --lr-scheduler-type`)
}
# Each generation: (a key every result written after it holds, {old name: new name}), oldest first.
RENAMED_GENERATIONS: tuple[tuple[str, dict[str, str]], ...] = (
    ("untimed_steps", RENAMED_SETTINGS),
    ("max_steps", RENAMED_FOR_RUN),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def stage_field(stage: type, name: str, *, default: Any = MISSING, note: str = "") -> Any:
    """A dataclass field for the setting ``name`` of the stage config ``stage``, with that setting's help text.

    Args:
        stage: The stage's dataclass (``LoraSettings``, ``TrainConfig``, ...).
        name: The field's name there; the benchmark's field carries the same name.
        default: The benchmark's default when it needs another than the stage's.
        note: What the setting means in the benchmark besides, appended to the help text.
    """
    source = {f.name: f for f in fields(stage)}[name]
    text = source.metadata["help"]
    if note:
        text += (" " if text.endswith(".") else ". ") + note
    metadata = {"help": text}
    if default is MISSING and source.default_factory is not MISSING:
        return field(default_factory=source.default_factory, metadata=metadata)
    return field(default=source.default if default is MISSING else default, metadata=metadata)


def default_name(model: str) -> str:
    """The run name a benchmark of ``model`` gets when none is given: ``smollm2`` for the bundled model (the
    committed results' name), ``tiny`` for the random model, else the checkpoint folder's or Hub id's last part,
    with every run of other characters than letters, digits, ``_``, ``-``, ``.`` made one ``_``."""
    text = str(model).strip()
    if text.lower() in BUNDLED_ALIASES:
        return BUNDLED_NAME
    if text == TINY_MODEL:
        return TINY_MODEL
    last = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    name = _UNSAFE.sub("_", last).strip("_.-")
    return name or "model"


@dataclass
class BenchConfig:
    """Settings of one benchmark run. The defaults are the SmolLM2 experiment (``bench/configs/smollm2.yaml``)."""

    name: str | None = field(
        default=None,
        metadata={
            "help": "Name of the run: results go to train_NAME.* in --out. Default: from --model (smollm2 for the "
            "bundled model, else the checkpoint folder's name)."
        },
    )
    model: str = stage_field(ModelConfig, "model", note="Or 'tiny': a random Llama on counting sequences.")
    dtype: str = stage_field(
        ModelConfig,
        "dtype",
        default="float32",
        note="Here float32 by default, the precision of the committed figures (every arm uses the same).",
    )
    device: str | None = stage_field(ModelConfig, "device")
    cpu_allocator: str = stage_field(
        ModelConfig,
        "cpu_allocator",
        note="The committed SmolLM2 figures were timed with glibc's own thresholds.",
    )
    threads: int | None = field(
        default=1, metadata={"help": "CPU threads of torch ('none': torch's own; 1 suits a shared machine)."}
    )
    tiny_layers: int = field(default=6, metadata={"help": "Blocks of the 'tiny' model."})
    tiny_hidden: int = field(default=64, metadata={"help": "Hidden size of the 'tiny' model (a multiple of 4)."})
    tiny_vocab: int = field(default=128, metadata={"help": "Vocabulary of the 'tiny' model."})
    data: str = stage_field(DataConfig, "data")
    general_data: str | None = stage_field(
        DataConfig,
        "general_data",
        default="kjv",
        note="Here the default is kjv (the benchmark measures forgetting); with 'none' it is not measured (its "
        "columns show '-').",
    )
    max_length: int = stage_field(DataConfig, "max_length")
    max_train_chars: int | None = stage_field(DataConfig, "max_train_chars", default=400_000)
    max_eval_chars: int | None = stage_field(DataConfig, "max_eval_chars", default=100_000)
    eval_blocks: int = field(
        default=32, metadata={"help": "Held-out target blocks evaluated (spread evenly over the eval split)."}
    )
    general_blocks: int = field(default=32, metadata={"help": "General-corpus blocks evaluated for forgetting."})
    batch_size: int = stage_field(TrainConfig, "batch_size")
    max_steps: int = stage_field(
        TrainConfig,
        "max_steps",
        default=60,
        note="Here every arm's steps in the equal-step view; faster arms train on past it for equal time and "
        "time to quality.",
    )
    untimed_steps: int = field(
        default=2,
        metadata={
            "help": "First steps of each arm left out of the step-time medians (at least 1: it measures memory)."
        },
    )
    learning_rate: float = stage_field(
        TrainConfig, "learning_rate", default=3e-4, note="Here 3e-4 by default, the rate of the committed figures."
    )
    lr_scheduler_type: str = stage_field(
        TrainConfig,
        "lr_scheduler_type",
        default="constant",
        note="Here constant or cosine; cosine decays to 10% of the peak at --max-steps and holds there, so the "
        "steps beyond it (equal time, time to quality) still learn.",
    )
    warmup_steps: int = stage_field(TrainConfig, "warmup_steps")
    weight_decay: float = stage_field(TrainConfig, "weight_decay")
    max_grad_norm: float = stage_field(TrainConfig, "max_grad_norm")
    seed: int = stage_field(TrainConfig, "seed", note="Also of the probe and of the data split.")
    r: int = stage_field(
        LoraSettings, "r", default=8, note="Here on all attention and MLP projections of an adapted block."
    )
    lora_alpha: float = stage_field(LoraSettings, "lora_alpha", default=16)
    top_pct: float = stage_field(SelectConfig, "top_pct", note="Here below 100: the share every selective arm adapts.")
    calibrate: bool = stage_field(
        SelectConfig,
        "calibrate",
        default=True,
        note="Here beside the cost model: each arm records both predictions; the timing runs before any arm trains, "
        "off every arm's clock.",
    )
    arms: list[str] = field(
        default_factory=lambda: list(ARM_KINDS[:5]),
        metadata={
            "help": "Arms, in order: all (required), score, truncation, contiguous, frontier, ranks (score blocks, "
            "score-proportional ranks at uniform r's parameter count), reprobe (score blocks, re-probed)."
        },
    )
    reprobe_every: int = stage_field(
        TrainConfig, "reprobe_every", default=20, note="Here the reprobe arm's interval (at least 1)."
    )
    frontier_points: int = field(
        default=3, metadata={"help": "Frontier points trained besides the named arms (spread from low to high)."}
    )
    eval_steps: int = stage_field(
        TrainConfig, "eval_steps", default=10, note="Here at least 1 (time to quality reads the held-out curve)."
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Blocks per evaluation batch."})
    quality_cap: float = field(
        default=1.5, metadata={"help": "Time to quality: train up to this many times all-layer LoRA's time."}
    )
    probe_batches: int = stage_field(ProbeConfig, "probe_batches")
    probe_batch_size: int = stage_field(ProbeConfig, "probe_batch_size")
    progress: bool = stage_field(TrainConfig, "progress")

    def __post_init__(self) -> None:
        positive = {
            "tiny_layers",
            "tiny_hidden",
            "tiny_vocab",
            "max_length",
            "eval_blocks",
            "general_blocks",
            "batch_size",
            "max_steps",
            "untimed_steps",
            "r",
            "eval_steps",
            "eval_batch_size",
            "probe_batches",
            "probe_batch_size",
            "reprobe_every",
        }
        optional_positive = {"threads", "max_train_chars", "max_eval_chars"}
        non_negative = {"warmup_steps", "seed", "frontier_points"}
        for f in fields(self):
            value, flag = getattr(self, f.name), _flag(f.name)
            if f.name in positive | optional_positive | non_negative:
                if value is None and f.name in optional_positive:
                    continue
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise TypeError(f"{flag} must be an integer, got {value!r}")
                if value < (0 if f.name in non_negative else 1):
                    raise ValueError(f"{flag} must be {'>= 0' if f.name in non_negative else '>= 1'}, got {value!r}")
            elif f.type == "float":
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                    raise TypeError(f"{flag} must be a finite number, got {value!r}")
                if value < 0:
                    raise ValueError(f"{flag} must be >= 0, got {value!r}")
            elif f.type == "bool" and not isinstance(value, bool):
                raise TypeError(f"{flag} must be true or false, got {value!r}")
        check_choice("--cpu-allocator", self.cpu_allocator, CPU_ALLOCATORS)
        if isinstance(self.general_data, str) and self.general_data.strip().lower() in _NO_GENERAL:
            self.general_data = None  # as `run` reads it: no general corpus, forgetting not measured
        for name in ("model", "data", "dtype", "lr_scheduler_type", "name", "general_data"):
            value = getattr(self, name)
            if value is None and name in ("name", "general_data"):
                continue
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{_flag(name)} must be a non-empty string, got {value!r}")
        if self.name is None:
            self.name = default_name(self.model)
        if not _NAME.match(self.name):
            raise ValueError(f"--name must be letters, digits, '_', '-' or '.', got {self.name!r}")
        if self.lr_scheduler_type not in SCHEDULES:
            why = " (linear reaches 0 at --max-steps: the steps beyond it would not learn)"
            raise ValueError(
                f"--lr-scheduler-type must be one of {', '.join(SCHEDULES)}, got {self.lr_scheduler_type!r}"
                + (why if self.lr_scheduler_type == "linear" else "")
            )
        if self.learning_rate == 0:
            raise ValueError("--learning-rate must be positive, got 0")
        if self.lora_alpha == 0:
            raise ValueError("--lora-alpha must be positive, got 0")
        if not 1 <= self.top_pct < 100:
            raise ValueError(f"--top-pct must be in [1, 100): the share of blocks adapted, got {self.top_pct!r}")
        if self.quality_cap < 1:
            raise ValueError(
                f"--quality-cap must be >= 1 (a multiple of all-layer LoRA's time), got {self.quality_cap!r}"
            )
        if self.max_steps <= self.untimed_steps:
            raise ValueError(
                f"--max-steps ({self.max_steps}) must exceed --untimed-steps ({self.untimed_steps}): no step would "
                "be timed"
            )
        if self.tiny_hidden % 4:
            raise ValueError(f"--tiny-hidden must be a multiple of 4 (the tiny model's heads), got {self.tiny_hidden}")
        self._check_arms()

    def _check_arms(self) -> None:
        if isinstance(self.arms, str) or not isinstance(self.arms, Sequence) or not self.arms:
            raise TypeError(f"--arms must be a list of arm names ({', '.join(ARM_KINDS)}), got {self.arms!r}")
        unknown = [a for a in self.arms if a not in ARM_KINDS]
        if unknown:
            raise ValueError(f"--arms: unknown arm(s) {unknown}; choose from {', '.join(ARM_KINDS)}")
        repeated = sorted({a for a in self.arms if list(self.arms).count(a) > 1})
        if repeated:
            raise ValueError(f"--arms lists {repeated} more than once")
        if BASELINE not in self.arms:
            raise ValueError(f"--arms must include {BASELINE!r}: every ratio is taken against LoRA on all layers")
        if len(self.arms) < 2:
            raise ValueError(f"--arms needs a selective arm besides {BASELINE!r}, got {list(self.arms)}")
        if "frontier" in self.arms and self.frontier_points == 0:
            raise ValueError("--arms includes 'frontier' but --frontier-points is 0")
        beyond = [a for a in self.arms if a in BEYOND_ARMS]
        if beyond and "score" not in self.arms:
            raise ValueError(f"--arms {beyond} are compared with the 'score' arm: add it")
        self.arms = list(self.arms)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BenchConfig:
        """Read a YAML (or JSON) file of settings; keys are the field names (``-`` or ``_``)."""
        return settings_from_file(cls, path, hint=renamed_hint)


def settings_from_file(cls: type, path: str | os.PathLike, *, hint: Any = None) -> Any:
    """``cls(**settings)`` from a YAML (or JSON) file whose keys are ``cls``'s field names (``-`` or ``_``); an
    unknown key is refused, with ``hint(unknown)`` appended to the message when given."""
    values = {str(k).replace("-", "_"): v for k, v in read_settings(path).items()}
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        extra = hint(unknown) if hint is not None else ""
        raise ValueError(f"--config: unknown setting(s) {unknown} in {str(path)!r}{extra}")
    return cls(**values)


def read_settings(path: str | os.PathLike) -> dict:
    """The mapping of settings in a YAML (or JSON) file; a ValueError naming ``--config`` when it is not one.

    Read within the size, depth and expanded-size limits of :func:`~aletheia_lora.checks.read_data_file`.
    """
    values = read_data_file(path, label="--config", fmt="yaml")
    if not isinstance(values, dict):
        raise ValueError(f"--config: {str(path)!r} must hold a mapping of settings")
    return values


def renamed_hint(names: Sequence[str]) -> str:
    """``" (renamed: old -> new, ...)"`` for the older setting names among ``names``; ``""`` when none is."""
    renamed = {old: new for _, renames in RENAMED_GENERATIONS for old, new in renames.items()}
    old = [n for n in names if n in renamed]
    if not old:
        return ""
    return " (renamed: " + ", ".join(f"{n} -> {renamed[n]}" for n in old) + ")"


def current_settings(
    config: Mapping[str, Any], generations: Sequence[tuple[str, Mapping[str, str]]] = RENAMED_GENERATIONS
) -> dict:
    """A result's recorded settings under today's names, in their order (see :data:`RENAMED_GENERATIONS`).

    Each generation of renames applies to a result written before it (one without the generation's mark), in
    order: an old name may be a newer setting's name (``warmup_steps`` meant the untimed steps at first).
    """
    settings = dict(config)
    for mark, renames in generations:
        if mark not in settings:
            settings = {renames.get(key, key): value for key, value in settings.items()}
    return settings


def load_result(path: str | os.PathLike) -> dict:
    """A benchmark result JSON, its ``config`` under today's setting names.

    A training benchmark's result (it has ``arms``) gets every generation of :data:`RENAMED_GENERATIONS`; another
    benchmark's (``bench/families.py``'s, whose config keeps ``steps`` for its timed steps) the first only.

    Raises:
        ValueError: when the file is not valid JSON.
    """
    result = read_data_file(path, label="benchmark result", fmt="json")
    if isinstance(result, dict) and isinstance(result.get("config"), Mapping):
        generations = RENAMED_GENERATIONS if "arms" in result else RENAMED_GENERATIONS[:1]
        result["config"] = current_settings(result["config"], generations)
    return result
