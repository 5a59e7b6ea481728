"""`fastfilm train --tensorboard`: metrics.jsonl's scalars, also as TensorBoard events.

metrics.jsonl stays the record (plot, analyze and resume read it); this writes a copy of
each of its lines to RUN/tensorboard with torch.utils.tensorboard.SummaryWriter, under the
same names (nested values as `val_per_type/exist`), at the line's optimizer `step`, which
keeps growing when an epoch cut short by --max-minutes is finished after a --resume.
"""
from __future__ import annotations

import sys
from pathlib import Path

SUBDIR = "tensorboard"
STEP = "step"  # the x axis, not itself a scalar


def scalars(line: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics.jsonl line, nested dicts flattened with '/' (booleans as 0/1;
    None, strings and the step left out)."""
    out: dict[str, float] = {}
    for key, value in line.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and name != STEP:
            out[name] = float(value)
    return out


class TensorBoardLog:
    """SummaryWriter over RUN/tensorboard; `open` returns None (after one line on stderr)
    when the tensorboard package is not installed."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, run_dir: Path) -> TensorBoardLog | None:
        try:
            # Optional dependency: torch.utils.tensorboard imports the tensorboard package.
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("fastfilm: --tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                  "writing metrics.jsonl only", file=sys.stderr)
            return None
        return cls(SummaryWriter(log_dir=str(Path(run_dir) / SUBDIR)))

    def write(self, line: dict) -> None:
        """One metrics.jsonl line, flushed (a run may be killed at any time)."""
        for name, value in scalars(line).items():
            self.writer.add_scalar(name, value, global_step=line[STEP])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
