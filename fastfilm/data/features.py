"""Precomputed image features (e.g. ResNet-101 conv4 maps) read in place, never copied.

Where they live: `DATA/features/<dir>.npy` or `DATA/features/<dir>_features.h5`, where <dir>
is the image directory under DATA/images (`train`, `val`, `trainA`, ...: the split's name in
CLEVR's layout). The HDF5 name is the one clevr-iep's extract_features.py writes
(`train_features.h5`, a dataset named `features`), so its files only need moving. Keying by
image directory rather than question file lets CLEVR-Humans questions, which are about CLEVR's
val images, use `val`'s features.

What they hold: [N, C, H, W] float16 or float32, row i the feature of the image whose file name
ends in the number i (`CLEVR_val_000123.png` -> row 123), which is the order extract_features.py
writes them in. A `.npy` file is memory-mapped; an HDF5 file is read with h5py (an optional
dependency, `pip install 'fastfilm[features]'`) a batch of rows at a time. Both are read only
where a batch needs them, so a 50 GB file costs no memory up front.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fastfilm.errors import UserError

DIR = "features"
DATASET = "features"  # the HDF5 dataset name clevr-iep writes
DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_NUMBER = re.compile(r"(\d+)$")


def candidates(data: str | Path, image_dir: str) -> list[Path]:
    """The two names a feature file of DATA/images/<image_dir> may have: [.npy, .h5]."""
    d = Path(data) / DIR
    return [d / f"{image_dir}.npy", d / f"{image_dir}_features.h5"]


def find(data: str | Path, image_dir: str) -> Path | None:
    """The feature file of DATA/images/<image_dir>, None if there is none; UserError if both names exist."""
    found = [p for p in candidates(data, image_dir) if p.is_file()]
    if len(found) > 1:
        raise UserError(f"{data}: two feature files for images/{image_dir}: {found[0]} and {found[1]}; keep one")
    return found[0] if found else None


def image_number(file: str) -> int:
    """The row of an image in its directory's feature file: the number its name ends in."""
    m = _NUMBER.search(Path(file).stem)
    if m is None:
        raise UserError(f"image {file}: features are matched to images by the number their file name ends in "
                        "(CLEVR_val_000123.png -> row 123), and this name has none")
    return int(m.group(1))


def _h5py(path: Path):
    try:
        import h5py  # optional dependency: only HDF5 feature files need it
    except ImportError:
        raise UserError(f"{path}: reading HDF5 features needs h5py: pip install h5py (or 'fastfilm[features]'), "
                        f"or save the array as {path.with_name(path.name.replace('_features.h5', '.npy'))}") from None
    return h5py


class FeatureFile:
    """One feature file, open for reading rows: `shape` [N, C, H, W], `dtype` float16/float32."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        self.format = "hdf5" if path.suffix in (".h5", ".hdf5") else "npy"
        try:
            if self.format == "npy":
                self.array = np.load(path, mmap_mode="r")
            else:
                self._file = _h5py(path).File(path, "r")
                if DATASET not in self._file:
                    raise UserError(f"{path}: no dataset named {DATASET!r} (it has: {', '.join(self._file) or 'none'})")
                self.array = self._file[DATASET]
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable feature file ({e})") from None
        self.shape, self.dtype = tuple(self.array.shape), np.dtype(self.array.dtype)
        if len(self.shape) != 4 or self.dtype not in DTYPES:
            raise UserError(f"{path}: features must be [N, C, H, W] float16 or float32, found {list(self.shape)} "
                            f"{self.dtype}")

    def read(self, rows: np.ndarray) -> np.ndarray:
        """rows [n] int (any order, repeats allowed) -> [n, C, H, W] in the file's dtype."""
        rows = np.asarray(rows, dtype=np.int64)
        # Increasing and distinct: what h5py's point selection requires, and in a memory map
        # it reads the file front to back.
        uniq, inverse = np.unique(rows, return_inverse=True)
        if len(uniq) and not 0 <= uniq[0] <= uniq[-1] < self.shape[0]:
            raise IndexError(f"{self.path}: rows {uniq[0]}..{uniq[-1]} outside 0..{self.shape[0] - 1}")
        block = np.asarray(self.array[uniq])
        return block if np.array_equal(uniq, rows) else block[inverse.reshape(-1)]

    def __len__(self) -> int:
        return self.shape[0]


class FeatureView:
    """The feature of each image row of a cached split: file rows `rows` [I] of `file`.
    Shaped like the images it stands for: `shape` [I, C, H, W]."""

    def __init__(self, file: FeatureFile, rows: np.ndarray):
        self.file, self.rows = file, np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), *self.file.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.file.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, image_rows: np.ndarray) -> np.ndarray:
        """image_rows [n] (rows of the split's images) -> [n, C, H, W] features."""
        return self.file.read(self.rows[image_rows])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Every row, read into memory (the loader's `resident` mode)."""
        out = self.take(np.arange(len(self.rows)))
        return out if dtype is None else out.astype(dtype)


# ------------------------------------------------------------------ the cache's record of a file


def match_rows(data: Path, split: str, question_file: Path, files: list[str],
               skip_bad: bool) -> tuple[np.ndarray, list[tuple[int, str]], dict]:
    """The feature row of each image of a split, `files` [I] relative to DATA/images.

    Returns (rows [I] int64, 0 where there is none; the images without a row as (index,
    reason), which raise UserError unless skip_bad; the record of the file that the cache
    keeps in meta.json to find it again and to see when it changes).
    """
    dirs = sorted({f.split("/")[0] for f in files})
    if len(dirs) != 1:
        raise UserError(f"{question_file}: split {split!r} is about images in {len(dirs)} directories "
                        f"({', '.join(dirs[:4])}); features are read from one file per image directory")
    path = find(data, dirs[0])
    if path is None:
        names = " or ".join(str(p.relative_to(data)) for p in candidates(data, dirs[0]))
        raise UserError(f"{data}: no features for the images of split {split!r} (images/{dirs[0]}): expected "
                        f"{names}, [N, C, H, W] float16/float32 with row i for the image numbered i (docs/features.md)")
    file = FeatureFile(path)
    numbers = np.array([image_number(f) for f in files], dtype=np.int64)
    bad = [(i, f"no row {n} in {path} ({len(file)} rows)") for i, n in enumerate(numbers) if n >= len(file)]
    if bad and not skip_bad:
        i, why = bad[0]
        raise UserError(f"image {files[i]} of split {split!r}: {why}"
                        + (f" (and {len(bad) - 1} more images)" if len(bad) > 1 else "")
                        + "; --skip-bad drops their questions")
    st = path.stat()
    record = {"file": str(path.relative_to(data)), "image_dir": dirs[0], "format": file.format,
              "size": st.st_size, "mtime_ns": st.st_mtime_ns, "shape": list(file.shape), "dtype": str(file.dtype)}
    return np.where(numbers < len(file), numbers, 0), bad, record


def changed(data: Path, record: dict) -> str | None:
    """Why DATA's feature file is no longer the one `record` describes (another size or
    mtime, gone, or replaced by a file of the other name), else None."""
    recorded = data / record["file"]
    now = find(data, record["image_dir"])
    if now is None:
        return f"its feature file {recorded} is gone"
    st = now.stat()
    if now != recorded or (st.st_size, st.st_mtime_ns) != (record["size"], record["mtime_ns"]):
        return f"feature file {now} changed since it was built"
    return None


def open_view(data: Path, record: dict, rows: np.ndarray) -> FeatureView:
    """The features of a cached split: the file `record` names, checked against it."""
    path = data / record["file"]
    rebuild = f"`fastfilm preprocess {data} --input features`"
    if not path.is_file():
        raise UserError(f"{path}: the feature file this cache reads is gone; put it back or rebuild the cache ({rebuild})")
    file = FeatureFile(path)
    if [*file.shape] != record["shape"] or str(file.dtype) != record["dtype"]:
        raise UserError(f"{path}: now {list(file.shape)} {file.dtype}, the cache was built for {record['shape']} "
                        f"{record['dtype']}; rebuild it ({rebuild})")
    return FeatureView(file, rows)


def check_channels(channels: int, shape: tuple[int, ...], where: str) -> None:
    """The model's --feature-channels must be the files' C (shape [.., C, H, W])."""
    if shape[1] != channels:
        raise UserError(f"{where}: features have {shape[1]} channels and the model expects {channels}; "
                        f"train with --feature-channels {shape[1]}")
