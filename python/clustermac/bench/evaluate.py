"""Retrieval evaluation: average precision and the Oxford/Paris protocols.

Three entry points:

* :func:`average_precision` -- one ranked list, Oxford's ``compute_ap``: the area under the
  precision/recall curve by the trapezoid rule, with precision 1 at recall 0, and "junk"
  images removed from the list before ranks are counted.
* :func:`compute_map` -- many queries at once from a database x queries array of ranked
  indices and a ground truth with ``ok``/``junk`` index lists per query, following the
  conventions of the revisited Oxford/Paris evaluation (Radenovic et al., CVPR 2018): a
  query without positives gets AP = NaN and is left out of the mean.
* :func:`revisited_map` -- the Easy / Medium / Hard protocols of the revisited datasets.

:func:`paired_bootstrap_interval` says whether one method's per-query APs beat another's by more
than chance: the 95 % interval of the mean difference, resampling queries.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["average_precision", "compute_map", "paired_bootstrap_interval", "revisited_map"]


def _trapezoid_ap(positive_ranks: np.ndarray, n_positives: int) -> float:
    """AP from the 0-based ranks (junk already removed, ascending) of the retrieved positives.

    The j-th retrieved positive (0-based) at rank r adds one trapezoid of width 1/n_positives
    between precision j/r (the precision just before it; 1 when r = 0) and (j+1)/(r+1).
    Positives never retrieved add nothing, so recall stops short of 1.
    """
    if positive_ranks.size == 0:
        return 0.0
    ranks = positive_ranks.astype(np.float64)
    order = np.arange(ranks.size, dtype=np.float64)
    precision_before = np.ones_like(ranks)
    nonzero = ranks > 0
    precision_before[nonzero] = order[nonzero] / ranks[nonzero]
    precision_after = (order + 1.0) / (ranks + 1.0)
    return float(np.sum(precision_before + precision_after) / (2.0 * n_positives))


def average_precision(
    ranked: Sequence[Hashable],
    positives: Collection[Hashable],
    junk: Collection[Hashable] = (),
) -> float:
    """Average precision of one ranked list, as Oxford's ``compute_ap``.

    Args:
        ranked: the retrieved items, best first (image names or indices; any hashable).
            Items must be distinct.
        positives: the items that count as correct. Positives missing from ``ranked`` still
            count in the recall denominator.
        junk: items ignored entirely: removed from ``ranked`` before ranks are counted, so they
            neither help nor hurt. Must not overlap ``positives``.

    Returns:
        AP in [0, 1] by the trapezoid rule with precision 1 at recall 0; NaN when
        ``positives`` is empty (AP is undefined; :func:`compute_map` leaves such queries out).

    Raises:
        ValueError: duplicate items in ``ranked``, or an item both positive and junk.

    Example: ranked [a, x, b] with positives {a, b} gives 0.791667.
    """
    ranked_list = list(ranked)
    positive_set = set(positives)
    junk_set = set(junk)
    if len(set(ranked_list)) != len(ranked_list):
        seen: set = set()
        duplicate = next(item for item in ranked_list if item in seen or seen.add(item))
        raise ValueError(f"ranked: item {duplicate!r} appears more than once; expected distinct items")
    overlap = positive_set & junk_set
    if overlap:
        raise ValueError(
            f"positives and junk overlap in {len(overlap)} item(s), e.g. {next(iter(overlap))!r}; "
            "expected disjoint collections"
        )
    if not positive_set:
        return math.nan
    positive_ranks = []
    rank = 0  # rank among non-junk items only
    for item in ranked_list:
        if item in junk_set:
            continue
        if item in positive_set:
            positive_ranks.append(rank)
        rank += 1
    return _trapezoid_ap(np.asarray(positive_ranks, dtype=np.int64), len(positive_set))


def _index_array(value: Any, what: str) -> np.ndarray:
    """A ground-truth index list as a 1-D int64 array (ValueError naming ``what`` otherwise)."""
    array = np.asarray(value if value is not None else [])
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_)):
        raise ValueError(
            f"{what}: expected a flat list of integer image indices, received "
            f"{array.dtype} array of shape {array.shape}"
        )
    return array.astype(np.int64, copy=False)


def _check_ranks(ranks: Any, n_queries: int) -> np.ndarray:
    """Validate the database x queries ranks array; returns it as int64."""
    array = np.asarray(ranks)
    if array.ndim != 2:
        raise ValueError(f"ranks: expected a 2-D array (database images x queries), received shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"ranks: expected integer image indices, received dtype {array.dtype}")
    if array.shape[1] != n_queries:
        raise ValueError(
            f"ranks: has {array.shape[1]} columns but gnd has {n_queries} queries; expected one "
            "column per query (shape database images x queries; transpose a queries x database array)"
        )
    # No dtype conversion: a full database x queries array can be large (1M x 70 ranks).
    if array.size and array.min() < 0:
        raise ValueError(f"ranks: contains negative index {array.min()}; expected indices >= 0")
    return array


def _check_distinct(column: np.ndarray, query: int) -> None:
    """A repeated image would be counted twice as a hit; O(n) with a count per index."""
    if column.size <= 1:
        return
    if column.max() < 8 * column.size + 1024:
        repeated = np.bincount(column).max() > 1
    else:  # sparse huge indices: sort instead of a count array sized by the largest index
        repeated = np.unique(column).size != column.size
    if repeated:
        raise ValueError(
            f"ranks: column {query} (query {query}) lists an image more than once; expected each "
            "column to rank distinct images"
        )


def _query_positives_and_junk(entry: Mapping, query: int) -> tuple[np.ndarray, np.ndarray]:
    """Positives and junk of one classic ground-truth entry ('ok'/'junk').

    An entry with only the revisited keys is read with the Medium protocol (easy + hard)."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"gnd[{query}]: expected a dict, received {type(entry).__name__}")
    if "ok" in entry:
        positives = _index_array(entry["ok"], f"gnd[{query}]['ok']")
    elif "easy" in entry and "hard" in entry:
        positives = np.concatenate(
            [
                _index_array(entry["easy"], f"gnd[{query}]['easy']"),
                _index_array(entry["hard"], f"gnd[{query}]['hard']"),
            ]
        )
    else:
        raise ValueError(
            f"gnd[{query}]: has keys {sorted(entry)}; expected 'ok' (and optionally 'junk'), "
            "or the revisited 'easy'/'hard'/'junk'"
        )
    junk = _index_array(entry.get("junk"), f"gnd[{query}]['junk']")
    return positives, junk


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping],
    kappas: Sequence[int] = (1, 5, 10),
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean average precision and precision at k over many queries (revisitop conventions).

    Args:
        ranks: integer array of shape (n_ranked, n_queries); column q lists database indices
            best first for query q. It may hold only the top n_ranked of the database: positives
            not listed count as never retrieved.
        gnd: one dict per query with 'ok' (positive database indices) and optionally 'junk'
            (indices ignored, see :func:`average_precision`). A dict with only the revisited
            keys 'easy'/'hard'/'junk' is read as Medium (positives easy + hard).
        kappas: the k of precision at k.

    Returns:
        ``(mean_ap, per_query_aps, mean_precision_at_k, per_query_precision_at_k)``:
        the mean AP over queries that have positives; AP per query (NaN for queries without
        positives); mean precision at each k; and an (n_queries, len(kappas)) array of
        precision at k (NaN rows for queries without positives). Precision at k follows
        revisitop: after removing junk, k is capped at the rank of the last retrieved positive,
        i.e. P@k = (#positives in the top min(k, last positive rank)) / that number; 0 when no
        positive is retrieved. The means are NaN when no query has positives.

    Raises:
        ValueError: wrong shapes or types, repeated images in a column, negative indices,
            non-positive k, a gnd entry without 'ok', or an index both positive and junk.
    """
    gnd_list = list(gnd)
    ranks_array = _check_ranks(ranks, len(gnd_list))
    kappa_array = np.asarray(list(kappas), dtype=np.int64).reshape(-1)
    if kappa_array.size and kappa_array.min() < 1:
        raise ValueError(f"kappas: expected positive integers, received {list(kappas)}")
    n_queries = len(gnd_list)
    aps = np.full(n_queries, np.nan)
    precisions = np.full((n_queries, kappa_array.size), np.nan)
    for query, entry in enumerate(gnd_list):
        column = ranks_array[:, query]
        _check_distinct(column, query)
        positives, junk = _query_positives_and_junk(entry, query)
        if positives.size == 0:
            continue
        overlap = np.intersect1d(positives, junk)
        if overlap.size:
            raise ValueError(f"gnd[{query}]: index {overlap[0]} is both a positive and junk; expected disjoint lists")
        positive_positions = np.flatnonzero(np.isin(column, positives))
        junk_positions = np.flatnonzero(np.isin(column, junk))
        # Junk does not take a rank: shift each positive up by the junk ranked above it.
        positive_ranks = positive_positions - np.searchsorted(junk_positions, positive_positions)
        n_positives = np.unique(positives).size
        aps[query] = _trapezoid_ap(positive_ranks, n_positives)
        if positive_ranks.size == 0:
            precisions[query] = 0.0
            continue
        one_based = positive_ranks + 1
        capped_k = np.minimum(one_based.max(), kappa_array)
        precisions[query] = (one_based[None, :] <= capped_k[:, None]).sum(axis=1) / capped_k
    evaluated = ~np.isnan(aps)
    if evaluated.any():
        mean_ap = float(aps[evaluated].mean())
        mean_precision = precisions[evaluated].mean(axis=0)
    else:
        mean_ap = math.nan
        mean_precision = np.full(kappa_array.size, np.nan)
    return mean_ap, aps, mean_precision, precisions


def revisited_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping],
    kappas: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, Any]]:
    """The Easy / Medium / Hard protocols of revisited Oxford and Paris (Radenovic et al. 2018).

    Args:
        ranks: as in :func:`compute_map`.
        gnd: one dict per query with 'easy', 'hard' and 'junk' index lists (other keys such as
            'bbx' are ignored).
        kappas: the k of precision at k.

    Returns:
        ``{'easy': ..., 'medium': ..., 'hard': ...}``, each a dict with 'map' (float),
        'aps' (per-query AP, NaN where the protocol leaves the query without positives),
        'mp@k' (mean precision at each k) and 'pr@k' (per-query precision at k), where

        * Easy: positives = easy; junk = junk + hard.
        * Medium: positives = easy + hard; junk = junk.
        * Hard: positives = hard; junk = junk + easy.
    """
    gnd_list = list(gnd)
    protocols: dict[str, list[dict[str, np.ndarray]]] = {"easy": [], "medium": [], "hard": []}
    for query, entry in enumerate(gnd_list):
        if not isinstance(entry, Mapping):
            raise ValueError(f"gnd[{query}]: expected a dict, received {type(entry).__name__}")
        missing = [key for key in ("easy", "hard", "junk") if key not in entry]
        if missing:
            raise ValueError(
                f"gnd[{query}]: missing {missing}; expected the revisited keys 'easy', 'hard' and "
                "'junk' (a classic 'ok'/'junk' ground truth has no Easy/Hard split: use compute_map)"
            )
        easy = _index_array(entry["easy"], f"gnd[{query}]['easy']")
        hard = _index_array(entry["hard"], f"gnd[{query}]['hard']")
        junk = _index_array(entry["junk"], f"gnd[{query}]['junk']")
        protocols["easy"].append({"ok": easy, "junk": np.concatenate([junk, hard])})
        protocols["medium"].append({"ok": np.concatenate([easy, hard]), "junk": junk})
        protocols["hard"].append({"ok": hard, "junk": np.concatenate([junk, easy])})
    results: dict[str, dict[str, Any]] = {}
    for protocol, protocol_gnd in protocols.items():
        mean_ap, aps, mean_precision, precisions = compute_map(ranks, protocol_gnd, kappas)
        results[protocol] = {"map": mean_ap, "aps": aps, "mp@k": mean_precision, "pr@k": precisions}
    return results


def paired_bootstrap_interval(
    differences: np.ndarray, resamples: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of paired per-query differences.

    ``differences`` holds, per query, one method's AP minus another's on the same query (NaN for
    a query without positives: left out). Queries are resampled with replacement ``resamples``
    times (NumPy ``default_rng(seed)``: same input and seed, same interval); the interval is the
    central ``level`` share of the resampled means. An interval above 0 means the first method
    is better beyond what the choice of queries explains.

    Raises ``ValueError`` when no difference is finite, ``resamples`` < 1 or ``level`` is not in (0, 1).
    """
    diff = np.asarray(differences, dtype=np.float64).reshape(-1)
    diff = diff[~np.isnan(diff)]
    if diff.size == 0 or not np.isfinite(diff).all():
        raise ValueError("differences: expected at least one finite per-query difference (NaN ones are left out)")
    if isinstance(resamples, bool) or int(resamples) != resamples or resamples < 1:
        raise ValueError(f"resamples: expected a positive int, got {resamples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a share in (0, 1), got {level!r}")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(int(resamples), diff.size))].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    return float(np.percentile(means, tail)), float(np.percentile(means, 100.0 - tail))
