"""Worker processes for tests/test_distributed.py: run as `python tests/dist_workers.py MODE ...`.

``probe OUT WORLD``: spawns WORLD gloo ranks that probe tiny models (plain, DDP, FSDP1, FSDP2) and check the
error handling; every rank writes ``OUT/rank<r>.json`` with what it measured.
``cli ARGS...``: the `aletheia-lora` command line, for a torchrun launch; with ALETHEIA_TEST_FAIL_RANK=<r> that
rank's data loading raises, to check that every rank stops with the message.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

METRICS = ("grad_norm", "grad_rms", "fisher", "grad_weight")
PROBE = dict(probe_batches=5, batch_size=2, progress=False)  # 5 batches: the two ranks get 3 and 2


def probe_rows():
    from tiny_models import token_rows

    return token_rows(12, vary=True)


def _error_text(fn) -> str | None:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _state(model) -> dict:
    return {
        "grads": sum(p.grad is not None for p in model.parameters()),
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "checksum": float(sum(getattr(p, "_local_tensor", p).detach().double().sum() for p in model.parameters())),
    }


def _probe_rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from aletheia_lora import gradient_probe
    from tiny_models import tiny_model

    rows = probe_rows()
    result = {"rank": rank, "scores": {}, "meta": {}, "state": {}, "errors": {}}

    def record(name, model, **kwargs):
        scores = gradient_probe(model, rows, **PROBE, **kwargs)
        result["scores"][name] = [scores[i] for i in sorted(scores)]
        result["meta"][name] = scores.meta

    # The same global batches, shared between the ranks.
    plain = tiny_model("llama", n_layers=4)
    for metric in METRICS:
        record(f"plain-{metric}", plain, metric=metric)

    # DDP: the probe looks through the wrapper; afterwards DDP still trains, its gradients averaged.
    ddp = DistributedDataParallel(tiny_model("llama", n_layers=4))
    ddp.train()
    before = _state(ddp)
    record("ddp-grad_norm", ddp)
    result["state"]["ddp"] = before == _state(ddp)
    ids = torch.tensor([rows[rank]["input_ids"][:8]])
    ddp(input_ids=ids, labels=ids).loss.backward()
    grad = ddp.module.model.layers[1].mlp.down_proj.weight.grad.clone()
    gathered = [torch.zeros_like(grad) for _ in range(world)]
    dist.all_gather(gathered, grad)
    result["state"]["ddp_step_synchronised"] = all(torch.equal(gathered[0], g) for g in gathered)

    # FSDP1, one unit per decoder block, weights flattened and sharded.
    for strategy in ("FULL_SHARD", "NO_SHARD"):
        fsdp = FullyShardedDataParallel(
            tiny_model("llama", n_layers=4),
            use_orig_params=True,
            device_id=torch.device("cpu"),
            auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
            sharding_strategy=getattr(ShardingStrategy, strategy),
        )
        before = _state(fsdp)
        for metric in METRICS if strategy == "FULL_SHARD" else ("grad_norm",):
            record(f"fsdp1-{strategy}-{metric}", fsdp, metric=metric)
        result["state"][f"fsdp1-{strategy}"] = before == _state(fsdp)
    # ... and it still trains afterwards: a forward/backward gives sharded gradients.
    out_ids = torch.tensor([rows[0]["input_ids"][:8]])
    fsdp(input_ids=out_ids, labels=out_ids).loss.backward()
    result["state"]["fsdp1_trains_after"] = any(p.grad is not None for p in fsdp.parameters())

    # FSDP2: fully_shard per block and at the root; DTensor weights sharded on dim 0.
    model2 = tiny_model("llama", n_layers=4)
    for layer in model2.model.layers:
        fully_shard(layer)
    fully_shard(model2)
    before = _state(model2)
    for metric in METRICS:
        record(f"fsdp2-{metric}", model2, metric=metric)
    result["state"]["fsdp2"] = before == _state(model2)

    # Errors: every rank raises, none waits for the other.
    flat = FullyShardedDataParallel(tiny_model("llama", 2), use_orig_params=False, device_id=torch.device("cpu"))
    result["errors"]["flat"] = _error_text(lambda: gradient_probe(flat, rows, **PROBE))
    own_rows = probe_rows() if rank == 0 else list(reversed(probe_rows()))
    result["errors"]["different_data"] = _error_text(lambda: gradient_probe(plain, own_rows, **PROBE))
    broken = tiny_model("llama", n_layers=2)
    if rank == 1:

        def fail(module, args, output):
            raise RuntimeError("device lost")

        broken.model.layers[1].register_forward_hook(fail)
    result["errors"]["one_rank_fails"] = _error_text(lambda: gradient_probe(broken, rows, **PROBE))
    # and the process group still works: the failure was agreed on, not left half-way through a collective
    flag = torch.ones(1)
    dist.all_reduce(flag)
    result["state"]["group_alive_after_errors"] = int(flag.item()) == world

    # Evaluation shared between the ranks: 3 batches, so one rank has one fewer (and the sharded model repeats
    # a forward pass without counting it).
    from aletheia_lora.train import evaluate_loss

    result["eval"] = {
        "plain": evaluate_loss(plain, rows, batch_size=5, distributed=True),
        "fsdp2": evaluate_loss(model2, rows, batch_size=5, distributed=True),
    }
    dist.destroy_process_group()

    # A rank that fails outside a check point leaves the group: the other, waiting in a collective with it, gets
    # an error at once (not at the timeout) that says it lost contact.
    from aletheia_lora.distributed import launched_job

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    start = time.monotonic()
    try:
        with launched_job(timeout_s=60):
            if rank == 1:
                raise ValueError("rank one broke mid-training")
            dist.all_reduce(torch.ones(1))
    except Exception as exc:
        result["errors"]["lost"] = f"{type(exc).__name__}: {exc}"
    result["state"]["lost_seconds"] = time.monotonic() - start
    result["state"]["group_left"] = not dist.is_initialized()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _probe_rank_safe(rank: int, world: int, init_file: str, out: str) -> None:
    try:
        _probe_rank(rank, world, init_file, out)
    except BaseException:
        Path(out, f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def run_probe_checks(out: str, world: int) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the group the launcher's environment describes
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    init_file = os.path.join(out, "init")
    mp.spawn(_probe_rank_safe, args=(world, init_file, out), nprocs=world, join=True)


def _record_writes(folder: str) -> None:
    """Log every output file this rank writes (and the layers it selects) to FOLDER/rank<r>.txt."""
    from aletheia_lora import files, pipeline, plots, train

    log = Path(folder, f"rank{os.environ.get('RANK', '0')}.txt")

    def note(line: str) -> None:
        with log.open("a") as f:
            f.write(line + "\n")

    def recorded(fn, describe):
        def wrapper(*args, **kwargs):
            note(describe(*args, **kwargs))
            return fn(*args, **kwargs)

        return wrapper

    files.write_text = recorded(files.write_text, lambda path, text: f"write {Path(path).name}")
    plots.save_figure = recorded(plots.save_figure, lambda fig, path: f"write {Path(path).name}")
    train._atomic_save_adapter = recorded(train._atomic_save_adapter, lambda model, to: f"write {Path(to).name}")
    real_probe_and_select = pipeline.probe_and_select

    def probe_and_select(*args, **kwargs):
        result = real_probe_and_select(*args, **kwargs)
        note(f"selected {list(result['selection'].layers)}")
        return result

    pipeline.probe_and_select = probe_and_select


def run_cli(argv: list[str]) -> int:
    from aletheia_lora import cli, pipeline

    if os.environ.get("ALETHEIA_TEST_RECORD"):
        _record_writes(os.environ["ALETHEIA_TEST_RECORD"])
    fail_rank = os.environ.get("ALETHEIA_TEST_FAIL_RANK")
    if fail_rank is not None and os.environ.get("RANK") == fail_rank:
        real = pipeline.build_datasets

        def broken_build_datasets(*args, **kwargs):
            real(*args, **kwargs)
            raise ValueError("this rank's data is unreadable")

        pipeline.build_datasets = broken_build_datasets
    return cli.main(argv)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "probe":
        run_probe_checks(rest[0], int(rest[1]))
    elif mode == "cli":
        sys.exit(run_cli(rest))
    else:
        sys.exit(f"unknown mode {mode!r}")
