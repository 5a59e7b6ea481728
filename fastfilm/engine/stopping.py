"""Early stopping on a smoothed validation accuracy, and the spread that says how noisy it is.

One epoch's validation accuracy moves with the noise of a finite validation set and of the
batch-norm statistics; stopping on it (or keeping its best) rewards whichever epoch the noise
favoured. The rule here watches the mean of the last `window` complete epochs' accuracies:
an epoch whose mean beats every earlier mean resets the count, any other epoch adds one, and
training stops when the count reaches the patience. Counting starts once `window` epochs
exist, so that a mean of fewer (as noisy as they are) never sets the mark to beat.
window=1 is the single-epoch rule.
"""
from __future__ import annotations

from dataclasses import dataclass


def smoothed(history: list[float], window: int) -> float:
    """Mean of the last `window` values of history (all of them while there are fewer)."""
    if not history:
        raise ValueError("no accuracies yet")
    recent = history[-max(window, 1):]
    return sum(recent) / len(recent)


def spread(history: list[float], window: int) -> float:
    """max - min of the last `window` values (0 with fewer than two)."""
    recent = history[-max(window, 1):]
    return max(recent) - min(recent) if len(recent) > 1 else 0.0


@dataclass
class Stopping:
    """The rule's state; lives in the trainer's Progress so that resume continues it."""
    best: float = -1.0      # best smoothed accuracy so far
    stale: int = 0          # complete epochs since it last improved

    def update(self, history: list[float], window: int) -> bool:
        """Account for the epoch that just appended its accuracy to `history`; True if the
        smoothed accuracy improved."""
        if len(history) < window:
            return False
        value = smoothed(history, window)
        if value > self.best:
            self.best, self.stale = value, 0
            return True
        self.stale += 1
        return False

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.stale >= patience
