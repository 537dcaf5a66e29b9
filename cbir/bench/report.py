"""Building the report dict of one model: :func:`build_report` (every figure computed by
:mod:`cbir.metrics`) and its flat :func:`headline`."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from cbir.bench.config import FORMAT, SERVER_MAX_K, BenchConfig, item_keys, load_bench_data
from cbir.bench.robustness import raw_images, robustness_report
from cbir.bench.sources import GrpcSearcher, index_database

log = logging.getLogger("cbir.bench")


# ============================================================================================
# the report
# ============================================================================================
def _ks(cfg_ks, k: int, n: int) -> list[int]:
    ks = sorted({int(x) for x in cfg_ks if int(x) <= n} | {min(int(k), n)})
    return ks or [1]


def _model_train_info(model_path: str) -> dict:
    """The dataset sizes recorded by ``cbir train`` in ``config.json`` next to the model."""
    p = Path(model_path)
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("dataset", {}) or {}
    except (OSError, ValueError):
        return {}


def _f(x) -> float:
    return float(x)


def build_report(cfg: BenchConfig, hasher=None) -> dict:
    """Run the benchmark described by ``cfg`` and return the report dict (see module doc).

    ``hasher``: an already loaded :class:`~cbir.models.hasher.Hasher` (else ``cfg.model`` is
    loaded). Raises ``ValueError`` on an overlap between queries and database (unless
    ``cfg.allow_overlap``) and on inconsistent inputs.
    """
    import torch
    from tqdm.auto import tqdm

    from cbir import metrics as M
    from cbir.models.hasher import Hasher

    cfg.validate()
    t_start = time.perf_counter()
    walls: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        walls[name] = round(time.perf_counter() - t0, 3)
        return time.perf_counter()

    t = time.perf_counter()
    if hasher is None:
        hasher = Hasher.load(cfg.model, device=cfg.device, batch_size=cfg.batch_size)
    model_cfg = hasher.config or {}
    t = lap("load_model", t)
    data = load_bench_data(cfg, hasher.image_size, model_dataset=model_cfg.get("dataset"))
    t = lap("load_data", t)

    # -- overlap check (before any expensive work) -------------------------------------------
    qk, how = item_keys(data.query, np.arange(len(data.query)))
    dk, how_d = item_keys(data.database, np.arange(len(data.database)))
    if how != how_d:  # one set in memory, the other on disk: compare pixels
        qk = [
            hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in raw_images(data.query, range(len(data.query)))[0]
        ]
        dk = [
            hashlib.sha1(im.numpy().tobytes()).hexdigest()
            for im in raw_images(data.database, range(len(data.database)))[0]
        ]
        how = "pixels"
    try:
        hits = M.check_overlap(qk, dk, allow=cfg.allow_overlap)
    except ValueError as exc:
        raise ValueError(f"overlap check ({how}): {exc} (bench: --allow-overlap)") from None
    t = lap("overlap_check", t)

    # -- encode ------------------------------------------------------------------------------
    q_decision = None  # an ensemble's class answers of the queries (the hardness section)
    with torch.inference_mode():
        if hasattr(hasher, "encode_imageset_decisions"):
            q_codes, _, q_idx, q_decision = hasher.encode_imageset_decisions(
                data.query, progress=cfg.progress, desc="encode queries", num_workers=cfg.num_workers
            )
        else:
            q_codes, _, q_idx = hasher.encode_imageset(
                data.query, progress=cfg.progress, desc="encode queries", num_workers=cfg.num_workers
            )
        t = lap("encode_queries", t)
        db_source, index_facts = "encoded", None
        db_item_ids = None  # ids of the database rows in an index / the server (default: positions)
        if cfg.index:
            db_codes, db_idx, db_item_ids, index_facts = index_database(cfg.index, hasher, data)
            db_source = f"index {cfg.index}"
        else:
            db_codes, _, db_idx = hasher.encode_imageset(
                data.database, progress=cfg.progress, desc="encode database", num_workers=cfg.num_workers
            )
        t = lap("encode_database", t)
    if len(q_codes) == 0 or len(db_codes) == 0:
        raise ValueError(f"nothing to score: {len(q_codes)} readable queries, {len(db_codes)} readable database images")
    ql = data.query_labels[q_idx]
    dl = data.db_labels[db_idx]
    n, nq, B = len(db_codes), len(q_codes), q_codes.nbits
    kk = min(int(cfg.k), n)
    ks = _ks(cfg.ks, cfg.k, n)

    # -- retrieval ---------------------------------------------------------------------------
    orders = ("lex", "hamming")
    steps = tqdm(total=12, desc="retrieval metrics", unit="metric", disable=not cfg.progress, leave=False)
    ret: dict[str, Any] = {"k_requested": int(cfg.k), "k": kk, "ks": ks}
    ret["map_at_k"], ret["map_all"], ret["precision_at_k"], ret["recall_at_k"] = {}, {}, {}, {}
    for order in orders:
        ret["map_at_k"][order] = M.mean_average_precision(q_codes, ql, db_codes, dl, kk, order=order)
        steps.update()
        ret["map_all"][order] = M.mean_average_precision(q_codes, ql, db_codes, dl, None, order=order)
        steps.update()
        ret["precision_at_k"][order] = [_f(v) for v in M.precision_at_k(q_codes, ql, db_codes, dl, ks, order=order)]
        steps.update()
        ret["recall_at_k"][order] = [_f(v) for v in M.recall_at_k(q_codes, ql, db_codes, dl, ks, order=order)]
        steps.update()
    # tie-aware (expected AP over every order of tied items): the figures that do not depend on
    # database order. lex ties = identical codes; Hamming ties = equal distance.
    ret["tie_aware_map_at_k"], ret["tie_aware_map_all"] = {}, {}
    for order in orders:
        ret["tie_aware_map_at_k"][order] = M.tie_aware_average_precision(q_codes, ql, db_codes, dl, kk, order)
        ret["tie_aware_map_all"][order] = M.tie_aware_average_precision(q_codes, ql, db_codes, dl, None, order)
        steps.update()
    pr = M.precision_recall_by_radius(q_codes, ql, db_codes, dl)
    ret["pr_by_radius"] = {
        "radius": [int(v) for v in pr.radius],
        "precision": [_f(v) for v in pr.precision],
        "recall": [_f(v) for v in pr.recall],
        "empty_fraction": [_f(v) for v in pr.empty_fraction],
    }
    steps.update()
    rp = M.precision_within_radius(q_codes, ql, db_codes, dl, 2)
    ret["p_at_h2"] = {
        "radius": 2,
        "precision": rp.precision,
        "empty_fraction": rp.empty_fraction,
        "note": "a query whose Hamming ball of radius 2 is empty scores 0 and counts",
    }
    steps.update()
    rc = M.relevant_counts(ql, dl)
    ret["queries_without_relevant_items"] = int((rc == 0).sum())
    ret["mean_relevant_per_query"] = float(rc.mean())
    steps.close()
    t = lap("retrieval", t)

    # -- coverage ------------------------------------------------------------------------------
    coverage = {"database": M.coverage_report(db_codes), "queries": M.coverage_report(q_codes)}
    # the yardstick: uniformly random codes at the same N and B, and random path bits below the
    # observed class prefixes (what a tree that spreads each class perfectly at random gives)
    cb = int(hasher.layout.class_bits or 0)
    coverage["database"]["random"] = [M.random_expectation(db_codes, 0)]
    if 0 < cb < B:
        coverage["database"]["random"].append(M.random_expectation(db_codes, cb))
    coverage["database"]["bit_correlation"] = [[round(float(v), 6) for v in row] for row in M.bit_correlation(db_codes)]
    t = lap("coverage", t)

    # -- robustness ------------------------------------------------------------------------------
    robust = None
    if cfg.robustness and (cfg.jitter or cfg.occlusion):
        pos = np.arange(len(data.query))[q_idx]
        if len(pos) > cfg.robustness_images:
            pos = np.sort(np.random.default_rng(cfg.seed + 2).permutation(pos)[: cfg.robustness_images])
        robust = robustness_report(
            hasher, data.query, pos, cfg.jitter, cfg.occlusion, seed=cfg.seed, progress=cfg.progress
        )
    t = lap("robustness", t)

    # -- hardness (ensembles) -----------------------------------------------------------------
    hardness = None
    if q_decision is not None and not data.multilabel:
        from cbir.bench.hardness import hardness_report

        hardness = hardness_report(
            hasher, q_codes, q_decision, ql, db_codes, dl, kk, index=cfg.index, db_ids=db_item_ids
        )
        t = lap("hardness", t)

    # -- the server path ---------------------------------------------------------------------
    server = None
    if cfg.address:
        if db_item_ids is None:
            assert data.database_positions is not None  # load_bench_data always sets it
            db_item_ids = data.database_positions[db_idx]
        server = _server_figures(cfg, hasher, q_codes, ql, dl, db_item_ids, ks, ret)
        t = lap("server", t)

    layout = hasher.layout
    train_info = _model_train_info(cfg.model)
    report = {
        "format": FORMAT,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": cfg.to_dict(),
        "model": {
            "path": str(cfg.model),
            "method": hasher.method_name,
            "backbone": getattr(hasher.spec, "backbone", None),
            "content_hash": hasher.content_hash,
            "nbits": int(B),
            "layout": layout.to_dict(),
            "image_size": hasher.image_size,
            "trained_on": model_cfg.get("dataset"),
            "train_size": train_info.get("train"),
        },
        "data": {
            "name": data.name,
            "source": data.source,
            "multilabel": data.multilabel,
            "num_labels": len(data.class_names),
            "relevance": "shares at least one label" if data.multilabel else "same class",
            "train_size": data.train_size if data.train_size is not None else train_info.get("train"),
            "query_size": int(nq),
            "database_size": int(n),
            "query_source_size": data.query_source_size,
            "database_source_size": data.database_source_size,
            "unreadable_queries": int(len(data.query) - nq),
            "unreadable_database": None if index_facts else int(len(data.database) - len(db_idx)),
            "database_codes": db_source,
            "index": index_facts,
        },
        "overlap": {"checked_by": how, "overlapping_queries": int(len(hits)), "allowed": bool(cfg.allow_overlap)},
        "retrieval": ret,
        "coverage": coverage,
        "robustness": robust,
        "server": server,
        "hardness": hardness,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": str(hasher.device),
            "threads": torch.get_num_threads(),
            "host": platform.node(),
        },
        "wall_s": walls,
    }
    walls["total"] = round(time.perf_counter() - t_start, 3)
    report["headline"] = headline(report)
    return report


def _server_figures(cfg, hasher, q_codes, ql, dl, db_ids, ks, ret) -> dict:
    """Ranked-retrieval figures (mAP@k, P@k, recall@k in both orders) measured through the
    server's ``BatchSearch`` calls with code queries, and whether they equal the in-process
    figures exactly. ``db_ids`` is the server's id of every database row: the ids of the
    ``--index`` items when an index is given (the index the server serves; items matched by
    path or id, see :func:`index_database`), else the rows' positions in the benchmark's whole
    database set (the ids ``cbir index build --dataset SRC`` assigns). The server's model content
    hash, when reported, must be the model's. Code-based figures (Hamming-ball, tie-aware,
    coverage) need every database code and are computed in process only."""
    from cbir import metrics as M

    out: dict[str, Any] = {"address": cfg.address}
    n = len(dl)
    kk = ret["k"]
    for order in ("lex", "hamming"):
        s = GrpcSearcher(cfg.address, order=order, token=os.environ.get("CBIR_TOKEN") or None)
        try:
            if order == "lex":
                st = s.stats()
                out["server_count"] = int(st.count)
                out["server_model_content_hash"] = st.model_content_hash
                if st.model_content_hash and st.model_content_hash != hasher.content_hash:
                    raise ValueError(
                        f"the server at {cfg.address} runs model {st.model_content_hash[:12]}, "
                        f"not {hasher.content_hash[:12]}; its figures would not be comparable"
                    )
                if int(st.count) != n:
                    log.warning("server holds %d items, the benchmark database %d", st.count, n)
            fig: dict[str, Any] = {
                "map_at_k": M.mean_average_precision(q_codes, ql, None, dl, kk, searcher=s, db_ids=db_ids),
                "precision_at_k": [
                    _f(v) for v in M.precision_at_k(q_codes, ql, None, dl, ks, searcher=s, db_ids=db_ids)
                ],
                "recall_at_k": [_f(v) for v in M.recall_at_k(q_codes, ql, None, dl, ks, searcher=s, db_ids=db_ids)],
            }
            if n <= SERVER_MAX_K:  # the whole ranking fits in one Search response
                fig["map_all"] = M.mean_average_precision(q_codes, ql, None, dl, None, searcher=s, db_ids=db_ids)
            fig["search_calls"], fig["search_wall_s"] = s.calls, round(s.wall_s, 3)
        finally:
            s.close()
        fig["equal_in_process"] = bool(
            np.isclose(fig["map_at_k"], ret["map_at_k"][order], rtol=0, atol=1e-12)
            and ("map_all" not in fig or np.isclose(fig["map_all"], ret["map_all"][order], rtol=0, atol=1e-12))
            and np.allclose(fig["precision_at_k"], ret["precision_at_k"][order], rtol=0, atol=1e-12)
            and np.allclose(fig["recall_at_k"], ret["recall_at_k"][order], rtol=0, atol=1e-12)
        )
        out[order] = fig
    out["equal_in_process"] = bool(out["lex"]["equal_in_process"] and out["hamming"]["equal_in_process"])
    return out


def headline(report: dict) -> dict:
    """The figures of the printed table and of ``cbir bench compare`` (flat dict)."""
    r, cov = report["retrieval"], report["coverage"]["database"]
    return {
        "method": report["model"]["method"],
        "bits": report["model"]["nbits"],
        "model": report["model"]["content_hash"][:12],
        "k": r["k"],
        "map_at_k_lex": r["map_at_k"]["lex"],
        "map_at_k_hamming": r["map_at_k"]["hamming"],
        "map_all_lex": r["map_all"]["lex"],
        "map_all_hamming": r["map_all"]["hamming"],
        "tie_aware_map_at_k_lex": r["tie_aware_map_at_k"]["lex"],
        "tie_aware_map_at_k_hamming": r["tie_aware_map_at_k"]["hamming"],
        "tie_aware_map_all_lex": r["tie_aware_map_all"]["lex"],
        "tie_aware_map_all_hamming": r["tie_aware_map_all"]["hamming"],
        "p_at_h2": r["p_at_h2"]["precision"],
        "p_at_h2_empty": r["p_at_h2"]["empty_fraction"],
        "entropy": cov["entropy_bits"],
        "unique_percent": cov["unique_percent"],
        "collisions": cov["average_collision_count"],
        "random_unique_percent": yardstick(cov)["unique_percent"],
        "random_collisions": yardstick(cov)["average_collision_count"],
    }


def yardstick(cov: dict) -> dict:
    """The random-code expectation codes are compared with: random bits below the class prefix
    when the layout has class bits, else uniformly random codes."""
    rnd = cov.get("random") or [
        {"fixed_bits": 0, "unique_percent": float("nan"), "average_collision_count": float("nan")}
    ]
    return rnd[-1]
