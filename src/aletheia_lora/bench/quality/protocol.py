"""Running the protocol unit by unit: the learning-rate sweep on the first seed, then the other seeds at each
arm's chosen rate; an arm registered with ``rate_from`` runs every seed at its source's chosen rate once that sweep
is complete, and one registered with ``after`` runs each unit once the other arm's unit of the same task, rate and
seed exists. A finished unit's JSON is written atomically and skipped on a rerun, so a stopped run continues where
it stopped; the summary and the page are made from the unit files alone."""

from __future__ import annotations

import datetime
import functools
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aletheia_lora.bench.measure import machine_info
from aletheia_lora.bench.quality.arms import AFTER, ARMS, SEEDED_ARMS, ArmContext, rate_source
from aletheia_lora.bench.quality.config import QualityConfig
from aletheia_lora.bench.quality.render import render_quality
from aletheia_lora.bench.quality.summary import (
    choose_rate,
    rate_key,
    read_unit,
    shared_rate,
    summarize,
    sweep_losses,
    unit_path,
)
from aletheia_lora.bench.quality.tasks import TaskData, load_base, load_task
from aletheia_lora.bench.quality.unit import run_unit
from aletheia_lora.evaluation import evaluate_loss
from aletheia_lora.files import write_json
from aletheia_lora.layers import DecoderStack, find_decoder_stack
from aletheia_lora.pipeline import versions
from aletheia_lora.plan import probe_scores, selection_cost

logger = logging.getLogger(__name__)


def _write(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON at ``path`` atomically, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, payload)


def arm_cost(base: nn.Module, config: QualityConfig, stack: DecoderStack | None = None, **lora: Any) -> Any:
    """The cost model the arms select with (at the config's rank, or the ``lora`` ranks given); the summary prices
    every unit's training time with it too."""
    return selection_cost(base, seq_len=config.max_length, batch_size=config.batch_size, lora={"r": config.r, **lora},
                          stack=stack)  # fmt: skip


class _Task:
    """A task's data, probe scores, base losses and arm context, built on first use."""

    def __init__(self, name: str, session: _Session) -> None:
        self.name, self.session = name, session
        self.folder = session.root / name
        self._data: TaskData | None = None
        self._context: ArmContext | None = None
        self.base_losses: dict = {}

    @property
    def data(self) -> TaskData:
        if self._data is None:
            s = self.session
            self._data = load_task(self.name, s.config, s.tokenizer)
            _write(self.folder / "splits.json", {"task": self.name, **self._data.describe(),
                                                      "sources": self._data.sources})  # fmt: skip
            losses = {}
            for key, rows in (("validation_loss", self._data.validation), ("test_loss", self._data.test),
                              ("general_loss", self._data.general)):  # fmt: skip
                losses[key] = None if rows is None else s.loss(rows, self._data.pad)
            self.base_losses = losses
        return self._data

    @property
    def context(self) -> ArmContext:
        if self._context is None:
            s, c = self.session, self.session.config
            path = self.folder / "probe.json"
            cached = read_unit(path)
            if cached is None:
                probe = {"probe_batches": c.probe_batches, "batch_size": c.probe_batch_size, "seed": 0}
                scores, seconds = probe_scores(s.base, self.data.train, probe, pad_token_id=self.data.pad,
                                               stack=s.stack)  # fmt: skip
                cached = {"scores": {str(k): v for k, v in sorted(scores.items())}, "seconds": seconds}
                _write(path, cached)
            scores = {int(k): float(v) for k, v in cached["scores"].items()}
            cost = arm_cost(s.base, c, s.stack)
            self._context = ArmContext(s.base, s.stack, scores, cost, c, c.max_length, c.batch_size)
        return self._context


class _Session:
    """The base model, loaded once for every unit this process trains."""

    def __init__(self, config: QualityConfig, root: Path) -> None:
        self.config, self.root = config, root
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.base, self.tokenizer = load_base(config, self.device)
        self.base.eval()
        self.stack = find_decoder_stack(self.base)
        self.tasks = {name: _Task(name, self) for name in config.tasks}

    def loss(self, rows: list, pad: int) -> float:
        return evaluate_loss(self.base, rows, batch_size=self.config.eval_batch_size, pad_token_id=pad)["loss"]

    def _check_same_blocks(self, task: str, arm: str, seed: int, layers: list[int]) -> None:
        """An arm's units must adapt the blocks its finished units adapted (the same seed's, for a seeded arm): a
        change of code or cost model between sessions must not mix two selections under one arm."""
        pattern = f"*_seed{seed}.json" if arm in SEEDED_ARMS else "*.json"
        for path in sorted((self.root / task / arm).glob(pattern)):
            done = read_unit(path)
            if done is not None and list(done["layers"]) != list(layers):
                raise ValueError(
                    f"{task} / {arm}: this code picks blocks {list(layers)}, {path.name} trained {done['layers']}; "
                    "the selection changed since that unit ran: continue with the code that started the run, or "
                    "start a new run (--name)"
                )

    def train(self, task: str, arm: str, rate: float, seed: int) -> dict:
        t = self.tasks[task]
        choice = ARMS[arm](t.context, seed)
        self._check_same_blocks(task, arm, seed, choice.layers)
        logger.info("unit %s / %s / lr %s / seed %d: blocks %s", task, arm, rate_key(rate), seed, choice.layers)
        after = None
        if arm in AFTER:
            after = read_unit(unit_path(self.root, task, AFTER[arm], rate, seed))
            if after is None:
                raise RuntimeError(f"unit {task} / {arm} / lr {rate_key(rate)} / seed {seed} runs after "
                                   f"{AFTER[arm]}'s unit of the same rate and seed, which has not run")  # fmt: skip
        torch.manual_seed(seed)
        record = run_unit(self.base, t.data, choice, arm=arm, rate=rate, seed=seed, config=self.config,
                          device=self.device, base_losses=t.base_losses, after=after)  # fmt: skip
        if rate_source(arm) is not None:
            record["rate_from"] = rate_source(arm)
        return record


def planned_units(config: QualityConfig, root: Path) -> list[tuple[str, str, float, int]]:
    """The units that can run now, in order: per task and arm (in the config's order), the sweep (every rate on the
    first seed, and the rates past an edge that came out best: :func:`~.summary.sweep_losses`), then the other seeds at
    the arm's chosen rate once its sweep is complete.

    The arms registered with ``rate_from`` come after those of every task (so adding one leaves the other units'
    places in the plan as they were): no sweep, every seed at the source arm's chosen rate once that sweep is
    complete; with ``after``, a unit only once the other arm's unit of the same task, rate and seed exists. Units
    that wait are planned by a later call (:func:`run_protocol` plans again until a pass trains nothing).
    """
    units = []
    for task in config.tasks:
        for arm in config.arms:
            if rate_source(arm) is not None:
                continue
            sweep = sweep_losses(config, root, task, arm)  # with the rates past an edge that was best
            units.extend((task, arm, float(key), config.seeds[0]) for key in sweep)
            if all(v is not None for v in sweep.values()):
                chosen = choose_rate(sweep)
                units.extend((task, arm, chosen, seed) for seed in config.seeds[1:])
    for task in config.tasks:
        for arm in config.arms:
            if rate_source(arm) is None:
                continue
            chosen, _ = shared_rate(config, root, task, arm)
            for seed in config.seeds if chosen is not None else []:
                if arm in AFTER and not unit_path(root, task, AFTER[arm], chosen, seed).is_file():
                    continue
                units.append((task, arm, chosen, seed))
    return units


def quality_command(config: QualityConfig, command: str) -> int:
    """``aletheia-lora quality``: run or continue the protocol in ``config.out``; print what is left."""
    summary = run_protocol(config, config.out, docs=config.docs, command=command, max_units=config.max_units)
    left = len(summary["missing_units"])
    wrote = f"wrote {Path(config.out) / (config.name + '.json')}" + (f" and {config.docs}" if config.docs else "")
    sys.stdout.write(f"trained {summary['units_trained_now']} units; {left or 'no'} units left\n{wrote}\n")
    return 0


def run_protocol(
    config: QualityConfig,
    out_dir: str | os.PathLike = "bench/results",
    *,
    docs: str | os.PathLike | None = None,
    command: str | None = None,
    max_units: int | None = None,
) -> dict:
    """Run (or continue) the protocol and write ``OUT/NAME.json``, ``OUT/NAME.md`` and the plots.

    Units go to ``OUT/NAME/TASK/ARM/lrRATE_seedSEED.json``; finished ones are skipped.

    Args:
        config: The settings.
        out_dir: The results folder.
        docs: Also write the page (e.g. ``docs/QUALITY.md``) here.
        command: The command line that ran this, recorded and shown on the page.
        max_units: Train at most this many new units, then write the summary and stop.

    Returns:
        The summary written to ``OUT/NAME.json``.
    """
    if not isinstance(config, QualityConfig):
        raise TypeError(f"config must be a QualityConfig, got {type(config).__name__}")
    out = Path(out_dir)
    root = out / config.name
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    session: _Session | None = None
    trained = 0
    stopped = False
    # each pass plans what the units before it made possible (the seeds after a sweep, the units that wait for
    # another arm's); a pass that trains nothing ends the run
    while not stopped:
        before = trained
        for task, arm, rate, seed in planned_units(config, root):
            path = unit_path(root, task, arm, rate, seed)
            if path.is_file():
                continue
            if max_units is not None and trained >= max_units:
                stopped = True
                break
            session = session or _Session(config, root)
            record = session.train(task, arm, rate, seed)
            record["config"] = asdict(config)
            _write(path, record)
            trained += 1
        stopped = stopped or trained == before
    # nothing trained now: the base model only for its shapes
    base, stack = (session.base, session.stack) if session else (load_base(config, torch.device("cpu"))[0], None)
    cost_at = functools.cache(lambda r, a, m: arm_cost(base, config, stack, r=r, attention_r=a, mlp_r=m))
    summary = summarize(config, root, cost_at=cost_at)
    summary.update(
        command=command or f"run_protocol(QualityConfig.from_file(...), {str(out_dir)!r})",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=asdict(config),
        units_trained_now=trained,
        wall_seconds_now=time.perf_counter() - started,
        machine=machine_info(session.device if session else torch.device(config.device or "cpu")),
        versions=versions(),
    )
    for task in config.tasks:
        splits = read_unit(root / task / "splits.json")
        if splits is not None:
            summary["tasks"][task]["data"] = {k: v for k, v in splits.items() if k != "sources"}
    write_json(out / f"{config.name}.json", summary)
    render_quality(summary, out, docs=docs)
    return summary
