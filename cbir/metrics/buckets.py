"""Metrics over buckets of equal distance: Hamming-radius precision / recall and tie-aware AP.

Both group the database, per query, by a key shared by tied items (the Hamming distance, or the
whole code for the lexicographic order) and work on per-group relevant / total counts, never on
one ranking, so no figure here depends on the order ties are broken in. Conventions (labels,
orders, queries with no relevant item) are those of :mod:`cbir.metrics.retrieval`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cbir.codes import ORDERS, Codes, rank
from cbir.metrics.retrieval import _check_k, _check_problem, _chunk_rows, _relevance, _words

__all__ = [
    "hamming_counts",
    "lex_counts",
    "PRCurve",
    "precision_recall_by_radius",
    "RadiusPrecision",
    "precision_within_radius",
    "expected_average_precision",
    "tie_aware_average_precisions",
    "tie_aware_average_precision",
]


# --------------------------------------------------------------------------------------------
# Hamming-radius metrics
# --------------------------------------------------------------------------------------------
def hamming_counts(query_codes, query_labels, db_codes, db_labels) -> tuple[np.ndarray, np.ndarray]:
    """Per-query histograms over Hamming distance: ``(n, r)``, both ``(Q, B + 1)`` int64.

    ``n[q, d]`` = database items at Hamming distance exactly ``d`` from query ``q``;
    ``r[q, d]`` = how many of them are relevant. Everything radius- and tie-based derives from
    these (they are the tie groups of the Hamming ranking).
    """
    query_codes, ql, db_codes, dl = _check_problem(query_codes, query_labels, db_codes, db_labels)
    b1 = query_codes.nbits + 1
    nq, n = len(ql), len(dl)
    cnt = np.zeros((nq, b1), dtype=np.int64)
    rcnt = np.zeros((nq, b1), dtype=np.int64)
    dbw = _words(db_codes.packed)
    qw = _words(query_codes.packed)
    step = _chunk_rows(n, dbw.shape[1])
    for s in range(0, nq, step):
        e = min(s + step, nq)
        dist = np.bitwise_count(qw[s:e, None, :] ^ dbw[None, :, :]).sum(axis=2, dtype=np.int64)
        flat = dist + (np.arange(e - s, dtype=np.int64) * b1)[:, None]
        rel = _relevance(ql[s:e], dl)
        cnt[s:e] = np.bincount(flat.ravel(), minlength=(e - s) * b1).reshape(e - s, b1)
        rcnt[s:e] = np.bincount(flat[rel], minlength=(e - s) * b1).reshape(e - s, b1)
    return cnt, rcnt


class PRCurve(NamedTuple):
    """Precision/recall over Hamming radius ``r = 0..B`` (all ``(B + 1,)`` arrays)."""

    radius: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    empty_fraction: np.ndarray


def precision_recall_by_radius(query_codes, query_labels, db_codes, db_labels) -> PRCurve:
    """Precision-recall curve of Hamming-ball retrieval, for every radius ``r = 0..B``.

    For query ``q`` the retrieved set is the ball ``{j : H(q, c_j) <= r}``. Per query,
    ``precision = relevant in ball / size of ball`` (**an empty ball scores 0**) and
    ``recall = relevant in ball / relevant in the database`` (0 when the database holds no
    relevant item); both are averaged over all queries (macro average).
    ``empty_fraction[r]`` is the fraction of queries whose ball of radius ``r`` is empty.
    """
    cnt, rcnt = hamming_counts(query_codes, query_labels, db_codes, db_labels)
    ball = np.cumsum(cnt, axis=1).astype(np.float64)
    rball = np.cumsum(rcnt, axis=1).astype(np.float64)
    prec = np.divide(rball, ball, out=np.zeros_like(ball), where=ball > 0)
    tot = rball[:, -1:]
    rec = np.divide(rball, tot, out=np.zeros_like(rball), where=tot > 0)
    return PRCurve(
        radius=np.arange(cnt.shape[1]),
        precision=prec.mean(axis=0),
        recall=rec.mean(axis=0),
        empty_fraction=(ball == 0).mean(axis=0),
    )


class RadiusPrecision(NamedTuple):
    """Result of :func:`precision_within_radius`."""

    precision: float
    empty_fraction: float


def precision_within_radius(query_codes, query_labels, db_codes, db_labels, r: int = 2) -> RadiusPrecision:
    """P@H<=r: mean over queries of the precision of the Hamming ball of radius ``r``.

    Per query: ``relevant items with H(q, c) <= r / items with H(q, c) <= r``. **A query whose
    ball is empty scores 0** and still counts in the mean. Also returns ``empty_fraction``, the
    fraction of queries with an empty ball, so a low score can be told apart from empty balls.
    ``r`` is clipped to ``B`` (every item lies within radius ``B``).
    """
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
        raise ValueError(f"radius r must be an integer >= 0, got {r!r}")
    pr = precision_recall_by_radius(query_codes, query_labels, db_codes, db_labels)
    rr = min(int(r), len(pr.radius) - 1)
    return RadiusPrecision(float(pr.precision[rr]), float(pr.empty_fraction[rr]))


# --------------------------------------------------------------------------------------------
# tie-aware AP (He, Cakir, Bargal, Sclaroff, CVPR 2018)
# --------------------------------------------------------------------------------------------
def _harmonic(n: int) -> np.ndarray:
    """``H[t] = sum_{s=1..t} 1/s`` for ``t = 0..n``."""
    h = np.zeros(n + 1)
    if n:
        h[1:] = np.cumsum(1.0 / np.arange(1, n + 1))
    return h


def _group_sums(a, n, r, R_before, H):
    """Expected ``sum P@i rel_i`` over a group of ``n`` tied items (``r`` relevant) at ranks
    ``a+1..a+n`` after ``R_before`` relevant items (uniform random order within the group)."""
    a = np.asarray(a, dtype=np.int64)
    n = np.asarray(n, dtype=np.int64)
    r = np.asarray(r, dtype=np.float64)
    s0 = H[a + n] - H[a]  # sum_{t=a+1..a+n} 1/t
    s1 = n - (a + 1) * s0  # sum_{t=a+1..a+n} (t-a-1)/t
    nf = n.astype(np.float64)
    frac = np.divide(r - 1, nf - 1, out=np.zeros_like(r), where=n > 1)
    inner = (R_before + 1) * s0 + frac * s1
    return np.divide(r, nf, out=np.zeros_like(r), where=n > 0) * inner


def expected_average_precision(n_groups, r_groups, k: int | None = None) -> np.ndarray:
    """Tie-aware AP: expected AP@k when items inside each tie group are in uniformly random order.

    ``n_groups``/``r_groups`` are ``(Q, G)`` counts: the ranking is a sequence of ``G`` tie
    groups (for Hamming ranking, group ``d`` = items at distance ``d``) of ``n_d`` items, ``r_d``
    of them relevant. With ``a_d = sum_{j<d} n_j`` items and ``R_d = sum_{j<d} r_j`` relevant
    items ranked before group ``d``, the relevant item at position ``a_d + t`` of a random order
    of the group has ``(t-1)(r_d-1)/(n_d-1)`` other relevant items of its group ahead of it in
    expectation (hypergeometric), so (He et al. 2018, eq. for tie-aware AP)::

        E[sum_i P@i rel_i over group d] = (r_d/n_d) * sum_{t=1..n_d}
                                           (R_d + 1 + (t-1)(r_d-1)/(n_d-1)) / (a_d + t)
                                        = (r_d/n_d) * [(R_d+1) S0 + (r_d-1)/(n_d-1) S1],
        S0 = H(a_d+n_d) - H(a_d),  S1 = n_d - (a_d+1) S0   (H = harmonic numbers; the
                                                          S1 term is 0 when n_d = 1)

    **Full ranking** (``k=None`` or ``k >= N``): ``AP_T = (1/R) sum_d E[...]``, ``R = sum r_d``
    (0 when ``R = 0``). This is exact: ``R`` does not depend on the order.

    **@k** (DeepHash AP@k, normaliser ``R_k`` = relevant in the top ``k``, a random variable):
    let ``g`` be the group cut by rank ``k`` (``a_g < k <= a_g + n_g``), ``m = k - a_g`` of its
    items enter the top ``k``. The number ``Y`` of relevant ones among them is hypergeometric
    ``P(Y=y) = C(r_g,y) C(n_g-r_g,m-y) / C(n_g,m)``, and given ``Y=y`` those ``m`` items are a
    uniformly ordered group of ``m`` items with ``y`` relevant, independent of earlier groups::

        E[AP@k] = sum_y P(Y=y) * (T + E_g(m, y)) / (R_g + y)     (a term is 0 if R_g + y = 0)

    with ``T = sum_{d<g} E[...]`` (as above) and ``E_g(m, y)`` the group formula with ``n = m``,
    ``r = y``, ``a = a_g``, ``R = R_g``. Both equal the mean AP over all orderings of tied items.
    Returns ``(Q,)`` float64.
    """
    n_groups = np.asarray(n_groups)
    r_groups = np.asarray(r_groups)
    if n_groups.ndim != 2 or n_groups.shape != r_groups.shape:
        raise ValueError(
            f"n_groups and r_groups must be (Q, G) arrays of the same shape, got {n_groups.shape} and {r_groups.shape}"
        )
    if n_groups.size and (
        n_groups.dtype.kind not in "iu"
        or r_groups.dtype.kind not in "iu"
        or (r_groups < 0).any()
        or (r_groups > n_groups).any()
    ):
        raise ValueError("group counts must be integers with 0 <= r_d <= n_d")
    n_groups = n_groups.astype(np.int64)
    r_groups = r_groups.astype(np.int64)
    nq = n_groups.shape[0]
    totals = n_groups.sum(axis=1)
    if nq == 0:
        return np.zeros(0)
    N = int(totals.max())
    H = _harmonic(N)
    a = np.cumsum(n_groups, axis=1) - n_groups
    R_before = (np.cumsum(r_groups, axis=1) - r_groups).astype(np.float64)
    contrib = _group_sums(a, n_groups, r_groups, R_before, H)  # (Q, G)
    R = r_groups.sum(axis=1).astype(np.float64)
    if k is None:
        kk = None
    else:
        kk = _check_k(k, N)
    out = np.zeros(nq)
    full = np.ones(nq, dtype=bool) if kk is None else totals <= kk
    s = contrib[full].sum(axis=1)
    out[full] = np.divide(s, R[full], out=np.zeros_like(s), where=R[full] > 0)
    if kk is None:
        return out
    from scipy.special import gammaln

    def lchoose(x, y):
        return gammaln(x + 1) - gammaln(y + 1) - gammaln(x - y + 1)

    for q in np.flatnonzero(~full):
        ends = a[q] + n_groups[q]
        g = int(np.searchsorted(ends, kk))  # first group with a_g + n_g >= k
        ag, ng, rg = int(a[q, g]), int(n_groups[q, g]), int(r_groups[q, g])
        m = kk - ag
        T = float(contrib[q, :g].sum())
        Rg = float(R_before[q, g])
        ys = np.arange(max(0, m - (ng - rg)), min(rg, m) + 1)
        logp = lchoose(rg, ys) + lchoose(ng - rg, m - ys) - lchoose(ng, m)
        p = np.exp(logp)
        eg = _group_sums(np.full(len(ys), ag), np.full(len(ys), m), ys, Rg, H)
        den = Rg + ys
        val = np.divide(T + eg, den, out=np.zeros(len(ys)), where=den > 0)
        out[q] = float((p * val).sum())
    return out


def lex_counts(query_codes, query_labels, db_codes, db_labels) -> tuple[np.ndarray, np.ndarray]:
    """Tie groups of the **lexicographic** ranking: ``(n, r)``, both ``(Q, U)`` int64.

    Two database items tie in the lexicographic order exactly when their codes are equal (the
    order of distinct codes is total), so the groups are the ``U`` distinct database codes, in
    ascending ``q XOR c`` order for each query: ``n[q, j]`` = items sharing the ``j``-th code
    of query ``q``'s ranking, ``r[q, j]`` = how many of them are relevant to ``q``.
    """
    query_codes, ql, db_codes, dl = _check_problem(query_codes, query_labels, db_codes, db_labels)
    uniq, inverse, counts = np.unique(db_codes.packed, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    ucodes = Codes(uniq, db_codes.nbits)
    u, nq = len(uniq), len(ql)
    if ql.ndim == 1:  # per-group class histogram, then one column per query
        classes, dcls = np.unique(dl, return_inverse=True)
        hist = np.zeros((u, len(classes)), dtype=np.int64)
        np.add.at(hist, (inverse, dcls.reshape(-1)), 1)
        pos = np.searchsorted(classes, ql)
        pos_c = np.minimum(pos, len(classes) - 1)
        hit = (pos < len(classes)) & (classes[pos_c] == ql)
    else:
        from scipy.sparse import csr_matrix

        onehot = csr_matrix((np.ones(len(dl)), (np.arange(len(dl)), inverse)), shape=(len(dl), u))
    cnt = np.empty((nq, u), dtype=np.int64)
    rcnt = np.empty((nq, u), dtype=np.int64)
    step = _chunk_rows(u, max(1, db_codes.nbytes))
    for s in range(0, nq, step):
        e = min(s + step, nq)
        order = rank(query_codes[s:e], ucodes, None, order="lex")  # (e - s, U), no ties left
        cnt[s:e] = counts[order]
        if ql.ndim == 1:
            r = np.where(hit[s:e, None], hist[:, pos_c[s:e]].T, 0)
        else:
            r = np.asarray((onehot.T @ _relevance(ql[s:e], dl).T.astype(np.float64)).T).round().astype(np.int64)
        rcnt[s:e] = np.take_along_axis(r, order, axis=1)
    return cnt, rcnt


def tie_aware_average_precisions(
    query_codes, query_labels, db_codes, db_labels, k: int | None = None, order: str = "hamming"
) -> np.ndarray:
    """``(Q,)`` tie-aware AP@k (see :func:`expected_average_precision`).

    ``order="hamming"``: items at equal Hamming distance from the query form a tie group
    (:func:`hamming_counts`; He et al. 2018). ``order="lex"``: items with identical codes form
    a tie group, groups in lexicographic order (:func:`lex_counts`). The score is the expected
    AP@k over all orderings of tied items, so it depends neither on database order nor on the
    tie-break rule. ``k=None`` = whole database.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    counts = hamming_counts if order == "hamming" else lex_counts
    cnt, rcnt = counts(query_codes, query_labels, db_codes, db_labels)
    return expected_average_precision(cnt, rcnt, k)


def tie_aware_average_precision(
    query_codes, query_labels, db_codes, db_labels, k: int | None = None, order: str = "hamming"
) -> float:
    """Tie-aware mAP@k in ``order`` (``"hamming"`` or ``"lex"``): mean over all queries of
    :func:`tie_aware_average_precisions` (queries with no relevant item score 0 and count)."""
    return float(tie_aware_average_precisions(query_codes, query_labels, db_codes, db_labels, k, order).mean())
