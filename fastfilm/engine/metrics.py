"""Accuracy overall, per question type and per question family, and the paper's Table 1 layout."""
from __future__ import annotations

import numpy as np

from fastfilm.data.types import QUESTION_TYPES, TYPE_TITLES


def accuracy_report(preds: np.ndarray, answers: np.ndarray, types: np.ndarray, families: np.ndarray) -> dict:
    """{"accuracy", "count", "per_type", "per_family"}; accuracies in 0..1.

    Questions without a ground-truth answer (answer -1, e.g. the test split) are not
    counted; types/families of -1 are reported under "unknown".
    """
    known = answers >= 0
    if not known.any():
        return {"accuracy": None, "count": 0, "per_type": {}, "per_family": {}}
    correct = (preds == answers) & known

    def grouped(keys: np.ndarray, name_of) -> dict:
        out = {}
        for k in np.unique(keys[known]):
            sel = known & (keys == k)
            out[name_of(int(k))] = float(correct[sel].sum() / sel.sum())
        return out

    return {
        "accuracy": float(correct.sum() / known.sum()),
        "count": int(known.sum()),
        "per_type": grouped(types, lambda k: QUESTION_TYPES[k] if k >= 0 else "unknown"),
        "per_family": grouped(families, lambda k: str(k) if k >= 0 else "unknown"),
    }


def format_table(rows: dict[str, dict]) -> str:
    """rows: model name -> accuracy_report. A text table in the paper's Table 1 column order."""
    cols = [("Overall", lambda r: r["accuracy"])]
    cols += [(TYPE_TITLES[t], (lambda t: lambda r: r["per_type"].get(t))(t)) for t in QUESTION_TYPES]
    width = max(len(n) for n in rows) + 2
    lines = [" " * width + " | ".join(f"{c:>17}" for c, _ in cols)]
    for name, report in rows.items():
        cells = [get(report) for _, get in cols]
        lines.append(f"{name:<{width}}" + " | ".join(f"{100 * v:17.1f}" if v is not None else f"{'-':>17}"
                                                  for v in cells))
    return "\n".join(lines)
