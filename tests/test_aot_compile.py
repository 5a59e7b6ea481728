"""Every Triton kernel of kernels/ compiles for sm_80 and sm_90, in every autotune config and
every specialisation the op launches, without spilling registers (fastfilm.kernels.aot).

No GPU needed: Triton compiles ahead of time for a target and cuobjdump reads the cubin. The
CI set is FiLM's shape (64x128x14x14) in every dtype, layout and mode, on both archs: 480
compilations, about 160 s of CPU cold (~80 s on two idle cores: a process per core), under
20 s once Triton's cache (~/.triton/cache) holds them. FASTFILM_AOT_ALL_SHAPES=1 adds every shape of
aot.BN_FILM_SHAPES (the other shapes change which ints Triton sees divisible by 16).
"""
import os
import re

import pytest

from fastfilm.kernels import aot

REASON = aot.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no ahead-of-time compilation here: {REASON}")


def _compile(full: bool):
    specs, missing = aot.all_specs(full=full)
    return specs, missing, aot.compile_all(specs)


@pytest.fixture(scope="module")
def core():
    return _compile(full=False)


def _failures(specs, results) -> list[str]:
    """One line per variant that failed to compile or spilled, with its config."""
    lines = []
    for spec, res in zip(specs, results, strict=True):
        if res.error or res.spills:
            what = res.error or f"spills: {res.stack} B stack frame, {res.local} B local memory per thread"
            lines.append(f"{spec.arch} {spec.kernel} [{spec.config}] e.g. {spec.cases[0]}: {what}")
    return lines


def test_every_kernel_file_has_cases():
    """Kernels live in *_triton.py files (found by the glob), each with launch cases."""
    files = aot.triton_modules()
    assert files, "no kernels/*_triton.py found"
    assert sorted(p.stem for p in files) == sorted(aot.LAUNCH_CASES)
    others = [p.name for p in aot.KERNEL_DIR.glob("*.py")
              if p not in files and p.name != "aot.py" and "@triton.jit" in p.read_text()]
    assert not others, f"Triton kernels outside a *_triton.py file, unseen by the compile check: {others}"


def test_cases_reach_every_kernel(core):
    _, missing, _ = core
    assert not missing, f"@triton.jit functions no launch case reaches: {missing}"


def test_cases_cover_dtypes_layouts_and_modes(core):
    """The recorded launches hold the specialisations the op makes: every dtype, NCHW
    (s stride 1) and channels_last (c stride 1), train/eval, with/without running stats."""
    specs, _, _ = core
    for arch in aot.ARCHS:
        of = {s.kernel: [] for s in specs}
        for s in specs:
            if s.arch == arch:
                of[s.kernel].append(s.config)
        fwd = of["_bn_film_relu_residual_fwd_kernel"]
        for dtype in ("fp32", "fp16", "bf16", "fp64"):
            assert any(f"*{dtype}" in c for c in fwd), (arch, dtype)
        assert any("y_ss=1" in c for c in fwd) and any("y_sc=1" in c for c in fwd), arch
        assert any("IS_VAR=True" in c for c in fwd) and any("IS_VAR=False" in c for c in fwd), arch
        stats = of["_bn_stats_fwd_kernel"] + of["_bn_stats_merge_fwd_kernel"]
        assert any("HAS_RUNNING=True" in c for c in stats) and any("HAS_RUNNING=False" in c for c in stats), arch
        reduce_ = of["_bn_film_relu_residual_bwd_reduce_kernel"]
        assert any("WRITE_DY=True" in c for c in reduce_) and any("WRITE_DY=False" in c for c in reduce_), arch
        # Every autotune config of the two autotuned kernels, for each (dtype, layout) seen.
        for name in ("_bn_film_relu_residual_fwd_kernel", "_bn_film_relu_residual_bwd_kernel"):
            blocks = {re.search(r"BLOCK_S=\d+ BLOCK_C=\d+ num_warps=\d+", c).group() for c in of[name]}
            assert len(blocks) == 8, (arch, name, sorted(blocks))


def test_compiles_without_spills(core):
    specs, _, results = core
    failures = _failures(specs, results)
    assert not failures, f"{len(failures)} of {len(specs)} compilations failed or spilled:\n" + "\n".join(failures)


def test_spill_detector_sees_a_forced_spill(core):
    """The check can fail: the same kernel capped at 32 registers (ptxas -maxrregcount)
    must show up as spilling."""
    specs, _, results = core
    spec, res = max(((s, r) for s, r in zip(specs, results) if s.arch == "sm_90"), key=lambda sr: sr[1].registers)
    assert res.registers > 64 and not res.spills
    capped = aot.Spec(**{**spec.__dict__, "options": {**spec.options, "maxnreg": 32}})
    forced = aot.compile_spec(capped)
    assert not forced.error
    assert forced.registers <= 32 and forced.spills, forced


def test_occupancy_by_hand():
    h100 = aot.ARCHS["sm_90"]
    # 40 registers x 32 threads = 1280 per warp: 51 warps fit in 65536 registers, 12 blocks of 4.
    assert aot.occupancy(h100, 40, 0, 4) == (12, 0.75, "registers")
    # 90 registers round up to 96 per thread (256 per warp): 21 warps, 5 blocks of 4.
    assert aot.occupancy(h100, 90, 0, 4) == (5, 20 / 64, "registers")
    # 100 KB of shared memory (+1 KB reserved): two blocks in 228 KB.
    assert aot.occupancy(h100, 32, 100 * 1024, 4)[::2] == (2, "shared memory")
    # 16 registers, 8 warps: the 64-warp limit binds first.
    assert aot.occupancy(aot.ARCHS["sm_80"], 16, 0, 8) == (8, 1.0, "warps")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FASTFILM_AOT_ALL_SHAPES"),
                    reason="~1700 compilations (10+ min of CPU cold): set FASTFILM_AOT_ALL_SHAPES=1")
def test_every_shape_compiles_without_spills():
    specs, missing, results = _compile(full=True)
    assert not missing
    failures = _failures(specs, results)
    assert not failures, f"{len(failures)} of {len(specs)} compilations failed or spilled:\n" + "\n".join(failures)
