"""Decode PNG/JPEG files and resize them to `size x size` RGB uint8, with DALI or Pillow.

All three decoders below
- drop the alpha channel rather than composite it: CLEVR's RGBA PNGs are fully opaque
  (alpha 255 everywhere), the original FiLM code dropped it too (PIL convert('RGB')), and
  DALI's decoder drops it when asked for RGB, so they agree on every input,
  translucent ones included;
- stretch to a square with an antialiased bicubic filter, as the original code resized
  480x320 to 224x224;
- scale 16-bit PNGs to 8 bits and apply JPEG EXIF orientation.
DALI's resize agrees with Pillow's to a mean absolute difference under 0.5 of 255, the bound
tests/test_cache.py checks (single edge pixels differ more): the two bicubic resamplers place
and weight their taps slightly differently. JPEG IDCTs differ slightly as well. Measured
differences are in docs/data.md.

Three ways to get there (`--decoder`):
- `pillow`: Pillow decodes and resizes;
- `dali`: a DALI pipeline decodes and resizes (cubic, antialiased);
- `dali+pillow`: DALI decodes, Pillow resizes the decoded arrays. PNG is lossless, so this
  gives Pillow's pixels exactly; it exists because on a CPU DALI's PNG decode is the faster
  one but its cubic resize grows costlier than Pillow's with the output side.
`auto` takes whichever was measured fastest for this machine kind at the nearest measured
size (`choose_decoder`, the table in decoder_speeds.json, written by
benchmarks/decoder_table.py from benchmarks/results/preprocess_<kind>*.json; figures in
docs/data.md), and says which in one line. Preprocessing runs once, so the choice only
saves minutes on a large dataset.

DALI: CPU operators on CPU machines (`device="cpu"`, device_id=None). `device="gpu"` builds a
`mixed` decoder: JPEG is decoded with nvJPEG on the GPU, but PNG (all of CLEVR) is still
decoded on the CPU by nvImageCodec; only the resize then runs on the GPU. The win on CLEVR
is therefore small, and decoding happens once per image anyway.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from fastfilm.errors import UserError

BACKENDS = ("dali", "dali+pillow", "pillow")
_PNG = b"\x89PNG\r\n\x1a\n"
SPEEDS = Path(__file__).with_name("decoder_speeds.json")
# `auto` leaves Pillow only for a decoder measured at least this much faster: smaller gaps are
# within the run-to-run noise of the shared machines the table was measured on, and Pillow
# needs no optional dependency.
MARGIN = 1.05
# Fewer images than this decode within seconds: no progress bar, and no line saying which
# decoder `auto` took (the cache's meta.json records it either way).
QUIET_BELOW = 256


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(decoder: str, size: int | None = None, device: str = "cpu") -> str:
    """--decoder as the backend that will run: choose_decoder(...).backend."""
    return choose_decoder(decoder, size, device=device).backend


@dataclass(frozen=True)
class DecoderChoice:
    backend: str    # one of BACKENDS
    why: str        # one line: what was chosen and on what evidence


def load_speeds(path: Path = SPEEDS) -> dict:
    """machine kind -> {"sizes": {"64": {backend: rate / Pillow's rate}}, "measured_in": {"64": results
    file}, "sources": [what each results file was measured on]}."""
    try:
        return json.loads(Path(path).read_text())["machines"]
    except FileNotFoundError:
        return {}


def nearest_size(measured: Sequence[int], size: int) -> int:
    """The measured output side closest to `size` by ratio (resize cost follows the pixel
    count, so 96 is as near 64 as 144 is to 96); ties go to the smaller side."""
    return min(sorted(measured), key=lambda m: abs(math.log(m / size)))


def choose_decoder(decoder: str, size: int | None, *, device: str = "cpu", kind: str | None = None,
                   speeds: dict | None = None, dali: bool | None = None) -> DecoderChoice:
    """The backend for `--decoder decoder` at output side `size`. 'auto' on a CPU takes the
    fastest in `speeds` (default: decoder_speeds.json) for machine `kind` (default: this
    machine's, hardware.machine_kind) at the measured size nearest `size`; Pillow unless
    another one was measured at least MARGIN times faster, or when nothing was measured for
    this kind. `dali`: whether nvidia-dali imports (default: try it)."""
    dali = dali_available() if dali is None else dali
    if decoder != "auto":
        if decoder not in BACKENDS:
            raise UserError(f"decoder: {decoder!r} is not one of auto, {', '.join(BACKENDS)}")
        if decoder != "pillow" and not dali:
            raise UserError(f"decoder: {decoder!r} asked for but nvidia-dali is not installed "
                            "(pip install nvidia-dali-cuda120, or use --decoder pillow)")
        return DecoderChoice(decoder, f"--decoder {decoder}")
    if not dali:
        return DecoderChoice("pillow", "decoder auto: pillow (nvidia-dali is not installed)")
    if device != "cpu":
        return DecoderChoice("dali", f"decoder auto: dali (--device {device}: DALI's mixed GPU pipeline)")
    if size is None:
        raise ValueError("choose_decoder: --decoder auto with DALI installed needs the output size")
    kind = kind or _cpu_kind()
    entry = (load_speeds() if speeds is None else speeds).get(kind)
    if not entry or not entry.get("sizes"):
        return DecoderChoice("pillow", f"decoder auto: pillow (no decode speeds measured on a {kind} machine; "
                             "benchmarks/bench_preprocess.py and decoder_table.py add them)")
    at = nearest_size([int(k) for k in entry["sizes"]], size)
    rates = entry["sizes"][str(at)]
    source = entry.get("measured_in", {}).get(str(at), SPEEDS.name)
    where = f"on {kind} at {at} px" + ("" if at == size else f", the measured size nearest {size} px")
    best = max((b for b in rates if b != "pillow" and b in BACKENDS), key=rates.get, default=None)
    if best is None:
        return DecoderChoice("pillow", f"decoder auto: pillow for {size} px (no DALI decoder measured {where}; "
                             f"{source})")
    if rates[best] < MARGIN:
        return DecoderChoice("pillow", f"decoder auto: pillow for {size} px (the fastest DALI decoder, {best}, "
                             f"measured {rates[best]:.2f}x Pillow's rate {where}, under the {MARGIN:g}x that "
                             f"would pay; {source})")
    return DecoderChoice(best, f"decoder auto: {best} for {size} px ({rates[best]:.2f}x Pillow's rate {where}; "
                         f"{source})")


def _cpu_kind() -> str:
    # hardware imports torch: only `auto` on a CPU pays for it, never an explicit --decoder.
    import torch

    from fastfilm.hardware import machine_kind
    return machine_kind(torch.device("cpu"))


def default_workers(workers: int = 0) -> int:
    return workers if workers > 0 else max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                           else os.cpu_count() or 1)


def describe_decoding(backend: str, device: str, workers: int) -> str:
    """Which device decodes which format and which resizes, in words, for the build's log
    line. backend: one of BACKENDS; device: 'cpu', 'gpu' or 'gpu:N' (DALI only)."""
    n = default_workers(workers)
    threads = f"{n} thread{'s' if n != 1 else ''}"
    if backend == "pillow":
        return f"Pillow on the CPU ({threads}): PNG and JPEG decoded and resized on the CPU"
    pillow_resize = backend == "dali+pillow"
    if device == "cpu":
        how = "decoded on the CPU, resized by Pillow" if pillow_resize else "decoded and resized on the CPU"
        return f"DALI on the CPU ({threads}): PNG and JPEG {how}"
    gpu = int(device.partition(":")[2] or 0)
    resize = "resized by Pillow on the CPU" if pillow_resize else "resized on the GPU"
    return (f"DALI 'mixed' on GPU {gpu}: JPEG decoded on the GPU (nvJPEG), PNG on the CPU ({threads}, "
            f"nvImageCodec); {resize}")


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
            return resize_pillow(im.convert("RGB"), size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image ({e})") from None


def resize_pillow(im: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """RGB image (or [H, W, 3] uint8 array) -> [size, size, 3] uint8: Pillow's antialiased
    bicubic stretch, the one resize of both `pillow` and `dali+pillow`."""
    if isinstance(im, np.ndarray):
        im = Image.fromarray(im, "RGB")
    return np.asarray(im.resize((size, size), Image.BICUBIC))


class DaliDecoder:
    """A DALI pipeline: encoded bytes [B] -> [B, size, size, 3] uint8 on the host, or with
    resize=False the decoded images as they are (B arrays [H_i, W_i, 3] uint8)."""

    def __init__(self, size: int, batch_size: int, workers: int, device: str = "cpu", resize: bool = True):
        self.size, self.batch_size, self.workers, self.resize = size, batch_size, workers, resize
        if device == "cpu":
            self.device_id, self.decoder_device = None, "cpu"
        elif device == "gpu" or device.startswith("gpu:"):
            self.device_id, self.decoder_device = int(device.partition(":")[2] or 0), "mixed"
        else:
            raise UserError(f"device: {device!r} must be cpu, gpu or gpu:N")
        self._build()

    def _build(self) -> None:
        from nvidia.dali import fn, pipeline_def, types

        size, device, resize = self.size, self.decoder_device, self.resize

        # prefetch_queue_depth=1: we feed one batch and run it, so nothing is left queued
        # when a bad file makes a batch fail.
        @pipeline_def(batch_size=self.batch_size, num_threads=self.workers, device_id=self.device_id,
                      prefetch_queue_depth=1, exec_dynamic=True)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            img = fn.decoders.image(enc, device=device, output_type=types.RGB, dtype=types.UINT8)
            if not resize:
                return img
            return fn.resize(img, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)

        self.pipe = pipe()
        self.pipe.build()

    def __call__(self, encoded: Sequence[bytes]) -> np.ndarray | list[np.ndarray]:
        """Raises RuntimeError (DALI's) when any image of the batch fails; the pipeline is rebuilt."""
        try:
            self.pipe.feed_input("encoded", [np.frombuffer(e, dtype=np.uint8) for e in encoded])
            (out,) = self.pipe.run()
        except RuntimeError:
            self._build()  # a failed run leaves the pipeline unusable
            raise
        if hasattr(out, "as_cpu"):
            out = out.as_cpu()
        if self.resize:
            return out.as_array()
        # Copies: the pipeline may reuse its output buffers on the next run, while these are
        # still being resized.
        return [np.array(out[i]) for i in range(len(out))]


def decode_images(paths: Sequence[str | Path], size: int, out: np.ndarray, *, backend: str = "auto",
                  device: str = "cpu", workers: int = 0, skip_bad: bool = False, batch_size: int = 32,
                  desc: str = "decode") -> list[tuple[int, str]]:
    """Decode every file of `paths` into `out[i]` ([N, size, size, 3] uint8, e.g. a memmap)
    with `backend` (one of BACKENDS, or 'auto': choose_decoder, silently).

    A bad file (missing, empty, truncated, undecodable) raises UserError naming it, or with
    `skip_bad` leaves its row zero and is returned as (index, reason). Parallel over `workers`
    threads (0: one per core): Pillow and DALI both release the GIL while decoding and resizing.
    """
    backend = resolve_backend(backend, size, device)
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

    def resize(i: int, rgb: np.ndarray) -> None:
        out[i] = resize_pillow(rgb, size)

    dali = (DaliDecoder(size, batch_size, workers, device, resize=backend == "dali") if backend != "pillow"
            else None)
    task = load if dali else pillow
    chunks = [range(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size)]
    resizing: list = []
    with ThreadPoolExecutor(workers) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", leave=False, disable=len(paths) < QUIET_BELOW) as bar:
        # One chunk in flight ahead of the one being finished: file reads (and Pillow decodes)
        # overlap DALI's work without queueing the whole dataset at once; with dali+pillow the
        # previous chunk's resizes overlap DALI's decode of this one.
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
                decoded = _decode_dali_batch(dali, good, fail)
                for f in resizing:
                    f.result()
                if dali.resize:
                    for i, img in decoded:
                        out[i] = img
                else:
                    resizing = [pool.submit(resize, i, img) for i, img in decoded]
            bar.update(len(done))
        for f in resizing:
            f.result()
    return bad


def _decode_dali_batch(dali: DaliDecoder, items: list[tuple[int, bytes]], fail) -> list[tuple[int, np.ndarray]]:
    """(index, image) for every item DALI decodes; `fail` is called for the others."""
    if not items:
        return []
    try:
        return list(zip([i for i, _ in items], dali([d for _, d in items]), strict=True))
    except RuntimeError:
        pass
    # DALI's error does not say which sample failed: retry one at a time to name it.
    decoded = []
    for i, data in items:
        try:
            decoded.append((i, dali([data])[0]))
        except RuntimeError as e:
            fail(i, f"cannot decode image (DALI: {_dali_reason(e)})")
    return decoded


def _dali_reason(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return next((ln for ln in lines if "failure" in ln.lower()), lines[-1] if lines else "unknown error")[:200]
