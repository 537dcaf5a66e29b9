"""``cbir bench``: retrieval, coverage and robustness report of a model.

  cbir bench --model M [--dataset NAME | --queries SRC --database SRC] [--k 1000] [--out DIR]
  cbir bench compare M1 M2 ... | DIR  [same data options] [--out DIR]

The first form encodes the queries and the database (or reads the database codes from
--index), computes every figure of cbir.metrics (mAP@k and mAP@all in lexicographic and
Hamming order, tie-aware mAP, P@k, recall@k, precision/recall over Hamming radius, P@H<=2,
code coverage, hash-code retention under colour jitter and occlusion), writes report.json,
report.md and PNG plots into --out and prints the headline table. Without a data option the
model's training dataset is used. An ensemble model (`cbir train --ensemble E`) adds a hardness
section: easy / hard / IDK fractions of the queries, tie-aware mAP@k of each, a risk-coverage
curve (risk_coverage.png) and the recall gain and latency of probing the prediction set on the
IDK queries (cbir.bench.hardness). --address HOST:PORT also measures the ranked figures through
a running `cbir serve` (its Search calls) and checks that they equal the in-process figures.

The second form benches several models on the same data and prints one comparison table
(thesis Tables 3.4/3.5: mAP@1000, mAP@all, tie-aware mAP, P@H<=2, entropy, unique %,
collisions); it writes compare.md and compare.json (plus each model's report) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_data_args(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Options shared by ``bench`` and ``bench compare``. In the compare sub-parser the
    defaults are suppressed so that options given before ``compare`` are kept."""
    S = argparse.SUPPRESS

    def d(v):
        return S if suppress else v

    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=d(None),
        help="digits, cifar10-subset, mnist, a folder, a .csv/.jsonl manifest or an .npz, split into "
        "query/database by its protocol (default: the model's training dataset)",
    )
    g.add_argument(
        "--queries", metavar="SRC", default=d(None), help="a whole source used as the queries (with --database)"
    )
    g.add_argument(
        "--database", metavar="SRC", default=d(None), help="a whole source used as the database (with --queries)"
    )
    g.add_argument(
        "--data-root", default=d(None), help="folder of the named .npz datasets (default: ../shared/datasets)"
    )
    g.add_argument(
        "--query-fraction",
        type=float,
        default=d(0.1),
        help="query split of a folder/manifest given as --dataset (default: 0.1)",
    )
    g.add_argument("--seed", type=int, default=d(0), help="seed of splits, limits and perturbations (default: 0)")
    g.add_argument("--limit-queries", type=int, default=d(None), metavar="N", help="use a random subset of N queries")
    g.add_argument(
        "--limit-database", type=int, default=d(None), metavar="N", help="use a random subset of N database items"
    )
    g.add_argument(
        "--allow-overlap",
        action="store_true",
        default=d(False),
        help="allow queries that also occur in the database (otherwise an error)",
    )
    m = p.add_argument_group("metrics")
    m.add_argument("--k", type=int, default=d(1000), help="mAP@k / tie-aware mAP@k cut-off (default: 1000)")
    m.add_argument(
        "--no-robustness", action="store_true", default=d(False), help="skip the code-retention measurements"
    )
    m.add_argument(
        "--robustness-images",
        type=int,
        default=d(500),
        metavar="N",
        help="query images perturbed for code retention (default: 500)",
    )
    m.add_argument(
        "--jitter",
        type=_floats,
        default=d(None),
        metavar="S1,S2,...",
        help="colour-jitter strengths (default: 0.1,0.2,0.3,0.4,0.5)",
    )
    m.add_argument(
        "--occlusion",
        type=_floats,
        default=d(None),
        metavar="A1,A2,...",
        help="occluded area fractions (default: 0.05,0.1,0.2,0.3,0.4)",
    )
    m.add_argument("--no-plots", action="store_true", default=d(False), help="do not write PNG plots")
    r = p.add_argument_group("run")
    r.add_argument("--device", default=d("auto"), help="auto, cpu, cuda ... (default: auto)")
    r.add_argument("--batch-size", type=int, default=d(256), help="encoding batch size (default: 256)")
    r.add_argument("--workers", type=int, default=d(0), help="DataLoader worker processes (default: 0)")
    r.add_argument("--threads", type=int, default=d(None), help="torch CPU threads")
    r.add_argument("--no-progress", action="store_true", default=d(False), help="no progress bars")
    r.add_argument("--json", action="store_true", default=d(False), help="print the headline figures as JSON")


def config_from_args(args, model: str | None):
    from cbir.bench import DEFAULT_JITTER, DEFAULT_OCCLUSION, BenchConfig

    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    return BenchConfig(
        model=model or "",
        dataset=g("dataset"),
        queries=g("queries"),
        database=g("database"),
        data_root=g("data_root"),
        query_fraction=g("query_fraction", 0.1),
        seed=g("seed", 0),
        k=g("k", 1000),
        out=g("out"),
        index=g("index"),
        address=g("address"),
        allow_overlap=bool(g("allow_overlap", False)),
        limit_queries=g("limit_queries"),
        limit_database=g("limit_database"),
        robustness=not g("no_robustness", False),
        robustness_images=g("robustness_images", 500),
        jitter=tuple(g("jitter") if g("jitter") is not None else DEFAULT_JITTER),
        occlusion=tuple(g("occlusion") if g("occlusion") is not None else DEFAULT_OCCLUSION),
        plots=not g("no_plots", False),
        device=g("device", "auto"),
        batch_size=g("batch_size", 256),
        num_workers=g("workers", 0),
        progress=not g("no_progress", False),
    )


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _hardness_lines(h: dict) -> str:
    """The ensemble's hardness section in a few lines (details in report.md)."""
    fr, m, k = h["fractions"], h["tie_aware_map_at_k"], h["k"]

    def f(v):
        return "-" if v is None else f"{v:.4f}"

    lines = [
        f"hardness ({h['members']} members, {h['perturb']}): easy {fr['easy']:.3f}, hard {fr['hard']:.3f}, "
        f"idk {fr['idk']:.3f} of the queries",
        f"tie-aware mAP@{k} lex: easy {f(m['easy']['lex'])}, hard {f(m['hard']['lex'])}, idk {f(m['idk']['lex'])}",
    ]
    p = h.get("probing")
    if p:
        lines.append(
            f"idk queries: recall@{k} {p['recall_plain']:.4f} -> {p['recall_prediction_set']:.4f} with the "
            f"prediction set ({p['latency_ratio']:.2f}x latency), {p['recall_top2']:.4f} with its top 2 classes "
            f"({p['latency_ratio_top2']:.2f}x)"
        )
    return "\n".join(lines)


def run(args) -> int:
    if getattr(args, "bench_command", None) == "compare":
        return run_compare(args)
    from cbir.bench import build_report, headline_table, write_report

    if not args.model:
        raise ValueError("--model is required (a model.pt or a `cbir train` output directory); see `cbir bench --help`")
    _threads(args)
    cfg = config_from_args(args, args.model)
    out = (
        Path(args.out)
        if args.out
        else (Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent) / "bench"
    )
    cfg.out = str(out)
    report = build_report(cfg)
    files = write_report(report, out, plots=cfg.plots)
    if getattr(args, "json", False):
        print(json.dumps(report["headline"], indent=2))
    else:
        print(headline_table(report))
        if report.get("hardness"):
            print("\n" + _hardness_lines(report["hardness"]))
    print(
        f"\nreport: {files['json']}  {files['markdown']}  ({len(files['plots'])} plots; "
        f"{report['wall_s']['total']:.1f} s)"
    )
    return 0


def run_compare(args) -> int:
    from cbir.bench import compare_table
    from cbir.bench import run_compare as _run

    if not args.models:
        raise ValueError("bench compare needs model paths (or a directory of models)")
    _threads(args)
    base = config_from_args(args, None)
    out = Path(getattr(args, "out", None) or "runs/compare")
    rows, summary = _run(args.models, base, out)
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
    else:
        if not summary["same_data"]:
            print("warning: the models were benchmarked on different data", file=sys.stderr)
        print(compare_table(rows))
    for e in summary["errors"]:
        print(f"failed: {e['path']}: {e['error']}", file=sys.stderr)
    print(f"\nwritten: {out / 'compare.md'}  {out / 'compare.json'}")
    if not rows:
        raise ValueError("no model could be benchmarked")
    return 1 if summary["errors"] else 0


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="retrieval / coverage / robustness report of a model (or compare models)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="model checkpoint (model.pt) or a `cbir train` output directory")
    p.add_argument("--out", default=None, help="report directory (default: <model dir>/bench; compare: runs/compare)")
    p.add_argument(
        "--index",
        default=None,
        metavar="DIR",
        help="read the database codes from this `cbir index build` directory instead of encoding "
        "(items matched to the database by file path, else by id = position in the database set)",
    )
    p.add_argument(
        "--address",
        default=None,
        metavar="HOST:PORT",
        help="also measure the ranked figures through this running server's Search calls (bearer token from $CBIR_TOKEN); give --index too (the index it serves) to map its ids by path",
    )
    _add_data_args(p)
    bsub = p.add_subparsers(dest="bench_command", metavar="{compare}", title="sub-command (optional)")
    c = bsub.add_parser(
        "compare",
        help="bench several models on the same data; one table (thesis Tables 3.4/3.5)",
        description="Bench several models on the same data and print one comparison table. "
        "MODELS: model.pt files, `cbir train` output directories, a directory of "
        "those, or report.json files of earlier runs.",
    )
    c.add_argument("models", nargs="+", metavar="MODEL", help="models, model directories or report.json files")
    c.add_argument("--out", default=argparse.SUPPRESS, help="output directory (default: runs/compare)")
    _add_data_args(c, suppress=True)
    p.set_defaults(func=run, bench_command=None)
