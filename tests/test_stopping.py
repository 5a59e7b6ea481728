"""Early stopping on a smoothed validation accuracy (engine/stopping.py), on synthetic sequences."""
from __future__ import annotations

import pytest

from fastfilm.engine.stopping import Stopping, smoothed, spread


def run_rule(accuracies: list[float], window: int, patience: int) -> int | None:
    """The epoch (1-based) after which the rule stops, or None."""
    rule, history = Stopping(), []
    for epoch, acc in enumerate(accuracies, start=1):
        history.append(acc)
        rule.update(history, window)
        if rule.should_stop(patience):
            return epoch
    return None


# Rising with noise: one lucky epoch (0.67 at epoch 2), as in issue 12's table.
NOISY = [0.48, 0.67, 0.51, 0.52, 0.57, 0.60, 0.62, 0.64, 0.65, 0.66]


def test_single_epoch_rule_stops_on_a_lucky_epoch():
    assert run_rule(NOISY, window=1, patience=3) == 5


def test_smoothed_rule_keeps_training_while_the_mean_rises():
    # Means of 3 from epoch 3 on: 0.553, 0.567, 0.533, 0.563, 0.597, 0.62, 0.637, 0.65. The means of
    # the first one and two epochs (0.48, 0.575: the lucky epoch) do not count.
    assert run_rule(NOISY, window=3, patience=3) is None


def test_smoothed_rule_stops_on_a_plateau():
    plateau = [0.50, 0.60, 0.70, 0.74, 0.71, 0.69, 0.70, 0.69, 0.70]
    # Means of 3: epoch 3 0.600, 4 0.680, 5 0.717 (best), 6 0.713, 7 0.700, 8 0.693: three without a better one.
    assert run_rule(plateau, window=3, patience=3) == 8
    # The single-epoch rule stops an epoch earlier: its best is epoch 4, and 5, 6, 7 are worse.
    assert run_rule(plateau, window=1, patience=3) == 7


def test_smoothed_and_spread():
    assert smoothed([0.1, 0.2, 0.3, 0.6], 3) == pytest.approx(0.3667, abs=1e-4)
    assert smoothed([0.4], 3) == 0.4
    assert spread([0.1, 0.5, 0.3, 0.35], 3) == pytest.approx(0.2)
    assert spread([0.5], 3) == 0.0
    with pytest.raises(ValueError):
        smoothed([], 3)


def test_patience_zero_never_stops():
    assert run_rule([0.9, 0.1, 0.1, 0.1, 0.1], window=1, patience=0) is None
