"""The whole job: load, probe, select, fine-tune, evaluate, report. What `aletheia-lora train` and `run` call."""

from __future__ import annotations

import logging
import platform
import shlex
import statistics
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from aletheia_lora.checks import validate_selected_layers
from aletheia_lora.config import LoraSettings
from aletheia_lora.cost import Calibration, CostModel
from aletheia_lora.data import (
    DataConfig,
    build_datasets,
    check_max_length,
    detect_format,
    is_bundled_corpus,
    read_records,
)
from aletheia_lora.depth import EMBEDDINGS
from aletheia_lora.distributed import (
    fail_together,
    fsdp1_units,
    is_distributed,
    is_main_process,
    launched_job,
    on_main_process,
)
from aletheia_lora.evaluation import evaluate_loss
from aletheia_lora.files import prepare_output_dir, update_manifest, write_json
from aletheia_lora.freeze import FreezeCallback
from aletheia_lora.layers import DecoderStack, find_decoder_stack
from aletheia_lora.models import ModelConfig
from aletheia_lora.plan import choose_layers, lora_config_for, selection_cost
from aletheia_lora.plots import plot_layer_scores, plot_speed_quality
from aletheia_lora.probe import LayerScores, ProbeConfig
from aletheia_lora.report import REPORT_NAME, summary_table, write_report
from aletheia_lora.reprobe import ReprobeCallback
from aletheia_lora.resume import check_resumed_run, run_settings
from aletheia_lora.select import PROGRESSIVE, SelectConfig, Selection
from aletheia_lora.train import TrainConfig, train_lora

logger = logging.getLogger(__name__)

__all__ = [
    "PROBE_OUTPUTS",
    "RunConfig",
    "describe_data",
    "equivalent_command",
    "prepare_run_dir",
    "probe_and_select",
    "run_outputs",
    "run_pipeline",
    "run_probe",
    "summary_table",  # from aletheia_lora.report, where it moved
    "versions",
]


@dataclass
class RunConfig:
    """Everything one run needs; each part is also a group of CLI flags."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)


def versions() -> dict[str, str]:
    """Versions of the stack, recorded in every report."""
    import peft
    import transformers

    from aletheia_lora import __version__

    return {
        "aletheia_lora": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def _shape(config: RunConfig) -> dict:
    """The training step's shape, at which the cost model prices a selection."""
    return {"seq_len": config.data.max_length, "batch_size": config.train.batch_size}


def _cost(model, train_rows, config: RunConfig, pad_token_id: int, stack: DecoderStack) -> CostModel | Calibration:
    return selection_cost(
        model,
        train_rows,
        **_shape(config),
        calibrate=config.select.calibrate,
        lora=config.lora,
        gradient_checkpointing=config.train.gradient_checkpointing,
        pad_token_id=pad_token_id,
        stack=stack,
    )


def probe_and_select(
    model,
    train_rows,
    config: RunConfig,
    out_dir: Path | None,
    *,
    progress: bool = True,
    pad_token_id: int = 0,
    stack: DecoderStack | None = None,
) -> dict:
    """Probe the model, select layers, and (with ``out_dir``) write scores.json, selection.json, layer_scores.png.

    Returns ``{"scores", "selection", "cost"}``: the :class:`LayerScores`, the :class:`Selection` and what
    predicted its speedups (:func:`~aletheia_lora.plan.selection_cost`).
    """
    if config.select.strategy == PROGRESSIVE:
        raise ValueError(
            "--strategy progressive is a way of training, not a selection: it needs no probe (train with it, or "
            "probe with --strategy score, contiguous or truncation)"
        )
    scores, selection, cost = choose_layers(
        model,
        train_rows,
        probe=config.probe,
        select=config.select,
        lora=config.lora,
        **_shape(config),
        gradient_checkpointing=config.train.gradient_checkpointing,
        pad_token_id=pad_token_id,
        progress=progress,
        stack=stack,
    )
    if out_dir is not None:
        on_main_process(_write_probe_outputs, scores, selection, Path(out_dir))
    return {"scores": scores, "selection": selection, "cost": cost}


def _write_probe_outputs(scores: LayerScores, selection: Selection, out_dir: Path) -> None:
    scores.to_json(out_dir / "scores.json")
    model_type = scores.meta.get("model_type", "")
    plot_layer_scores(
        scores,
        list(selection.layers),
        out_dir / "layer_scores.png",
        metric=scores.meta.get("metric", "grad_norm"),
        title=f"{model_type}: probe scores, {selection.strategy} selection",
    )
    _write_selection(selection, out_dir, model_type)


def _write_selection(selection: Selection, out_dir: Path, model_type: str) -> None:
    """selection.json, and the strategies' predicted speed vs captured score, the chosen one marked."""
    write_json(out_dir / "selection.json", selection.to_dict())
    if selection.strategy not in ("given", PROGRESSIVE):
        title = f"{model_type}: predicted speed vs probe score captured" if model_type else None
        plot_speed_quality(selection, out_dir / "speed_quality.png", **({"title": title} if title else {}))


PROBE_OUTPUTS = ("scores.json", "selection.json", "layer_scores.png", "speed_quality.png")


def run_outputs(config: RunConfig, *, probing: bool = True, from_scores: bool = False) -> list[str]:
    """What a training run writes in its output folder (``/``: a folder of the tool's files): with ``probing`` the
    probe's outputs, with ``from_scores`` (a selection from saved scores) its speed-vs-quality plot."""
    writes = ["run_config.json", "selection.json", "metrics.json", REPORT_NAME, "loss_curve.png"]
    writes += ["adapter/", "checkpoints/"]
    writes += ["scores.json", "layer_scores.png"] if probing else []
    writes += ["speed_quality.png"] if probing or from_scores else []
    writes += ["freeze.png"] if config.select.strategy == PROGRESSIVE else []
    return writes + (["reprobe.json", "reprobe.png"] if config.train.reprobe_every else [])


def prepare_run_dir(
    out_dir: str | Path, *, overwrite: bool = False, resume: bool = False, writes: tuple | list = ()
) -> Path:
    """:func:`prepare_output_dir` on rank 0 only; the other ranks wait, then get its path or raise its error."""
    return on_main_process(prepare_output_dir, out_dir, overwrite=overwrite, resume=resume, writes=writes)


def run_probe(config: RunConfig, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """What `aletheia-lora probe` does: load, probe and select, writing scores.json, selection.json and
    layer_scores.png; under torchrun/accelerate the ranks share the probe batches and rank 0 writes.

    Returns :func:`probe_and_select`'s ``{"scores", "selection", "cost"}``; ``selection`` is a :class:`Selection`;
    ``files``: the paths written.
    """
    with launched_job(config.model.dist_timeout):
        data = replace(config.data, general_data=None)
        data.check_packages()  # before anything is loaded or written
        out = prepare_run_dir(out_dir, overwrite=overwrite, writes=PROBE_OUTPUTS)
        model, tokenizer = fail_together(config.model.load)
        stack = find_decoder_stack(model)
        check_max_length(config.data.max_length, model)
        train_rows = fail_together(lambda: build_datasets(data, tokenizer)[0])
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        result = probe_and_select(
            model, train_rows, config, out, progress=progress, pad_token_id=pad_token_id, stack=stack
        )
        on_main_process(update_manifest, out, complete=True)
        return {**result, "files": [out / name for name in PROBE_OUTPUTS if (out / name).exists()]}


def _eval_all(model, eval_rows, general_rows, batch_size: int, pad_token_id: int) -> dict:
    # Under several processes each rank evaluates its share of the batches; the sums are added across ranks.
    kwargs = {"batch_size": batch_size, "pad_token_id": pad_token_id, "distributed": True}
    result = {"target": evaluate_loss(model, eval_rows, **kwargs)}
    if general_rows is not None and len(general_rows):
        result["general"] = evaluate_loss(model, general_rows, **kwargs)
    return result


def run_pipeline(
    config: RunConfig,
    out_dir: str | Path,
    *,
    evaluate: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    layers: list[int] | None = None,
    scores_file: str | Path | None = None,
) -> dict:
    """Probe -> select -> LoRA fine-tune -> (evaluate before/after) -> report, writing everything to ``out_dir``.

    Args:
        config: The run's settings.
        out_dir: Output folder (:func:`run_outputs`): metrics.json, report.md (the summary), run_config.json,
            selection.json, scores.json, layer_scores.png, speed_quality.png, loss_curve.png, adapter/ (with a
            filled model card, README.md), checkpoints/. Refused if it exists, unless ``overwrite``/``resume``.
        evaluate: Measure target-domain and general-corpus loss before and after training.
        overwrite: Write into an existing folder: only this tool's files are replaced, and a file it did not
            write where the run writes is refused (:func:`~aletheia_lora.files.prepare_output_dir`).
        resume: Continue training from the last checkpoint in ``out_dir/checkpoints``; refused when the
            checkpoint is damaged or the run's settings differ from those in ``run_config.json`` (except
            :data:`~aletheia_lora.resume.MAY_CHANGE_ON_RESUME`, e.g. ``--max-steps``) or from the checkpoint's
            adapters.
        layers: Train these layers and skip the probe (not with ``scores_file``).
        scores_file: Select from these saved scores instead of probing; they must come from this model.

    Returns:
        The report written to metrics.json (the same on every rank).

    Under ``torchrun`` or ``accelerate launch`` every rank runs this: the process group is initialised from
    the launcher's environment (with ``config.model.dist_timeout``), the ranks share the probe and evaluation
    batches and reduce them, so all select the same layers; the Trainer trains with DDP; rank 0 alone writes
    files. An error on one rank is raised on all of them at the next check point, or ends their collectives.
    """
    with launched_job(config.model.dist_timeout):
        return _run_pipeline(config, out_dir, evaluate, overwrite, resume, layers, scores_file)


def _check_request(config: RunConfig, layers: list[int] | None, scores_file: str | Path | None) -> LayerScores | None:
    """Refuse conflicting or wrong inputs before anything is loaded or written; the scores file, read."""
    if layers is not None and scores_file is not None:
        raise ValueError("give --layers or --scores, not both")
    if layers is not None:
        validate_selected_layers(layers)
        if config.lora.rank_allocation == "scores":
            raise ValueError(
                "--rank-allocation scores needs probe scores: drop --layers (the probe then scores the layers), "
                "or give --scores FILE in its place"
            )
    if config.select.strategy == PROGRESSIVE:
        if config.train.reprobe_every:
            raise ValueError(
                "--strategy progressive does not combine with --reprobe-every: one freezes blocks as they settle, "
                "the other moves training between blocks"
            )
        if scores_file is not None:
            raise ValueError(
                "--strategy progressive needs no scores: drop --scores (--layers sets the starting blocks)"
            )
        if config.lora.rank_allocation == "scores":
            raise ValueError(
                "--strategy progressive does not combine with --rank-allocation scores: it needs no probe scores "
                "and puts LoRA on every block at one rank"
            )
    if config.train.cache_prefix and config.train.reprobe_every:
        raise ValueError(
            "--cache-prefix does not combine with --reprobe-every: re-probing moves the adapted blocks up and down, "
            "so the blocks below them are not a fixed prefix"
        )
    if config.train.reprobe_every:
        if config.lora.rank_allocation == "scores":
            raise ValueError(
                "--reprobe-every does not combine with --rank-allocation scores: ranks are fixed when the adapters "
                "are built, and re-probing moves training between blocks"
            )
        if is_distributed():
            raise ValueError(
                f"--reprobe-every runs in one process, not {dist.get_world_size()}: DDP and FSDP fix which "
                "parameters train when they wrap the model"
            )
    # rank 0 reads the file and hands it to all: every rank selects from the same scores
    return None if scores_file is None else on_main_process(LayerScores.from_json, scores_file)


def _check_scores_model(scores: LayerScores, scores_file: str | Path, stack: DecoderStack) -> None:
    if len(scores) != stack.num_layers:
        raise ValueError(f"--scores {str(scores_file)!r} has {len(scores)} layers, the model {stack.num_layers}")
    probed = (scores.meta.get("model_type", stack.model_type), scores.meta.get("num_layers", stack.num_layers))
    if probed != (stack.model_type, stack.num_layers):
        raise ValueError(
            f"--scores {str(scores_file)!r} was probed on a {probed[0]} model of {probed[1]} layers, this run's "
            f"--model is a {stack.model_type} of {stack.num_layers} layers: give scores probed on this model, or "
            "drop --scores to probe it"
        )


def _run_pipeline(config, out_dir, evaluate, overwrite, resume, layers, scores_file) -> dict:
    given_scores = _check_request(config, layers, scores_file)
    # missing optional packages (a bundled corpus's, an integration's) are named before anything loads or is written
    config.data.check_packages()
    config.train.check_packages()
    progressive = config.select.strategy == PROGRESSIVE
    probing = layers is None and scores_file is None and not progressive
    writes = run_outputs(config, probing=probing, from_scores=scores_file is not None)
    if resume:  # before the folder is touched: a refused resume leaves it as it was
        on_main_process(check_resumed_run, Path(out_dir).expanduser(), config, layers)
    out = prepare_run_dir(out_dir, overwrite=overwrite, resume=resume, writes=writes)
    torch.manual_seed(config.train.seed)
    on_main_process(write_json, out / "run_config.json", run_settings(config))
    progress = config.train.progress and is_main_process()

    model, tokenizer = fail_together(config.model.load)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stack = find_decoder_stack(model)
    check_max_length(config.data.max_length, model)
    if layers is not None:
        validate_selected_layers(layers, stack.num_layers)
    if given_scores is not None:
        _check_scores_model(given_scores, scores_file, stack)
    train_rows, eval_rows, general_rows = fail_together(build_datasets, config.data, tokenizer)
    logger.info(
        "data: %d training rows, %d eval rows, %s general rows of up to %d tokens",
        len(train_rows),
        len(eval_rows),
        len(general_rows) if general_rows is not None else "no",
        config.data.max_length,
    )
    report = {
        "model": config.model.model,
        "model_type": stack.model_type,
        "num_layers": stack.num_layers,
        "dtype": config.model.resolved_dtype,
        "versions": versions(),
        "command": equivalent_command(config, out, evaluate=evaluate, layers=layers, scores_file=scores_file),
        "data": {
            "source": config.data.data,
            "format": describe_data(config.data),
            "train_rows": len(train_rows),
            "eval_rows": len(eval_rows),
            "general_rows": len(general_rows) if general_rows is not None else None,
            "max_length": config.data.max_length,
        },
    }

    if evaluate:
        logger.info("evaluating the base model")
        report["eval_before"] = _eval_all(model, eval_rows, general_rows, config.train.batch_size, pad_token_id)

    scores, cost = None, None
    if progressive:  # no probe: LoRA on every block (or the given ones) to start with
        selection = Selection.progressive(layers if layers is not None else range(stack.num_layers))
        on_main_process(write_json, out / "selection.json", selection.to_dict())
    elif layers is not None:
        selection = Selection.given(layers)
        on_main_process(write_json, out / "selection.json", selection.to_dict())
    elif given_scores is not None:
        # rank 0 selects and hands the selection to all: every rank trains the same layers
        cost = _cost(model, train_rows, config, pad_token_id, stack)
        selection = on_main_process(_select_from_scores, given_scores, model, stack, config, cost)
        on_main_process(_write_selection, selection, out, stack.model_type)
        if config.lora.rank_allocation == "scores":
            scores = given_scores
    else:
        probed = probe_and_select(
            model, train_rows, config, out, progress=progress, pad_token_id=pad_token_id, stack=stack
        )
        scores, selection, cost = probed["scores"], probed["selection"], probed["cost"]
    report["selection"] = selection.to_dict()
    selected = list(selection.layers)
    logger.info("adapting layers %s", selected)

    callbacks = []
    freezing = None
    if progressive:
        lora_config, _ = lora_config_for(model, selected, config.lora, every_block=True, stack=stack)
        freezing = FreezeCallback(config.train.freeze_every, config.train.max_frozen_pct, layers=selected)
        callbacks.append(freezing)
    elif config.train.reprobe_every:
        # adapters on every block; the callback trains the selected ones and moves them at each re-probe
        lora_config, _ = lora_config_for(model, selected, config.lora, every_block=True, stack=stack)
        if cost is None:  # --layers: no selection was costed yet
            cost = _cost(model, train_rows, config, pad_token_id, stack)
        reprobing = ReprobeCallback(
            train_rows,
            config.train.reprobe_every,
            layers=selected,
            select=config.select,
            probe=config.probe,
            cost=cost,
            pad_token_id=pad_token_id,
            history_path=out / "reprobe.json",
            progress=progress,
        )
        callbacks.append(reprobing)
    else:
        lora_config, _ = lora_config_for(model, selected, config.lora, scores=scores, stack=stack)
    result = train_lora(
        model,
        lora_config,
        train_rows,
        eval_rows,
        config.train,
        output_dir=out,
        pad_token_id=pad_token_id,
        resume=resume,
        callbacks=callbacks,
        dist_timeout=config.model.dist_timeout,
        stack=stack,
    )
    if freezing is not None:
        report["freeze"] = _freeze_report(freezing, result)
    elif callbacks:
        report["reprobe"] = reprobing.summary()
        logger.info(
            "re-probed %d times in %.1f s; layers trained at some point: %s",
            report["reprobe"]["probes"],
            report["reprobe"]["seconds"],
            report["reprobe"]["layers_ever_trained"],
        )
    report["train"] = _train_report(result, config)
    cached = report["train"]["prefix_cache"]
    if cached and not cached.get("progressive") and isinstance(cost, CostModel):  # the cost model's cached step
        cached["predicted_speedup"] = cost.speedup(selected, cached=True)
    report["log_history"] = result.log_history
    report["adapter"] = str(result.adapter_dir) if result.adapter_dir else None
    if evaluate:
        logger.info("evaluating the fine-tuned model")
        # an FSDP1 model runs only through its wrapper; everything else through the PeftModel itself
        wrapped = result.wrapped
        tuned = wrapped if wrapped is not None and any(u is wrapped for u in fsdp1_units(wrapped)) else result.model
        report["eval_after"] = _eval_all(tuned, eval_rows, general_rows, config.train.batch_size, pad_token_id)
    # rank 0's report (its step times, its log) is the one written and returned everywhere
    title = f"{stack.model_type}: LoRA on {len(selected)} layers" + (", frozen progressively" if progressive else "")
    return on_main_process(_write_report, report, out, title, writes)


def _train_report(result, config: RunConfig) -> dict:
    """The ``train`` part of the report: steps, time, speed, depth, the train loss."""
    steps = result.step_times[1:] or result.step_times  # the first step pays one-off warm-up costs
    median_step = statistics.median(steps) if steps else None  # no step run (resumed at max_steps)
    # every rank trains on its own batches: a step covers this many tokens over all of them
    tokens_per_step = (
        config.train.batch_size * config.train.gradient_accumulation_steps * config.data.max_length * result.processes
    )
    # the last step is always logged (the guard of trainer.py): its loss is the mean since the log before it
    last = next((r for r in reversed(result.log_history) if "loss" in r), None)
    lowest = result.lowest_layer_reached
    return {
        "steps": len(result.step_times),
        "global_step": result.global_step,
        "max_steps": result.max_steps,
        "seconds": result.train_seconds,
        "median_step_seconds": median_step,
        "tokens_per_second": tokens_per_step / median_step if median_step else None,
        "lowest_layer_reached": "embeddings" if lowest == EMBEDDINGS else lowest,
        "trainable_parameters": result.trainable_parameters,
        "processes": result.processes,
        "bf16": result.bf16,
        "final_train_loss": last["loss"] if last else None,
        "final_train_loss_step": last["step"] if last else None,
        "mean_train_loss": result.mean_train_loss,
        "prefix_cache": result.prefix_cache,
    }


def _freeze_report(freezing: FreezeCallback, result) -> dict:
    """The report's ``freeze`` part: the callback's summary, and this call's step times by step."""
    first = result.global_step - len(result.step_times) + 1  # a resumed run timed its own steps only
    out = freezing.summary()
    out["step_seconds"] = [[first + i, t] for i, t in enumerate(result.step_times)]
    logger.info(
        "progressive freezing: blocks %s frozen; %s",
        [int(b) for b in out["frozen_blocks"]],
        ", ".join(f"block {b} at step {v['step']}" for b, v in out["frozen_blocks"].items()) or "none settled",
    )
    return out


def _select_from_scores(scores: LayerScores, model, stack: DecoderStack, config: RunConfig, cost) -> Selection:
    _, selection, _ = choose_layers(
        model, None, select=config.select, **_shape(config), scores=scores, cost=cost, stack=stack
    )
    return selection


def _write_report(report: dict, out: Path, title: str, writes: list[str] | tuple[str, ...] = ()) -> dict:
    return write_report(report, out, title, writes)


def describe_data(config: DataConfig) -> str:
    """The training data's format in a few words (``plain text ('text'), packed``), from its columns."""
    try:
        if is_bundled_corpus(config.data):
            text = f"plain text (bundled corpus {config.data.strip()})"
        else:
            records = read_records(config.data)  # cached by datasets since build_datasets read it
            fmt = detect_format(
                records,
                text_field=config.text_field,
                prompt_field=config.prompt_field,
                response_field=config.response_field,
                messages_field=config.messages_field,
            )
            text = fmt.describe()
            if fmt.kind != "text" and (config.chat_template or fmt.kind == "conversations" or fmt.conversational):
                text += ", chat template"
            if fmt.kind != "text":
                return text
        return text + (", packed" if config.pack else ", one row per document")
    except (OSError, ValueError) as exc:  # the data was read once already; say so rather than fail the report
        logger.debug("data format not described: %s", exc)
        return "unknown"


def equivalent_command(
    config: RunConfig,
    out: str | Path,
    *,
    evaluate: bool = True,
    layers: list[int] | None = None,
    scores_file: str | Path | None = None,
) -> str:
    """The run as one ``aletheia-lora`` command line: every setting that differs from its default, as a flag
    (``--progress``, a matter of the console, left out)."""
    words = ["aletheia-lora", "run" if evaluate else "train"]
    seen: set[str] = {"progress"}
    for group in vars(config).values():
        defaults = type(group)()  # as built, so a default resolved on this machine (--general-data auto) is one
        for f in fields(group):
            value = getattr(group, f.name)
            default = getattr(defaults, f.name)
            if f.name in seen or is_dataclass(value) or value == default:
                continue
            seen.add(f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                words.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, (list, tuple)):
                words += [flag, *map(str, value)]
            else:
                words += [flag, "none" if value is None else str(value)]
    if layers is not None:
        words += ["--layers", *map(str, layers)]
    if scores_file is not None:
        words += ["--scores", str(scores_file)]
    return shlex.join([*words, "--out", str(out)])
