"""A run's report, in every form it is read: the console summary, ``report.md`` (the same text), ``metrics.json``,
the loss plot and the adapter's model card (``adapter/README.md``).

The model card is a small template filled from the report, on top of the metadata PEFT's ``save_pretrained``
writes (``library_name``, ``base_model``, tags: kept, read with ``huggingface_hub.ModelCard``).
``Trainer.create_model_card`` does not fit: it writes into the Trainer's output folder (the checkpoints here), for
a whole fine-tuned model, and knows neither the selected blocks nor the losses before and after training.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aletheia_lora.cost import prediction_basis
from aletheia_lora.files import update_manifest, write_json, write_text
from aletheia_lora.plots import plot_freeze_timeline, plot_loss_curves, plot_reprobe_history
from aletheia_lora.select import Selection

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
# where files written beside metrics.json are listed in the summary, in this order
_ORDER = ("metrics.json", REPORT_NAME, "run_config.json", "selection.json", "scores.json", "layer_scores.png")
_ORDER += (
    "speed_quality.png",
    "loss_curve.png",
    "reprobe.json",
    "reprobe.png",
    "freeze.png",
    "adapter/",
    "checkpoints/",
)


def _loss(report: dict, when: str, part: str = "target") -> float | None:
    return report.get(when, {}).get(part, {}).get("loss")


def predicted_text(sel: Selection, than: str = "LoRA on all layers") -> str:
    """``1.29x ± 5% faster per step than LoRA on all layers (cost model, not calibrated)``: the selection's
    predicted speedup with its error band and basis (:func:`~aletheia_lora.cost.prediction_basis`)."""
    band, basis = prediction_basis(sel.cost_model, calibrated=sel.calibration is not None)
    plus_minus = "" if band is None else f" ± {band:.0%}"
    return f"{sel.predicted_speedup:.2f}x{plus_minus} faster per step than {than} ({basis})"


def _cache_priced(sel: Selection) -> bool:
    """Whether a cost model priced ``sel``'s cached steps (a selection.json from before them, or one timed by a
    calibration without a model, has none)."""
    cached = [sel.cached_speedup, *(a.cached_speedup for a in sel.alternatives.values())]
    return sel.progressive_plan is not None or any(x is not None for x in cached)


def _blocks(count: int) -> str:
    return "block 0" if count == 1 else f"blocks 0-{count - 1}"


def _cached_line(sel: Selection) -> str:
    """``cached epochs   1.70x ± 5% per step ...``: the chosen selection's step once ``--cache-prefix`` feeds it.
    Its basis is the cost model's even beside a calibration, which has no cache term."""
    if sel.cached_speedup is None:
        lowest = sel.lowest_layer
        return f"cached epochs   cannot cache: the lowest selected layer is {lowest} (truncation or contiguous can)"
    band, basis = prediction_basis(sel.cache_cost_model or sel.cost_model)
    plus_minus = "" if band is None else f" ± {band:.0%}"
    return (f"cached epochs   {sel.cached_speedup:.2f}x{plus_minus} faster per step than LoRA on all layers with "
            f"--cache-prefix, {_blocks(sel.lowest_layer)} skipped ({basis})")  # fmt: skip


def _progressive_lines(sel: Selection, tag: str) -> list[str]:
    """The progressive prediction: its planned schedule, its speedup over the run, and what the cache adds."""
    plan = sel.progressive_plan
    first = (f"  {'progressive':<12} planned: {_blocks(plan.frozen_blocks)} frozen one by one at even intervals "
             f"(--max-frozen-pct {plan.max_frozen_pct:g}; the gradient rule decides the real freezes), predicted "
             f"{plan.speedup:.2f}x over the run{tag}")  # fmt: skip
    if plan.cache_from_epochs is None:  # nothing below the frozen blocks to skip (no cost in the prefix)
        return [first, f"  {'':<12} with --cache-prefix: never faster"]
    second = (f"  {'':<12} with --cache-prefix: no faster below {plan.cache_from_epochs} epochs (a freeze must stand "
              f"an epoch before it is cached), up to {plan.cached_speedup_limit:.2f}x over many epochs")  # fmt: skip
    return [first, second]


def selection_lines(sel: Selection) -> list[str]:
    """What ``probe`` and ``select`` print: the selection, its score share and predicted speedup (uncached and with
    the prefix cache), the alternative strategies, and progressive freezing on a planned schedule."""
    lines = [f"strategy        {sel.strategy}", f"selected        {list(sel.layers)}"]
    if sel.score_share is not None:
        lines.append(f"score captured  {sel.score_share:.1%}")
    if sel.predicted_speedup is not None:
        lines.append(f"predicted       {predicted_text(sel)}")
    priced = _cache_priced(sel)
    if priced:
        lines.append(_cached_line(sel))
    # beside a calibration the cached figures are the cost model's: said on each, so none passes for calibrated
    tag = " (cost model)" if sel.calibration is not None else ""
    for name, other in sel.alternatives.items():
        line = (f"  {name:<12} share {other.captured_share:.1%}, predicted {other.speedup:.2f}x, "
                f"lowest layer {other.lowest_layer}")  # fmt: skip
        if priced:
            cached = other.cached_speedup
            line += ", cannot cache" if cached is None else f", cached epochs {cached:.2f}x{tag}"
        lines.append(line)
    if sel.progressive_plan is not None:
        lines += _progressive_lines(sel, tag)
    return lines


def _cache_line(cache: dict) -> str:
    """The summary's line for ``--cache-prefix``: what was skipped, the cache's size and build, its prediction."""
    if cache.get("progressive"):
        builds = ", ".join(
            f"blocks below {b['block']} at step {b['step']} ({b['build_seconds']:.1f} s)" for b in cache["builds"]
        )
        builds = builds or "none (the frozen prefix never stayed for an epoch)"
        return f"prefix cache    built: {builds}; {cache['batches_served']} batches skipped the prefix"
    where = "memory-mapped" if cache["memory_mapped"] else "in memory"
    line = (f"prefix cache    blocks 0-{cache['block'] - 1} skipped: {cache['bytes'] / 2**20:.1f} MiB {where}, built "
            f"in {cache['build_seconds']:.1f} s, {cache['batches_served']} batches served")  # fmt: skip
    if cache.get("predicted_speedup") is not None:
        line += f"; predicted {cache['predicted_speedup']:.2f}x per step vs all layers, cached"
    return line


def summary_table(report: dict) -> str:
    """The run's summary as plain text, one fact per line: what the console prints and ``report.md`` holds."""
    sel = Selection.from_dict(report["selection"])
    model = f"model           {report['model']} ({report['model_type']}, {report['num_layers']} layers"
    lines = [model + (f", {report['dtype']})" if report.get("dtype") else ")")]
    data = report.get("data", {})
    if "format" in data:
        general = data.get("general_rows")
        lines.append(
            f"data            {data['format']}; {data['train_rows']} training rows, {data['eval_rows']} held-out "
            f"rows{'' if general is None else f', {general} general rows'} of up to {data['max_length']} tokens"
        )
    lines.append(f"selected        {len(sel.layers)} layers ({sel.strategy}): {list(sel.layers)}")
    if sel.score_share is not None:
        lines.append(f"score captured  {sel.score_share:.1%} of the total probe score")
    if sel.predicted_speedup is not None:
        lines.append(f"predicted       {predicted_text(sel)}")
    if "reprobe" in report:
        reprobe = report["reprobe"]
        lines.append(
            f"re-probed       every {reprobe['every']} steps, {reprobe['probes']} times in "
            f"{reprobe['seconds']:.0f} s; last selection {reprobe['history'][-1]['layers']}"
        )
    if "freeze" in report:
        freeze = report["freeze"]
        frozen = ", ".join(f"{b} at step {v['step']}" for b, v in freeze["frozen_blocks"].items()) or "none"
        lines.append(f"frozen          every {freeze['every']} steps, blocks settled: {frozen}")
    train = report["train"]
    speed = [f"{train['median_step_seconds']:.2f} s/step"] if train["median_step_seconds"] is not None else ["no step"]
    if train.get("tokens_per_second"):
        speed.append(f"{train['tokens_per_second']:.0f} tokens/s")
    if train.get("bf16"):
        speed.append("bfloat16 mixed precision")
    seconds = f"{train['seconds']:.1f}" if train["seconds"] < 10 else f"{train['seconds']:.0f}"
    lines.append(
        f"training        {train['steps']} steps in {seconds} s "
        f"({', '.join(speed)}), backward reached {train['lowest_layer_reached']}"
    )
    if train.get("prefix_cache"):
        lines.append(_cache_line(train["prefix_cache"]))
    if train.get("final_train_loss") is not None:
        text = f"train loss      {train['final_train_loss']:.3f} at step {train['final_train_loss_step']}"
        if train.get("mean_train_loss") is not None:
            text += f" (mean over this run's steps {train['mean_train_loss']:.3f})"
        lines.append(text)
    if "eval_before" in report and "eval_after" in report:
        for part in ("target", "general"):
            if part in report["eval_before"]:
                b, a = report["eval_before"][part], report["eval_after"][part]
                lines.append(
                    f"{part + ' loss':<15} {b['loss']:.3f} -> {a['loss']:.3f} "
                    f"(perplexity {b['perplexity']:.1f} -> {a['perplexity']:.1f})"
                )
    if report.get("adapter"):
        lines.append(f"adapter         {report['adapter']}")
    if report.get("files"):
        lines.append(f"files           {report['out']}: {', '.join(report['files'])}")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    """``report.md``: the summary (the very text the console shows), the run as one command, the versions."""
    versions = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in report.get("versions", {}).items())
    parts = [f"# aletheia-lora run: {report['model']}", "", "```text", summary_table(report), "```", ""]
    if report.get("command"):
        parts += ["The run as one command (its settings that differ from the defaults):", ""]
        parts += ["```bash", report["command"], "```", ""]
    parts += [f"Versions: {versions}." if versions else "", ""]
    parts += ["Everything above, and the log of every step, is in `metrics.json`; the settings in `run_config.json`."]
    return "\n".join(parts) + "\n"


def _card_metadata(card_path: Path, report: dict):
    """PEFT's card metadata from ``card_path`` (a fresh one when it is missing or unreadable), tagged."""
    from huggingface_hub import ModelCard, ModelCardData

    try:
        data = ModelCard.load(card_path).data
    except Exception as exc:  # noqa: BLE001 - a card that does not parse is replaced, not fatal
        logger.debug("not reading %s: %s", card_path, exc)
        data = ModelCardData(library_name="peft")
    tags = list(data.tags or [])
    data.tags = tags + [t for t in ("aletheia-lora", "lora") if t not in tags]
    if not data.base_model:
        data.base_model = report["model"]
    return data


def model_card(report: dict, card_path: Path) -> str:
    """The adapter's README.md: PEFT's metadata (read from ``card_path``) and a body filled from ``report``."""
    sel = Selection.from_dict(report["selection"])
    data = report.get("data", {})
    version = report.get("versions", {}).get("aletheia_lora", "")
    how = "named by the user" if sel.strategy == "given" else f"chosen by a gradient probe, strategy `{sel.strategy}`"
    lines = [
        f"# LoRA adapter for {report['model']}",
        "",
        f"LoRA adapters on {len(sel.layers)} of the {report['num_layers']} decoder blocks of `{report['model']}` "
        f"({report['model_type']}), {how}: blocks {list(sel.layers)}. Trained with "
        f"[aletheia-lora](https://pypi.org/project/aletheia-lora/) {version}.",
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{report["model"]}")',
        f'model = PeftModel.from_pretrained(model, "{report.get("adapter") or "adapter"}")',
        "```",
        "",
        "## Training",
        "",
    ]
    if sel.score_share is not None and sel.predicted_speedup is not None:
        share, speedup = f"{sel.score_share:.1%}", predicted_text(sel, "all blocks")
        lines.append(f"- Selection: {share} of the probe score, predicted {speedup}")
    if "format" in data:
        rows = f"{data['train_rows']} training rows, {data['eval_rows']} held-out rows"
        lines.append(f"- Data: `{data.get('source')}`, {data['format']}; {rows} of up to {data['max_length']} tokens")
    train = report["train"]
    precision = report.get("dtype") or "their own dtype"
    precision += ", bfloat16 mixed precision" if train.get("bf16") else ""
    lines.append(
        f"- Steps: {train.get('global_step', train['steps'])} in {train['seconds']:.0f} s; weights in {precision}"
    )
    if report.get("command"):
        lines += ["", "The run as one command (its settings that differ from the defaults):", ""]
        lines += ["```bash", report["command"], "```"]
    if "eval_before" in report and "eval_after" in report:
        lines += ["", "## Held-out loss", "", "| data | before | after |", "|---|---|---|"]
        for part in ("target", "general"):
            if part in report["eval_before"]:
                before, after = _loss(report, "eval_before", part), _loss(report, "eval_after", part)
                lines.append(f"| {part} | {before:.4f} | {after:.4f} |")
        lines += ["", "Token-weighted mean next-token loss (nats per token) over the held-out rows."]
    versions = report.get("versions", {})
    lines += ["", "## Framework versions", ""]
    lines += [f"- {name.replace('_', '-')} {value}" for name, value in versions.items()]
    metadata = _card_metadata(card_path, report)
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def written_files(out: Path, names: list[str] | tuple[str, ...]) -> list[str]:
    """Of ``names`` (``/``: a folder), those in ``out`` now or about to be (metrics.json, report.md), in the summary's
    order."""
    found = [n for n in names if (out / n.rstrip("/")).exists() or n in ("metrics.json", REPORT_NAME)]
    return sorted(found, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER))


def write_report(report: dict, out: Path, title: str, writes: list[str] | tuple[str, ...] = ()) -> dict:
    """Write the run's plots, ``metrics.json``, ``report.md`` and the adapter's model card into ``out``; mark the
    run complete in the manifest. ``writes`` are the names the run claimed (the summary lists those written)."""
    steps = report["train"].get("global_step") or None
    plot_loss_curves(
        report["log_history"],
        out / "loss_curve.png",
        title=title,
        eval_loss_before=_loss(report, "eval_before"),
        eval_loss_after=_loss(report, "eval_after"),
        steps=steps,
    )
    if "reprobe" in report:
        every = report["reprobe"]["every"]
        plot_reprobe_history(
            report["reprobe"]["history"],
            report["num_layers"],
            out / "reprobe.png",
            title=f"Blocks trained, re-probed every {every} steps",
        )
    if "freeze" in report:
        plot_freeze_timeline(
            report["freeze"],
            report["num_layers"],
            out / "freeze.png",
            title=f"Progressive freezing, decided every {report['freeze']['every']} steps",
            end_step=steps,
        )
    report["out"] = str(out)
    report["files"] = written_files(out, writes or ["metrics.json", REPORT_NAME])
    write_json(out / "metrics.json", report)
    adapter = Path(report["adapter"]) if report.get("adapter") else None
    if adapter is not None and adapter.is_dir():
        card = adapter / "README.md"
        update_manifest(out, claim=[f"{adapter.name}/README.md"])  # PEFT's card, listed already; replaced whole
        write_text(card, model_card(report, card))
    write_text(out / REPORT_NAME, report_markdown(report))
    update_manifest(out, complete=True)
    return report
