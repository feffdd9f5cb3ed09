"""Benchmark: glibc's malloc with its own adaptive thresholds against ``--cpu-allocator tuned``, on SmolLM2-135M.

The allocator is a property of the process, so each measurement is a fresh process (this script runs itself as a
worker), and the two modes alternate, ``--pairs`` times, so the machine's drift hits both alike. A worker trains two
LoRA arms of the bundled SmolLM2-135M round-robin (one step each per round, the order alternating): all 30 blocks and
the top half, r=8 on every attention and MLP projection, batch 4 x 128 random tokens, AdamW, clipping at 1.0 (the
training benchmark's step), and reports each arm's median step time over ``--steps`` timed rounds (2 untimed first)
and the process's peak resident memory.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python bench/allocator.py [--pairs 2] [--steps 20] [--out bench/results]

Writes ``allocator.json`` and ``allocator.md`` (the table, rendered from the JSON; ``--render-only`` again).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from aletheia_lora.bench.measure import launch_prefix
from aletheia_lora.files import write_text

REPO = Path(__file__).resolve().parents[1]
MODES = ("default", "tuned")
UNTIMED = 2


def worker(mode: str, steps: int) -> dict:
    """One fresh process's measurement (run with ``--worker MODE``)."""
    import torch
    from peft import LoraConfig

    from aletheia_lora.allocator import allocator_state, tune_cpu_allocator
    from aletheia_lora.bench.measure import proc_status, timed_step
    from aletheia_lora.bench.workload import lora_copy
    from aletheia_lora.models import load_model_and_tokenizer

    torch.set_num_threads(1)
    if mode == "tuned":
        tune_cpu_allocator()
    base, _ = load_model_and_tokenizer("smollm2-135m", dtype="float32", device="cpu")
    n = base.config.num_hidden_layers
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    arms = {}
    for name, layers in (("all", list(range(n))), ("top half", list(range(n // 2, n)))):
        config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, layers_to_transform=layers, lora_dropout=0.0)
        arms[name] = lora_copy(base, config, seed=0, learning_rate=3e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for step in range(steps + UNTIMED):
        ids = torch.randint(1, base.config.vocab_size, (4, 128), generator=generator)
        order = list(arms) if step % 2 == 0 else list(arms)[::-1]
        for name in order:
            model, params, optimizer = arms[name]
            batch = {"input_ids": ids, "labels": ids}
            _, seconds = timed_step(model, batch, optimizer, params=params, max_grad_norm=1.0)
            if step >= UNTIMED:
                times[name].append(seconds)
    return {
        "mode": mode,
        "median_step_seconds": {name: statistics.median(t) for name, t in times.items()},
        "peak_rss_mb": (proc_status("VmHWM") or 0) / 2**20,
        "allocator": allocator_state(),
    }


def render(result: dict) -> str:
    """The Markdown table of ``allocator.json``."""
    rows = [
        "# glibc malloc: default against tuned thresholds (SmolLM2-135M LoRA steps, CPU)",
        "",
        f"Made by `{result['command']}` ({result['created']}); {result['steps']} timed rounds per process, "
        "fresh processes alternating.",
        "",
        "| process | mode | all blocks (s) | top half (s) | top-half speedup | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(result["runs"], 1):
        t = run["median_step_seconds"]
        rows.append(
            f"| {i} | {run['mode']} | {t['all']:.3f} | {t['top half']:.3f} | {t['all'] / t['top half']:.3f} | "
            f"{run['peak_rss_mb']:.0f} |"
        )
    s = result["summary"]
    rows += [
        "",
        f"Tuned against default, pair by pair: all-block step {s['all_faster_pct'][0]:.1f}% to "
        f"{s['all_faster_pct'][1]:.1f}% faster, top-half step {s['top_faster_pct'][0]:.1f}% to "
        f"{s['top_faster_pct'][1]:.1f}% faster, peak RSS {s['rss_more_mb'][0]:+.0f} to {s['rss_more_mb'][1]:+.0f} MB.",
        "",
    ]
    return "\n".join(rows)


def summarize(runs: list[dict]) -> dict:
    """Per default/tuned pair, how much faster tuned stepped and how much more memory it peaked at: [min, max]."""
    pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs) - 1, 2)]

    def faster(arm: str) -> list[float]:
        values = [100 * (1 - t["median_step_seconds"][arm] / d["median_step_seconds"][arm]) for d, t in pairs]
        return [min(values), max(values)]

    more = [t["peak_rss_mb"] - d["peak_rss_mb"] for d, t in pairs]
    return {
        "all_faster_pct": faster("all"),
        "top_faster_pct": faster("top half"),
        "rss_more_mb": [min(more), max(more)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2, help="default/tuned process pairs")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds per process")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return 0
    path = args.out / "allocator.json"
    if args.render_only:
        result = json.loads(path.read_text())
    else:
        if args.pairs < 1 or args.steps < 1:
            raise SystemExit("--pairs and --steps must be >= 1")
        runs = []
        for pair in range(args.pairs):
            for mode in MODES:
                print(f"pair {pair + 1}/{args.pairs}: {mode}", file=sys.stderr, flush=True)
                done = subprocess.run(
                    [sys.executable, __file__, "--worker", mode, "--steps", str(args.steps)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        flags = argv if argv is not None else sys.argv[1:]
        result = {
            "command": " ".join(
                [*launch_prefix(), ".venv/bin/python", "bench/allocator.py", *map(shlex.quote, flags)]
            ),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "steps": args.steps,
            "runs": runs,
            "summary": summarize(runs),
        }
        write_text(path, json.dumps(result, indent=2) + "\n")
    write_text(args.out / "allocator.md", render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
