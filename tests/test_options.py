"""The fast path's switches: 'auto' follows the per-machine-kind table (engine/options.py,
DEFAULTS), explicit values win, one line says what was chosen, and every table entry that
names a committed benchmark agrees with what that benchmark measured."""
import json
from pathlib import Path

import pytest
import torch

from fastfilm.config import FastConfig
from fastfilm.engine import options
from fastfilm.engine.options import DEFAULTS, defaults_for, resolve

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
SWITCHES = ("amp", "compile", "fused", "channels_last")
# A piece is on by default only when its training step measured at least this much faster.
MARGIN = 1.02


@pytest.fixture
def quiet(monkeypatch):
    """Each test sees the notes it causes (they are printed once per process)."""
    monkeypatch.setattr(options, "_NOTED", set())


@pytest.mark.parametrize("kind", ["cpu-amx", "cpu-avx2"])
def test_auto_takes_the_table_entry_of_the_machine_kind(kind, monkeypatch, capsys, quiet):
    monkeypatch.setattr(options, "machine_kind", lambda device: kind)
    monkeypatch.setattr(options, "native_bf16", lambda device: kind == "cpu-amx")
    table = DEFAULTS[kind]
    ex = resolve(FastConfig(), CPU)
    assert (ex.compile, ex.fused, ex.channels_last) == (table.compile, table.fused, table.channels_last)
    assert ex.dtype == {"bf16": torch.bfloat16, "off": None}[table.amp]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastfilm: {kind}: ") and table.source in err[0], err


def test_explicit_switches_override_the_table_and_are_named(monkeypatch, capsys, quiet):
    monkeypatch.setattr(options, "machine_kind", lambda device: "cpu-amx")
    monkeypatch.setattr(options, "native_bf16", lambda device: True)
    table = DEFAULTS["cpu-amx"]
    ex = resolve(FastConfig(fused=not table.fused, amp="off"), CPU)
    assert ex.fused is (not table.fused) and ex.dtype is None
    assert (ex.compile, ex.channels_last) == (table.compile, table.channels_last)  # still auto
    line = capsys.readouterr().err.strip()
    assert f"--{'' if not table.fused else 'no-'}fused" in line and "--amp off" in line and table.source in line
    # Everything given: the table is not the reason for anything.
    resolve(FastConfig(amp="off", compile=False, fused=True, channels_last=True), CPU)
    line = capsys.readouterr().err.strip()
    assert "fp32, eager, fused op, channels_last" in line and table.source not in line


def test_auto_bf16_needs_native_bf16(monkeypatch, capsys, quiet):
    """A kind whose entry says bf16 (CUDA) runs fp32 on hardware without bf16, without the
    fallback note that an explicit --amp bf16 gets."""
    monkeypatch.setattr(options, "machine_kind", lambda device: "cuda-sm70")
    monkeypatch.setattr(options, "native_bf16", lambda device: False)
    assert defaults_for("cuda-sm70").amp == "bf16"
    assert resolve(FastConfig(), CPU).dtype is None
    assert "no native bf16" not in capsys.readouterr().err
    assert resolve(FastConfig(amp="bf16"), CPU).dtype is None
    assert "no native bf16" in capsys.readouterr().err


def test_unknown_kinds_fall_back():
    assert defaults_for("cuda-sm120") is DEFAULTS["cuda"]
    assert defaults_for("cpu-riscv") is DEFAULTS["cpu-other"]


def _pairs(candidates: dict, switch: str):
    """(with, without) train q/s of candidates that differ in `switch` only (one question per image)."""
    field = {"amp": "amp"}.get(switch, switch)
    rows = [c for c in candidates.values() if c.get("questions_per_image", 1) == 1]
    for a in rows:
        for b in rows:
            others = all(a[k] == b[k] for k in SWITCHES if k != field)
            on = a[field] not in (False, "fp32") and b[field] in (False, "fp32")
            if others and on:
                yield a["train_qps"], b["train_qps"]


@pytest.mark.parametrize("kind", sorted(k for k, d in DEFAULTS.items() if d.source.endswith(".json")))
def test_table_agrees_with_the_committed_benchmark(kind):
    """Each switch of the entry is on iff the benchmark measured the step >= 2% faster with it
    (for every pair of candidates in the file that differ in that switch only)."""
    entry = DEFAULTS[kind]
    data = json.loads((ROOT / entry.source).read_text())
    flags = data["machine"].get("cpu_flags")
    if flags is not None:  # older files did not record the flags (train_cpu.json: the AMD EPYC, AVX2)
        assert flags["amx_bf16"] == (kind == "cpu-amx") and flags["avx2"]
    checked = 0
    for switch in SWITCHES:
        for with_it, without in _pairs(data["candidates"], switch):
            chosen = getattr(entry, switch) not in (False, "off")
            assert chosen == (with_it >= MARGIN * without), (
                f"{kind}: {switch}={getattr(entry, switch)} but {entry.source} measured {with_it:.0f} q/s with it "
                f"and {without:.0f} without")
            checked += 1
    assert checked >= 3, f"{entry.source} has too few ablation pairs to back the {kind} entry"
