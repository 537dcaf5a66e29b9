"""Ensemble hardness on the CIFAR subset, for each perturbation: does the t-test's easy/hard split
mean something, and do different perturbations find the same hard queries?

"Looking for controversy: an ensemble approach to epistemic uncertainty" (2022). For each
perturbation (``--perturbs``, default ``seed,bootstrap,arch``) the script builds an ensemble of
``--members`` E members, encodes the query and database sets of the protocol
(``../shared/datasets/README.md``: 846 queries, 4,660 database = training items) and prints

* the hard fraction (``ClassDecision.idk``: the prediction set is not exactly one class), the
  easy / hard / idk groups of :mod:`cbir.bench.hardness`, and tie-aware mAP@k (lex, Hamming) on
  easy (= not idk) vs hard (= idk) queries;
* on the IDK queries: recall@k of the plain lexicographic search vs the prediction-set search
  (:func:`cbir.ensemble.search_prediction_set`) over an LMDB index of the database codes, with the
  whole set and capped at its 2 most confident classes, and their latency ratios;
* the t-test + confidence cost against the ensemble's encode time, and (shared backbone) the
  encode time of the shared-backbone path against the per-member path;
* the pairwise Jaccard overlap of the hard query sets of the perturbations.

Members (cheap): ``seed`` and ``bootstrap`` are CE heads on one frozen backbone (the backbone of
``--ce-from``, a CE model; its class head is not copied, so every head starts from its own random
init) trained by :func:`cbir.ensemble.train_ensemble` (``head_steps`` each on cached features).
``arch``: member 0 is such a head (the ``--ce-from`` resnet20), members 1.. are other
architectures (``--arch-backbones``, trained from scratch with CE for ``--arch-budget`` seconds
each, the cosine schedule following the budget): only one backbone was trained beforehand, so
the architecture members are weaker; the figure says what they give. Model selection never looks
at the query set (the model after the last step is used).

Measured over five warm starts (2026-12-04 18:29 - 19:35 UTC; seed and bootstrap again with
this script, 19:39 - 19:52, which printed the same recall and mAP figures and the intervals and
latency / t-test figures below; nothing else running, 2 threads, the usage command below with
``--ce-from runs/ce40_s<s>/model.pt``; warm start ``s`` = ``cbir train --method ce --dataset
cifar10-subset --backbone resnet20 --epochs 40 --batch-size 128 --lr 2e-3 --threads 2 --seed s``
(1,440 steps, ~9.5 min each); E = 5; 300 head steps per member, 1 cached view; tau = -log 0.05,
margin 1, the defaults fixed beforehand; ``arch`` for s = 0-2 only, ``--perturbs
seed,bootstrap`` for s = 3, 4)::

    warm start s                  0        1        2        3        4      mean (sd)
    class accuracy query / db   0.70/0.83 0.70/0.82 0.69/0.82 0.71/0.83 0.70/0.84   (seed)
    seed  hard (idk) %           3.2      3.2      4.0      3.9      3.5     3.6 (0.3)
          IDK queries             27       27       34       33       30     151 in all
          easy - hard mAP@1000  +0.337   +0.300   +0.419   +0.392   +0.291  +0.348 (0.050)  >= 0.2: met 5/5
          IDK recall@1000 gain  +0.163   +0.077   +0.209   +0.144   +0.238  +0.166 (0.056)  >= 0.1: met 4/5
            95 % bootstrap      -0.01    -0.07    +0.06    +0.02    +0.09   (lower end)
                                +0.31    +0.23    +0.35    +0.27    +0.39   (upper end)
          latency ratio         1.96x    1.97x    1.93x    1.90x    1.62x                   <= 3x: met 5/5
    boot  hard (idk) %           2.8      3.3      3.5      4.4      2.8     3.4 (0.6)
          IDK queries             24       28       30       37       24     143 in all
          easy - hard mAP@1000  +0.273   +0.313   +0.318   +0.333   +0.398  +0.327 (0.041)  >= 0.2: met 5/5
          IDK recall@1000 gain  +0.298   +0.261   +0.086   +0.199   +0.186  +0.206 (0.073)  >= 0.1: met 4/5
            95 % bootstrap      +0.16    +0.12    -0.04    +0.09    +0.05   (lower end)
                                +0.44    +0.40    +0.21    +0.31    +0.33   (upper end)
          latency ratio         1.78x    2.07x    1.91x    1.97x    1.80x                   <= 3x: met 5/5
    arch  hard (idk) %          34.4     32.3     34.3
          easy - hard           +0.248   +0.288   +0.296
          IDK gain              +0.036   +0.031   +0.030   (latency 2.27-2.30x)
    Jaccard seed/boot           0.214    0.170    0.143    0.228    0.125   (chance 0.015-0.021)
            seed/arch           0.050    0.071    0.073                    (chance 0.030-0.037)
            boot/arch           0.033    0.056    0.056                    (chance 0.027-0.033)

Every target was met together in one run by seed in runs 0, 2, 3, 4 and by bootstrap in runs 0,
1, 3, 4; pooled over the runs' IDK queries (each run's gain weighted by its IDK count) the gain
is seed +0.169 (151 queries), bootstrap +0.202 (143); the runs' intervals combined as
independent normal errors give ~95 % intervals [+0.103, +0.235] and [+0.144, +0.260] (an
estimate from the printed intervals, not a bootstrap of the pooled queries). A run's IDK set
holds 24-37 queries and per-query gains are all-or-nothing (a subtree gained or lost), so one
run's gain is uncertain by +-0.11 to +-0.16 (the printed 95 % bootstrap intervals of the paired
per-query differences, ``cbir.bench.hardness.gain_interval``): the two misses (seed run 1
+0.077, bootstrap run 2 +0.086) lie well inside them, and 0.1 lies inside the intervals of 8
of the 10 runs (all but bootstrap runs 0 and 1, lower ends +0.16 and +0.12): one run alone
cannot tell the target met or missed; pooled, it is met by both, by bootstrap with more room.
The t-test + confidence cost 1.07-1.39 % (seed) and 1.06-1.33 % (bootstrap) of the ensemble
forward (first runs: 1.05-1.63 %; arch 0.31-0.39 %); latency ratios in the first runs
1.67-2.44x; the shared-backbone encode 0.18-0.22x the per-member path. ``arch``: members 1.. are
45 s convnets (query accuracy of the ensemble 0.58-0.60 against 0.70 for the heads): a third of
the queries are IDK because weak members disagree, not because the query is hard, and probing
them gains little.

Why the warm start matters: with the earlier 15-epoch warm start (540 steps; same command
otherwise, five runs on 2026-12-03/04) the backbone classified only ~0.64 of its own training
images (the database) correctly, so every class subtree was ~0.65 right and a prediction-set
class could add at most that: seed split +0.223 (met 5/5), gain +0.094 (met 1/5); bootstrap
+0.221 (3/5), +0.109 (4/5); hard fraction 8-10 %. On the 40-epoch backbone the database codes
are 0.82-0.84 right and IDK queries fewer (3-4 %); on them the true class is the set's first
class for 15-38 % but in its first two for 52-79 %, and the plain top-1000 reaches the set's
second class for 4-24 %, so the set's second subtree adds a larger share of a more accurate
subtree.
The 40-epoch budget was checked on the held-out protocol before any query-set run: ``--heldout
0.2 --k 800`` (933 held-out training images as queries against the other 3727, heads trained
without them; the backbone saw them): seed split +0.323, gain +0.192; bootstrap +0.380, +0.213
(the 15-epoch backbone there: +0.209/+0.112, +0.239/+0.115; 1000 head steps and 4 views
instead of 300 and 1 did not help it: +0.189/+0.072, +0.202/+0.118). Thresholds were fixed on
that protocol too (15-epoch backbone: IDK gains at margins 0.5/1/2/3 seed
+0.105/+0.112/+0.116/+0.110, bootstrap +0.097/+0.115/+0.103/+0.105; the default margin 1 kept).

The code of a ``ce`` model is its class bits alone, so the plain search serves the query's class
subtree and then the subtree of the class whose binary number is nearest by XOR (an arbitrary
neighbour); the prediction-set search serves the set's subtrees instead, then fills k with the
plain order (unfilled, a two-class set leaves ~9 % of the 1000 slots empty).

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_ensemble.py --ce-from runs/ce40_s0/model.pt \\
        --members 5 --head-steps 300 --feature-views 1 --arch-budget 45 --threads 2 --k 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _train_arch(cfg, args, work: Path):
    """The ``arch`` ensemble: member 0 a head on the frozen CE backbone, members 1.. other
    backbones trained from scratch for ``--arch-budget`` seconds each."""
    from cbir.engine import train
    from cbir.ensemble import EnsembleHasher

    names = [b.strip() for b in args.arch_backbones.split(",") if b.strip()]
    members, info = [train(dataclasses.replace(cfg, out=str(work / "arch" / "member-0"))).hasher], []
    info.append({"index": 0, "seed": cfg.seed, "backbone": cfg.backbone, "bootstrap": None, "frozen_ce": True})
    for i in range(1, args.members):
        spec = names[(i - 1) % len(names)]
        name, _, width = spec.partition(":")
        mcfg = dataclasses.replace(
            cfg,
            backbone=name,
            backbone_kwargs={"width": int(width)} if width else {},
            init_from=None,
            freeze_backbone=False,
            epochs=1000,
            time_budget_s=args.arch_budget,
            batch_size=128,
            lr=3e-3,
            seed=cfg.seed + i,
            out=str(work / "arch" / f"member-{i}"),
        )
        members.append(train(mcfg).hasher)
        info.append({"index": i, "seed": mcfg.seed, "backbone": spec, "bootstrap": None, "budget_s": args.arch_budget})
    ens = EnsembleHasher(members, "arch")
    ens.member_info = info
    return ens


def _encode(ens, imageset):
    """Codes and class decisions of ``imageset``; wall time of the members' forward passes and of
    the t-test + confidence (:func:`cbir.uncertainty.class_decision`) alone."""
    from cbir.codes import Codes
    from cbir.data import make_loader
    from cbir.uncertainty import ClassDecision, class_decision

    encs, t_enc, t_test, all_logits = [], 0.0, 0.0, []
    for batch in make_loader(imageset.with_transform(ens.eval_transform), 256, shuffle=False):
        t = time.perf_counter()
        _, _, logits = ens._member_outputs(batch.images)
        t_enc += time.perf_counter() - t
        t = time.perf_counter()
        class_decision(logits, ens.tau, ens.margin)
        t_test += time.perf_counter() - t
        encs.append(ens.encode_ensemble(batch.images))
        all_logits.append(logits)
    return (
        Codes.concat([e.codes for e in encs]),
        ClassDecision.concat([e.decision for e in encs], len(ens.class_names)),
        t_enc,
        t_test,
        np.concatenate(all_logits, axis=1),
    )


def _heldout_dataset(name: str, fraction: float, work: Path) -> str:
    """An ``.npz`` whose query set is a stratified ``fraction`` of ``name``'s training set
    (seed 0) and whose training set = database is the rest: the data on which thresholds may be
    looked at (never the query set)."""
    from cbir.data import load_dataset
    from cbir.data.sources import stratified_split

    tr = load_dataset(name).train
    if tr.images is not None:  # (N, 3, H, W) uint8
        images = tr.images.numpy()
    else:
        images = np.stack([np.asarray(tr.get_pil(i)) for i in range(len(tr))])
    rest, held = stratified_split(tr.labels, fraction=fraction, seed=0)
    split = np.full(len(tr), "train", dtype="<U5")
    split[held] = "test"
    out = work / f"heldout-{fraction:g}.npz"
    np.savez(out, images=images, labels=tr.labels, split=split, class_names=np.array(tr.class_names))
    return str(out)


def _margin_sweep(ens, q_codes, q_logits, ql, db_codes, dl, k: int, margins) -> None:
    """The hardness figures at other prediction-set margins (the codes do not depend on it)."""
    from cbir.bench.hardness import hardness_report
    from cbir.uncertainty import class_decision

    for m in margins:
        dec = class_decision(q_logits, ens.tau, m)
        h = hardness_report(ens, q_codes, dec, ql, db_codes, dl, k)
        t, p = h["tie_aware_map_at_k"], h["probing"]
        gap = t["answered"]["lex"] - t["idk"]["lex"] if t["idk"]["lex"] is not None else float("nan")
        gain = f"{p['recall_gain']:+.4f} at {p['latency_ratio']:.2f}x" if p else "-"
        print(f"  margin {m:g}: hard (idk) {h['fractions']['idk']:.3f}, easy - hard {gap:+.4f}, IDK recall gain {gain}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ce-from", default="runs/ce40_s0/model.pt", help="a CE checkpoint whose backbone heads share")
    ap.add_argument("--dataset", default="cifar10-subset")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--perturbs", default="seed,bootstrap,arch")
    ap.add_argument("--head-steps", type=int, default=300)
    ap.add_argument("--feature-views", type=int, default=1, help="augmented views cached per image for the heads")
    ap.add_argument("--arch-backbones", default="convnet:32,convnet:16,convnet:48,convnet:24")
    ap.add_argument("--arch-budget", type=float, default=45.0, help="seconds of training per arch member")
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--heldout",
        type=float,
        default=None,
        help="replace the protocol by a held-out FRACTION of the training set as queries, the rest as "
        "training set = database (for looking at thresholds without the query set)",
    )
    ap.add_argument("--margins", default="", help="also print the hardness figures at these prediction-set margins")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    from cbir.bench.hardness import hardness_groups, hardness_report
    from cbir.data import load_dataset
    from cbir.engine import TrainConfig
    from cbir.ensemble import train_ensemble
    from cbir.models.hasher import Hasher
    from cbir.uncertainty import class_decision

    class_decision(np.zeros((2, 1, 2)))  # imports scipy.stats once, outside the timings
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_ensemble-"))
    work.mkdir(parents=True, exist_ok=True)
    ce = Hasher.load(args.ce_from, device="cpu")
    sd = work / "backbone.pt"  # the backbone only: every head starts from its own random init
    torch.save({f"backbone.{k}": v for k, v in ce.method.backbone.state_dict().items()}, sd)
    dataset = args.dataset
    if args.heldout is not None:
        dataset = _heldout_dataset(args.dataset, args.heldout, work)
        print(
            f"held-out protocol: {args.heldout:g} of the {args.dataset} training set as queries, the rest as "
            f"training set = database ({dataset}); the --ce-from backbone was trained on all of it"
        )
    cfg = TrainConfig(
        method="ce",
        dataset=dataset,
        backbone=ce.spec.backbone,
        backbone_kwargs=dict(ce.spec.backbone_kwargs),
        init_from=str(sd),
        freeze_backbone=True,
        head_steps=args.head_steps,
        feature_views=args.feature_views,
        epochs=0,
        threads=args.threads,
        out=str(work / "ens"),
        progress=True,
    )
    sp = load_dataset(dataset)
    ql, dl = sp.query.labels, sp.database.labels
    print(f"{sp.describe()}; E = {args.members}; CE backbone {args.ce_from} ({ce.spec.backbone})")

    hard_sets: dict[str, np.ndarray] = {}
    for perturb in [p.strip() for p in args.perturbs.split(",") if p.strip()]:
        t0 = time.perf_counter()
        if perturb == "arch":
            ens = _train_arch(cfg, args, work)
            how = f"member 0 a CE head on the frozen backbone, members 1.. {args.arch_backbones} ({args.arch_budget:.0f} s each)"
        else:
            path = train_ensemble(dataclasses.replace(cfg, out=str(work / perturb)), args.members, perturb)
            ens = Hasher.load(path, device="cpu")
            how = f"CE heads on the frozen backbone, {args.head_steps} head steps each"
            if perturb == "bootstrap":
                kinds = [i["bootstrap"]["kind"] for i in ens.member_info]
                uniq = [i["bootstrap"]["unique"] for i in ens.member_info]
                how += f"; draws {kinds}, distinct items {uniq} of {len(sp.train)}"
        t_train = time.perf_counter() - t0
        print(f"\n== {perturb}: {how}; trained in {t_train:.0f} s; shared backbone: {ens.shared_backbone}")

        t = time.perf_counter()
        q_codes, q_dec, t_enc, t_test, q_logits = _encode(ens, sp.query)
        db_codes, db_dec, _, _, _ = _encode(ens, sp.database)
        print(
            f"encoded in {time.perf_counter() - t:.0f} s; t-test + confidence {1000 * t_test:.1f} ms for "
            f"{len(q_codes)} queries vs ensemble forward {1000 * t_enc:.1f} ms ({100 * t_test / t_enc:.2f} %)"
        )
        if ens.shared_backbone:
            ens.shared_backbone = False
            _, _, t_enc_pm, _, _ = _encode(ens, sp.query)
            ens.shared_backbone = True
            print(
                f"shared-backbone encode {1000 * t_enc:.0f} ms vs per-member {1000 * t_enc_pm:.0f} ms "
                f"(ratio {t_enc / t_enc_pm:.3f})"
            )
        pred_acc = float((q_dec.predicted == ql).mean())
        h = hardness_report(ens, q_codes, q_dec, ql, db_codes, dl, args.k)
        hard = np.asarray(q_dec.idk)
        hard_sets[perturb] = hard
        m = h["tie_aware_map_at_k"]
        k = h["k"]
        print(
            f"ensemble class accuracy on the queries {pred_acc:.4f}, on the database {float((db_dec.predicted == dl).mean()):.4f}; "
            f"mean prediction-set size {h['mean_prediction_set_size']:.2f}"
        )
        print(
            f"hard (idk) queries: {int(hard.sum())} of {len(hard)} ({100 * hard.mean():.1f} %); "
            f"groups easy/hard/idk {h['fractions']['easy']:.3f}/{h['fractions']['hard']:.3f}/{h['fractions']['idk']:.3f}"
        )
        for name, g in (
            ("easy (not idk)", "answered"),
            ("hard (idk)", "idk"),
            ("unanimous easy", "easy"),
            ("not unanimous", "not_easy"),
        ):
            lex, ham = m[g]["lex"], m[g]["hamming"]
            f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            print(f"  tie-aware mAP@{k} {name:15s} lex {f(lex)}  Hamming {f(ham)}  ({h['counts'][g]} queries)")
        if m["answered"]["lex"] is not None and m["idk"]["lex"] is not None:
            print(f"  easy - hard (lex): {m['answered']['lex'] - m['idk']['lex']:+.4f} (target >= 0.2)")
        p = h["probing"]
        if p:
            ci = p["recall_gain_ci95"]
            ci = "" if ci is None else f", 95 % bootstrap interval [{ci[0]:+.4f}, {ci[1]:+.4f}]"
            print(
                f"IDK queries ({p['queries']}, mean set size {p['mean_set_size']:.2f}): recall@{k} plain lex "
                f"{p['recall_plain']:.4f}, prediction set {p['recall_prediction_set']:.4f} (gain {p['recall_gain']:+.4f}{ci}) "
                f"latency {p['latency_ms_plain']:.3f} vs {p['latency_ms_prediction_set']:.3f} ms ({p['latency_ratio']:.2f}x); "
                f"top-2 classes {p['recall_top2']:.4f} (gain {p['recall_gain_top2']:+.4f}, {p['latency_ratio_top2']:.2f}x) "
                "(targets: gain >= 0.1 at <= 3x)"
            )
            print(
                f"  not filled: prediction set {p['recall_set_only']:.4f} (gain {p['recall_gain_set_only']:+.4f}, "
                f"{p['latency_ratio_set_only']:.2f}x), {p['mean_returned']['set_only']:.1f} items returned of {k}; "
                f"true class first {p['true_class_first']:.3f}, in top 2 {p['true_class_in_top2']:.3f}, "
                f"in the set {p['true_class_in_set']:.3f}; plain top-{k} reaches the set's 2nd class "
                f"{p['plain_reaches_second_class']:.3f}"
            )
        margins = [float(m) for m in args.margins.split(",") if m.strip()]
        if margins:
            print(f"other prediction-set margins (tau {ens.tau:.3f}):")
            _margin_sweep(ens, q_codes, q_logits, ql, db_codes, dl, k, margins)
        groups = hardness_groups(q_dec)
        assert np.array_equal(groups["idk"], hard)
        print(f"[{perturb} done at {time.perf_counter() - t_all:.0f} s]")

    if len(hard_sets) > 1:
        print("\nJaccard overlap of the hard (idk) query sets:")
        for a, b in itertools.combinations(hard_sets, 2):
            inter = int((hard_sets[a] & hard_sets[b]).sum())
            union = int((hard_sets[a] | hard_sets[b]).sum())
            pa, pb = hard_sets[a].mean(), hard_sets[b].mean()
            chance = pa * pb / (pa + pb - pa * pb) if pa + pb > 0 else float("nan")
            print(
                f"  {a} vs {b}: {inter} / {union} = {inter / union if union else float('nan'):.3f} "
                f"(independent sets of these sizes: {chance:.3f})"
            )
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
