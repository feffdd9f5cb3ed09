"""Layer-selective LoRA inside a Hugging Face ``Trainer`` or TRL ``SFTTrainer``, in two lines.

The selection has to be in place before the trainer exists: ``Trainer`` builds its optimizer from the
parameters that require grad when training starts, before any callback's ``on_train_begin`` runs, and a
callback cannot swap the model it was given. So the work is split in two:

* :func:`prepare_aletheia_model` (or :func:`configure_aletheia_lora` for trainers that wrap the model
  themselves from a ``peft_config``) probes the data, selects the blocks, builds the ``LoraConfig`` and
  wraps the model, before the trainer is built;
* :class:`AletheiaCallback` runs inside the trainer: it removes the input-require-grads hooks that the
  trainer's activation checkpointing (or PEFT) adds, which would otherwise run every backward pass down to
  the embeddings and cancel the speed-up, and it records how deep each backward pass really went.

.. code-block:: python

    model, report = prepare_aletheia_model(model, train_dataset, top_pct=50, r=16)
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, callbacks=[AletheiaCallback(report)])
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig, PeftModel
from torch import nn
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from aletheia_lora.checks import check_bool, check_choice, check_int
from aletheia_lora.data import IGNORE_INDEX, conversation_tokens
from aletheia_lora.data.chat import normalize_messages
from aletheia_lora.depth import (
    EMBEDDINGS,
    BackwardDepthMonitor,
    count_input_require_grads_hooks,
    remove_input_require_grads_hooks,
)
from aletheia_lora.layers import DecoderStack, find_decoder_stack, unwrap_model
from aletheia_lora.plan import DEFAULT_SEQ_LEN, Plan, make_plan
from aletheia_lora.probe import LayerScores
from aletheia_lora.ranks import BY, RankAllocation
from aletheia_lora.select import Selection
from aletheia_lora.train import prepare_lora_model

logger = logging.getLogger(__name__)

RANK_ALLOCATIONS = ("uniform", "scores")


@dataclass
class AletheiaReport:
    """What :func:`configure_aletheia_lora` measured and chose, and what :class:`AletheiaCallback` saw.

    Attributes:
        plan: The :class:`~aletheia_lora.plan.Plan`: scores, :class:`~aletheia_lora.select.Selection`, LoRA
            config, cost model and rank allocation. Its parts are also read as ``layer_scores``,
            ``selected_layers``, ``selection``, ``lora_config`` and ``rank_allocation``.
        trainable_parameters: Trainable parameters once wrapped (set by :func:`prepare_aletheia_model`).
        lowest_layer_reached: Lowest block the backward passes reached during training (``-1``: the
            embeddings), set by :class:`AletheiaCallback`; it should equal ``selected_layers[0]``.
        backward_depths: ``(step, lowest block reached)`` for each training step, set by the callback.
    """

    plan: Plan
    trainable_parameters: int | None = None
    lowest_layer_reached: int | None = None
    backward_depths: list[tuple[int, int | None]] = field(default_factory=list)

    @property
    def layer_scores(self) -> LayerScores:
        """The probe's per-block scores."""
        return self.plan.scores

    @property
    def selected_layers(self) -> list[int]:
        """The adapted blocks, sorted."""
        return list(self.plan.selection.layers)

    @property
    def selection(self) -> Selection:
        """The :class:`~aletheia_lora.select.Selection`: score share, predicted speedup, alternatives."""
        return self.plan.selection

    @property
    def lora_config(self) -> LoraConfig:
        """The PEFT config adapting only the selected blocks."""
        return self.plan.lora_config

    @property
    def rank_allocation(self) -> RankAllocation | None:
        """Per-block ranks when ``rank_allocation="scores"``, else None."""
        return self.plan.rank_allocation

    @property
    def predicted_speedup(self) -> float:
        """Predicted step-time ratio of LoRA on every block to LoRA on the selected ones."""
        return float(self.plan.selection.predicted_speedup)

    def to_dict(self) -> dict:
        """A JSON-ready summary."""
        return {
            "layer_scores": {str(k): float(v) for k, v in sorted(self.layer_scores.items())},
            "probe": dict(self.layer_scores.meta),
            "selected_layers": self.selected_layers,
            "selection": self.selection.to_dict(),
            "rank_allocation": self.rank_allocation.to_dict() if self.rank_allocation is not None else None,
            "trainable_parameters": self.trainable_parameters,
            "lowest_layer_reached": self.lowest_layer_reached,
        }

    def summary(self) -> str:
        """A few human-readable lines: the selection, its score share and predicted speedup, the ranks."""
        selection = self.plan.selection
        lines = [
            f"selected layers ({selection.strategy}): {self.selected_layers}",
            f"probe score captured: {selection.score_share:.1%}; "
            f"predicted speedup over LoRA on all layers: {self.predicted_speedup:.2f}x",
        ]
        if self.rank_allocation is not None:
            ranks = {layer: sorted(set(kinds.values())) for layer, kinds in self.rank_allocation.ranks.items()}
            lines.append(
                f"ranks by {self.rank_allocation.by}: {ranks} "
                f"({self.rank_allocation.total_params} LoRA parameters, uniform r={self.rank_allocation.r}: "
                f"{self.rank_allocation.uniform_params})"
            )
        if self.trainable_parameters is not None:
            lines.append(f"trainable parameters: {self.trainable_parameters}")
        if self.lowest_layer_reached is not None:
            lowest = (
                "the embeddings" if self.lowest_layer_reached == EMBEDDINGS else f"block {self.lowest_layer_reached}"
            )
            lines.append(f"backward pass reached down to {lowest}")
        return "\n".join(lines)


def _tokenize_row(row, tokenizer, max_length: int, index: int) -> Mapping:
    """One training row as the probe wants it: tokenized rows as they are, TRL-style rows tokenized.

    TRL's dataset formats, with the loss where SFT puts it: ``text`` (every token); ``messages`` (or ShareGPT's
    ``conversations``): the assistant's turns only, as TRL's ``assistant_only_loss``; ``prompt`` and
    ``completion``: the completion only, as ``SFTTrainer`` does by default, whether both are strings (joined as
    they are, as ``SFTTrainer`` joins them, with EOS after the completion) or both lists of messages (TRL's
    conversational prompt/completion). Conversations use the tokenizer's chat template, or
    :data:`~aletheia_lora.data.FALLBACK_CHAT_TEMPLATE` when it has none (see :func:`conversation_tokens`).
    """
    if not isinstance(row, Mapping):
        raise TypeError(f"train_dataset rows must be dicts, got {type(row).__name__} at row {index}")
    if "input_ids" in row:
        if hasattr(row["input_ids"], "__len__") and len(row["input_ids"]) == 0:
            raise ValueError(f"train_dataset row {index} has empty 'input_ids': a row needs at least one token")
        return row
    if tokenizer is None:
        raise ValueError(
            "train_dataset holds text, not 'input_ids': pass tokenizer=... so that the probed rows can be tokenized"
        )
    where = f"train_dataset row {index}"

    def ids(encoded) -> list[int]:
        return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)

    def nonempty(tokens: list[int], field: str) -> list[int]:
        if not tokens:  # caught here, where the row's index and field are known
            raise ValueError(f"{where}: its {field!r} gives no tokens (empty?); drop such rows")
        return tokens

    def conversation(messages: list[dict], field: str, train_from: int = 0) -> dict:
        input_ids, labels = conversation_tokens(tokenizer, messages, train_from=train_from, where=where)
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(f"{where}: its {field!r} hold no assistant turn to train on; drop such rows")
        return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}

    # a dataset mixing formats fills the other formats' columns with None: a None column is absent
    present = {key: value for key, value in row.items() if value is not None}
    if isinstance(present.get("text"), str):
        return {"input_ids": nonempty(ids(tokenizer(present["text"])), "text")[:max_length]}
    for key in ("messages", "conversations"):
        if key in present:
            return conversation(normalize_messages(present[key], f"{where}: {key!r}"), key)
    if "prompt" in present and "completion" in present:
        prompt, completion = present["prompt"], present["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            prompt_ids = ids(tokenizer(prompt))
            completion_ids = ids(tokenizer(completion, add_special_tokens=False))
            if tokenizer.eos_token_id is not None:
                completion_ids.append(tokenizer.eos_token_id)
            return {
                "input_ids": nonempty(prompt_ids + completion_ids, "prompt+completion")[:max_length],
                "labels": ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length],
            }
        if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt/completion
            context = normalize_messages(prompt, f"{where}: 'prompt'")
            answer = normalize_messages(completion, f"{where}: 'completion'")
            return conversation(context + answer, "completion", train_from=len(context))
        raise ValueError(
            f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages, got "
            f"{type(prompt).__name__} and {type(completion).__name__}"
        )
    if "text" in present:
        raise ValueError(f"{where}: 'text' must be a string, got {type(present['text']).__name__}")
    empty = sorted(set(row) - set(present))
    raise ValueError(
        f"{where} has none of 'input_ids', 'text', 'messages' or 'prompt'+'completion' (it has {sorted(present)}"
        + (f"; None: {empty})" if empty else ")")
    )


class _TokenizedView(Sequence):
    """A sized dataset whose rows are tokenized on access, so the probe tokenizes only the rows it samples."""

    def __init__(self, dataset, tokenizer, max_length: int) -> None:
        self.dataset, self.tokenizer, self.max_length = dataset, tokenizer, max_length

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return _tokenize_row(self.dataset[index], self.tokenizer, self.max_length, index)


class _TokenizedStream(Iterable):
    """The same for an iterable dataset (e.g. a streaming ``IterableDataset``): rows tokenized as they come."""

    def __init__(self, dataset, tokenizer, max_length: int) -> None:
        self.dataset, self.tokenizer, self.max_length = dataset, tokenizer, max_length

    def __iter__(self):
        for index, row in enumerate(self.dataset):
            yield _tokenize_row(row, self.tokenizer, self.max_length, index)


def _probe_dataset(train_dataset, tokenizer, max_length: int):
    """The dataset as the probe wants it, with text rows tokenized lazily."""
    if isinstance(train_dataset, (str, bytes, Mapping)) or not (
        hasattr(train_dataset, "__getitem__") or isinstance(train_dataset, Iterable)
    ):
        raise TypeError(
            "train_dataset must be a dataset of rows (HF Dataset or IterableDataset, list of dicts), got "
            + type(train_dataset).__name__
        )
    if isinstance(train_dataset, DataLoader):  # padded batches: the probe takes them as they come
        return train_dataset
    if not (hasattr(train_dataset, "__len__") and hasattr(train_dataset, "__getitem__")):
        return _TokenizedStream(train_dataset, tokenizer, max_length)
    if len(train_dataset) == 0:
        raise ValueError("train_dataset is empty: the probe needs at least one row")
    return _TokenizedView(train_dataset, tokenizer, max_length)


def _check_lora_flags(lora_kwargs: Mapping[str, Any]) -> None:
    """``LoraConfig``'s boolean fields among the pass-through arguments: PEFT takes any truthy value (``"no"``)."""
    flags = {f.name for f in dataclasses.fields(LoraConfig) if f.type in ("bool", bool)}
    for name, value in lora_kwargs.items():
        if name in flags:
            check_bool(name, value)


def configure_aletheia_lora(
    model: nn.Module,
    train_dataset,
    *,
    tokenizer: Any = None,
    max_length: int = 512,
    top_pct: float | None = 50,
    top_k: int | None = None,
    strategy: str = "score",
    target_speedup: float | None = None,
    r: int = 16,
    lora_alpha: float = 32,
    rank_allocation: str = "uniform",
    rank_by: str = "layer",
    layer_scores: Mapping[int, float] | None = None,
    probe_batches: int = 5,
    probe_batch_size: int = 1,
    metric: str = "grad_norm",
    seed: int = 42,
    seq_len: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
    **lora_kwargs,
) -> AletheiaReport:
    """Probe, select and build the ``LoraConfig`` without touching the model: for trainers given a ``peft_config``.

    Args:
        model: The base causal LM (not yet wrapped by PEFT). It is left exactly as found.
        train_dataset: The training rows (a sized or an iterable dataset, or a ``DataLoader`` of padded
            batches): tokenized (``input_ids``, optionally ``attention_mask``/``labels``), or TRL-style rows with
            ``tokenizer``: ``text``, ``messages`` (loss on the assistant turns), ``prompt``+``completion`` as strings
            or lists of messages (loss on the completion).
        tokenizer: Tokenizes text rows for the probe (only the rows it samples).
        max_length: Text rows are cut to this many tokens for the probe.
        top_pct: Share of blocks to adapt, as :func:`select_layers`.
        top_k: Number of blocks to adapt instead of ``top_pct``.
        strategy: ``score``, ``contiguous`` or ``truncation``, as :func:`select_layers`.
        target_speedup: For ``truncation``: the predicted speedup to reach.
        r: LoRA rank (with ``rank_allocation="scores"``: the uniform rank whose parameter count is shared out).
        lora_alpha: LoRA alpha.
        rank_allocation: ``"uniform"``: rank ``r`` everywhere. ``"scores"``: ranks proportional to the
            blocks' scores under the parameter budget of uniform rank ``r`` (:func:`allocate_ranks`).
        rank_by: With ``"scores"``: ``"layer"`` or ``"layer_and_kind"``.
        layer_scores: Scores from an earlier probe; the probe is skipped.
        probe_batches: Batches the probe accumulates scores over.
        probe_batch_size: Rows per probe batch.
        metric: Probe metric, as :func:`gradient_probe`.
        seed: Seed of the probe's batch sampling.
        seq_len: Sequence length for the predicted speedup; default: the length of the first row (for an
            iterable dataset, :data:`aletheia_lora.plan.DEFAULT_SEQ_LEN`).
        batch_size: Training batch size for the predicted speedup.
        progress: Show the probe's progress bar.
        **lora_kwargs: Passed to :func:`apply_aletheia_lora` (``target_modules``, ``attention_r``, ``mlp_r``,
            ``lora_dropout``, ``target_experts``, ...).

    Returns:
        The :class:`AletheiaReport`; its ``lora_config`` goes to ``peft.get_peft_model`` or a trainer's
        ``peft_config``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, PeftModel):
        raise TypeError("model is already a PeftModel; pass the base model (model.get_base_model())")
    max_length = check_int("max_length", max_length, minimum=2)
    progress = check_bool("progress", progress)
    # named here: the probe calls it batch_size, which is this function's training batch size
    probe_batch_size = check_int("probe_batch_size", probe_batch_size, minimum=1)
    if tokenizer is not None and not callable(tokenizer):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer or None, got {type(tokenizer).__name__}")
    _check_lora_flags(lora_kwargs)
    check_choice("rank_allocation", rank_allocation, RANK_ALLOCATIONS)
    check_choice("rank_by", rank_by, BY)
    seq_len = check_int("seq_len", seq_len, minimum=1, allow_none=True)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    dataset = _probe_dataset(train_dataset, tokenizer, max_length)
    stack = find_decoder_stack(model)
    if layer_scores is not None:
        if not isinstance(layer_scores, Mapping):
            raise TypeError(f"layer_scores must map layer index -> score, got {type(layer_scores).__name__}")
        if sorted(layer_scores) != list(range(stack.num_layers)):
            raise ValueError(
                f"layer_scores covers layers {sorted(layer_scores)}; the model has {stack.num_layers} blocks (0..."
                f"{stack.num_layers - 1})"
            )
    if seq_len is None:  # the rows' own length when they can be read; else the plan's default
        seq_len = len(dataset[0]["input_ids"]) if isinstance(dataset, _TokenizedView) else DEFAULT_SEQ_LEN
    plan = make_plan(
        model,
        dataset,
        probe={"probe_batches": probe_batches, "batch_size": probe_batch_size, "metric": metric, "seed": seed},
        select={"top_pct": top_pct, "top_k": top_k, "strategy": strategy, "target_speedup": target_speedup},
        lora={"r": r, "lora_alpha": lora_alpha, **lora_kwargs, "rank_allocation": rank_allocation, "rank_by": rank_by},
        seq_len=max(seq_len, 1),
        batch_size=batch_size,
        scores=layer_scores,
        progress=progress,
        stack=stack,
    )
    report = AletheiaReport(plan)
    logger.info("aletheia: %s", report.summary().replace("\n", "; "))
    return report


def prepare_aletheia_model(
    model: nn.Module,
    train_dataset,
    *,
    gradient_checkpointing: bool = False,
    **kwargs,
) -> tuple[PeftModel, AletheiaReport]:
    """Probe, select, configure and wrap ``model``: the PeftModel to hand to ``Trainer`` / ``SFTTrainer``.

    Call it before building the trainer, which takes its optimizer's parameters from the wrapped model.
    The wrapped model carries no input-require-grads hook (see :func:`prepare_lora_model`), so the backward
    pass stops at the lowest selected block; add :class:`AletheiaCallback` to keep it so during training.

    Args:
        model: The base causal LM.
        train_dataset: The training rows, as :func:`configure_aletheia_lora`.
        gradient_checkpointing: Enable non-reentrant activation checkpointing on the model (no input grads needed;
            prefer this over the trainer's own ``activation_checkpointing`` argument).
        **kwargs: As :func:`configure_aletheia_lora`.

    Returns:
        ``(peft_model, report)``.
    """
    gradient_checkpointing = check_bool("gradient_checkpointing", gradient_checkpointing)
    report = configure_aletheia_lora(model, train_dataset, **kwargs)
    peft_model = prepare_lora_model(model, report.lora_config, gradient_checkpointing=gradient_checkpointing)
    report.trainable_parameters = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return peft_model, report


def _reentrant(args) -> bool:
    """Whether the trainer's arguments ask for reentrant checkpointing (which needs the input-grad hooks)."""
    if not (getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)):
        return False
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(
        args, "gradient_checkpointing_kwargs", None
    )
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError:
            kwargs = None
    return bool(isinstance(kwargs, Mapping) and kwargs.get("use_reentrant", False))


def _layer_parameters(model: nn.Module, stack: DecoderStack) -> list[tuple[int, nn.Parameter]]:
    """``(block, parameter)`` for every parameter of a block, and ``(EMBEDDINGS, parameter)`` for the input
    embeddings; a head or final norm is left out, since it sits above the blocks."""
    base = unwrap_model(model)
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    pairs = [(EMBEDDINGS, p) for p in embeddings.parameters()] if isinstance(embeddings, nn.Module) else []
    for name, p in base.named_parameters():
        layer = stack.layer_of(name)
        if layer is not None:
            pairs.append((layer, p))
    return pairs


def _lowest_trainable_layer(layer_parameters: list[tuple[int, nn.Parameter]]) -> int | None:
    """The lowest block the backward pass has to reach: that of the lowest trainable weight (``EMBEDDINGS`` when
    the input embeddings train, e.g. new tokens: the backward then runs all the way down)."""
    return min((layer for layer, p in layer_parameters if p.requires_grad), default=None)


class AletheiaCallback(TrainerCallback):
    """Keeps the backward pass short during training and records how deep it went.

    At the start of training it removes the input-require-grads hooks that the trainer's activation
    checkpointing (``activation_checkpointing=True``) or PEFT registered: they make the embeddings' output
    require grad, so every backward pass runs down to block 0 whatever blocks are adapted. Non-reentrant
    checkpointing (the transformers default) does not need them; with ``use_reentrant=True`` they are kept and
    a warning says what that costs. During training it records, per step, the lowest block the backward pass
    reached, and warns once if that is below the lowest block trainable in that step (which re-probing moves).

    Args:
        report: The report of :func:`prepare_aletheia_model`; the callback fills in its
            ``lowest_layer_reached`` and ``backward_depths``.
        remove_input_grad_hooks: Remove the hooks (default). False only records and warns.
    """

    def __init__(self, report: AletheiaReport | None = None, *, remove_input_grad_hooks: bool = True) -> None:
        if report is not None and not isinstance(report, AletheiaReport):
            raise TypeError(f"report must be an AletheiaReport or None, got {type(report).__name__}")
        self.report = report
        self.remove_input_grad_hooks = check_bool("remove_input_grad_hooks", remove_input_grad_hooks)
        self.expected_lowest: int | None = None
        self.lowest_layer_reached: int | None = None
        self.backward_depths: list[tuple[int, int | None]] = []
        self.removed_hooks = 0
        self._monitor: BackwardDepthMonitor | None = None
        self._layer_parameters: list[tuple[int, nn.Parameter]] = []
        self._warned = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            logger.warning("AletheiaCallback got no model from the trainer: nothing to monitor")
            return
        hooks = count_input_require_grads_hooks(model)
        if hooks:
            if _reentrant(args):
                logger.warning(
                    "reentrant activation checkpointing needs the %d input-require-grads hook(s): every backward pass "
                    "will run down to the embeddings; use non-reentrant checkpointing to keep the speed-up",
                    hooks,
                )
            elif self.remove_input_grad_hooks:
                self.removed_hooks = remove_input_require_grads_hooks(model)
                logger.info(
                    "removed %d input-require-grads hook(s) so the backward pass stops at the lowest adapted block",
                    self.removed_hooks,
                )
            else:
                logger.warning(
                    "the model carries %d input-require-grads hook(s): the backward pass runs down to the embeddings",
                    hooks,
                )
        # mapped once: the requires_grad flags are read each step, as re-probing may move the trainable blocks
        stack = find_decoder_stack(model)
        self._layer_parameters = _layer_parameters(model, stack)
        self.expected_lowest = _lowest_trainable_layer(self._layer_parameters)
        if self.report is not None and state.is_world_process_zero:
            logger.info("aletheia: %s", self.report.summary().replace("\n", "; "))
        self._monitor = BackwardDepthMonitor(model, stack).__enter__()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._monitor is not None:
            self._monitor.lowest = None
            self.expected_lowest = _lowest_trainable_layer(self._layer_parameters)

    def on_step_end(self, args, state, control, **kwargs):
        if self._monitor is None:
            return
        lowest = self._monitor.lowest
        self.backward_depths.append((state.global_step, lowest))
        if lowest is not None:
            self.lowest_layer_reached = (
                lowest if self.lowest_layer_reached is None else min(self.lowest_layer_reached, lowest)
            )
        if (
            not self._warned
            and lowest is not None
            and self.expected_lowest is not None
            and lowest < self.expected_lowest
        ):
            self._warned = True
            where = "the embeddings" if lowest == EMBEDDINGS else f"block {lowest}"
            logger.warning(
                "the backward pass reached %s, below the lowest adapted block %s: something makes lower "
                "activations require grad (an input-grad hook, reentrant checkpointing), and the speed-up of "
                "layer selection is lost",
                where,
                self.expected_lowest,
            )
        if self.report is not None:
            self.report.lowest_layer_reached = self.lowest_layer_reached
            self.report.backward_depths = list(self.backward_depths)

    def on_train_end(self, args, state, control, **kwargs):
        if self._monitor is not None:
            self._monitor.__exit__(None, None, None)
            self._monitor = None
        if self.lowest_layer_reached is not None and state.is_world_process_zero:
            where = (
                "the embeddings" if self.lowest_layer_reached == EMBEDDINGS else f"block {self.lowest_layer_reached}"
            )
            logger.info("aletheia: the backward pass reached down to %s", where)
