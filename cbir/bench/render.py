"""Rendering a report: the printed headline table, ``report.md``, the PNG plots and
:func:`write_report`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from cbir.bench.report import yardstick
from cbir.codes import json_default


def _md_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _text_table(header: list[str], rows: list[list]) -> str:
    cols = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * x for x in w)] + [fmt(r) for r in cols[1:]])


def _headline_rows(report: dict) -> list[list[str]]:
    h, r = report["headline"], report["retrieval"]
    k = h["k"]
    rows = [
        [f"tie-aware mAP@{k} (lexicographic)", f"{h['tie_aware_map_at_k_lex']:.4f}"],
        [f"tie-aware mAP@{k} (Hamming)", f"{h['tie_aware_map_at_k_hamming']:.4f}"],
        ["tie-aware mAP@all (lexicographic)", f"{h['tie_aware_map_all_lex']:.4f}"],
        ["tie-aware mAP@all (Hamming)", f"{h['tie_aware_map_all_hamming']:.4f}"],
        [f"mAP@{k} (lex, ties by id: order-dependent)", f"{h['map_at_k_lex']:.4f}"],
        [f"mAP@{k} (Hamming, ties by code/id)", f"{h['map_at_k_hamming']:.4f}"],
        ["mAP@all (lex / Hamming, ties by id)", f"{h['map_all_lex']:.4f} / {h['map_all_hamming']:.4f}"],
        ["P@H<=2 (empty balls score 0)", f"{h['p_at_h2']:.4f} ({100 * h['p_at_h2_empty']:.1f} % empty)"],
    ]
    for kk in (10, 100):
        if kk in r["ks"]:
            i = r["ks"].index(kk)
            rows.append(
                [
                    f"P@{kk} (lex / Hamming)",
                    f"{r['precision_at_k']['lex'][i]:.4f} / {r['precision_at_k']['hamming'][i]:.4f}",
                ]
            )
    i = r["ks"].index(k)
    rows.append(
        [f"recall@{k} (lex / Hamming)", f"{r['recall_at_k']['lex'][i]:.4f} / {r['recall_at_k']['hamming'][i]:.4f}"]
    )
    cov = report["coverage"]["database"]
    rows += [
        ["code entropy (bits)", f"{h['entropy']:.3f} (max {cov['max_entropy_bits']:.3f})"],
        ["unique codes", f"{cov['unique_codes']} / {cov['n']} ({h['unique_percent']:.2f} %)"],
        ["average collision count", f"{h['collisions']:.3f}"],
        [
            f"random codes at this N, B ({_yardstick_name(cov)})",
            f"{h['random_unique_percent']:.2f} % unique, {h['random_collisions']:.3f} collisions",
        ],
        [
            "unique % / random unique %",
            f"{h['unique_percent'] / h['random_unique_percent']:.3f}" if h["random_unique_percent"] > 0 else "n/a",
        ],
        ["largest bucket", f"{cov['largest_bucket']}"],
    ]
    rob = report.get("robustness")
    if rob and rob.get("n_images"):
        for kind in ("jitter", "occlusion"):
            if rob[kind]:
                last = rob[kind][-1]
                rows.append([f"retention, full code ({kind} {last['strength']:g})", f"{last['retention'][-1]:.3f}"])
    srv = report.get("server")
    if srv:
        rows.append(
            [
                f"server {srv['address']}: mAP@{k} lex / Hamming",
                f"{srv['lex']['map_at_k']:.4f} / {srv['hamming']['map_at_k']:.4f} "
                f"({'equal' if srv['equal_in_process'] else 'DIFFERENT'})",
            ]
        )
    return rows


def _yardstick_name(cov: dict) -> str:
    fb = yardstick(cov)["fixed_bits"]
    return f"random bits below the {fb} class bits" if fb else "uniformly random"


def _title(report: dict) -> str:
    m, d = report["model"], report["data"]
    return (
        f"{m['method']} ({m['backbone']}), {m['nbits']} bits, model {m['content_hash'][:12]} | {d['name']}: "
        f"{d['query_size']} queries x {d['database_size']} database (train {d['train_size']})"
        f"{', multi-label' if d['multilabel'] else ''}"
    )


def headline_table(report: dict) -> str:
    """The table ``cbir bench`` prints."""
    return _title(report) + "\n" + _text_table(["metric", "value"], _headline_rows(report))


def _fmt(v, nd=4):
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def report_markdown(report: dict) -> str:
    r, cov, d, m = report["retrieval"], report["coverage"]["database"], report["data"], report["model"]
    parts = [
        f"# cbir bench report\n\n{_title(report)}\n\nCreated {report['created_utc']}; definitions: "
        "`cbir.metrics` docstrings. Relevance: " + d["relevance"] + ".\n"
    ]
    parts.append("## Headline\n\n" + _md_table(["metric", "value"], _headline_rows(report)))
    rows = [
        [
            k,
            _fmt(r["precision_at_k"]["lex"][i]),
            _fmt(r["precision_at_k"]["hamming"][i]),
            _fmt(r["recall_at_k"]["lex"][i]),
            _fmt(r["recall_at_k"]["hamming"][i]),
        ]
        for i, k in enumerate(r["ks"])
    ]
    parts.append("## P@k and recall@k\n\n" + _md_table(["k", "P@k lex", "P@k Hamming", "R@k lex", "R@k Hamming"], rows))
    pr = r["pr_by_radius"]
    rows = [
        [rad, _fmt(pr["precision"][rad]), _fmt(pr["recall"][rad]), f"{100 * pr['empty_fraction'][rad]:.1f}"]
        for rad in pr["radius"]
    ]
    parts.append(
        "## Hamming-ball retrieval (precision / recall by radius)\n\nAn empty ball scores precision 0.\n\n"
        + _md_table(["radius", "precision", "recall", "empty balls %"], rows)
    )
    rows = [
        [
            f"{i + 1}",
            _fmt(cov["prefix_entropy"][i], 3),
            _fmt(cov["prefix_balance"][i], 3),
            _fmt(cov["bit_balance"][i], 3),
        ]
        for i in range(cov["nbits"])
    ]
    parts.append(
        "## Coverage of the database codes\n\n"
        + _md_table(
            ["figure", "value"],
            [
                ["codes", cov["n"]],
                ["unique codes", f"{cov['unique_codes']} ({cov['unique_percent']:.2f} %)"],
                ["entropy (bits)", f"{cov['entropy_bits']:.3f} of max {cov['max_entropy_bits']:.3f}"],
                ["average collision count", f"{cov['average_collision_count']:.3f}"],
                ["largest bucket", cov["largest_bucket"]],
                ["mean abs bit correlation", f"{cov['mean_abs_bit_correlation']:.3f}"],
            ],
        )
        + "\n\nPer depth d (prefix entropy and balance) and per bit d (balance = fraction of 1s):\n\n"
        + _md_table(["d", "prefix entropy", "prefix balance", "bit balance"], rows)
    )
    hist = cov["bucket_size_histogram"]
    parts.append(
        "Bucket sizes:\n\n"
        + _md_table(["bucket size", "buckets"], [[s, b] for s, b in zip(hist["sizes"], hist["buckets"])])
    )
    rob = report.get("robustness")
    if rob and rob.get("n_images"):
        depths = sorted({1, 2, 4, 8, 12, 16, 24, 32, 48, 64} & set(range(1, m["nbits"] + 1)) | {m["nbits"]})
        rows = [
            [f"{kind} {e['strength']:g}"] + [f"{e['retention'][dd - 1]:.3f}" for dd in depths]
            for kind in ("jitter", "occlusion")
            for e in rob[kind]
        ]
        parts.append(
            f"## Hash-code retention ({rob['n_images']} query images)\n\nFraction of images whose "
            "first d bits are unchanged (jitter: brightness/contrast/saturation factors in [1-s, 1+s], "
            "hue in [-s/4, s/4]; occlusion: black square over a fraction s of the area).\n\n"
            + _md_table(["perturbation"] + [f"d={dd}" for dd in depths], rows)
        )
    srv = report.get("server")
    if srv:
        rows = [
            [
                o,
                _fmt(srv[o]["map_at_k"]),
                _fmt(r["map_at_k"][o]),
                _fmt(srv[o].get("map_all", "n/a")),
                _fmt(r["map_all"][o]),
                srv[o]["equal_in_process"],
                srv[o]["search_calls"],
                srv[o]["search_wall_s"],
            ]
            for o in ("lex", "hamming")
        ]
        parts.append(
            f"## Through the server at {srv['address']}\n\nmAP@k, mAP@all, P@k and recall@k measured "
            "with the server's BatchSearch (code queries); 'equal' compares all of them with the "
            "in-process figures.\n\n"
            + _md_table(
                [
                    "order",
                    f"mAP@{r['k']} server",
                    "in-process",
                    "mAP@all server",
                    "in-process",
                    "equal",
                    "BatchSearch calls",
                    "wall s",
                ],
                rows,
            )
        )
    ov = report["overlap"]
    facts = [
        ["model", f"{m['path']} ({m['method']}, hash {m['content_hash']})"],
        ["data source", json.dumps(d["source"])],
        ["train / query / database", f"{d['train_size']} / {d['query_size']} / {d['database_size']}"],
        ["unreadable images skipped", f"{d['unreadable_queries']} queries, {d['unreadable_database']} database"],
        ["database codes", d["database_codes"]],
        ["queries without any relevant item", r["queries_without_relevant_items"]],
        [
            "overlap check",
            f"by {ov['checked_by']}: {ov['overlapping_queries']} overlapping queries"
            f"{' (allowed)' if ov['allowed'] else ''}",
        ],
    ]
    if report.get("hardness"):
        from cbir.bench.hardness import hardness_markdown

        plotted = "risk_coverage.png" in (report.get("files") or {}).get("plots", [])
        parts.append(hardness_markdown(report["hardness"], plotted))
    facts += [[f"wall time {k}", f"{v:.2f} s"] for k, v in report["wall_s"].items()]
    parts.append("## Run\n\n" + _md_table(["fact", "value"], facts, "ll"))
    if report.get("files"):
        parts.append("Plots: " + ", ".join(f"[{f}]({f})" for f in report["files"].get("plots", [])))
    return "\n\n".join(parts) + "\n"


# ============================================================================================
# plots
# ============================================================================================
def _label_groups(xs, ys, which, min_dist: float = 0.05) -> list[tuple[tuple[float, float], list[int]]]:
    """Points ``which`` of a curve on the unit square to label, merging those closer than
    ``min_dist`` into one label (``r=0,1,2``) so labels never print over each other."""
    groups: list[tuple[tuple[float, float], list[int]]] = []
    for i in which:
        if i >= len(xs):
            continue
        p = (float(xs[i]), float(ys[i]))
        for q, members in groups:
            if (p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 < min_dist**2:
                members.append(i)
                break
        else:
            groups.append((p, [i]))
    return groups


def write_plots(report: dict, out: Path) -> list[str]:
    """Write the PNG plots of ``report`` into ``out``; returns the file names.

    Uses matplotlib's object API (``Figure`` renders with its own Agg canvas), so no global
    backend is switched and no pyplot state is touched in the caller's process."""
    import matplotlib.ticker
    from matplotlib.figure import Figure

    def subplots(*args, **kw):
        fig = Figure(figsize=kw.pop("figsize"))
        return fig, fig.subplots(*args, **kw)

    out = Path(out)
    r, cov = report["retrieval"], report["coverage"]["database"]
    title = f"{report['model']['method']} {report['model']['nbits']} bits - {report['data']['name']}"
    written = []

    def save(fig, name):
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        written.append(name)

    pr = r["pr_by_radius"]
    fig, ax = subplots(figsize=(5, 4))
    ax.plot(pr["recall"], pr["precision"], "o-", ms=3)
    for (x, y), rads in _label_groups(pr["recall"], pr["precision"], (0, 1, 2, 4, 8)):
        ax.annotate("r=" + ",".join(map(str, rads)), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (empty ball = 0)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title("PR over Hamming radius", fontsize=9)
    ax.grid(alpha=0.3)
    save(fig, "pr_curve.png")

    fig, ax = subplots(figsize=(5, 4))
    for order in ("lex", "hamming"):
        ax.plot(r["ks"], r["precision_at_k"][order], "o-", ms=3, label=order)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("P@k")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "precision_at_k.png")

    rob = report.get("robustness") or {}
    fig, axes = subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, kind in zip(axes, ("jitter", "occlusion")):
        for e in rob.get(kind, []):
            ax.plot(range(1, len(e["retention"]) + 1), e["retention"], "o-", ms=2, label=f"{e['strength']:g}")
        ax.set_xlabel("prefix depth d (bits)")
        ax.set_title(f"{kind}", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if rob.get(kind):
            ax.legend(title="strength", fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    axes[0].set_ylabel("code retention")
    save(fig, "retention.png")

    hist = cov["bucket_size_histogram"]
    fig, ax = subplots(figsize=(5, 4))
    if len(hist["sizes"]) <= 30:  # one bar per occurring size, evenly spaced
        pos = np.arange(len(hist["sizes"]))
        ax.bar(pos, hist["buckets"])
        ax.set_xticks(pos, [str(v) for v in hist["sizes"]], fontsize=6, rotation=90)
    else:
        ax.bar(hist["sizes"], hist["buckets"])
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("bucket size (items sharing one code)")
    ax.set_ylabel("number of buckets")
    save(fig, "bucket_sizes.png")

    fig, ax = subplots(figsize=(5, 4))
    d = np.arange(1, cov["nbits"] + 1)
    ax.plot(d, cov["prefix_entropy"], "o-", ms=3, label="database")
    qcov = report["coverage"].get("queries")
    if qcov:
        ax.plot(d, qcov["prefix_entropy"], "s--", ms=2, label="queries")
    ax.plot(d, np.minimum(d, np.log2(cov["n"])), ":", color="grey", label="max min(d, log2 N)")
    ax.set_xlabel("prefix depth d (bits)")
    ax.set_ylabel("prefix entropy (bits)")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "prefix_entropy.png")
    if report.get("hardness"):
        from cbir.bench.hardness import plot_risk_coverage

        written.append(plot_risk_coverage(report["hardness"], out, title))
    return written


def write_report(report: dict, out: str | Path, plots: bool = True) -> dict:
    """Write ``report.json``, ``report.md`` and (``plots``) the PNG plots into ``out``.
    Returns ``{"json": path, "markdown": path, "plots": [names]}`` (also stored in the report)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names = write_plots(report, out) if plots else []
    report["files"] = {"json": "report.json", "markdown": "report.md", "plots": names}
    report["wall_s"]["write"] = round(time.perf_counter() - t0, 3)
    (out / "report.md").write_text(report_markdown(report))
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=json_default))
    tmp.replace(out / "report.json")
    return {"json": out / "report.json", "markdown": out / "report.md", "plots": [out / n for n in names]}
