"""The class answer of an ensemble model in ``Search`` / ``BatchSearch`` responses (issue 11).

When the served model is an ensemble (:class:`cbir.ensemble.EnsembleHasher`: the encoder calls
its ``encode_ensemble``), every image query gets the class answer of
:func:`cbir.uncertainty.class_decision` in ``SearchResponse.uncertainty``: its hardness, its
"I don't know" flag and its prediction set (class index, name, t-test confidence, most
confident first). Code and id queries have no class answer, and a single model gives none:
the field stays unset and the response is exactly that of a plain search.

``SearchRequest.search_prediction_set`` (default off): an IDK image query searches the subtree
of every class in its prediction set and merges the hits in the engine's total order, with
:func:`cbir.ensemble.search_prediction_set` (called, not copied). The work is bounded: the set
holds at most the model's number of classes, and set size x ``k`` counts against the per-call
hit limit before any search runs.
"""

from __future__ import annotations

from typing import Sequence

import grpc
import numpy as np

from cbir.codes import Codes
from cbir.indexer.results import SearchResult, hamming_to, prefix_len_to
from cbir.v1 import search_pb2 as pb

from .backend import IndexBackend
from .guard import Budget, RpcError, invalid
from .search import response
from .validate import Limits

__all__ = [
    "check_prediction_set_request",
    "check_prediction_set_work",
    "probes_prediction_set",
    "search_prediction_set_one",
    "uncertainty_pb",
]


def check_prediction_set_request(r: pb.SearchRequest, where: str, ensemble: bool) -> None:
    """``search_prediction_set`` only with what it can honour (INVALID_ARGUMENT naming the field
    that conflicts; FAILED_PRECONDITION when the served model is not an ensemble)."""
    if not r.search_prediction_set:
        return
    kind = r.WhichOneof("query")
    if kind != "image":
        what = "a code" if kind == "code" else "an id" if kind == "id" else "no query"
        raise invalid(
            f"{where}search_prediction_set needs an image query (the ensemble's class answer of an "
            f"image); this request has {what}: send the image, or drop search_prediction_set"
        )
    if r.mode != pb.LEXICOGRAPHIC:
        raise invalid(
            f"{where}search_prediction_set merges in the lexicographic order: use mode LEXICOGRAPHIC, "
            "or drop search_prediction_set"
        )
    for name, bad in (("offset", r.offset), ("cursor", r.cursor), ("label_filter", len(r.label_filter))):
        if bad:
            raise invalid(f"{where}search_prediction_set takes no {name}: drop one of the two")
    if not ensemble:
        raise RpcError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{where}search_prediction_set needs an ensemble model, and this server's model is a single "
            "one (or it has none): serve an ensemble checkpoint (cbir train --ensemble E), or drop the flag",
        )


def probes_prediction_set(r: pb.SearchRequest, decision) -> bool:
    """Whether request ``r`` with the 1-row class answer ``decision`` is a prediction-set search."""
    return bool(r.search_prediction_set) and decision is not None and bool(decision.idk[0])


def check_prediction_set_work(lim: Limits, reqs: Sequence[pb.SearchRequest], ks: Sequence[int], decisions) -> None:
    """Refuse before any search a call whose prediction-set searches ((set size + 1) x k each:
    k per class of the set, plus the plain search that fills the answer) and plain searches
    (k + offset) exceed the per-call hit limit (RESOURCE_EXHAUSTED). (An index of at most that
    many items plus :data:`cbir.ensemble.WHOLE_READ_EXTRA_ROWS` is ranked whole by one search
    instead, which costs about what the searches charged do.)"""
    hits = 0
    for r, k, d in zip(reqs, ks, decisions):
        hits += (int(d.prediction_set[0].sum()) + 1) * k if probes_prediction_set(r, d) else int(r.offset) + k
    if hits > lim.max_hits_per_call:
        raise RpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this call's prediction-set searches ask for {hits} ranked hits (k for every class of each "
            f"IDK query's prediction set and k for the plain search that fills its answer), over the per-call work limit of {lim.max_hits_per_call}; lower k "
            "or split the call",
        )


def uncertainty_pb(decision, class_names: Sequence[str], searched: bool) -> pb.QueryUncertainty:
    """The 1-row :class:`cbir.uncertainty.ClassDecision` as a ``QueryUncertainty`` message."""
    (classes,) = decision.sets()
    conf = decision.confidence[0]
    return pb.QueryUncertainty(
        hardness=float(decision.hardness[0]),
        idk=bool(decision.idk[0]),
        prediction_set=[
            pb.ClassConfidence(
                index=int(c), name=str(class_names[c]) if c < len(class_names) else "", confidence=float(conf[c])
            )
            for c in classes
        ],
        searched_prediction_set=searched,
    )


def search_prediction_set_one(
    backend: IndexBackend, r: pb.SearchRequest, query: Codes, k: int, classes: list[int], budget: Budget
) -> pb.SearchResponse:
    """The prediction-set search of one IDK query (``classes`` best first), as a response."""
    from cbir.ensemble import search_prediction_set

    budget.check()
    try:
        ids, codes = search_prediction_set(backend.reader, query, classes, k)
    except ValueError as e:  # e.g. an index whose codes have no class bits
        raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"prediction-set search: {e}") from None
    q = query.packed[0]
    res = SearchResult(
        np.asarray(ids, dtype=np.int64),
        codes,
        hamming_to(q, codes.packed),
        prefix_len_to(q, codes.packed, codes.nbits),
        "lex",
        None,
    )
    metas = backend.get_metadata(res.ids) if r.return_metadata else None
    return response(r, query, res, metas, 0)
