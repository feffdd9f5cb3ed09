"""glibc malloc tuning: what mallopt changes (in fresh processes), where it does nothing, and who applies it."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

from aletheia_lora import allocator
from aletheia_lora.models import ModelConfig

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: is an 8 MiB block mmapped (glibc's default: above 128 KiB), and is the heap kept after a free?
_PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    from aletheia_lora.allocator import allocator_state, tune_cpu_allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    applied = tune_cpu_allocator() if sys.argv[1] == "tuned" else None
    before = libc.mallinfo2()
    block = libc.malloc(8 << 20)
    during = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    print(json.dumps({"applied": applied, "mmapped": during.hblkhd - before.hblkhd,
                      "kept": after.arena, "state": allocator_state()}))
    """
)


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_tuned_blocks_come_from_the_heap_and_stay_after_free():
    default, tuned = _probe("default"), _probe("tuned")
    assert default["applied"] is None and default["state"]["tuned"] is None
    assert default["mmapped"] >= 8 << 20  # glibc's own threshold (128 KiB at start) maps it
    assert tuned["applied"] == allocator.TUNED == tuned["state"]["tuned"]
    assert tuned["mmapped"] == 0  # below the 32 MiB threshold: from the heap
    assert tuned["kept"] >= 8 << 20  # freed, but under the 1 GiB trim threshold: kept for reuse
    assert tuned["state"]["libc"].startswith("glibc")


def test_other_c_libraries_are_left_alone(monkeypatch, caplog):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(allocator, "_applied", None)
    with caplog.at_level("INFO", logger="aletheia_lora.allocator"):
        assert allocator.tune_cpu_allocator() is None
    assert "not glibc" in caplog.text
    assert allocator.allocator_state()["tuned"] is None


def test_a_refused_setting_is_an_error(monkeypatch):
    class Refusing:
        @staticmethod
        def mallopt(param, value):
            return 0

    monkeypatch.setattr(allocator, "_glibc", lambda: Refusing())
    monkeypatch.setattr(allocator, "_applied", None)
    with pytest.raises(RuntimeError, match="mallopt refused mmap_threshold=33554432"):
        allocator.tune_cpu_allocator()
    assert allocator.allocator_state()["tuned"] is None


def test_environment_variables_are_recorded(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    assert allocator.allocator_state()["environment"] == {"MALLOC_TRIM_THRESHOLD_": "1073741824"}


@pytest.mark.parametrize("value", ["fast", "", None, True])
def test_model_config_names_a_bad_choice(value):
    with pytest.raises(ValueError, match=r"--cpu-allocator must be one of tuned, default, got"):
        ModelConfig(cpu_allocator=value)


@pytest.mark.parametrize(("choice", "device", "tuned"), [("tuned", "cpu", 1), ("default", "cpu", 0)])
def test_model_config_tunes_before_loading_on_the_cpu(monkeypatch, choice, device, tuned):
    order = []
    monkeypatch.setattr("aletheia_lora.models.loading.tune_cpu_allocator", lambda: order.append("tune"))
    monkeypatch.setattr(
        "aletheia_lora.models.loading.load_model_and_tokenizer", lambda *a, **k: order.append("load") or (None, None)
    )
    ModelConfig(cpu_allocator=choice, device=device).load()
    assert order == ["tune"] * tuned + ["load"]


def test_model_config_leaves_the_allocator_of_a_cuda_run(monkeypatch):
    order = []
    monkeypatch.setattr("aletheia_lora.models.loading.tune_cpu_allocator", lambda: order.append("tune"))
    monkeypatch.setattr(
        "aletheia_lora.models.loading.load_model_and_tokenizer", lambda *a, **k: order.append("load") or (None, None)
    )
    monkeypatch.setattr(ModelConfig, "resolved_device", property(lambda self: "cuda"))
    ModelConfig().load()
    assert order == ["load"]


def test_the_flag_is_on_the_commands_that_load_a_model():
    from aletheia_lora.cli import build_parser

    _, parsers = build_parser()
    for command in ("probe", "train", "run"):
        assert "--cpu-allocator" in parsers[command].format_help()
    assert parsers["train"].parse_args(["--cpu-allocator", "default"]).cpu_allocator == "default"
