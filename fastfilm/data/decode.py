"""Decode PNG/JPEG files and resize them to `size x size` RGB uint8, with DALI or Pillow.

Both backends
- drop the alpha channel rather than composite it: CLEVR's RGBA PNGs are fully opaque
  (alpha 255 everywhere), the original FiLM code dropped it too (PIL convert('RGB')), and
  DALI's decoder drops it when asked for RGB, so the two backends agree on every input,
  translucent ones included;
- stretch to a square with an antialiased bicubic filter, as the original code resized
  480x320 to 224x224;
- scale 16-bit PNGs to 8 bits and apply JPEG EXIF orientation.
Pixels agree to a mean absolute difference under 0.5 of 255, the bound tests/test_cache.py
checks (single edge pixels differ more): DALI's and Pillow's bicubic resamplers place and
weight their taps slightly differently, and their JPEG IDCTs differ. Measured differences
are in docs/data.md.

Speed on CPU: which backend is faster depends on the output side, because DALI's CPU cubic
resize grows costlier than Pillow's with it (benchmarks/bench_preprocess.py; figures in
docs/data.md); either way preprocessing runs once.

DALI: CPU operators on CPU machines (`device="cpu"`, device_id=None). `device="gpu"` builds a
`mixed` decoder: JPEG is decoded with nvJPEG on the GPU, but PNG (all of CLEVR) is still
decoded on the CPU by nvImageCodec; only the resize then runs on the GPU. The win on CLEVR
is therefore small, and decoding happens once per image anyway.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from fastfilm.errors import UserError

BACKENDS = ("dali", "pillow")
_PNG = b"\x89PNG\r\n\x1a\n"


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(decoder: str) -> str:
    """'auto' -> 'dali' when DALI imports, else 'pillow'. Asking for 'dali' without it is a UserError."""
    if decoder == "auto":
        return "dali" if dali_available() else "pillow"
    if decoder not in BACKENDS:
        raise UserError(f"decoder: {decoder!r} is not one of auto, {', '.join(BACKENDS)}")
    if decoder == "dali" and not dali_available():
        raise UserError("decoder: 'dali' asked for but nvidia-dali is not installed "
                        "(pip install nvidia-dali-cuda120, or use --decoder pillow)")
    return decoder


def default_workers(workers: int = 0) -> int:
    return workers if workers > 0 else max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                           else os.cpu_count() or 1)


def describe_decoding(backend: str, device: str, workers: int) -> str:
    """Which device decodes which format and resizes, in words, for the build's log line.
    backend: 'dali' or 'pillow'; device: 'cpu', 'gpu' or 'gpu:N' (DALI only)."""
    n = default_workers(workers)
    threads = f"{n} thread{'s' if n != 1 else ''}"
    if backend == "pillow":
        return f"Pillow on the CPU ({threads}): PNG and JPEG decoded and resized on the CPU"
    if device == "cpu":
        return f"DALI on the CPU ({threads}): PNG and JPEG decoded and resized on the CPU"
    gpu = int(device.partition(":")[2] or 0)
    return (f"DALI 'mixed' on GPU {gpu}: JPEG decoded on the GPU (nvJPEG), PNG on the CPU ({threads}, "
            f"nvImageCodec); resized on the GPU")


def read_encoded(path: str | Path) -> bytes:
    """File bytes, checked for the damage both decoders must reject alike. Raises ValueError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError("image file not found") from None
    except OSError as e:
        raise ValueError(f"cannot read image ({e.strerror})") from None
    if not data:
        raise ValueError("empty image file")
    # Pillow decodes a PNG that lost its tail (IEND) without complaint while DALI refuses it:
    # check here so that both backends call the same files bad.
    if data.startswith(_PNG) and data.rfind(b"IEND", max(0, len(data) - 4096)) < 0:
        raise ValueError("truncated PNG (no IEND chunk)")
    if data.startswith(b"\xff\xd8") and data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) < 0:
        raise ValueError("truncated JPEG (no end-of-image marker)")
    return data


def decode_pillow(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> [size, size, 3] uint8. Raises ValueError on undecodable data."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):  # 16/32-bit grey: keep the high byte, as DALI does
                im = Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8))
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            return np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image ({e})") from None


class DaliDecoder:
    """A DALI pipeline: encoded bytes [B] -> [B, size, size, 3] uint8 on the host."""

    def __init__(self, size: int, batch_size: int, workers: int, device: str = "cpu"):
        self.size, self.batch_size, self.workers = size, batch_size, workers
        if device == "cpu":
            self.device_id, self.decoder_device = None, "cpu"
        elif device == "gpu" or device.startswith("gpu:"):
            self.device_id, self.decoder_device = int(device.partition(":")[2] or 0), "mixed"
        else:
            raise UserError(f"device: {device!r} must be cpu, gpu or gpu:N")
        self._build()

    def _build(self) -> None:
        from nvidia.dali import fn, pipeline_def, types

        size, device = self.size, self.decoder_device

        # prefetch_queue_depth=1: we feed one batch and run it, so nothing is left queued
        # when a bad file makes a batch fail.
        @pipeline_def(batch_size=self.batch_size, num_threads=self.workers, device_id=self.device_id,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            img = fn.decoders.image(enc, device=device, output_type=types.RGB, dtype=types.UINT8)
            return fn.resize(img, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)

        self.pipe = pipe()
        self.pipe.build()

    def __call__(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Raises RuntimeError (DALI's) when any image of the batch fails; the pipeline is rebuilt."""
        try:
            self.pipe.feed_input("encoded", [np.frombuffer(e, dtype=np.uint8) for e in encoded])
            (out,) = self.pipe.run()
        except RuntimeError:
            self._build()  # a failed run leaves the pipeline unusable
            raise
        if hasattr(out, "as_cpu"):
            out = out.as_cpu()
        return out.as_array()


def decode_images(paths: Sequence[str | Path], size: int, out: np.ndarray, *, backend: str = "auto",
                  device: str = "cpu", workers: int = 0, skip_bad: bool = False, batch_size: int = 32,
                  desc: str = "decode") -> list[tuple[int, str]]:
    """Decode every file of `paths` into `out[i]` ([N, size, size, 3] uint8, e.g. a memmap).

    A bad file (missing, empty, truncated, undecodable) raises UserError naming it, or with
    `skip_bad` leaves its row zero and is returned as (index, reason). Parallel over `workers`
    threads (0: one per core): Pillow and DALI both release the GIL while decoding.
    """
    backend = resolve_backend(backend)
    workers = default_workers(workers)
    bad: list[tuple[int, str]] = []

    def fail(i: int, reason: str) -> None:
        if not skip_bad:
            raise UserError(f"{paths[i]}: {reason}")
        out[i] = 0
        bad.append((i, reason))

    def load(i: int) -> tuple[int, bytes | None, str]:
        try:
            return i, read_encoded(paths[i]), ""
        except ValueError as e:
            return i, None, str(e)

    def pillow(i: int) -> tuple[int, bytes | None, str]:
        i, data, reason = load(i)
        if data is not None:
            try:
                out[i] = decode_pillow(data, size)
            except ValueError as e:
                reason = str(e)
        return i, None, reason

    dali = DaliDecoder(size, batch_size, workers, device) if backend == "dali" else None
    task = load if dali else pillow
    chunks = [range(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", leave=False, disable=len(paths) < 256) as bar:
        # One chunk in flight ahead of the one being finished: file reads (and Pillow decodes)
        # overlap DALI's work without queueing the whole dataset at once.
        pending = [pool.submit(task, i) for i in chunks[0]] if chunks else []
        for k in range(len(chunks)):
            done = [f.result() for f in pending]
            pending = [pool.submit(task, i) for i in chunks[k + 1]] if k + 1 < len(chunks) else []
            good = []
            for i, data, reason in done:
                if reason:
                    fail(i, reason)
                elif data is not None:
                    good.append((i, data))
            if dali:
                _decode_dali_batch(dali, good, out, fail)
            bar.update(len(done))
    return bad


def _decode_dali_batch(dali: DaliDecoder, items: list[tuple[int, bytes]], out: np.ndarray, fail) -> None:
    if not items:
        return
    try:
        out[[i for i, _ in items]] = dali([d for _, d in items])
        return
    except RuntimeError:
        pass
    # DALI's error does not say which sample failed: retry one at a time to name it.
    for i, data in items:
        try:
            out[i] = dali([data])[0]
        except RuntimeError as e:
            fail(i, f"cannot decode image (DALI: {_dali_reason(e)})")


def _dali_reason(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return next((ln for ln in lines if "failure" in ln.lower()), lines[-1] if lines else "unknown error")[:200]
