"""The quality protocol's settings: :class:`QualityConfig`, read from ``bench/configs/quality*.yaml``."""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field

from aletheia_lora.allocator import CPU_ALLOCATOR_HELP, CPU_ALLOCATORS
from aletheia_lora.bench.config import TINY_MODEL, settings_from_file
from aletheia_lora.checks import check_choice

TASKS = ("python-stdlib", "chitchat")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class QualityConfig:
    """Settings of one quality protocol. The defaults are the full CPU protocol (``bench/configs/quality.yaml``)."""

    name: str = field(default="quality", metadata={"help": "Results go to NAME.json and NAME/ (units) in --out."})
    model: str = field(default="smollm2-135m", metadata={"help": "The base model; 'tiny': a random Llama."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype (every arm the same)."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ...; default: cuda when present."})
    threads: int | None = field(default=1, metadata={"help": "CPU threads of torch (none: torch's own)."})
    cpu_allocator: str = field(
        default="default",
        metadata={
            "help": CPU_ALLOCATOR_HELP + " Here 'default' by default: the committed protocol was timed with glibc's "
            "own thresholds, and the units of one run must be timed alike."
        },
    )
    tiny_layers: int = field(default=4, metadata={"help": "Blocks of the 'tiny' model."})
    tiny_hidden: int = field(default=32, metadata={"help": "Hidden size of the 'tiny' model (a multiple of 4)."})
    tasks: list[str] = field(default_factory=lambda: list(TASKS), metadata={"help": "Tasks: " + ", ".join(TASKS)})
    general_data: str | None = field(default="kjv", metadata={"help": "Forgetting corpus ('none': not measured)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per training block or conversation."})
    train_chars: int = field(default=50_000, metadata={"help": "python-stdlib: characters of training text."})
    held_chars: int = field(default=60_000, metadata={"help": "python-stdlib: characters of held-out files."})
    train_dialogues: int = field(default=480, metadata={"help": "chitchat: training conversations."})
    held_dialogues: int = field(default=160, metadata={"help": "chitchat: held-out conversations."})
    max_turns: int = field(default=6, metadata={"help": "chitchat: first turns kept of each conversation."})
    max_doc_chars: int = field(default=10_000, metadata={"help": "python-stdlib: each file cut to this."})
    validation_rows: int = field(default=16, metadata={"help": "Validation rows (the learning rate is chosen here)."})
    test_rows: int = field(default=32, metadata={"help": "Test rows (the reported loss; no choice uses them)."})
    general_rows: int = field(default=16, metadata={"help": "General-corpus rows for forgetting."})
    batch_size: int = field(default=4, metadata={"help": "Rows per step."})
    epochs: int = field(default=2, metadata={"help": "Passes over the fixed training set."})
    eval_steps: int = field(default=10, metadata={"help": "Validation and test loss every this many steps."})
    eval_batch_size: int = field(default=8, metadata={"help": "Rows per evaluation batch."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of the steps in linear warm-up."})
    learning_rates: list[float] = field(
        default_factory=lambda: [1.5e-4, 3e-4, 6e-4, 1.2e-3, 2.4e-3],
        metadata={"help": "The sweep: every arm tries each on the first seed; the validation argmin is its rate."},
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds; the sweep uses the first."})
    sweep_extensions: int = field(
        default=2,
        metadata={
            "help": "When an arm's complete sweep is best at its lowest or highest rate, sweep one rate further out "
            "(the sweep's own ratio) and choose again, up to this many times: a chosen rate at the sweep's edge is "
            "a rate not yet tuned. 0: the listed rates only."
        },
    )
    arms: list[str] = field(
        default_factory=lambda: [
            "all",
            "score",
            "truncation",
            "contiguous",
            "paper",
            "param-matched",
            "random",
            "random-above",
            "contiguous+cache",
            "truncation+cache",
            "progressive",
            "progressive-fixed",
            "progressive+cache",
        ],
        metadata={
            "help": "Arms by registered name (aletheia_lora.bench.quality.arms.ARMS); 'all' is required, and so is "
            "the arm an arm takes its rate from (contiguous+cache: contiguous) or runs after (progressive-fixed: "
            "progressive). New arms go at the end, so the units of the others keep their place in the plan."
        },
    )
    top_pct: float = field(default=50.0, metadata={"help": "Share of blocks the selective arms adapt."})
    r: int = field(default=8, metadata={"help": "LoRA rank of the uniform arms."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha at rank r (other ranks keep alpha/r)."})
    paper_attention_r: int = field(default=16, metadata={"help": "paper arm: attention rank."})
    paper_mlp_r: int = field(default=64, metadata={"help": "paper arm: MLP rank."})
    freeze_every: int = field(
        default=6,
        metadata={
            "help": "progressive arm: steps per interval of the freezing rule (aletheia_lora.freeze). Its default "
            "for --strategy progressive, 20, is sized for ~200-step runs (freezes seen at steps 60-100 of 200); the "
            "protocol's runs are ~50-60 steps, so 20 x 60 / 200 = 6: the first freeze can come at step 12 (the rule "
            "compares two intervals) and a run has 8-10 decisions."
        },
    )
    max_frozen_pct: float = field(
        default=50.0,
        metadata={
            "help": "progressive arm: the most of the blocks that may be frozen, in percent (rounded down). The "
            "default of --strategy progressive, 50: a share of the blocks, so it does not scale with the run's "
            "length."
        },
    )
    loraplus: bool = field(default=False, metadata={"help": "LoRA+ (PEFT create_loraplus_optimizer)."})
    loraplus_lr_ratio: float = field(default=16.0, metadata={"help": "LoRA+: B's rate over A's."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0: none)."})
    probe_batches: int = field(default=5, metadata={"help": "Probe batches (one probe per task, cached)."})
    probe_batch_size: int = field(default=1, metadata={"help": "Rows per probe batch."})
    bounded_share: float = field(default=0.95, metadata={"help": "Bounded quality: this share of all's loss drop."})
    progress: bool = field(default=False, metadata={"help": "Log each unit's progress."})
    out: str = field(default="bench/results", metadata={"help": "Results folder: NAME.json, NAME.md and NAME/."})
    docs: str | None = field(default=None, metadata={"help": "Also write the page here, e.g. docs/QUALITY.md."})
    max_units: int | None = field(
        default=None, metadata={"help": "Train at most this many new units, then summarize and stop (0: summarize)."}
    )

    def __post_init__(self) -> None:
        check_choice("--cpu-allocator", self.cpu_allocator, CPU_ALLOCATORS)
        ints = {
            "tiny_layers", "tiny_hidden", "max_length", "train_chars", "held_chars", "train_dialogues",
            "held_dialogues", "max_turns", "max_doc_chars", "validation_rows", "test_rows", "general_rows",
            "batch_size", "epochs", "eval_steps", "eval_batch_size", "r", "paper_attention_r", "paper_mlp_r",
            "probe_batches", "probe_batch_size", "freeze_every",
        }  # fmt: skip
        for name in ints | {"threads"}:
            value = getattr(self, name)
            if name == "threads" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{_flag(name)} must be an integer >= 1, got {value!r}")
        for name in ("warmup_ratio", "top_pct", "lora_alpha", "loraplus_lr_ratio", "weight_decay", "max_grad_norm",
                     "bounded_share", "max_frozen_pct"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{_flag(name)} must be a finite number >= 0, got {value!r}")
        if (
            isinstance(self.sweep_extensions, bool)
            or not isinstance(self.sweep_extensions, int)
            or (self.sweep_extensions < 0)
        ):
            raise ValueError(f"--sweep-extensions must be an integer >= 0, got {self.sweep_extensions!r}")
        if self.max_units is not None and (not isinstance(self.max_units, int) or self.max_units < 0):
            raise ValueError(f"--max-units must be an integer >= 0, got {self.max_units!r}")
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"--name must be letters, digits, '_', '-' or '.', got {self.name!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 1 <= self.top_pct < 100:
            raise ValueError(f"--top-pct must be in [1, 100), got {self.top_pct!r}")
        if self.max_frozen_pct > 100:
            raise ValueError(f"--max-frozen-pct must be at most 100, got {self.max_frozen_pct!r}")
        if not 0 < self.bounded_share <= 1:
            raise ValueError(f"--bounded-share must be in (0, 1], got {self.bounded_share!r}")
        if self.model == TINY_MODEL and self.tiny_hidden % 4:
            raise ValueError(f"--tiny-hidden must be a multiple of 4, got {self.tiny_hidden}")
        if isinstance(self.general_data, str) and self.general_data.strip().lower() in ("", "none", "off"):
            self.general_data = None
        self._check_lists()

    def _check_lists(self) -> None:
        # the registry: arms added later are valid names
        from aletheia_lora.bench.quality.arms import AFTER, ARMS, rate_source

        for name, allowed in (("tasks", TASKS), ("arms", tuple(ARMS))):
            values = getattr(self, name)
            if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"{_flag(name)} must be a non-empty list, got {values!r}")
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ValueError(f"{_flag(name)}: unknown {unknown}; choose from {', '.join(allowed)}")
            if len(set(values)) < len(values):
                raise ValueError(f"{_flag(name)} lists a name more than once: {list(values)}")
            setattr(self, name, list(values))
        if "all" not in self.arms:
            raise ValueError("--arms must include 'all': time to quality is taken against LoRA on every block")
        for arm in self.arms:
            source, after = rate_source(arm), AFTER.get(arm)
            if source is not None and source not in self.arms:
                raise ValueError(f"--arms: {arm!r} trains at the learning rate {source!r} chose; list {source!r} too")
            if after is not None and after not in self.arms:
                raise ValueError(f"--arms: {arm!r} runs after {after!r} and reads its units; list {after!r} too")
        rates = self.learning_rates
        if (
            not isinstance(rates, (list, tuple))
            or not rates
            or any(isinstance(x, bool) or not isinstance(x, numbers.Real) or not x > 0 for x in rates)
        ):
            raise ValueError(f"--learning-rates must be a non-empty list of positive numbers, got {rates!r}")
        self.learning_rates = sorted({float(x) for x in rates})
        seeds = self.seeds
        if (
            not isinstance(seeds, (list, tuple))
            or not seeds
            or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in seeds)
        ):
            raise ValueError(f"--seeds must be a non-empty list of integers >= 0, got {seeds!r}")
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"--seeds lists a seed more than once: {list(seeds)}")
        self.seeds = [int(s) for s in seeds]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> QualityConfig:
        """Read a YAML (or JSON) file of settings; keys are the field names (``-`` or ``_``)."""
        return settings_from_file(cls, path)
