"""One arm of ``bench/probe_vs_reference.py``, run in a fresh process: ``python bench/probe_worker.py SPEC``.

``SPEC`` is a JSON file the parent writes: the arm (``ours`` or ``reference``), the model and data specs, the probe
settings, where the extracted reference ``probe.py`` lies, and where to write the result. The worker builds the
model and rows itself, measures the one probe call (wall and CPU time, forward passes and the rows they saw, peak
RSS growth, other processes' load) and writes the per-layer scores and fingerprints of the weights and rows.

The measuring helpers come from ``aletheia_lora.bench.measure``; this file imports the package only inside
functions, after the model is loaded, so the reference arm's record still says whether its model loader pulled
our package in (``ours_imported``).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

REFERENCE_MODULE = "aletheia_lora_reference_probe"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_reference_probe(path: str):
    """Import the reference probe.py under its own module name; ``aletheia_lora`` stays ours."""
    spec = importlib.util.spec_from_file_location(REFERENCE_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_pretrained(name: str):
    """(model, tokenizer) in float32 on the CPU, by the library's loader."""
    from aletheia_lora.models import load_model_and_tokenizer

    return load_model_and_tokenizer(name, dtype="float32")


def _stdlib_rows(tokenizer, seq_len: int, num_rows: int) -> tuple[list[list[int]], list[str]]:
    """Rows of real text: the standard library's top-level public modules, sorted, joined by EOS."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    need = seq_len * num_rows
    ids: list[int] = []
    used = []
    eos = tokenizer.eos_token_id
    for path in sorted(stdlib.glob("*.py")):
        if path.name.startswith("_"):
            continue
        ids += tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
        used.append(path.name)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise RuntimeError(f"the standard library gave {len(ids)} tokens, fewer than {need}")
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(num_rows)], used


def build_model_and_rows(spec: dict):
    """The arm's model (float32, CPU, as loaded) and its rows as a LongTensor [num_rows, seq_len]."""
    import torch

    data = spec["data"]
    info: dict = {}
    if spec["model"]["kind"] == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        m = spec["model"]
        config = LlamaConfig(
            num_hidden_layers=m["num_layers"],
            hidden_size=m["hidden_size"],
            intermediate_size=m["intermediate_size"],
            num_attention_heads=m["num_attention_heads"],
            num_key_value_heads=m["num_key_value_heads"],
            vocab_size=m["vocab_size"],
            max_position_embeddings=max(256, data["seq_len"]),
            pad_token_id=0,
        )
        torch.manual_seed(m["init_seed"])
        model = LlamaForCausalLM(config).float().eval()
        generator = torch.Generator().manual_seed(data["data_seed"])
        rows = torch.randint(1, m["vocab_size"], (data["num_rows"], data["seq_len"]), generator=generator)
        info["text"] = f"random token ids (seed {data['data_seed']})"
    else:
        model, tokenizer = _load_pretrained(spec["model"]["name"])
        model = model.float().eval()
        row_ids, files = _stdlib_rows(tokenizer, data["seq_len"], data["num_rows"])
        rows = torch.tensor(row_ids, dtype=torch.long)
        info["text"] = f"Python {platform.python_version()} standard library: {', '.join(files)}"
    return model, rows, info


def run_worker(spec_path: str) -> None:
    """Run the arm ``spec_path`` describes and write its record to the spec's ``result`` path."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if spec["torch_threads"]:
        torch.set_num_threads(int(spec["torch_threads"]))
    arm, probe = spec["arm"], spec["probe"]
    model, rows, data_info = build_model_and_rows(spec)
    # Whether the model loader pulled our package in: checked before the measuring helpers below import it.
    ours_imported = "aletheia_lora" in sys.modules
    from aletheia_lora.bench.measure import (
        ForwardLog,
        PeakRss,
        model_fingerprint,
        own_cpu_s,
        system_busy_s,
        wait_for_quiet,
        warm_up,
    )

    num_layers = int(model.config.num_hidden_layers)
    dataset = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows]

    def reference_loader():  # exactly the DataLoader the reference builds
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=1,
            shuffle=True,
            drop_last=True,
            num_workers=0,
            generator=torch.Generator().manual_seed(probe["seed"]),
        )

    if arm == "ours":
        import aletheia_lora
        from aletheia_lora.probe import gradient_probe

        def call(data):
            return gradient_probe(
                model,
                data,
                num_layers,
                probe["probe_batches"],
                probe["chunk_size"],
                seed=probe["seed"],
                progress=False,
            )

        impl = {"module": "aletheia_lora.probe", "version": aletheia_lora.__version__}
        impl["probe_sha256"] = _sha256(Path(sys.modules["aletheia_lora.probe"].__file__))
    else:
        reference = load_reference_probe(spec["reference_probe"])

        def call(data):
            return reference.gradient_probe(
                model, data, num_layers, probe["probe_batches"], probe["chunk_size"], seed=probe["seed"]
            )

        # The reference file is its own module; ours_imported only says whether the model loader pulled ours in.
        impl = {
            "module": REFERENCE_MODULE,
            "file": spec["reference_probe"],
            "ours_imported": ours_imported,
        }

    result = {
        "arm": arm,
        "impl": impl,
        "num_layers": num_layers,
        "model_fingerprint": model_fingerprint(model),
        "data_fingerprint": hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16],
        "data": data_info,
        "torch_threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if spec.get("warmup"):
        result["warmup"] = warm_up(model, rows)
    log = ForwardLog(model, rows)
    gc.collect()
    if spec.get("quiet"):
        # Other processes may use the cores the probe's threads leave free, plus the threshold.
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        allowed = max(cpus - torch.get_num_threads(), 0) + spec["quiet"]["threshold_cores"]
        result["other_load_allowed"] = allowed
        result["quiet_wait"] = wait_for_quiet(spec["quiet"]["max_wait_s"], allowed)
    with PeakRss() as mem:
        busy0, own0, start = system_busy_s(), own_cpu_s(), time.perf_counter()
        scores = call(dataset)
        wall, own, busy = time.perf_counter() - start, own_cpu_s() - own0, system_busy_s() - busy0
    result.update(
        wall_s=wall,
        cpu_s=own,
        # Cores that other processes kept busy during the probe: on a shared machine, the timings' noise.
        other_cores_busy=max(busy - own, 0.0) / wall,
        forward_passes=log.calls,
        rows_seen=log.rows,
        scores=[float(scores[i]) for i in range(num_layers)],
        **mem.result(),
        training_after=model.training,
        trainable_params_after=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if arm == "ours" and spec.get("same_rows_run"):
        # Ours again, fed the reference's own DataLoader: scores on exactly the reference's rows.
        log.reset()
        same = call(reference_loader())
        result["same_rows"] = {
            "scores": [float(same[i]) for i in range(num_layers)],
            "rows_seen": log.rows,
            "forward_passes": log.calls,
        }
    log.handle.remove()
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    run_worker(sys.argv[1])
