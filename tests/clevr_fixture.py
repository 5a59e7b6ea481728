"""A small hand-written CLEVR v1.0-layout directory for the reader, cache and loader tests.

    images/{train,val,test}/CLEVR_<split>_NNNNNN.png  RGBA PNGs of odd sizes (one JPEG, one RGB PNG)
    questions/CLEVR_train_questions.json              with programs and families
    questions/CLEVR_val_questions.json                with programs
    questions/CLEVR_test_questions.json               no answers, no programs (families only), as CLEVR's test
    questions/CLEVR-Humans-val.json                   no programs, no families, a bare list, unknown words
    scenes/CLEVR_train_scenes.json                    present but not needed
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(37, 23), (48, 32), (61, 45), (30, 30)]  # (width, height), deliberately odd


def _prog(*steps: str) -> list[dict]:
    """'filter_color[red]' style steps chained one after another."""
    out = []
    for i, s in enumerate(steps):
        fn, _, val = s.partition("[")
        out.append({"function": fn, "inputs": [i - 1] if i else [], "value_inputs": [val[:-1]] if val else []})
    return out


# (question, answer, family, program); family -> last function is consistent, as in CLEVR.
TRAIN = [
    ("Are there any red cubes?", "yes", 0, _prog("scene", "filter_color[red]", "filter_shape[cube]", "exist")),
    ("How many spheres are there?", "2", 1, _prog("scene", "filter_shape[sphere]", "count")),
    ("What color is the large cylinder?", "blue", 2,
     _prog("scene", "filter_size[large]", "filter_shape[cylinder]", "unique", "query_color")),
    ("Is the small thing the same material as the cube; is it?", "no", 3,
     _prog("scene", "filter_size[small]", "unique", "same_material", "equal_material")),
    ("Are there more cubes than spheres, or fewer?", "yes", 4,
     _prog("scene", "filter_shape[cube]", "count", "greater_than")),
    ("Are there any green spheres?", "no", 0, _prog("scene", "filter_color[green]", "filter_shape[sphere]", "exist")),
    ("How many rubber things are there?", "3", 1, _prog("scene", "filter_material[rubber]", "count")),
    ("What color is the small cube?", "red", 2,
     _prog("scene", "filter_size[small]", "filter_shape[cube]", "unique", "query_color")),
]
VAL = [
    ("How many cubes are there?", "1", 1, _prog("scene", "filter_shape[cube]", "count")),
    ("Are there any blue spheres?", "yes", 0, _prog("scene", "filter_color[blue]", "filter_shape[sphere]", "exist")),
    ("What color is the large cube?", "purple", 2,
     _prog("scene", "filter_size[large]", "filter_shape[cube]", "unique", "query_color")),
]
TEST = [("Are there any red things?", 0), ("How many cylinders are there?", 1), ("What color is the ball?", 99)]
HUMANS = [("Which object is the shiniest of them all?", "gray"), ("Is the sphere metallic?", "maybe")]


def _image(index: int, size: tuple[int, int], rgba: bool) -> Image.Image:
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), np.full_like(x, 40 * index % 256)], -1)
    base[h // 3: 2 * h // 3, w // 4: w // 2] = [(90 * index) % 256, 200, (255 - 60 * index) % 256]
    img = base.astype(np.uint8)
    if rgba:
        img = np.concatenate([img, np.full((h, w, 1), 255, np.uint8)], -1)  # opaque, like CLEVR
    return Image.fromarray(img, "RGBA" if rgba else "RGB")


def _write_images(root: Path, split: str, count: int, jpeg_at: int = -1, rgb_at: int = -1) -> list[str]:
    d = root / "images" / split
    d.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        if i == jpeg_at:
            name = f"CLEVR_{split}_{i:06d}.jpg"
            _image(i, size, rgba=False).save(d / name, quality=95)
        else:
            name = f"CLEVR_{split}_{i:06d}.png"
            _image(i, size, rgba=i != rgb_at).save(d / name)
        names.append(name)
    return names


def _dump(path: Path, questions, *, bare: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = questions if bare else {"info": {"split": path.stem, "version": "1.0"}, "questions": questions}
    path.write_text(json.dumps(body, indent=1))


def make_clevr(root: str | Path) -> dict:
    """Write the fixture under `root`; returns counts and file lists for assertions."""
    root = Path(root)
    train_imgs = _write_images(root, "train", 4, jpeg_at=3, rgb_at=2)
    val_imgs = _write_images(root, "val", 2)
    test_imgs = _write_images(root, "test", 2)
    q = root / "questions"
    train = [{"split": "train", "image_index": i % 4, "image_filename": train_imgs[i % 4], "question_index": i,
              "question": t, "answer": a, "question_family_index": f, "program": p}
             for i, (t, a, f, p) in enumerate(TRAIN)]
    _dump(q / "CLEVR_train_questions.json", train)
    # val names its images by image_index only: the file name must be derived.
    val = [{"split": "val", "image_index": i % 2, "question_index": i, "question": t, "answer": a,
            "question_family_index": f, "program": p} for i, (t, a, f, p) in enumerate(VAL)]
    _dump(q / "CLEVR_val_questions.json", val)
    test = [{"split": "test", "image_index": i % 2, "image_filename": test_imgs[i % 2], "question_index": i,
             "question": t, "question_family_index": f} for i, (t, f) in enumerate(TEST)]
    _dump(q / "CLEVR_test_questions.json", test)
    humans = [{"image_filename": val_imgs[i % 2], "split": "val", "question": t, "answer": a}
              for i, (t, a) in enumerate(HUMANS)]
    _dump(q / "CLEVR-Humans-val.json", humans, bare=True)
    (root / "scenes").mkdir(exist_ok=True)
    (root / "scenes" / "CLEVR_train_scenes.json").write_text(json.dumps({"info": {}, "scenes": []}))
    return {"root": root, "train_images": train_imgs, "val_images": val_imgs, "test_images": test_imgs,
            "questions": {"train": len(TRAIN), "val": len(VAL), "test": len(TEST), "CLEVR-Humans-val": len(HUMANS)}}
