"""Side-by-side training benchmark: LoRA on every block against layer-selective LoRA at the same layer budget.

Every arm is its own copy of the base model with LoRA on one set of blocks:

* ``all``: every block, the baseline all ratios are taken against;
* ``score``: the top blocks by probe score (the reference rule);
* ``truncation``: the truncation-aware rule with its default target speedup;
* ``contiguous``: the top block of layers;
* ``frontier``: a few more points of :func:`~aletheia_lora.select.selection_frontier`, the lowest adapted block
  moved from low to high, to show where the best quality per unit of time lies;
* ``ranks``: the ``score`` blocks with ranks in proportion to their probe scores, at the parameter count of
  uniform rank ``r`` on them (:func:`~aletheia_lora.ranks.allocate_ranks`): compare it with ``score``;
* ``reprobe``: the ``score`` blocks first, the probe re-run every ``reprobe_every`` steps on the model being
  trained and the trainable adapters moved to its selection (:mod:`aletheia_lora.reprobe`); its clock includes
  the re-probes. Compare it with ``score``, selected once.

The arms take their steps in turn (round-robin, the first arm of a round rotating) on the same batches in the same
order, with the same seed, optimizer and learning-rate schedule, so drift on a shared machine hits every arm alike.
The training clock of an arm is the sum of its measured step times (forward, backward, clipping, optimizer step);
evaluation is not counted. Three views come out of the same runs:

1. equal steps: every arm after ``steps`` steps;
2. equal time: the arms other than ``all`` keep training while their clock is nearer to ``all``'s ``steps``-step
   time than it would be after one more step, so faster arms take more steps;
3. time to quality: the clock time at which an arm's held-out loss (evaluated every ``eval_every`` steps) first
   reaches ``all``'s equal-step loss, interpolated linearly between evaluations; arms that have not reached it
   keep training up to ``quality_cap`` times ``all``'s time.

The first ``warmup_steps`` steps of an arm pay one-off costs (allocations, optimizer state): they stay out of the
medians and are charged to the clock at the arm's median step time. The very first step of each arm also measures
how deep its backward pass went, the activations autograd saved, and the growth of resident memory (the kernel's
high-water mark on Linux, ``max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import datetime
import gc
import logging
import math
import numbers
import os
import platform
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from aletheia_lora.config import apply_aletheia_lora
from aletheia_lora.cost import CostModel
from aletheia_lora.data import pad_collate
from aletheia_lora.files import write_json, write_text
from aletheia_lora.layers import find_decoder_stack
from aletheia_lora.plots import plot_reprobe_history, pyplot, save_figure
from aletheia_lora.probe import ProbeConfig, gradient_probe
from aletheia_lora.ranks import allocate_for_config
from aletheia_lora.reprobe import move_adapters, reselect, set_trainable_layers
from aletheia_lora.select import (
    SelectConfig,
    describe_selection,
    select_layers,
    selection_frontier,
    summarize_selection,
)
from aletheia_lora.train import EMBEDDINGS, BackwardDepthMonitor, evaluate_loss, prepare_lora_model

logger = logging.getLogger(__name__)

ARM_KINDS = ("all", "score", "truncation", "contiguous", "frontier", "ranks", "reprobe")
# Arms built on the score selection, each compared with the `score` arm (one-shot selection, uniform rank).
BEYOND_ARMS = ("ranks", "reprobe")
BASELINE = "all"
STRATEGY_ARMS = ("score", "truncation", "contiguous")
# The arm the targets are assessed on: the library's truncation-aware rule.
TARGET_ARM = "truncation"
TINY_MODEL = "tiny"
SCHEDULES = ("constant", "cosine")
# A cosine schedule decays to this share of the peak at `steps` and stays there, so equal-time steps still learn.
COSINE_FLOOR = 0.1
MB = 2**20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class BenchConfig:
    """Settings of one benchmark run. The defaults are the SmolLM2 experiment (``bench/configs/smollm2.yaml``)."""

    name: str = field(default="smollm2", metadata={"help": "Name of the run: results go to train_NAME.* in --out."})
    model: str = field(
        default="smollm2-135m",
        metadata={"help": "Model: 'tiny' (a random Llama on counting sequences), 'smollm2-135m' or a checkpoint."},
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16, float16 or auto."})
    device: str | None = field(default=None, metadata={"help": "Device, e.g. cpu or cuda (default: cuda if present)."})
    threads: int | None = field(
        default=1, metadata={"help": "CPU threads of torch ('none': torch's own; 1 suits a shared machine)."}
    )
    tiny_layers: int = field(default=6, metadata={"help": "Blocks of the 'tiny' model."})
    tiny_hidden: int = field(default=64, metadata={"help": "Hidden size of the 'tiny' model (a multiple of 4)."})
    tiny_vocab: int = field(default=128, metadata={"help": "Vocabulary of the 'tiny' model."})
    data: str = field(default="python-stdlib", metadata={"help": "Target data: a bundled corpus or a path."})
    general_data: str = field(
        default="kjv", metadata={"help": "General text unrelated to the target, for forgetting (bundled or a path)."}
    )
    max_length: int = field(default=128, metadata={"help": "Tokens per training and evaluation block."})
    max_train_chars: int | None = field(
        default=400_000, metadata={"help": "Characters of training text taken from a bundled corpus."}
    )
    max_eval_chars: int | None = field(
        default=100_000,
        metadata={"help": "Characters of held-out and of general text taken from a bundled corpus."},
    )
    eval_blocks: int = field(
        default=32, metadata={"help": "Held-out target blocks evaluated (spread evenly over the eval split)."}
    )
    general_blocks: int = field(default=32, metadata={"help": "General-corpus blocks evaluated for forgetting."})
    batch_size: int = field(default=4, metadata={"help": "Blocks per training step."})
    steps: int = field(default=60, metadata={"help": "Steps of every arm in the equal-step view."})
    warmup_steps: int = field(
        default=2,
        metadata={
            "help": "First steps of each arm left out of the step-time medians (at least 1: it measures memory)."
        },
    )
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate of AdamW."})
    lr_schedule: str = field(
        default="constant",
        metadata={"help": "constant, or cosine (to 10% of the peak at --steps, then held: equal-time steps learn)."},
    )
    lr_warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 turns it off)."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order, the adapters and the probe."})
    r: int = field(default=8, metadata={"help": "LoRA rank (all attention and MLP projections of a block)."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha."})
    budget_pct: float = field(default=50, metadata={"help": "Share of blocks adapted by every selective arm, in %."})
    arms: list[str] = field(
        default_factory=lambda: list(ARM_KINDS[:5]),
        metadata={
            "help": "Arms, in order: all (required), score, truncation, contiguous, frontier, ranks (score blocks, "
            "score-proportional ranks at uniform r's parameter count), reprobe (score blocks, re-probed)."
        },
    )
    reprobe_every: int = field(
        default=20, metadata={"help": "Arm reprobe: steps between probes of the model being trained."}
    )
    frontier_points: int = field(
        default=3, metadata={"help": "Frontier points trained besides the named arms (spread from low to high)."}
    )
    eval_every: int = field(default=10, metadata={"help": "Evaluate the held-out loss every this many steps."})
    eval_batch_size: int = field(default=8, metadata={"help": "Blocks per evaluation batch."})
    quality_cap: float = field(
        default=1.5, metadata={"help": "Time to quality: train up to this many times all-layer LoRA's time."}
    )
    probe_batches: int = field(default=5, metadata={"help": "Batches of the gradient probe."})
    probe_batch_size: int = field(default=1, metadata={"help": "Rows per probe batch."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        positive = {
            "tiny_layers",
            "tiny_hidden",
            "tiny_vocab",
            "max_length",
            "eval_blocks",
            "general_blocks",
            "batch_size",
            "steps",
            "warmup_steps",
            "r",
            "eval_every",
            "eval_batch_size",
            "probe_batches",
            "probe_batch_size",
            "reprobe_every",
        }
        optional_positive = {"threads", "max_train_chars", "max_eval_chars"}
        non_negative = {"lr_warmup_steps", "seed", "frontier_points"}
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
        for name in ("name", "model", "data", "general_data", "dtype", "lr_schedule"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{_flag(name)} must be a non-empty string, got {getattr(self, name)!r}")
        if not _NAME.match(self.name):
            raise ValueError(f"--name must be letters, digits, '_', '-' or '.', got {self.name!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.learning_rate == 0:
            raise ValueError("--learning-rate must be positive, got 0")
        if self.lora_alpha == 0:
            raise ValueError("--lora-alpha must be positive, got 0")
        if not 1 <= self.budget_pct < 100:
            raise ValueError(f"--budget-pct must be in [1, 100): the share of blocks adapted, got {self.budget_pct!r}")
        if self.quality_cap < 1:
            raise ValueError(
                f"--quality-cap must be >= 1 (a multiple of all-layer LoRA's time), got {self.quality_cap!r}"
            )
        if self.steps <= self.warmup_steps:
            raise ValueError(
                f"--steps ({self.steps}) must exceed --warmup-steps ({self.warmup_steps}): no step would be timed"
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
        import yaml

        try:
            values = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"--config: cannot read {str(path)!r}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"--config: {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config: {str(path)!r} must hold a mapping of settings")
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"--config: unknown setting(s) {unknown} in {str(path)!r}")
        return cls(**values)


# ---------------------------------------------------------------------------------------------------------------
# Model and data


def _counting_rows(n: int, length: int, vocab: int, stride: int, seed: int) -> list[dict]:
    """Rows that count up by ``stride`` from a random start (ids 1..vocab-1): learnable in a few steps."""
    starts = np.random.default_rng(seed).integers(0, vocab - 1, n)
    return [{"input_ids": ((s + stride * np.arange(length)) % (vocab - 1) + 1).tolist()} for s in starts]


def _tiny_model(config: BenchConfig) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=config.tiny_vocab,
        hidden_size=config.tiny_hidden,
        intermediate_size=2 * config.tiny_hidden,
        num_hidden_layers=config.tiny_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(model_config)


def _spread(rows, n: int) -> list:
    """``n`` rows spread evenly over ``rows`` (all of them when there are fewer)."""
    if len(rows) <= n:
        return [rows[i] for i in range(len(rows))]
    return [rows[int(i)] for i in np.linspace(0, len(rows) - 1, n).round().astype(int)]


def _load(config: BenchConfig, device: torch.device) -> tuple[nn.Module, list, list, list, int]:
    """The base model and the train, held-out target and general rows, plus the padding id."""
    if config.model == TINY_MODEL:
        model = _tiny_model(config).to(device)
        n_train = config.batch_size * config.steps * 2
        train = _counting_rows(n_train, config.max_length, config.tiny_vocab, 1, config.seed)
        target = _counting_rows(config.eval_blocks, config.max_length, config.tiny_vocab, 1, config.seed + 1)
        general = _counting_rows(config.general_blocks, config.max_length, config.tiny_vocab, 2, config.seed + 2)
        return model, train, target, general, 0
    from aletheia_lora.data import DataConfig, build_datasets
    from aletheia_lora.models import ModelConfig

    model, tokenizer = ModelConfig(model=config.model, dtype=config.dtype, device=str(device)).load()
    data = DataConfig(
        data=config.data,
        general_data=config.general_data,
        max_length=config.max_length,
        max_train_chars=config.max_train_chars,
        max_eval_chars=config.max_eval_chars,
        seed=config.seed,
    )
    train, evaluation, general = build_datasets(data, tokenizer)
    if general is None:
        raise ValueError(f"--general-data {config.general_data!r}: forgetting needs a general corpus")
    for label, rows, wanted in (("eval", evaluation, config.eval_blocks), ("general", general, config.general_blocks)):
        if len(rows) < wanted:
            logger.warning(
                "the %s data holds %d blocks, fewer than the %d asked for: using those", label, len(rows), wanted
            )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [train[i] for i in range(len(train))]
    return model, rows, _spread(evaluation, config.eval_blocks), _spread(general, config.general_blocks), pad


class _Batches:
    """Training batch ``i`` for step ``i``: the same for every arm. Rows go in seeded epoch permutations."""

    def __init__(self, rows: list, batch_size: int, seed: int, pad_token_id: int, device: torch.device) -> None:
        if not rows:
            raise ValueError("the training data is empty")
        self.rows, self.batch_size, self.seed, self.pad, self.device = rows, batch_size, seed, pad_token_id, device
        self._order: list[int] = []
        self._epochs = 0
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        if index not in self._cache:
            end = (index + 1) * self.batch_size
            while len(self._order) < end:
                rng = np.random.default_rng([self.seed, self._epochs])
                self._order.extend(rng.permutation(len(self.rows)).tolist())
                self._epochs += 1
            picked = [self.rows[j] for j in self._order[index * self.batch_size : end]]
            self._cache[index] = {k: v.to(self.device) for k, v in pad_collate(picked, self.pad).items()}
        return self._cache[index]


def learning_rate_at(step: int, config: BenchConfig) -> float:
    """Learning rate of the step with 0-based index ``step``: linear warm-up, then constant or cosine."""
    if step < config.lr_warmup_steps:
        return config.learning_rate * (step + 1) / config.lr_warmup_steps
    if config.lr_schedule == "constant":
        return config.learning_rate
    span = max(1, config.steps - config.lr_warmup_steps)
    progress = min(1.0, (step - config.lr_warmup_steps) / span)
    return config.learning_rate * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------------------
# Memory


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _release_free_memory() -> None:
    """Collect garbage and hand the C allocator's free pages back, so RSS growth measures live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS growth is then an upper bound of the live growth
        pass


class _Memory:
    """Memory growth around a piece of work: resident set (CPU, Linux) or allocated device memory (CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.kind = "cuda_allocated" if self.cuda else "rss" if _proc_status("VmRSS") is not None else None

    def current(self) -> int | None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return _proc_status("VmRSS")

    def start_peak(self) -> int | None:
        """Reset the peak; return the current value to subtract from it."""
        _release_free_memory()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            return None
        return _proc_status("VmRSS")

    def peak_growth(self, start: int | None) -> int | None:
        if start is None:
            return None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - start
        peak = _proc_status("VmHWM")
        return None if peak is None else peak - start


class _SavedActivations:
    """Bytes of the distinct tensors autograd saves for the backward pass, parameters excluded."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


# ---------------------------------------------------------------------------------------------------------------
# Arms


@dataclass
class _Arm:
    name: str
    kind: str
    layers: list[int]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    views: dict[str, dict] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    lowest_reached: int | None = None
    charge: float | None = None  # seconds charged for each warm-up step: the arm's median timed step
    extra: dict[int, float] = field(default_factory=dict)  # seconds spent after step k besides training (re-probes)
    info: dict[str, Any] = field(default_factory=dict)  # what the arm adds to its blocks (ranks, re-probe history)

    @property
    def steps(self) -> int:
        return len(self.times)

    def clock_at(self, step: int, warmup: int) -> float:
        """Training seconds after ``step`` steps, warm-up steps charged at the arm's median."""
        timed = sum(self.times[warmup:step])
        charge = self.charge if self.charge is not None else statistics.median(self.times[:warmup] or [0.0])
        return timed + charge * min(step, warmup) + sum(s for k, s in self.extra.items() if k < step)


def _pick_frontier(points: list, taken: list[tuple[int, ...]], n: int) -> list:
    """``n`` frontier points dividing the frontier evenly from its lowest to its highest lowest block.

    Each is the point nearest to ``i / (n + 1)`` of the way along (``i = 1..n``) whose layers are not already an
    arm (``taken``) nor picked; the ends of the frontier are usually the score and contiguous arms.
    """
    free = [i for i, p in enumerate(points) if tuple(p.layers) not in taken]
    picked: list[int] = []
    for i in range(1, n + 1):
        remaining = [j for j in free if j not in picked]
        if not remaining:
            break
        aim = i * (len(points) - 1) / (n + 1)
        picked.append(min(remaining, key=lambda j: (abs(j - aim), j)))
    return [points[j] for j in sorted(picked)]


class _Runner:
    """Holds the arms and trains, evaluates and times them."""

    def __init__(
        self,
        config: BenchConfig,
        batches: _Batches,
        target_rows: list,
        general_rows: list,
        pad: int,
        device: torch.device,
    ) -> None:
        self.config, self.batches, self.target_rows, self.general_rows = config, batches, target_rows, general_rows
        self.pad, self.device = pad, device
        self.memory = _Memory(device)
        self.arms: list[_Arm] = []
        self.order: list[dict] = []  # every step of every arm, in the order they ran
        self.load: list[float] = []
        self.bar = tqdm(desc="bench", unit="step", disable=not config.progress)

    def loss(self, model: nn.Module, rows: list) -> float:
        return evaluate_loss(model, rows, batch_size=self.config.eval_batch_size, pad_token_id=self.pad)["loss"]

    def add_arm(self, base: nn.Module, name: str, kind: str, layers: list[int], scores=None) -> _Arm:
        config = self.config
        _release_free_memory()
        start = self.memory.current()
        lora_kwargs = {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": 0.0}
        info: dict[str, Any] = {}
        if kind == "reprobe":  # adapters on every block; set_trainable_layers picks those that train
            lora = apply_aletheia_lora(base, list(range(find_decoder_stack(base).num_layers)), **lora_kwargs)
        else:
            lora = apply_aletheia_lora(base, layers, **lora_kwargs)
        if kind == "ranks":
            lora, allocation = allocate_for_config(base, lora, scores)
            info = {
                "ranks": {str(layer): max(kinds.values()) for layer, kinds in sorted(allocation.ranks.items())},
                "lora_parameters": allocation.total_params,
                "uniform_parameters": allocation.uniform_params,
            }
        torch.manual_seed(config.seed)  # the same adapter initialisation rule in every arm
        model = prepare_lora_model(copy.deepcopy(base), lora)
        model.train()
        # reprobe: the optimizer holds every adapter (AdamW skips those without a gradient: the frozen ones)
        params = [p for p in model.parameters() if p.requires_grad]
        if kind == "reprobe":
            set_trainable_layers(model, layers)
            info = {"every": config.reprobe_every, "history": [{"step": 0, "layers": list(layers)}]}
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        end = self.memory.current()
        arm = _Arm(name, kind, list(layers), model, optimizer, params, info=info)
        arm.memory = {
            "kind": self.memory.kind,
            "build_mb": None if start is None or end is None else (end - start) / MB,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        self.arms.append(arm)
        return arm

    def reprobe(self, arm: _Arm) -> None:
        """Probe the arm's model as trained so far, on other rows, and move its trainable adapters."""
        config = self.config
        scores, layers, seconds = reselect(
            arm.model,
            self.batches.rows,
            select=SelectConfig(top_pct=config.budget_pct, strategy="score"),
            probe=ProbeConfig(probe_batches=config.probe_batches, probe_batch_size=config.probe_batch_size),
            seed=config.seed + arm.steps,
            pad_token_id=self.pad,
        )
        start = time.perf_counter()
        before = arm.info["history"][-1]["layers"]
        entry = move_adapters(arm.model, layers, before=before, scores=scores)
        arm.extra[arm.steps] = seconds + time.perf_counter() - start
        arm.info["history"].append({"step": arm.steps, **entry, "seconds": arm.extra[arm.steps]})

    def step(self, arm: _Arm, phase: str) -> None:
        """One optimizer step of ``arm`` on the batch of its step index; evaluates on the cadence."""
        config, index = self.config, arm.steps
        batch = self.batches(index)
        for group in arm.optimizer.param_groups:
            group["lr"] = learning_rate_at(index, config)
        first = index == 0
        with contextlib.ExitStack() as measuring:
            if first:  # measured on the first (untimed) step only, so the timed steps carry no hooks
                saved = _SavedActivations(arm.model)
                peak_start = self.memory.start_peak()
                depth = measuring.enter_context(BackwardDepthMonitor(arm.model))
                measuring.enter_context(torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            loss = arm.model(**batch).loss
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(arm.params, config.max_grad_norm)
            arm.optimizer.step()
            arm.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
        if first:
            arm.lowest_reached = depth.lowest
            growth = self.memory.peak_growth(peak_start)
            arm.memory["first_step_peak_mb"] = None if growth is None else growth / MB
            arm.memory["saved_activations_mb"] = saved.bytes / MB
        arm.times.append(seconds)
        arm.losses.append(float(loss.detach()))
        self.order.append({"arm": arm.name, "step": arm.steps, "phase": phase})
        self.bar.update(1)
        self.bar.set_postfix(phase=phase, arm=arm.name)
        if arm.steps % config.eval_every == 0:
            self.evaluate(arm, phase)
        if arm.kind == "reprobe" and arm.steps % config.reprobe_every == 0:
            self.reprobe(arm)

    def evaluate(self, arm: _Arm, phase: str) -> float:
        """Held-out target loss of ``arm`` now (once per step count), added to its curve."""
        if arm.evals and arm.evals[-1]["step"] == arm.steps:
            return arm.evals[-1]["loss"]
        loss = self.loss(arm.model, self.target_rows)
        arm.evals.append({"step": arm.steps, "loss": loss, "phase": phase})
        return loss

    def view(self, arm: _Arm, name: str, phase: str) -> None:
        """Record the target and general losses of ``arm`` now as the view ``name``."""
        arm.views[name] = {
            "steps": arm.steps,
            "target_loss": self.evaluate(arm, phase),
            "general_loss": self.loss(arm.model, self.general_rows),
            "interpolated": False,
        }

    def rounds(self, wants, phase: str, first_round: int) -> int:
        """Round-robin over the arms ``wants`` accepts, one step each per round, until none does."""
        round_index = first_round
        while True:
            stepping = [arm for arm in self.arms if wants(arm)]
            if not stepping:
                return round_index
            self.load.append(os.getloadavg()[0])
            k = round_index % len(stepping)
            for arm in stepping[k:] + stepping[:k]:
                self.step(arm, phase)
            round_index += 1


def _interpolate_time(points: list[tuple[float, float]], target: float) -> float | None:
    """First time a (time, loss) curve reaches ``target``, linear between points; None if it never does."""
    for i, (t, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return t
            t0, l0 = points[i - 1]
            return t0 + (l0 - target) / (l0 - loss) * (t - t0)
    return None


def _interpolate_loss(points: list[tuple[float, float]], at: float) -> float:
    """Loss of a (time, loss) curve at time ``at``, linear between points."""
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if t0 <= at <= t1:
            return l0 + (l1 - l0) * (at - t0) / (t1 - t0) if t1 > t0 else l1
    return points[-1][1]


def _machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _arm_specs(config: BenchConfig, scores, cost: CostModel, num_layers: int) -> tuple[list, list]:
    """``(name, kind, layers)`` of every arm in the configured order, and the whole selection frontier."""
    specs: list[tuple[str, str, list[int]]] = []
    for kind in config.arms:
        if kind == BASELINE:
            specs.append((kind, kind, list(range(num_layers))))
        elif kind in BEYOND_ARMS:
            specs.append((kind, kind, select_layers(scores, config.budget_pct, strategy="score", cost=cost)))
        elif kind != "frontier":
            specs.append((kind, kind, select_layers(scores, config.budget_pct, strategy=kind, cost=cost)))
    frontier = selection_frontier(scores, config.budget_pct, cost=cost)
    if "frontier" in config.arms:
        picked = _pick_frontier(frontier, [tuple(layers) for _, _, layers in specs], config.frontier_points)
        at = config.arms.index("frontier")  # the named arms before it
        specs[at:at] = [(f"frontier-{p.lowest_layer}", "frontier", list(p.layers)) for p in picked]
    return specs, frontier


def _train_views(runner: _Runner, base_target: float) -> tuple[float, float, float]:
    """Train the arms through the three views; return all-layer LoRA's time, its loss and the time cap."""
    config = runner.config
    baseline = next(arm for arm in runner.arms if arm.kind == BASELINE)
    warm, steps = config.warmup_steps, config.steps

    # 1. equal steps
    logger.info("training %d arms round-robin for %d steps each", len(runner.arms), steps)
    runner.rounds(lambda arm: arm.steps < steps, "equal_steps", 0)
    for arm in runner.arms:
        arm.charge = statistics.median(arm.times[warm:steps])
        runner.view(arm, "equal_steps", "equal_steps")
    all_seconds = baseline.clock_at(steps, warm)

    # 2. equal time: step while that brings the clock nearer to the all-layer time
    def nearer(limit: float):
        return lambda arm: arm is not baseline and arm.clock_at(arm.steps, warm) + arm.charge / 2 < limit

    logger.info("equal time: training the faster arms up to %.1f s each", all_seconds)
    next_round = runner.rounds(nearer(all_seconds), "equal_time", steps)
    for arm in runner.arms:
        if arm.steps == steps and arm.clock_at(steps, warm) - all_seconds <= arm.charge / 2:
            arm.views["equal_time"] = dict(arm.views["equal_steps"])
        elif arm.steps > steps:
            runner.view(arm, "equal_time", "equal_time")
        else:  # slower than all-layer LoRA by over half a step: read its curve at the all-layer time
            curve = [(0.0, base_target)] + [(arm.clock_at(e["step"], warm), e["loss"]) for e in arm.evals]
            arm.views["equal_time"] = {
                "steps": steps,
                "target_loss": _interpolate_loss(curve, all_seconds),
                "general_loss": None,
                "interpolated": True,
            }

    # 3. time to quality: train on until the all-layer loss is reached or the cap
    goal = baseline.views["equal_steps"]["target_loss"]
    cap_seconds = config.quality_cap * all_seconds
    within_cap = nearer(cap_seconds)

    def unreached(arm: _Arm) -> bool:
        return not any(e["loss"] <= goal for e in arm.evals) and within_cap(arm)

    logger.info("time to quality: training arms that have not reached loss %.4f, up to %.1f s", goal, cap_seconds)
    runner.rounds(unreached, "time_to_quality", next_round)
    for arm in runner.arms:
        runner.evaluate(arm, "time_to_quality")  # the curve ends where training ended
    runner.bar.close()
    return all_seconds, goal, cap_seconds


def run_bench(
    config: BenchConfig,
    out_dir: str | os.PathLike = "bench/results",
    *,
    command: str | None = None,
    docs: str | os.PathLike | None = None,
    render: bool = True,
) -> dict:
    """Run the benchmark and write ``train_NAME.json``, ``train_NAME.md`` and the plots into ``out_dir``.

    Args:
        config: The settings.
        out_dir: Output folder (created if needed; only this run's ``train_NAME.*`` files are written).
        command: The command line that ran this, recorded in the JSON and the tables.
        docs: Also write the benchmark page (e.g. ``docs/BENCHMARKS.md``) here.
        render: Write the Markdown, plots and page (:func:`render_outputs`); False writes the JSON only, for a
            caller that renders itself and wants the paths written.

    Returns:
        The result written to the JSON.
    """
    from aletheia_lora.pipeline import versions

    if not isinstance(config, BenchConfig):
        raise TypeError(f"config must be a BenchConfig, got {type(config).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    load_before = list(os.getloadavg())
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)

    base, train_rows, target_rows, general_rows, pad = _load(config, device)
    stack = find_decoder_stack(base)
    num_layers = stack.num_layers
    base.eval()
    batches = _Batches(train_rows, config.batch_size, config.seed, pad, device)
    runner = _Runner(config, batches, target_rows, general_rows, pad, device)
    base_target = runner.loss(base, target_rows)
    base_general = runner.loss(base, general_rows)

    start = time.perf_counter()
    scores = gradient_probe(
        base,
        train_rows,
        probe_batches=config.probe_batches,
        batch_size=config.probe_batch_size,
        seed=config.seed,
        pad_token_id=pad,
        progress=config.progress,
    )
    probe_seconds = time.perf_counter() - start

    cost = CostModel.from_model(base, seq_len=config.max_length, batch_size=config.batch_size, r=config.r)
    specs, frontier = _arm_specs(config, scores, cost, num_layers)
    # What `aletheia-lora probe|train` would pick with each strategy (its cost model assumes its default rank).
    cli_layers = {
        kind: describe_selection(
            scores,
            model=base,
            seq_len=config.max_length,
            batch_size=config.batch_size,
            top_pct=config.budget_pct,
            strategy=kind,
        )["selected_layers"]
        for kind in STRATEGY_ARMS
    }
    for name, kind, layers in specs:
        runner.add_arm(base, name, kind, layers, scores)
    del base
    _release_free_memory()
    all_seconds, goal, cap_seconds = _train_views(runner, base_target)

    result = {
        "name": config.name,
        "command": command or f"run_bench(BenchConfig(name={config.name!r}), {str(out_dir)!r})",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "model": {"name": config.model, "type": stack.model_type, "num_layers": num_layers},
        "machine": _machine(device),
        "versions": versions(),
        "load_average": {"before": load_before, "during": runner.load, "after": list(os.getloadavg())},
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "probe": {"seconds": probe_seconds, "scores": {str(k): v for k, v in sorted(scores.items())}},
        "cost_model": cost.description,
        "cli_layers": cli_layers,
        "frontier": [
            {
                "lowest_layer": p.lowest_layer,
                "layers": list(p.layers),
                "score_share": p.captured_share,
                "predicted_speedup": p.speedup,
                "pareto": p.pareto,
            }
            for p in frontier
        ],
        "base": {"target_loss": base_target, "general_loss": base_general},
        "equal_time_seconds": all_seconds,
        "quality": {"target_loss": goal, "cap": config.quality_cap, "cap_seconds": cap_seconds},
        "step_order": runner.order,
        "arms": [
            _summarize(arm, runner, scores, cost, probe_seconds, base_target, base_general) for arm in runner.arms
        ],
    }
    _compare(result)
    result["targets"] = assess_targets(result)
    write_json(out / f"train_{config.name}.json", result)
    if render:
        render_outputs(out, config.name, docs=docs)
    return result


def _summarize(
    arm: _Arm, runner: _Runner, scores, cost: CostModel, probe_seconds: float, base_target: float, base_general: float
) -> dict:
    config, warm = runner.config, runner.config.warmup_steps
    median = statistics.median(arm.times[warm : config.steps])
    summary = summarize_selection(scores, arm.layers, cost=cost)
    curve = [{"step": 0, "seconds": 0.0, "loss": base_target, "phase": "base"}] + [
        {**e, "seconds": arm.clock_at(e["step"], warm)} for e in arm.evals
    ]
    views = {}
    for name, view in arm.views.items():
        views[name] = {
            **view,
            "seconds": arm.clock_at(view["steps"], warm),
            "forgetting": None if view["general_loss"] is None else view["general_loss"] - base_general,
        }
    if views.get("equal_time", {}).get("interpolated"):
        views["equal_time"]["seconds"] = None
    lowest = arm.lowest_reached
    return {
        "name": arm.name,
        "kind": arm.kind,
        "layers": arm.layers,
        "num_adapted": len(arm.layers),
        "lowest_layer": min(arm.layers),
        "lowest_layer_reached": "embeddings" if lowest == EMBEDDINGS else lowest,
        "score_share": summary.captured_share,
        "predicted_speedup": summary.speedup,
        "median_step_seconds": median,
        "tokens_per_second": config.batch_size * config.max_length / median,
        "memory": arm.memory,
        "probe_share": probe_seconds / (probe_seconds + views["equal_steps"]["seconds"]),
        "views": views,
        "curve": curve,
        "step_seconds": arm.times,
        "train_losses": arm.losses,
        **({"beyond": _beyond_info(arm, warm)} if arm.kind in BEYOND_ARMS else {}),
    }


def _beyond_info(arm: _Arm, warm: int) -> dict:
    """What a ``ranks`` or ``reprobe`` arm did besides training its blocks with uniform rank."""
    info = dict(arm.info)
    if arm.kind == "reprobe":
        seconds = sum(arm.extra.values())
        info.update(
            probes=len(arm.extra),
            seconds=seconds,
            share_of_clock=seconds / arm.clock_at(arm.steps, warm),
            layers_ever_trained=sorted({i for h in info["history"] for i in h["layers"]}),
            final_layers=info["history"][-1]["layers"],
        )
    return info


def _compare(result: dict) -> None:
    """Add the ratios against the all-layer arm: speedups, relative losses, time to quality."""
    arms = {a["name"]: a for a in result["arms"]}
    base = arms[BASELINE]
    warm, steps = result["config"]["warmup_steps"], result["config"]["steps"]
    goal, cap_seconds = result["quality"]["target_loss"], result["quality"]["cap_seconds"]
    base_times = base["step_seconds"][warm:steps]
    base_forgetting = base["views"]["equal_steps"]["forgetting"]
    for arm in result["arms"]:
        times = arm["step_seconds"][warm:steps]
        measured = base["median_step_seconds"] / arm["median_step_seconds"]
        arm["measured_speedup"] = measured
        # steps of the same index ran in the same round: their ratio cancels drift between rounds
        arm["paired_speedup"] = statistics.median(b / t for b, t in zip(base_times, times))
        arm["prediction_error"] = arm["predicted_speedup"] / measured - 1
        for view in arm["views"].values():
            base_view = base["views"]["equal_steps"]
            view["target_vs_all"] = view["target_loss"] / base_view["target_loss"]
            view["forgetting_vs_all"] = None if view["forgetting"] is None else view["forgetting"] - base_forgetting
        reached = _interpolate_time([(p["seconds"], p["loss"]) for p in arm["curve"]], goal)
        if reached is not None and reached > cap_seconds:
            reached = None
        arm["time_to_quality"] = {
            "seconds": reached,
            # against the time all-layer LoRA took to reach that loss: its equal-step training time
            "ratio_to_all": None if reached is None else reached / result["equal_time_seconds"],
            "trained_seconds": arm["curve"][-1]["seconds"],
        }


def assess_targets(result: dict) -> list[dict]:
    """The project's targets for the truncation-aware arm, each with its value and whether it was met."""
    arms = {a["name"]: a for a in result["arms"]}
    arm = arms.get(TARGET_ARM)
    if arm is None:
        return []
    base = arms[BASELINE]
    steps, time_view = arm["views"]["equal_steps"], arm["views"]["equal_time"]
    ttq = arm["time_to_quality"]["ratio_to_all"]
    forgetting, base_forgetting = steps["forgetting"], base["views"]["equal_steps"]["forgetting"]
    targets = [
        ("step time >= 1.30x faster than all-layer LoRA", f"{arm['measured_speedup']:.2f}x",
         arm["measured_speedup"] >= 1.30),
        ("predicted speedup within 10% of measured", f"{arm['predicted_speedup']:.2f}x predicted, "
         f"{arm['prediction_error']:+.1%}", abs(arm["prediction_error"]) <= 0.10),
        ("target eval loss within 2% of all-layer LoRA (equal steps)",
         f"{steps['target_loss']:.4f} vs {base['views']['equal_steps']['target_loss']:.4f} "
         f"({steps['target_vs_all'] - 1:+.2%})", steps["target_vs_all"] <= 1.02),
        ("forgetting no worse than all-layer LoRA (equal steps)",
         f"{forgetting:+.4f} vs {base_forgetting:+.4f} nats", forgetting <= base_forgetting),
        ("reaches all-layer LoRA's loss in <= 0.8x its time",
         "not reached" if ttq is None else f"{ttq:.2f}x", ttq is not None and ttq <= 0.8),
        ("equal-time target loss no worse than all-layer LoRA",
         f"{time_view['target_loss']:.4f} vs {base['views']['equal_time']['target_loss']:.4f}",
         time_view["target_loss"] <= base["views"]["equal_time"]["target_loss"]),
    ]  # fmt: skip
    return [{"target": t, "arm": TARGET_ARM, "value": v, "met": bool(m)} for t, v, m in targets]


# ---------------------------------------------------------------------------------------------------------------
# Rendering: everything below reads the JSON only


def _layers_text(layers: Sequence[int], num_layers: int) -> str:
    """``all 30``, or the count and the runs of consecutive blocks: ``15: 0-4,7,9-17``."""
    if len(layers) == num_layers:
        return f"all {num_layers}"
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return f"{len(layers)}: " + ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _num(value, fmt: str, none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def _recommendation(result: dict) -> list[str]:
    """Which selection strategy the figures favour as the CLI default, and the best quality per time."""
    arms = [a for a in result["arms"] if a["kind"] in STRATEGY_ARMS]
    if not arms:
        return []

    def rank(arm: dict) -> tuple:
        ratio = arm["time_to_quality"]["ratio_to_all"]
        return (math.inf if ratio is None else ratio, arm["views"]["equal_time"]["target_loss"])

    best = min(arms, key=rank)
    ratio = best["time_to_quality"]["ratio_to_all"]
    reach = (
        "does not reach all-layer LoRA's loss within the cap"
        if ratio is None
        else (f"reaches all-layer LoRA's loss in {ratio:.2f}x its time")
    )
    lines = [
        f"- **Default strategy by these figures: `{best['name']}`.** Of the strategies, it {reach}, "
        f"with {best['measured_speedup']:.2f}x faster steps and an equal-time loss of "
        f"{best['views']['equal_time']['target_loss']:.4f} ({best['views']['equal_time']['target_vs_all'] - 1:+.2%} "
        f"vs all-layer LoRA); ranked by time to quality, then equal-time loss:"
    ]
    for arm in sorted(arms, key=rank):
        r = arm["time_to_quality"]["ratio_to_all"]
        lines.append(
            f"  - `{arm['name']}` {'not reached' if r is None else f'{r:.2f}x'}, equal-time loss "
            f"{arm['views']['equal_time']['target_loss']:.4f}, equal-step loss "
            f"{arm['views']['equal_steps']['target_loss']:.4f}, step speedup {arm['measured_speedup']:.2f}x."
        )
    selective = [a for a in result["arms"] if a["kind"] != BASELINE]
    top = min(selective, key=lambda a: a["views"]["equal_time"]["target_loss"])
    lines.append(
        f"- Best quality per unit of time among the selective arms: `{top['name']}` (lowest adapted block "
        f"{top['lowest_layer']}), equal-time loss {top['views']['equal_time']['target_loss']:.4f}."
    )
    return lines


def _overview(result: dict) -> list[str]:
    """Sentences over all arms: quality per time, the cost model, memory and forgetting."""
    base = next(a for a in result["arms"] if a["kind"] == BASELINE)
    selective = [a for a in result["arms"] if a["kind"] != BASELINE]
    speedups = [a["measured_speedup"] for a in selective]
    ahead = [a["name"] for a in selective if a["views"]["equal_time"]["target_vs_all"] <= 1]
    lines = [
        "- "
        + (
            f"At equal time {', '.join(f'`{n}`' for n in ahead)} matched or beat all-layer LoRA's loss."
            if ahead
            else "No selective arm matched all-layer LoRA's loss at equal time: their steps were "
            f"{min(speedups):.2f}-{max(speedups):.2f}x faster, but each step lowered the loss by less, and more "
            "steps in the same time did not make up for it."
        )
    ]
    errors = [a["prediction_error"] for a in selective]
    order = sorted(selective, key=lambda a: a["measured_speedup"])
    same_order = order == sorted(selective, key=lambda a: a["predicted_speedup"])
    lines.append(
        f"- The FLOP cost model's predicted speedups are off by {min(errors):+.1%} to {max(errors):+.1%} of the "
        f"measured ones and {'rank' if same_order else 'do not rank'} the arms in the measured order"
        + (
            " (all too low, as if the adapters' small rank-r products cost more than their FLOPs on a CPU)."
            if max(errors) < 0 and result["machine"]["device"] == "cpu"
            else "."
        )
    )
    saved = sorted(result["arms"], key=lambda a: a["lowest_layer"])
    if all(a["memory"].get("saved_activations_mb") is not None for a in saved):
        lines.append(
            "- Activations kept for the backward pass, by lowest adapted block: "
            + ", ".join(f"{a['memory']['saved_activations_mb']:.0f} MB (`{a['name']}`)" for a in saved)
            + ". The resident-memory peak of a first step is noisier (the allocator reuses freed memory)."
        )
    forgetting = [a["views"]["equal_steps"]["forgetting"] for a in result["arms"]]
    if all(f is not None and f < 0 for f in forgetting):
        lines.append(
            "- The general-corpus loss fell in every arm (negative forgetting), so no arm forgot; the forgetting "
            "target then compares how much each improved it (all-layer LoRA "
            f"{base['views']['equal_steps']['forgetting']:+.4f})."
        )
    return lines


def _reading(result: dict) -> list[str]:
    arms = {a["name"]: a for a in result["arms"]}
    base = arms[BASELINE]
    lines = []
    deep = [a["name"] for a in result["arms"] if a["lowest_layer_reached"] != a["lowest_layer"]]
    lines.append(
        "- The backward pass stopped at the lowest adapted block in every arm."
        if not deep
        else f"- The backward pass went below the lowest adapted block in {deep}: their speed-up is lost."
    )
    lines.extend(_overview(result))
    for arm in result["arms"]:
        if arm["kind"] == BASELINE:
            continue
        steps, equal_time = arm["views"]["equal_steps"], arm["views"]["equal_time"]
        lines.append(
            f"- `{arm['name']}` (lowest block {arm['lowest_layer']}): steps {arm['measured_speedup']:.2f}x faster "
            f"(predicted {arm['predicted_speedup']:.2f}x); at equal steps its loss is "
            f"{steps['target_vs_all'] - 1:+.2%} vs all-layer LoRA, at equal time "
            f"{equal_time['target_vs_all'] - 1:+.2%} ({equal_time['steps']} steps); "
            f"forgetting {_num(steps['forgetting'], '+.4f')} nats "
            f"(all-layer {base['views']['equal_steps']['forgetting']:+.4f})."
        )
    lines.extend(_recommendation(result))
    during = result["load_average"]["during"]
    cpus = result["machine"]["cpu_count"]
    if during:
        lines.append(
            f"- Machine load (1-minute average) during the run: median {statistics.median(during):.1f}, "
            f"max {max(during):.1f} on {cpus} CPUs. Other work slows every arm, but the arms took turns step by "
            "step, so ratios hold better than absolute times. One seed, and one learning rate for every arm "
            f"({result['config']['learning_rate']:g}): arms with fewer adapters might prefer another."
        )
    return lines


def _data_text(result: dict) -> str:
    cfg = result["config"]
    if cfg["model"] == TINY_MODEL:
        return (
            f"Training rows count up by 1 from random starts; held-out target: {cfg['eval_blocks']} more such rows; "
            f"general rows for forgetting count up by 2 ({cfg['general_blocks']} rows)."
        )
    return (
        f"Held-out target: {cfg['data']} eval split ({cfg['eval_blocks']} blocks spread over it); general corpus "
        f"for forgetting: {cfg['general_data']} ({cfg['general_blocks']} blocks)."
    )


def headline_table(result: dict) -> str:
    """One row per arm: layers, measured and predicted speedup, losses, forgetting and time to quality."""
    n = result["model"]["num_layers"]
    lines = [
        "| arm | layers | speedup measured | predicted | target loss (vs all) | equal-time loss (vs all) "
        "| forgetting | time to all-layer loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in result["arms"]:
        steps, equal_time, ttq = arm["views"]["equal_steps"], arm["views"]["equal_time"], arm["time_to_quality"]
        lines.append(
            f"| {arm['name']} | {_layers_text(arm['layers'], n)} | {arm['measured_speedup']:.2f}x "
            f"| {arm['predicted_speedup']:.2f}x | {steps['target_loss']:.4f} ({steps['target_vs_all'] - 1:+.2%}) "
            f"| {equal_time['target_loss']:.4f} ({equal_time['target_vs_all'] - 1:+.2%}) "
            f"| {_num(steps['forgetting'], '+.4f')} "
            f"| {'not reached' if ttq['ratio_to_all'] is None else format(ttq['ratio_to_all'], '.2f') + 'x'} |"
        )
    return "\n".join(lines)


def _header(result: dict, h: str) -> list[str]:
    cfg, model, machine, load = result["config"], result["model"], result["machine"], result["load_average"]
    truncation = {a["name"]: a for a in result["arms"]}.get(TARGET_ARM)
    probe = f"- Probe: {result['probe']['seconds']:.1f} s"
    if truncation:
        probe += f", {truncation['probe_share']:.1%} of probe + the truncation arm's {cfg['steps']}-step training"
    return [
        f"{h} Training benchmark `{result['name']}`: LoRA on all layers vs layer selections",
        "",
        f"{model['name']} ({model['type']}, {model['num_layers']} layers); LoRA r={cfg['r']} "
        f"alpha={cfg['lora_alpha']:g} on every attention and MLP projection of the adapted blocks; selective arms "
        f"adapt {cfg['budget_pct']:g}% of the blocks. Batch {cfg['batch_size']} x {cfg['max_length']} tokens, AdamW "
        f"lr {cfg['learning_rate']:g} ({cfg['lr_schedule']}), seed {cfg['seed']}; arms trained round-robin on the "
        f"same batches. {_data_text(result)} Base model: target loss {result['base']['target_loss']:.4f}, general "
        f"loss {result['base']['general_loss']:.4f}.",
        "",
        f"- Command: `{result['command']}` ({result['created']}, {result['wall_seconds'] / 60:.1f} min"
        + (f", {result['cpu_seconds'] / 60:.1f} min of CPU)" if "cpu_seconds" in result else ")"),
        f"- Machine: {machine['platform']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch "
        f"thread(s), device {machine.get('device_name', machine['device'])}; load average before "
        f"{load['before'][0]:.2f}, after {load['after'][0]:.2f}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        probe,
        f"- Cost model: {result['cost_model']}",
        "",
        headline_table(result),
    ]


def _equal_steps(result: dict, h: str) -> list[str]:
    cfg, n = result["config"], result["model"]["num_layers"]
    rss = result["arms"][0]["memory"]["kind"] == "rss"
    lines = [
        f"{h}# Equal steps ({cfg['steps']} steps each)",
        "",
        f"Speedup: all-layer median step time / the arm's (first {cfg['warmup_steps']} steps left out); paired: "
        f"median of the per-round ratios. Memory: growth of {'resident' if rss else 'allocated'} memory while "
        "building the arm (model copy, adapters, optimizer) and its peak growth during its first step; saved: "
        "activations autograd kept for the backward pass. Forgetting: general-corpus loss after minus before.",
        "",
        "| arm | layers | backward down to | s/step | tokens/s | speedup | paired | predicted | error "
        "| build MB | step peak MB | saved MB | target loss | vs all | forgetting |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in result["arms"]:
        view, mem = arm["views"]["equal_steps"], arm["memory"]
        lines.append(
            f"| {arm['name']} | {_layers_text(arm['layers'], n)} | {arm['lowest_layer_reached']} "
            f"| {arm['median_step_seconds']:.3f} | {arm['tokens_per_second']:.0f} | {arm['measured_speedup']:.2f}x "
            f"| {arm['paired_speedup']:.2f}x | {arm['predicted_speedup']:.2f}x | {arm['prediction_error']:+.1%} "
            f"| {_num(mem.get('build_mb'), '.0f')} | {_num(mem.get('first_step_peak_mb'), '.0f')} "
            f"| {_num(mem.get('saved_activations_mb'), '.0f')} | {view['target_loss']:.4f} "
            f"| {view['target_vs_all'] - 1:+.2%} | {_num(view['forgetting'], '+.4f')} |"
        )
    return lines


def _equal_time(result: dict, h: str) -> list[str]:
    lines = [
        f"{h}# Equal time ({result['equal_time_seconds']:.1f} s of training each: all-layer LoRA's "
        f"{result['config']['steps']} steps)",
        "",
        "| arm | steps | train s | target loss | vs all | forgetting | vs all-layer forgetting |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in result["arms"]:
        view = arm["views"]["equal_time"]
        note = " (read off its curve: slower than all-layer)" if view["interpolated"] else ""
        lines.append(
            f"| {arm['name']} | {view['steps']}{note} | {_num(view['seconds'], '.1f')} | {view['target_loss']:.4f} "
            f"| {view['target_vs_all'] - 1:+.2%} | {_num(view['forgetting'], '+.4f')} "
            f"| {_num(view['forgetting_vs_all'], '+.4f')} |"
        )
    return lines


def _time_to_quality(result: dict, h: str) -> list[str]:
    quality, cfg = result["quality"], result["config"]
    lines = [
        f"{h}# Time to quality (all-layer LoRA's {cfg['steps']}-step loss {quality['target_loss']:.4f}; held-out "
        f"loss every {cfg['eval_every']} steps, interpolated; cap {quality['cap']:g}x = "
        f"{quality['cap_seconds']:.1f} s)",
        "",
        "| arm | seconds to reach | vs all-layer time | trained s | final loss |",
        "|---|---|---|---|---|",
    ]
    for arm in result["arms"]:
        ttq = arm["time_to_quality"]
        ratio = "-" if ttq["ratio_to_all"] is None else f"{ttq['ratio_to_all']:.2f}x"
        lines.append(
            f"| {arm['name']} | {_num(ttq['seconds'], '.1f', 'not reached')} | {ratio} "
            f"| {ttq['trained_seconds']:.1f} | {arm['curve'][-1]['loss']:.4f} |"
        )
    return lines


def _ratio(value: float | None, reference: float | None) -> str:
    return "-" if value is None or reference is None else f"{value / reference - 1:+.2%}"


def _beyond(result: dict, h: str) -> list[str]:
    """``ranks`` and ``reprobe`` against ``score``: the same blocks first, uniform rank, selected once."""
    arms = {a["name"]: a for a in result["arms"]}
    score = arms["score"]
    cfg, n = result["config"], result["model"]["num_layers"]
    lines = [
        f"{h}# Beyond one-shot selection with uniform rank (each against `score`)",
        "",
        "`ranks`: the `score` blocks with ranks in proportion to their probe scores, at most the LoRA parameters of "
        f"uniform r={cfg['r']} on them. `reprobe`: the `score` blocks first; every {cfg['reprobe_every']} steps the "
        "probe runs again on the model being trained (other rows) and the trainable adapters move to its "
        "selection; blocks that leave keep what they learned, frozen. Its clock includes the re-probes. Losses "
        "are relative to `score`'s in the same view.",
        "",
        "| arm | trainable params | s/step | speedup vs all | equal-step loss (vs score) "
        "| equal-time loss (vs score) | time to all-layer loss | forgetting |",
        "|---|---|---|---|---|---|---|---|",
    ]
    score_steps, score_time = score["views"]["equal_steps"]["target_loss"], score["views"]["equal_time"]["target_loss"]
    for arm in [score] + [a for a in result["arms"] if a["kind"] in BEYOND_ARMS]:
        steps, equal_time, ttq = arm["views"]["equal_steps"], arm["views"]["equal_time"], arm["time_to_quality"]
        reached = "not reached" if ttq["ratio_to_all"] is None else f"{ttq['ratio_to_all']:.2f}x"
        lines.append(
            f"| {arm['name']} | {arm['memory']['trainable_parameters']:,} | {arm['median_step_seconds']:.3f} "
            f"| {arm['measured_speedup']:.2f}x "
            f"| {steps['target_loss']:.4f} ({_ratio(steps['target_loss'], score_steps)}) "
            f"| {equal_time['target_loss']:.4f} ({_ratio(equal_time['target_loss'], score_time)}) "
            f"| {reached} | {_num(steps['forgetting'], '+.4f')} |"
        )
    lines.append("")
    for arm in result["arms"]:
        info = arm.get("beyond")
        if not info:
            continue
        if arm["kind"] == "ranks":
            ranks = info["ranks"]
            lines.append(
                f"- `ranks`: {info['lora_parameters']:,} LoRA parameters against {info['uniform_parameters']:,} for "
                f"uniform r={cfg['r']}; ranks by block: "
                + ", ".join(f"{layer}: {rank}" for layer, rank in ranks.items())
                + "."
            )
        else:
            moves = [e for e in info["history"][1:] if e["moved_in"] or e["moved_out"]]
            lines.append(
                f"- `reprobe`: {info['probes']} re-probes took {info['seconds']:.1f} s, "
                f"{info['share_of_clock']:.1%} of its training clock; the selection changed {len(moves)} time(s)"
                + (
                    ": " + "; ".join(f"step {e['step']}: +{e['moved_in']} -{e['moved_out']}" for e in moves)
                    if moves
                    else ""
                )
                + f". Blocks trained at some point: {_layers_text(info['layers_ever_trained'], n)}; "
                f"last selection: {_layers_text(info['final_layers'], n)}."
            )
    return lines


def render_markdown(result: dict, *, level: int = 1) -> str:
    """The tables and the reading of a benchmark result, as Markdown (top heading at ``level``)."""
    h = "#" * level
    out = _header(result, h) + [""] + _equal_steps(result, h) + [""] + _equal_time(result, h)
    out += [""] + _time_to_quality(result, h)
    if any(a["kind"] in BEYOND_ARMS for a in result["arms"]):
        out += [""] + _beyond(result, h)
    if result["targets"]:
        out += ["", f"{h}# Targets (arm `{TARGET_ARM}`)", "", "| target | value | met |", "|---|---|---|"]
        out += [f"| {t['target']} | {t['value']} | {'met' if t['met'] else 'MISSED'} |" for t in result["targets"]]
    out += ["", f"{h}# Reading", "", *_reading(result), ""]
    return "\n".join(out)


def plot_loss_vs_time(result: dict, path: str | os.PathLike) -> Path:
    """Held-out target loss against training seconds, one line per arm."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for arm in result["arms"]:
        xs = [p["seconds"] for p in arm["curve"]]
        ys = [p["loss"] for p in arm["curve"]]
        style = {"color": "black", "linewidth": 2.2} if arm["kind"] == BASELINE else {}
        ax.plot(xs, ys, marker=".", label=arm["name"], **style)
    ax.axhline(result["quality"]["target_loss"], color="gray", linestyle="--", linewidth=0.8)
    ax.axvline(result["equal_time_seconds"], color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("training seconds (evaluation not counted)")
    ax.set_ylabel("held-out target loss (nats/token)")
    ax.set_title(f"{result['model']['name']}: held-out loss vs wall-clock")
    curves = [p["loss"] for a in result["arms"] for p in a["curve"][1:]]
    if curves:  # the base model's loss would squash the curves
        low, high = min(curves), max(curves)
        ax.set_ylim(low - 0.05 * (high - low or 1), high + 0.1 * (high - low or 1))
    ax.legend(fontsize=8)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_speedups(result: dict, path: str | os.PathLike) -> Path:
    """Predicted and measured step speedup of every arm against all-layer LoRA."""
    plt = pyplot()
    arms = result["arms"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(arms) + 2), 3.8))
    x = np.arange(len(arms))
    ax.bar(x - 0.2, [a["predicted_speedup"] for a in arms], 0.4, label="predicted (FLOP cost model)")
    ax.bar(x + 0.2, [a["measured_speedup"] for a in arms], 0.4, label="measured (median step time)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x, [f"{a['name']}\n(from {a['lowest_layer']})" for a in arms], fontsize=8)
    ax.set_ylabel("speedup vs all layers")
    ax.set_title(f"{result['model']['name']}: step speedup by arm")
    ax.legend(fontsize=8)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _other_runs(others: Sequence[dict], results_link: str) -> list[str]:
    """A table linking the other training benchmarks of the results folder: their arms and headline figures."""
    lines = [
        "## Other training benchmarks in the same folder",
        "",
        "| run | model | arms: step speedup, equal-time loss vs all-layer LoRA | command |",
        "|---|---|---|---|",
    ]
    for other in others:
        arms = "; ".join(
            f"{a['name']} {a['measured_speedup']:.2f}x, {a['views']['equal_time']['target_vs_all'] - 1:+.2%}"
            for a in other["arms"]
            if a["kind"] != BASELINE
        )
        lines.append(
            f"| [`{other['name']}`]({results_link}/train_{other['name']}.md) | {other['model']['name']} "
            f"| {arms} | `{other['command']}` |"
        )
    lines.append("")
    beyond = [(o, a) for o in others for a in o["arms"] if a["kind"] in BEYOND_ARMS]
    if beyond:
        lines += [
            "### Ranks and re-probing against one-shot `score` selection, run by run",
            "",
            "Relative to the `score` arm of the same run (same blocks at the start, uniform rank, selected once).",
            "",
            "| run | seed | arm | equal-step loss | equal-time loss | time to all-layer loss (arm / score) "
            "| re-probe share of clock |",
            "|---|---|---|---|---|---|---|",
        ]
        for other, arm in beyond:
            score = next(a for a in other["arms"] if a["kind"] == "score")
            ttq = arm["time_to_quality"]["ratio_to_all"], score["time_to_quality"]["ratio_to_all"]
            share = arm["beyond"].get("share_of_clock")
            steps, time_ = (
                _ratio(arm["views"][view]["target_loss"], score["views"][view]["target_loss"])
                for view in ("equal_steps", "equal_time")
            )
            lines.append(
                f"| `{other['name']}` | {other['config']['seed']} | {arm['name']} | {steps} | {time_} "
                f"| {_num(ttq[0], '.2f', 'not reached')} / {_num(ttq[1], '.2f', 'not reached')} "
                f"| {_num(share, '.1%')} |"
            )
        lines.append("")
    return lines


def render_docs(result: dict, probe_markdown: str | None, *, results_link: str, others: Sequence[dict] = ()) -> str:
    """The benchmark page: the training benchmark, links to ``others`` and the probe-vs-reference table."""
    name = result["name"]
    out = [
        "# Benchmarks",
        "",
        f"Generated from `{results_link}/train_{name}.json` by `{result['command']}` "
        f"(`aletheia-lora bench --render-only ...` re-renders it); do not edit by hand.",
        "",
        "How the training benchmark works: every arm is its own copy of the base model with LoRA on one set of "
        "blocks. The arms take their steps in turn (round-robin, rotating which goes first) on the same batches "
        "in the same order, with the same seed, optimizer and learning-rate schedule, so a busy machine slows "
        "all of them alike. Each arm's training clock sums its measured step times; evaluation is not counted. "
        "Equal steps compares the arms after the same number of steps; equal time lets the faster arms train "
        "until they have used the time all-layer LoRA needed; time to quality is when an arm's held-out loss "
        "first reaches all-layer LoRA's final loss.",
        "",
        render_markdown(result, level=2),
        f"![held-out loss vs training time]({results_link}/train_{name}_loss_vs_time.png)",
        "",
        f"![speedup by arm]({results_link}/train_{name}_speedup.png)",
        "",
        *(_other_runs(others, results_link) if others else []),
        "## Gradient probe benchmark (`bench/probe_vs_reference.py`)",
        "",
    ]
    if probe_markdown:
        # its headings go under this section's
        out.append("\n".join("##" + line if line.startswith("#") else line for line in probe_markdown.splitlines()))
    else:
        out.append("Not run yet: `.venv/bin/python bench/probe_vs_reference.py` writes `probe_vs_reference.md`.")
    return "\n".join(out).rstrip() + "\n"


def render_outputs(out_dir: str | os.PathLike, name: str, *, docs: str | os.PathLike | None = None) -> list[Path]:
    """(Re-)write ``train_NAME.md``, the plots and optionally the docs page from ``out_dir/train_NAME.json``.

    Args:
        out_dir: The folder that holds the JSON.
        name: The run's name.
        docs: Also write the benchmark page here; it includes ``out_dir/probe_vs_reference.md`` when present.

    Returns:
        The paths written.
    """
    import json

    out = Path(out_dir)
    source = out / f"train_{name}.json"
    if not source.is_file():
        raise FileNotFoundError(f"no benchmark result {str(source)!r}: run `aletheia-lora bench` first")
    try:
        result = json.loads(source.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(source)!r} is not valid JSON: {exc}") from None
    written = [
        write_text(out / f"train_{name}.md", render_markdown(result)),
        plot_loss_vs_time(result, out / f"train_{name}_loss_vs_time.png"),
        plot_speedups(result, out / f"train_{name}_speedup.png"),
    ]
    for arm in result["arms"]:
        if arm["kind"] == "reprobe":
            title = f"{result['model']['name']}: blocks trained by arm reprobe, every {arm['beyond']['every']} steps"
            path = out / f"train_{name}_reprobe.png"
            history = arm["beyond"]["history"]
            num_layers, steps = result["model"]["num_layers"], len(arm["step_seconds"])
            written.append(plot_reprobe_history(history, num_layers, path, title=title, end_step=steps))
    if docs is not None:
        docs = Path(docs)
        docs.parent.mkdir(parents=True, exist_ok=True)
        probe = out / "probe_vs_reference.md"
        link = Path(os.path.relpath(out.resolve(), docs.parent.resolve())).as_posix()
        others = []
        for path in sorted(out.glob("train_*.json")):
            if path != source:
                try:
                    others.append(json.loads(path.read_text()))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from None
        probe_text = probe.read_text() if probe.is_file() else None
        text = render_docs(result, probe_text, results_link=link, others=others)
        written.append(write_text(docs, text))
    return written
