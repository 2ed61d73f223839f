"""Plain NumPy references for checking the C++ core, shared by tests and benchmarks."""

from __future__ import annotations

import numpy as np

__all__ = ["ncut_objective"]


def ncut_objective(similarity: np.ndarray, labels: np.ndarray) -> float:
    """The Normalized Cut objective Σ_c cut(A_c, V − A_c) / assoc(A_c, V) of a partition
    (Shi & Malik 2000), self-similarities included, computed in float64."""
    s = np.asarray(similarity, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    total = 0.0
    for c in np.unique(labels):
        inside = labels == c
        assoc = s[inside].sum()
        total += (assoc - s[np.ix_(inside, inside)].sum()) / assoc
    return float(total)
