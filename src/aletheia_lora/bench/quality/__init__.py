"""The quality protocol (issue 14): per-arm learning rates chosen on validation, losses on test, two tasks,
several seeds and epochs, resumable unit by unit.

A unit is task x arm x learning rate x seed; its JSON goes to ``OUT/NAME/TASK/ARM/lrRATE_seedSEED.json``
(written atomically; a rerun skips it). The summary ``OUT/NAME.json`` and the page are made from the units alone.

Modules, in the order a run goes through them:

* :mod:`~aletheia_lora.bench.quality.config`: :class:`QualityConfig`;
* :mod:`~aletheia_lora.bench.quality.tasks`: the tasks' rows in disjoint train / validation / test splits;
* :mod:`~aletheia_lora.bench.quality.arms`: the arms, registered by name (:func:`register_arm`);
* :mod:`~aletheia_lora.bench.quality.unit`: one unit's training (cosine schedule with warm-up, optional LoRA+);
* :mod:`~aletheia_lora.bench.quality.protocol`: the plan of units and :func:`run_protocol`;
* :mod:`~aletheia_lora.bench.quality.summary`: the summary and the gap, from the unit files;
* :mod:`~aletheia_lora.bench.quality.render`: the page and plots, from the summary.
"""

from aletheia_lora.bench.quality.arms import ARMS, ArmChoice, ArmContext, register_arm
from aletheia_lora.bench.quality.config import TASKS, QualityConfig
from aletheia_lora.bench.quality.protocol import planned_units, quality_command, run_protocol
from aletheia_lora.bench.quality.render import render_markdown, render_quality
from aletheia_lora.bench.quality.summary import choose_rate, summarize, unit_path

__all__ = [
    "ARMS",
    "TASKS",
    "ArmChoice",
    "ArmContext",
    "QualityConfig",
    "choose_rate",
    "planned_units",
    "quality_command",
    "register_arm",
    "render_markdown",
    "render_quality",
    "run_protocol",
    "summarize",
    "unit_path",
]
