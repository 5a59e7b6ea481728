"""The learning-rate schedule: a linear warm-up, then constant, cosine or linear decay to
zero at the end of the run's budget.

The budget is the epoch budget (`total_steps` = epochs x steps per epoch) or the time budget
(--max-minutes), whichever ends first: the run's progress is

    progress = max(step / total_steps, elapsed_s / budget_s)        in [0, 1]

and the learning rate at a step is

    lr = base_lr x warm x decay(progress)
    warm = min(1, (step + 1) / warmup_steps)   or   min(1, progress / warmup_fraction)
    decay(p) = 1 (constant) | (1 + cos(pi p)) / 2 (cosine) | 1 - p (linear)

A time-based decay needs the clock, which is not the same in a resumed run or on another
rank: the schedule reads it only through `observe(elapsed_s)`, which the trainer calls with
the time all ranks agree on (rank 0's), and keeps the last reading as its state. Everything
else is a function of the step, so that `state_dict()` saved in last.pt and
`load_state_dict()` on resume continue the same sequence of learning rates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from fastfilm.config import parse_warmup

SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class LRSchedule:
    """lr(step) for a run; see the module docstring.

    base_lr: the peak learning rate; kind: constant | cosine | linear; total_steps: the epoch
    budget in optimizer steps (0: none); budget_s: the time budget in seconds (0: none);
    warmup_steps / warmup_fraction: the warm-up (at most one of them non-zero).
    """
    base_lr: float
    kind: str = "constant"
    total_steps: int = 0
    budget_s: float = 0.0
    warmup_steps: int = 0
    warmup_fraction: float = 0.0
    time_progress: float = 0.0   # the last clock reading as a share of budget_s (state)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"kind must be one of {SCHEDULES}, got {self.kind!r}")
        if self.warmup_steps and self.warmup_fraction:
            raise ValueError("give warmup_steps or warmup_fraction, not both")

    def observe(self, elapsed_s: float) -> None:
        """The run's elapsed time (the same value on every rank) for the time-based progress."""
        if self.budget_s > 0:
            self.time_progress = min(max(elapsed_s / self.budget_s, 0.0), 1.0)

    def progress(self, step: int) -> float:
        """How far through the budget the run is at `step` (0-based optimizer steps): [0, 1]."""
        by_steps = step / self.total_steps if self.total_steps > 0 else 0.0
        return min(max(by_steps, self.time_progress), 1.0)

    def factor(self, step: int) -> float:
        """lr(step) / base_lr."""
        p = self.progress(step)
        if self.warmup_steps:
            warm = min(1.0, (step + 1) / self.warmup_steps)
        elif self.warmup_fraction:
            # At least one step's worth, so that the first step does not get lr 0.
            first = 1 / self.total_steps if self.total_steps > 0 else 0.0
            warm = min(1.0, max(p, first) / self.warmup_fraction)
        else:
            warm = 1.0
        if self.kind == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * p))
        elif self.kind == "linear":
            decay = 1 - p
        else:
            decay = 1.0
        return warm * decay

    def lr(self, step: int) -> float:
        return self.base_lr * self.factor(step)

    def apply(self, optimizer, step: int) -> float:
        """Set every parameter group's lr for optimizer step `step`; returns it."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    @property
    def reads_clock(self) -> bool:
        """Whether the learning rate depends on elapsed time (else on the step alone)."""
        return self.budget_s > 0 and (self.kind != "constant" or self.warmup_fraction > 0)

    @classmethod
    def for_run(cls, lr: float, kind: str, warmup: str, *, steps_per_epoch: int, epochs: int,
                max_minutes: float) -> LRSchedule:
        """The schedule of a run: lr, --lr-schedule, --warmup ('200' or '5%'), its budgets."""
        warmup_steps, warmup_fraction = parse_warmup(warmup)
        return cls(base_lr=lr, kind=kind, total_steps=steps_per_epoch * epochs, budget_s=max_minutes * 60,
                   warmup_steps=warmup_steps, warmup_fraction=warmup_fraction)

    def state_dict(self) -> dict:
        return {"time_progress": self.time_progress}

    def load_state_dict(self, state: dict) -> None:
        self.time_progress = float(state.get("time_progress", 0.0))
