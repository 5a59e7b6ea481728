"""Every Triton kernel of kernels/ compiled ahead of time for real GPUs, on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs a kernel's program semantics on CPU but never
lowers it, so what only a compiled kernel can get wrong goes unseen there: a compile error in
the NVIDIA backend, register pressure that spills to local memory, shared memory that caps
occupancy. This module finds those without a GPU:

1. Every `kernels/*_triton.py` is loaded afresh with the interpreter off (a private copy, so a
   process that already imported the interpreted kernels is not disturbed).
2. Its launchers are run on CPU tensors shaped like the op's real launches (LAUNCH_CASES,
   below), with every kernel replaced by a recorder: the constexprs, `num_warps`, strides
   and dtypes come from the launchers' own code, per GPU (the launchers' split heuristics
   read the SM count). An autotuned kernel is expanded into all its configs.
3. Each launch is specialised exactly as `JITFunction.run` would on a GPU (Triton's own
   binder: an int equal to 1 becomes a constexpr, pointers and ints divisible by 16 get
   `tt.divisibility`), then compiled for the target with `triton.compile(ASTSource(...),
   target=GPUTarget("cuda", 80 | 90, 32))`; identical specialisations are compiled once.
4. `cuobjdump --dump-resource-usage` (shipped with Triton) reads registers, stack and local
   memory (spills) from the cubin; Triton's metadata gives the dynamic shared memory. The
   occupancy bound is what registers, shared memory and warps allow per SM.

Used by tests/test_aot_compile.py (fails on an error or a spill) and
benchmarks/kernel_resources.py (the table). Relies on two semi-private Triton functions
(`create_function_from_signature`, `JITFunction._pack_args`), checked with Triton 3.9.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch

KERNEL_DIR = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Arch:
    """A compile target and the per-SM limits of its GPUs (CUDA programming guide, compute
    capability tables). `sm_counts`: the GPUs' SM counts, which the launchers' split
    heuristics read, so each is recorded."""
    name: str
    capability: int
    sm_counts: tuple[int, ...]
    gpus: str
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 0          # bytes, shared memory carve-out at its largest
    smem_reserved_per_block: int = 1024


ARCHS = {
    "sm_80": Arch("sm_80", 80, (108,), "A100 (108 SMs)", smem_per_sm=164 * 1024),
    "sm_90": Arch("sm_90", 90, (132, 114), "H100 SXM / H200 (132 SMs), H100 PCIe (114 SMs)",
                  smem_per_sm=228 * 1024),
}


# ----------------------------------------------------------------------------- launch cases
# The launches each op really makes, kept here next to the kernels: what the model and the
# benchmarks feed the op. Each case runs the op's launchers the way its custom ops do.

BN_FILM_SHAPES = {
    (64, 128, 14, 14): "paper preset, training batch",
    (256, 128, 14, 14): "paper preset, eval batch (--eval-batch-size 256)",
    (1, 128, 14, 14): "batch-1 inference (fastfilm answer)",
    (256, 128, 28, 28): "benchmark's larger shape",
    (64, 32, 6, 6): "cpu preset on a GPU",
    (3, 130, 7, 5): "ragged: C and H*W multiples of no block",
}
# The CI set: FiLM's one real shape. The other shapes change only which ints are divisible
# by 16 (Triton's `tt.divisibility`) and the launchers' block heuristics.
BN_FILM_CORE_SHAPES = ((64, 128, 14, 14),)
BN_FILM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # fp64: gradcheck
BN_FILM_LAYOUTS = ("contiguous", "channels_last")
# (training, running statistics given): a training step, a training call without running
# statistics (allowed by the op), eval (folds the running statistics in).
BN_FILM_MODES = {"train": (True, True), "train_no_running": (True, False), "eval": (False, True)}


def _bn_film_relu_residual_cases(module, sm_count: int, full: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """(description, call) for every launch of fastfilm::bn_stats, ::bn_film_relu_residual_fwd
    and ::bn_film_relu_residual_bwd (kernels/bn_film_relu_residual.py): every dtype, layout
    and mode at FiLM's shape, and (full) at every shape above."""
    module._sm_count = lambda device: sm_count
    shapes = BN_FILM_SHAPES if full else BN_FILM_CORE_SHAPES
    for shape, dtype, layout, (mode, (training, running)) in (
            (s, d, lay, m) for s in shapes for d in BN_FILM_DTYPES for lay in BN_FILM_LAYOUTS
            for m in BN_FILM_MODES.items()):
        N, C, H, W = shape
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        # Values are never read: only dtypes, strides and pointer alignment reach the recorder.
        y, residual, dout = (torch.empty(shape, dtype=dtype, memory_format=fmt) for _ in range(3))
        # gamma and beta as FiLMGenerator makes them: [N, num_film, 2, C] viewed per block.
        film = torch.empty((N, 4, 2, C), dtype=dtype)
        gamma, beta = 1 + film[:, 1, 0], film[:, 1, 1]
        rm, rv = (torch.empty(C), torch.empty(C)) if running else (None, None)
        name = f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} {layout} {mode}"

        def call(y=y, residual=residual, dout=dout, gamma=gamma, beta=beta, rm=rm, rv=rv, training=training):
            if training:
                mean, stat = module.bn_stats_fwd(y, rm, rv, momentum=0.1, eps=1e-5)
            else:
                mean, stat = rm, rv
            module.bn_film_relu_residual_fwd(y, residual, gamma, beta, mean, stat, is_var=not training,
                                             eps=1e-5, out_dtype=dtype)
            rstd = stat if training else torch.rsqrt(stat + 1e-5)
            module.bn_film_relu_residual_bwd(dout, y, gamma, beta, mean, rstd, training=training)
        yield name, call


# Module stem -> its cases. A new `kernels/*_triton.py` must add its own (the test fails until then).
LAUNCH_CASES: dict[str, Callable] = {
    "bn_film_relu_residual_triton": _bn_film_relu_residual_cases,
}


# ----------------------------------------------------------------------------- loading

def triton_modules() -> list[Path]:
    """The kernel files: kernels/*_triton.py."""
    return sorted(KERNEL_DIR.glob("*_triton.py"))


@contextlib.contextmanager
def _interpreter_off():
    """TRITON_INTERPRET off while a private copy of a kernel module is decorated (triton.jit
    reads it then), restored afterwards for whoever set it."""
    import triton

    knobs = vars(triton.knobs.runtime)
    saved_knob = knobs.pop("interpret", None)
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        if saved_knob is not None:
            knobs["interpret"] = saved_knob


def load_compiled(path: Path):
    """A fresh copy of the kernel module at `path` with real (not interpreted) kernels."""
    spec = importlib.util.spec_from_file_location(f"fastfilm.kernels._aot_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    with _interpreter_off():
        spec.loader.exec_module(module)
    return module


def _jit_objects(module) -> dict:
    """name -> JITFunction or Autotuner defined at the module's top level."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    return {name: obj for name, obj in vars(module).items() if isinstance(obj, (JITFunction, Autotuner))}


# ----------------------------------------------------------------------------- recording

@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher made it (grid left out: it changes no code)."""
    kernel: str
    args: tuple
    kwargs: dict
    case: str


class _Recorder:
    def __init__(self, name: str, sink: list, case: list):
        self.name, self.sink, self.case = name, sink, case

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.name, args, kwargs, self.case[0]))
        return launch


def record(module, stem: str, sm_count: int, full: bool = True) -> list[Launch]:
    """Runs LAUNCH_CASES[stem] with every kernel of `module` replaced by a recorder."""
    if stem not in LAUNCH_CASES:
        raise RuntimeError(f"kernels/{stem}.py has no launch cases: add them to LAUNCH_CASES in kernels/aot.py")
    sink: list[Launch] = []
    case = [""]
    originals = _jit_objects(module)
    try:
        for name in originals:
            setattr(module, name, _Recorder(name, sink, case))
        for case[0], call in LAUNCH_CASES[stem](module, sm_count, full):
            call()
    finally:
        for name, obj in originals.items():
            setattr(module, name, obj)
    return sink


def unlaunched(module, launches: list[Launch]) -> list[str]:
    """@triton.jit functions neither launched nor called from a launched kernel."""
    objs = _jit_objects(module)
    launched = {launch.kernel for launch in launches}
    sources = "\n".join(_fn(objs[name]).src for name in launched)
    return [name for name in objs if name not in launched and not re.search(rf"\b{name}\(", sources)]


def _fn(obj):
    """The JITFunction under an Autotuner (or the object itself)."""
    from triton.runtime.autotuner import Autotuner

    return obj.fn if isinstance(obj, Autotuner) else obj


# ----------------------------------------------------------------------------- specialising

@dataclasses.dataclass
class Spec:
    """One compilation: a kernel, its specialised signature and options, for one arch."""
    module: str
    kernel: str
    arch: str
    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: list[str]

    @property
    def config(self) -> str:
        """The constexprs and launch options that make this variant, one line."""
        names = self.fn.arg_names
        consts = {names[path[0]]: _short(v) for path, v in self.constexprs.items()}
        dtypes = sorted({v for v in self.signature.values() if v.startswith("*")})
        opts = f"num_warps={self.options['num_warps']} num_stages={self.options['num_stages']}"
        return " ".join([*(f"{k}={v}" for k, v in consts.items()), opts, "ptrs=" + ",".join(dtypes)])


def _short(value) -> str:
    return str(value).replace("triton.language.", "")


def specialise(module, launches: list[Launch], arch: Arch) -> list[Spec]:
    """The distinct compilations `launches` need on `arch` (autotuned kernels: every config)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch.capability, 32))
    objs = _jit_objects(module)
    binders, specs = {}, {}
    for launch in launches:
        obj = objs[launch.kernel]
        fn = _fn(obj)
        configs = [c.all_kwargs() for c in obj.configs] if isinstance(obj, Autotuner) else [{}]
        if launch.kernel not in binders:
            binders[launch.kernel] = create_function_from_signature(fn.signature, fn.params, backend)
        for extra in configs:
            # What JITFunction.run adds before binding.
            kwargs = {**launch.kwargs, **extra, "debug": bool(fn.debug or knobs.runtime.debug),
                      "instrumentation_mode": knobs.compilation.instrumentation_mode,
                      "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts}
            bound, specialization, options = binders[launch.kernel](*launch.args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            key = (launch.kernel, repr(signature), repr(constexprs), repr(attrs), repr(options))
            if key in specs:
                specs[key].cases.append(launch.case)
            else:
                specs[key] = Spec(module.__name__.rsplit("_aot_", 1)[-1], launch.kernel, arch.name, fn, signature,
                                  constexprs, attrs, dict(options.__dict__), [launch.case])
    return list(specs.values())


def all_specs(archs: tuple[str, ...] = tuple(ARCHS), full: bool = True) -> tuple[list[Spec], list[str]]:
    """Every compilation of every kernel file on `archs` (full: at every case shape, else at
    the core ones), and the names of any @triton.jit function that no case reaches."""
    specs, missing = [], []
    for path in triton_modules():
        module = load_compiled(path)
        for arch_name in archs:
            arch = ARCHS[arch_name]
            launches = [launch for n in arch.sm_counts for launch in record(module, path.stem, n, full)]
            specs += specialise(module, launches, arch)
            missing += [f"{path.stem}.{name}" for name in unlaunched(module, launches)]
    for spec in specs:
        spec.cases = sorted(set(spec.cases))
    return specs, sorted(set(missing))


# ----------------------------------------------------------------------------- compiling

def tool(name: str) -> str | None:
    """Path of a CUDA binary shipped with Triton's NVIDIA backend (ptxas, cuobjdump), or None."""
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else shutil.which(name)


def unavailable() -> str | None:
    """Why ahead-of-time compilation cannot run here, or None if it can."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except ImportError as e:
        return f"Triton is not installed ({e})"
    if "nvidia" not in backends:
        return "Triton's NVIDIA backend is not installed"
    for name in ("ptxas", "cuobjdump"):
        if tool(name) is None:
            return f"{name} not found in triton/backends/nvidia/bin or on PATH"
    return None


@dataclasses.dataclass
class Resources:
    """What one compiled variant uses, and the occupancy it allows."""
    registers: int = 0
    stack: int = 0            # bytes per thread
    local: int = 0            # bytes per thread of local memory (register spills)
    smem_static: int = 0      # bytes per block, from the cubin
    smem_dynamic: int = 0     # bytes per block Triton requests at launch
    blocks_per_sm: int = 0
    occupancy: float = 0.0    # resident warps / max warps per SM
    limiter: str = ""
    error: str = ""

    @property
    def spills(self) -> bool:
        return self.local > 0 or self.stack > 0


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, stack, shared, local) of the single kernel in `cubin`, via cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    found = _USAGE.findall(out)
    if len(found) != 1:
        raise RuntimeError(f"expected one kernel's resource usage from cuobjdump, got:\n{out}")
    return tuple(int(v) for v in found[0])


def occupancy(arch: Arch, registers: int, smem: int, num_warps: int) -> tuple[int, float, str]:
    """(blocks per SM, fraction of the SM's warps resident, what limits it) for blocks of
    `num_warps` warps using `registers` per thread and `smem` bytes of shared memory."""
    regs_per_warp = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256 registers
    smem_per_block = -(-smem // 128) * 128 + arch.smem_reserved_per_block  # in units of 128 bytes
    limits = {
        "registers": arch.regs_per_sm // max(regs_per_warp, 1) // num_warps,
        "shared memory": arch.smem_per_sm // smem_per_block,
        "warps": arch.max_warps_per_sm // num_warps,
        "blocks": arch.max_blocks_per_sm,
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return blocks, blocks * num_warps / arch.max_warps_per_sm, limiter


def compile_spec(spec: Spec) -> Resources:
    """Compiles `spec` and reads its resources; a compile error is returned, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = ARCHS[spec.arch]
    try:
        kernel = triton.compile(ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs),
                                target=GPUTarget("cuda", arch.capability, 32), options=spec.options)
        registers, stack, smem_static, local = resource_usage(kernel.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - a compile failure is the finding, reported with its config
        return Resources(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
    smem_dynamic = int(kernel.metadata.shared)
    blocks, occ, limiter = occupancy(arch, registers, smem_static + smem_dynamic, spec.options["num_warps"])
    return Resources(registers, stack, local, smem_static, smem_dynamic, blocks, occ, limiter)


# Set before the pool forks: the workers inherit the specs (a JITFunction of a private module
# does not pickle) and receive indices.
_POOL_SPECS: list[Spec] = []


def _compile_index(i: int) -> Resources:
    return compile_spec(_POOL_SPECS[i])


def compile_all(specs: list[Spec], workers: int | None = None) -> list[Resources]:
    """compile_spec over `specs`, in `workers` forked processes (default: one per CPU this
    process may use); Triton's on-disk cache makes a repeated specialisation a file read."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = workers or len(os.sched_getaffinity(0))
    if workers <= 1 or len(specs) <= 1:
        return [compile_spec(spec) for spec in specs]
    global _POOL_SPECS
    _POOL_SPECS = specs
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_compile_index, range(len(specs)), chunksize=4))
    finally:
        _POOL_SPECS = []


def rows(specs: list[Spec], results: list[Resources]) -> list[dict]:
    """One JSON-ready row per compiled variant."""
    return [{"module": s.module, "kernel": s.kernel, "arch": s.arch, "config": s.config,
             "num_warps": s.options["num_warps"], **dataclasses.asdict(r), "spills": r.spills,
             "cases": s.cases}
            for s, r in zip(specs, results, strict=True)]
