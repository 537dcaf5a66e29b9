"""Ensemble uncertainty: per-instance t-test confidence, "I don't know" and hardness.

"Looking for controversy: an ensemble approach to epistemic uncertainty" (2022). An ensemble
of ``E`` members (bootstrap / seed / architecture perturbations of training) gives, for every
instance and every real-valued output ``O`` (a class logit in one-vs-rest form), ``E`` draws
``O_1..O_E`` taken as samples of ``N(mu, sigma^2)``. A one-sample t-test of ``mu = 0``
(eqs. 1-3)::

    t = Obar / (S / sqrt(E)),   Obar = (1/E) sum_i O_i,   S^2 = (1/(E-1)) sum_i (O_i - Obar)^2

with ``p`` its two-sided p-value (Student's t, ``E - 1`` degrees of freedom) gives the
**confidence** ``c = -sign(Obar) * log p`` (eq. 4): large positive when the members agree that
the output is positive, large negative when they agree it is negative, near 0 when they
dispute it. Two thresholds ``-tau < 0 < tau`` turn ``c`` into ``+1``, ``-1`` or ``0`` = "I
don't know" (IDK).

For ``C`` classes every class gets its own confidence from its one-vs-rest logit
(:func:`one_vs_rest`); the **prediction set** is the classes whose confidence is above ``tau``,
or, when none is, the classes within ``margin`` of the most confident one. An instance whose
prediction set does not hold exactly one class is **hard** (and its class answer is IDK).

Edge cases (documented, tested): members that agree exactly (``S = 0``) give ``p = 0`` when
``Obar != 0`` and ``p = 1`` when ``Obar = 0``; confidences are capped at ``+-max_conf`` so they
stay finite. ``log p`` is computed as ``log 2 + log sf(|t|)`` so tiny p-values keep precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "one_vs_rest",
    "ttest_confidence",
    "decide",
    "ClassDecision",
    "class_decision",
    "bit_agreement",
    "majority_bits",
    "DEFAULT_TAU",
]

#: the default threshold: |confidence| above -log(0.05), i.e. the members' mean differs from 0
#: at the 5 % level
DEFAULT_TAU = float(-np.log(0.05))
MAX_CONF = 700.0  # ~ -log of the smallest positive double


def one_vs_rest(logits: np.ndarray) -> np.ndarray:
    """Softmax logits ``(..., C)`` -> one-vs-rest log-odds ``log p_c - log(1 - p_c)``, i.e.
    ``z_c - logsumexp_{j != c} z_j`` (positive when class ``c`` is more likely than not)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.shape[-1] < 2:
        raise ValueError(f"one_vs_rest needs at least 2 classes, got logits of shape {z.shape}")
    out = np.empty_like(z)
    for c in range(z.shape[-1]):
        rest = np.delete(z, c, axis=-1)
        m = rest.max(axis=-1, keepdims=True)
        lse = (m + np.log(np.exp(rest - m).sum(axis=-1, keepdims=True)))[..., 0]
        out[..., c] = z[..., c] - lse
    return out


def ttest_confidence(outputs: np.ndarray, max_conf: float = MAX_CONF) -> np.ndarray:
    """Eq. 4 confidence of ``E`` member outputs: ``outputs`` is ``(E, ...)``; returns ``(...)``
    float64 ``-sign(Obar) * log p`` with ``p`` the two-sided one-sample t-test p-value of
    ``mu = 0``, capped at ``+-max_conf``. Needs ``E >= 2``."""
    from scipy.stats import t as student_t

    o = np.asarray(outputs, dtype=np.float64)
    e = o.shape[0] if o.ndim else 0
    if e < 2:
        raise ValueError(f"the t-test needs at least 2 ensemble members, got {e}; train with --ensemble E >= 2")
    mean = o.mean(axis=0)
    sd = o.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / (sd / np.sqrt(e))
    t = np.where((sd == 0) & (mean == 0), 0.0, t)  # identical zeros: no evidence either way
    log_p = np.log(2.0) + student_t.logsf(np.abs(t), df=e - 1)  # two-sided, in log space
    log_p = np.minimum(log_p, 0.0)  # p <= 1 (rounding)
    conf = -np.sign(mean) * log_p
    return np.clip(np.nan_to_num(conf, nan=0.0, posinf=max_conf, neginf=-max_conf), -max_conf, max_conf)


def decide(conf: np.ndarray, tau: float = DEFAULT_TAU, tau_neg: float | None = None) -> np.ndarray:
    """Three-way decision of confidences: ``+1`` above ``tau``, ``-1`` below ``-tau`` (or
    ``tau_neg``), ``0`` = I don't know in between. int8, the shape of ``conf``."""
    lo = -tau if tau_neg is None else tau_neg
    if not lo <= tau:
        raise ValueError(f"thresholds must satisfy tau_neg <= tau, got {lo} > {tau}")
    c = np.asarray(conf)
    return np.where(c > tau, 1, np.where(c < lo, -1, 0)).astype(np.int8)


@dataclass
class ClassDecision:
    """Per-instance class answer of an ensemble (arrays over the ``N`` instances)."""

    confidence: np.ndarray  # (N, C) float64 eq. 4 confidence per class
    decision: np.ndarray  # (N, C) int8 +1 / -1 / 0 (IDK) per class
    prediction_set: np.ndarray  # (N, C) bool
    predicted: np.ndarray  # (N,) int64 the most confident class
    idk: np.ndarray  # (N,) bool: the prediction set is not exactly one class
    hardness: np.ndarray  # (N,) float64 in (0, 1]: 1 / (1 + best - second-best confidence)

    @property
    def hard(self) -> np.ndarray:
        return self.idk

    @classmethod
    def concat(cls, parts: "list[ClassDecision]", num_classes: int = 0) -> "ClassDecision":
        """The decisions of consecutive batches as one (``num_classes`` shapes an empty result)."""
        if not parts:
            c = int(num_classes)
            return cls(
                np.zeros((0, c)),
                np.zeros((0, c), np.int8),
                np.zeros((0, c), bool),
                np.zeros(0, np.int64),
                np.zeros(0, bool),
                np.zeros(0),
            )
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in _DECISION_FIELDS))

    def take(self, rows) -> "ClassDecision":
        """The decisions of instances ``rows`` (an index array or a boolean mask)."""
        return ClassDecision(*(getattr(self, f)[rows] for f in _DECISION_FIELDS))

    def __len__(self) -> int:
        return int(self.predicted.shape[0])

    def sets(self) -> list[list[int]]:
        """The prediction set of each instance as a list of class indices (best first)."""
        out = []
        for row, conf in zip(self.prediction_set, self.confidence):
            idx = np.flatnonzero(row)
            out.append(idx[np.argsort(-conf[idx], kind="stable")].tolist())
        return out


_DECISION_FIELDS = ("confidence", "decision", "prediction_set", "predicted", "idk", "hardness")


def class_decision(
    member_logits: np.ndarray, tau: float = DEFAULT_TAU, margin: float = 1.0, max_conf: float = MAX_CONF
) -> ClassDecision:
    """Class answer from member logits ``(E, N, C)`` (softmax logits; converted with
    :func:`one_vs_rest`). Prediction set: classes with confidence above ``tau``; when there is
    none, the classes within ``margin`` of the most confident one."""
    z = np.asarray(member_logits, dtype=np.float64)
    if z.ndim != 3:
        raise ValueError(f"member logits must be (E, N, C), got shape {z.shape}")
    conf = ttest_confidence(one_vs_rest(z), max_conf)
    dec = decide(conf, tau)
    pos = dec > 0
    best = conf.max(axis=1)
    near = conf >= (best - margin)[:, None]
    pset = np.where(np.asarray(pos.any(axis=1))[:, None], pos, near)
    srt = np.sort(conf, axis=1)
    gap = srt[:, -1] - srt[:, -2] if conf.shape[1] > 1 else np.full(len(conf), np.inf)
    return ClassDecision(
        confidence=conf,
        decision=dec,
        prediction_set=pset,
        predicted=np.argmax(conf, axis=1).astype(np.int64),
        idk=pset.sum(axis=1) != 1,
        hardness=1.0 / (1.0 + gap),
    )


def bit_agreement(member_bits: np.ndarray) -> np.ndarray:
    """``(N, B)`` float64: per instance and bit, the fraction of members that agree with the
    majority (1 = unanimous, 0.5 = an even split). ``member_bits`` is ``(E, N, B)`` 0/1."""
    b = np.asarray(member_bits).astype(np.float64)
    if b.ndim != 3:
        raise ValueError(f"member bits must be (E, N, B), got shape {b.shape}")
    ones = b.mean(axis=0)
    return np.maximum(ones, 1.0 - ones)


def majority_bits(member_bits: np.ndarray, primary: int = 0) -> np.ndarray:
    """``(N, B)`` bool majority vote over members, ties broken by member ``primary``."""
    b = np.asarray(member_bits).astype(bool)
    ones = b.sum(axis=0)
    e = b.shape[0]
    return np.where(2 * ones == e, b[primary], 2 * ones > e)
