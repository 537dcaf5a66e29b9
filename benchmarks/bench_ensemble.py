"""Ensemble hardness on the CIFAR subset: does the t-test's easy/hard split mean something?

E members share one frozen backbone (the backbone of a CE warm start, e.g. the stage-1 model of
``benchmarks/bench_ddtl.py``) and differ in their class heads: each head is trained from its own
random start (``--perturb seed``) on the cached features. The ensemble's class answer
(:mod:`cbir.uncertainty`) splits the queries into easy and hard (IDK); the script prints

* the hard fraction, tie-aware mAP@1000 (lex and Hamming) on easy vs hard queries;
* on IDK queries: recall@1000 of a plain lexicographic search vs the prediction-set search
  (:func:`cbir.ensemble.search_prediction_set`) over an LMDB index, and their latency ratio;
* the cost of the t-test against the ensemble's encode time.

Usage::

    python benchmarks/bench_ensemble.py --ce-from runs/ce/model.pt --members 5 --head-steps 300
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ce-from", required=True, help="a CE checkpoint whose backbone the members share")
    ap.add_argument("--dataset", default="cifar10-subset")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--head-steps", type=int, default=300)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--ensemble-from", default=None, help="an ensemble checkpoint written by an earlier run (skips the training)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cbir import metrics as M
    from cbir.data import load_dataset
    from cbir.engine import TrainConfig
    from cbir.ensemble import search_prediction_set, train_ensemble
    from cbir.indexer import build_index, open_index
    from cbir.models.hasher import Hasher

    work = Path(args.out or tempfile.mkdtemp(prefix="bench_ensemble-"))
    ce = Hasher.load(args.ce_from, device="cpu")
    sd = work / "backbone.pt"
    work.mkdir(parents=True, exist_ok=True)
    torch.save({f"backbone.{k}": v for k, v in ce.method.backbone.state_dict().items()}, sd)
    cfg = TrainConfig(
        method="ce",
        dataset=args.dataset,
        backbone=ce.spec.backbone,
        init_from=str(sd),
        freeze_backbone=True,
        head_steps=args.head_steps,
        epochs=0,
        threads=args.threads,
        out=str(work / "ens"),
        progress=False,
    )
    t0 = time.perf_counter()
    if args.ensemble_from:
        ens = Hasher.load(args.ensemble_from, device="cpu")
        print(f"ensemble of {len(ens.members)} members from {args.ensemble_from}")
    else:
        ens = Hasher.load(train_ensemble(cfg, args.members, "seed"), device="cpu")
        print(
            f"trained {args.members} CE heads on the frozen backbone of {args.ce_from} "
            f"({args.head_steps} head steps each) in {time.perf_counter() - t0:.1f} s"
        )

    sp = load_dataset(args.dataset)
    ql, dl = sp.query.labels, sp.database.labels

    from cbir.uncertainty import class_decision

    class_decision(np.zeros((2, 1, 2)))  # imports scipy.stats once, outside the timings

    def encode(imageset):
        xs, encs = [], []
        t_enc = t_test = 0.0
        from cbir.data import make_loader

        for batch in make_loader(imageset.with_transform(ens.eval_transform), 256, shuffle=False):
            t = time.perf_counter()
            codes, confs, logits = ens._member_outputs(batch.images)
            t_enc += time.perf_counter() - t
            t = time.perf_counter()
            class_decision(logits, ens.tau, ens.margin)
            t_test += time.perf_counter() - t
            encs.append(ens.encode_ensemble(batch.images))
            xs.append(batch.indices.numpy())
        return encs, t_enc, t_test

    q_enc, t_enc, t_test = encode(sp.query)
    d_enc, _, _ = encode(sp.database)
    from cbir.codes import Codes

    qc = Codes.concat([e.codes for e in q_enc])
    dc = Codes.concat([e.codes for e in d_enc])
    idk = np.concatenate([e.decision.idk for e in q_enc])
    sets = [s for e in q_enc for s in e.decision.sets()]
    print(
        f"t-test + confidence: {1000 * t_test:.1f} ms for {len(qc)} queries vs ensemble encode "
        f"{1000 * t_enc:.1f} ms ({100 * t_test / t_enc:.2f} %)"
    )
    k = min(args.k, len(dc))
    for name, sel in (("easy", ~idk), ("hard", idk)):
        if sel.sum() == 0:
            print(f"{name}: 0 queries")
            continue
        lex = M.tie_aware_average_precision(qc[np.flatnonzero(sel)], ql[sel], dc, dl, k, "lex")
        ham = M.tie_aware_average_precision(qc[np.flatnonzero(sel)], ql[sel], dc, dl, k, "hamming")
        print(
            f"{name}: {int(sel.sum())} queries ({100 * sel.mean():.1f} %), tie-aware mAP@{k} lex {lex:.4f} "
            f"Hamming {ham:.4f}"
        )
    ix = build_index(work / "ix", np.arange(len(dc)), dc, layout=ens.layout)
    with open_index(ix) as r:
        rec_plain, rec_set, t_plain, t_set = [], [], 0.0, 0.0
        for i in np.flatnonzero(idk):
            rel = int((dl == ql[i]).sum())
            t = time.perf_counter()
            ids = r.search_lex(qc[i : i + 1], k).ids
            t_plain += time.perf_counter() - t
            rec_plain.append((dl[ids] == ql[i]).sum() / rel)
            t = time.perf_counter()
            ids2, _ = search_prediction_set(r, qc[i : i + 1], sets[i], k)
            t_set += time.perf_counter() - t
            rec_set.append((dl[ids2] == ql[i]).sum() / rel)
    if rec_plain:
        print(
            f"IDK queries ({len(rec_plain)}): recall@{k} plain lex {np.mean(rec_plain):.4f}, prediction-set "
            f"search {np.mean(rec_set):.4f} (gain {np.mean(rec_set) - np.mean(rec_plain):+.4f}); latency "
            f"{1000 * t_plain / len(rec_plain):.2f} ms vs {1000 * t_set / len(rec_set):.2f} ms "
            f"({t_set / t_plain:.2f}x)"
        )


if __name__ == "__main__":
    main()
