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

1. equal steps: every arm after ``max_steps`` steps;
2. equal time: the arms other than ``all`` keep training while their clock is nearer to ``all``'s ``max_steps``-step
   time than it would be after one more step, so faster arms take more steps;
3. time to quality: the clock time at which an arm's held-out loss (evaluated every ``eval_steps`` steps) first
   reaches ``all``'s equal-step loss, interpolated linearly between evaluations; arms that have not reached it
   keep training up to ``quality_cap`` times ``all``'s time.

The first ``untimed_steps`` steps of an arm pay one-off costs (allocations, optimizer state): they stay out of the
medians and are charged to the clock at the arm's median step time. The very first step of each arm also measures
how deep its backward pass went, the activations autograd saved, and the growth of resident memory (the kernel's
high-water mark on Linux, ``max_memory_allocated`` on CUDA). Forgetting is the general-corpus loss after training
minus before; with ``general_data=None`` (``--general-data none``) it is not measured (null in the JSON, ``-`` in the
tables).

Modules, in the order a run goes through them:

* :mod:`~aletheia_lora.bench.config`: :class:`BenchConfig` (a setting shared with ``aletheia-lora run`` carries
  its name: ``max_steps``, ``lr_scheduler_type``, ...), the arm names, the run name derived from the model, and the
  settings' older names (:func:`~aletheia_lora.bench.config.load_result` maps them when it reads a result);
* :mod:`~aletheia_lora.bench.workload`: the base model, the rows and the batches, and each arm's LoRA copy;
* :mod:`~aletheia_lora.bench.measure`: memory, saved activations, backward depth, step times, other processes'
  load, machine and versions (also used by ``bench/families.py`` and ``bench/probe_vs_reference.py``);
* :mod:`~aletheia_lora.bench.runner`: the arms, the round-robin runner and :func:`run_bench`;
* :mod:`~aletheia_lora.bench.analysis`: curves read at a time or a loss, ratios against all-layer LoRA, targets;
* :mod:`~aletheia_lora.bench.render`: the Markdown tables, the benchmark page and the plots, from the JSON alone.

The quality protocol (:mod:`~aletheia_lora.bench.quality`, ``aletheia-lora quality``) reuses these pieces: per-arm
learning rates chosen on validation, test losses, two tasks, several seeds, resumable unit by unit.
"""

from aletheia_lora.bench.analysis import assess_targets
from aletheia_lora.bench.config import (
    ARM_KINDS,
    BASELINE,
    BEYOND_ARMS,
    RENAMED_FOR_RUN,
    RENAMED_GENERATIONS,
    RENAMED_SETTINGS,
    STRATEGY_ARMS,
    TARGET_ARM,
    BenchConfig,
    default_name,
    load_result,
)
from aletheia_lora.bench.quality import QualityConfig, quality_command, run_protocol
from aletheia_lora.bench.render import (
    headline_table,
    plot_loss_vs_time,
    plot_speedups,
    render_docs,
    render_markdown,
    render_outputs,
)
from aletheia_lora.bench.runner import _pick_frontier, learning_rate_at, run_bench  # noqa: F401 - tests pick frontiers

__all__ = [
    "ARM_KINDS",
    "BASELINE",
    "BEYOND_ARMS",
    "RENAMED_FOR_RUN",
    "RENAMED_GENERATIONS",
    "RENAMED_SETTINGS",
    "STRATEGY_ARMS",
    "TARGET_ARM",
    "BenchConfig",
    "QualityConfig",
    "assess_targets",
    "default_name",
    "headline_table",
    "learning_rate_at",
    "load_result",
    "plot_loss_vs_time",
    "plot_speedups",
    "quality_command",
    "render_docs",
    "render_markdown",
    "render_outputs",
    "run_bench",
    "run_protocol",
]
