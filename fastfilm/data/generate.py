"""`fastfilm generate`: a dataset in CLEVR v1.0's layout, made on this machine.

    OUT/images/{train,val,test}/CLEVR_{split}_{000000}.png   RGBA, cfg.image_width x image_height
    OUT/scenes/CLEVR_{train,val}_scenes.json                  {"info", "scenes"}
    OUT/questions/CLEVR_{split}_questions.json                {"info", "questions"}

The test split is written like CLEVR's: questions without answer, program or family, no
scenes file. Image i of a split is a pure function of (seed, split, i) and answers are
balanced in image order in this process, so the bytes do not depend on the worker count.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import random
import signal
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fastfilm.config import GenerateConfig
from fastfilm.data.questions import FAMILIES, FAMILY_BY_NAME, Balancer, Family, family_table, question_pools
from fastfilm.data.render import render
from fastfilm.data.scene import SceneSample, sample_scene
from fastfilm.atomic import write_json
from fastfilm.errors import UserError

SPLITS = ("train", "val", "test")
MAX_OBJECTS = 10          # CLEVR's most; answers "0".."10" assume it
MAX_SCENE_ATTEMPTS = 200  # re-drawn scenes (hidden objects) before giving up on an image
CLEVR_AREA = 480 * 320


def image_filename(split: str, index: int) -> str:
    return f"CLEVR_{split}_{index:06d}.png"


def _check(cfg: GenerateConfig) -> list[Family]:
    """Validate the config (UserError naming the flag) and return the kept families."""
    if not cfg.out:
        raise UserError("OUT: an output directory is required")
    out = Path(cfg.out)
    for p in (out, *out.parents):  # the first that exists must be a directory
        if p.exists():
            if not p.is_dir():
                raise UserError(f"OUT {out}: {p} is a file, not a directory")
            break
    for name in ("train_images", "val_images", "test_images", "questions_per_image", "seed", "workers"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(cfg, name)}")
    if cfg.image_width < 16 or cfg.image_height < 16:
        raise UserError("--image-width/--image-height: images must be at least 16x16, "
                        f"got {cfg.image_width}x{cfg.image_height}")
    if not 1 <= cfg.min_objects <= cfg.max_objects <= MAX_OBJECTS:
        raise UserError(f"--min-objects/--max-objects: need 1 <= min <= max <= {MAX_OBJECTS}, "
                        f"got {cfg.min_objects} and {cfg.max_objects}")
    if cfg.cogent not in ("", "A", "B"):
        raise UserError(f"--cogent: must be A, B or empty, got {cfg.cogent!r}")
    if not 1.0 <= cfg.zoom <= 3.0:
        raise UserError(f"--zoom: must be between 1 and 3, got {cfg.zoom}")
    if cfg.min_pixels < 0 or not 1 <= cfg.supersample <= 4:
        raise UserError("--min-pixels must be >= 0 and --supersample between 1 and 4")
    if cfg.train_images + cfg.val_images + cfg.test_images == 0:
        raise UserError("--train-images/--val-images/--test-images: nothing to generate")
    names = [n.strip() for n in cfg.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILY_BY_NAME]
    if unknown:
        raise UserError(f"--families: unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                        f"known: {', '.join(FAMILY_BY_NAME)}")
    return [FAMILY_BY_NAME[n] for n in names] if names else list(FAMILIES)


def _seeds(cfg: GenerateConfig, split: str, index: int, stream: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([cfg.seed, SPLITS.index(split), index, stream])


def _py_rng(seq: np.random.SeedSequence) -> random.Random:
    # Python's generator: the question samplers make many scalar draws, and one draw costs
    # far less from random.Random than from numpy's Generator (figures: docs/data.md).
    return random.Random(int.from_bytes(seq.generate_state(4, np.uint32).tobytes(), "little"))


def sample_visible(cfg: GenerateConfig, split: str, index: int) -> tuple[SceneSample, np.ndarray]:
    """(scene sample, RGBA image [H, W, 4] uint8) of image `index` of `split`: scenes are
    re-drawn until every object shows at least cfg.min_pixels (scaled to the image area)."""
    rng = np.random.default_rng(_seeds(cfg, split, index, 0))
    min_px = cfg.min_pixels * cfg.image_width * cfg.image_height / CLEVR_AREA
    for _ in range(MAX_SCENE_ATTEMPTS):
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        sample = sample_scene(rng, n, cfg.image_width, cfg.image_height, cfg.cogent, cfg.zoom)
        image, visible = render(sample, cfg.supersample)
        if visible.min() >= min_px:
            return sample, image
    raise UserError(f"--min-pixels: image {index} of {split}: no scene in {MAX_SCENE_ATTEMPTS} tries keeps "
                    f"{min_px:.0f} pixels of every object visible; use fewer objects, bigger images "
                    "or a lower --min-pixels")


def make_image(cfg: GenerateConfig, split: str, index: int) -> tuple[dict, np.ndarray]:
    """(CLEVR scene dict, RGBA image [H, W, 4] uint8) of image `index` of `split`."""
    sample, image = sample_visible(cfg, split, index)
    scene = {"split": split, "image_index": index, "image_filename": image_filename(split, index), **sample.scene}
    return scene, image


def png_bytes(image: np.ndarray) -> bytes:
    """PNG file contents of an RGBA image [H, W, 4] uint8."""
    buf = io.BytesIO()
    # zlib level 1 rather than Pillow's default 6: encoding is a sizeable share of an
    # image's cost, and level 1 encodes much faster for somewhat larger files (figures:
    # docs/data.md).
    Image.fromarray(image, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _save_png(image: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(png_bytes(image))
    os.replace(tmp, path)


_CFG: GenerateConfig | None = None
_FAMILIES: list[Family] = []


def _init(cfg: GenerateConfig, families: list[Family]) -> None:
    global _CFG, _FAMILIES
    _CFG, _FAMILIES = cfg, families


def _worker_init(cfg: GenerateConfig, families: list[Family]) -> None:
    # Ctrl-C reaches the whole process group: the main process alone handles it (and
    # terminates the pool), so workers do not print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init(cfg, families)


def _work(task: tuple[str, int]) -> tuple[dict, list]:
    """In a worker: render and save one image, and sample its question pools."""
    split, index = task
    cfg = _CFG
    scene, image = make_image(cfg, split, index)
    _save_png(image, Path(cfg.out) / "images" / split / scene["image_filename"])
    pools = question_pools(scene, _FAMILIES, _py_rng(_seeds(cfg, split, index, 1)), cfg.questions_per_image)
    return scene, pools


def _info(cfg: GenerateConfig, split: str) -> dict:
    return {"split": split, "version": "1.0", "generator": "fastfilm generate", "seed": cfg.seed,
            "cogent": cfg.cogent, "image_size": [cfg.image_width, cfg.image_height],
            "objects": [cfg.min_objects, cfg.max_objects]}


def _results(cfg: GenerateConfig, families: list[Family], tasks: list, workers: int):
    """(scene, pools) per task, in task order, rendered by `workers` processes."""
    if workers <= 1 or len(tasks) < 2 * workers:
        _init(cfg, families)
        yield from map(_work, tasks)
        return
    with mp.get_context().Pool(workers, initializer=_worker_init, initargs=(cfg, families)) as pool:
        yield from pool.imap(_work, tasks, chunksize=max(1, min(16, len(tasks) // (8 * workers))))


def run(cfg: GenerateConfig) -> int:
    """Generate the dataset described by `cfg`; returns 0."""
    families = _check(cfg)
    out = Path(cfg.out)
    workers = cfg.workers or os.cpu_count() or 1
    counts = {"train": cfg.train_images, "val": cfg.val_images, "test": cfg.test_images}
    try:
        for sub in ("images", "scenes", "questions"):
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only or not ours: said before any image is rendered
        raise UserError(f"OUT {out}: cannot create {e.filename} ({e.strerror})") from None
    for split, n in counts.items():
        if n == 0:
            continue
        (out / "images" / split).mkdir(exist_ok=True)
        for partial_png in (out / "images" / split).glob(".CLEVR_*.png.tmp"):  # left by a killed run
            partial_png.unlink()
        # An old index must not describe a half-rewritten split if this run is interrupted.
        for stale in (out / "questions" / f"CLEVR_{split}_questions.json", out / "scenes" / f"CLEVR_{split}_scenes.json"):
            stale.unlink(missing_ok=True)
        balancer, scenes, questions = Balancer(), [], []
        tasks = [(split, i) for i in range(n)]
        for scene, pools in tqdm(_results(cfg, families, tasks, workers), total=n, desc=f"generate {split}", unit="img"):
            index = scene["image_index"]
            rng = _py_rng(_seeds(cfg, split, index, 2))
            taken: set[str] = set()
            for family_index, pool in pools:
                choice = balancer.choose(family_index, pool, rng, taken)
                if choice is None:
                    continue
                answer, text, program = choice
                taken.add(text)
                q = {"image_index": index, "image_filename": scene["image_filename"], "split": split,
                     "question_index": len(questions), "question": text}
                if split != "test":  # CLEVR's test split hides answers, programs and families
                    q.update(question_family_index=family_index, answer=answer, program=program)
                questions.append(q)
            scenes.append(scene)
        if split != "test":
            write_json(out / "scenes" / f"CLEVR_{split}_scenes.json", {"info": _info(cfg, split), "scenes": scenes}, indent=None)
        info = {**_info(cfg, split), "question_families": family_table()}
        write_json(out / "questions" / f"CLEVR_{split}_questions.json", {"info": info, "questions": questions}, indent=None)
        print(f"{split}: {n} images, {len(questions)} questions -> {out}")
    return 0
