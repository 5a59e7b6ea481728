"""Writing files so that a reader never sees a half-written one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temp file beside `path`, then rename it onto `path`.

    The rename is atomic on POSIX, so `path` is either the old file or the complete new
    one; on any error the temp file is removed. The file gets the usual permissions
    (0666 minus the umask), not mkstemp's private 0600: checkpoints and caches are shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj, indent: int | None = 2) -> Path:
    """Atomically write `obj` as JSON (json.dumps: the C encoder, fast on big files)."""
    text = json.dumps(obj, indent=indent) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
