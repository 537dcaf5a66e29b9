"""``cbir bench compare``: one table across several models on the same data."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import textwrap
from pathlib import Path
from typing import Sequence

from cbir.bench.config import FORMAT, BenchConfig
from cbir.bench.render import _md_table, _text_table, write_report
from cbir.bench.report import build_report
from cbir.codes import json_default

log = logging.getLogger("cbir.bench")


# ============================================================================================
# compare
# ============================================================================================
def find_models(paths: Sequence[str]) -> list[Path]:
    """Expand ``cbir bench compare`` arguments: a checkpoint file, a directory holding
    ``model.pt``, a directory of such directories, or a ``report.json`` (used as is)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            out.append(p)
        elif p.is_dir() and (p / "model.pt").is_file():
            out.append(p / "model.pt")
        elif p.is_dir() and (p / "report.json").is_file():
            out.append(p / "report.json")
        elif p.is_dir():
            found = sorted(p.glob("*/model.pt")) or sorted(p.glob("*/report.json"))
            if not found:
                raise FileNotFoundError(f"{p}: no model.pt (or */model.pt, */report.json) inside")
            out += found
        else:
            raise FileNotFoundError(f"no model or report at {p}")
    return out


def compare_rows(reports: Sequence[dict]) -> list[dict]:
    rows = []
    for rep in reports:
        h = dict(rep["headline"])
        h["data"] = rep["data"]["name"]
        h["queries"], h["database"] = rep["data"]["query_size"], rep["data"]["database_size"]
        h["path"] = rep["model"]["path"]
        rows.append(h)
    return rows


#: two tables, each narrow enough for a terminal: ranked retrieval, then coverage
_RETRIEVAL_COLS = [
    ("method", "method", None),
    ("bits", "bits", None),
    ("model", "model", None),
    ("tie@{k} lex", "tie_aware_map_at_k_lex", 4),
    ("tie@{k} Ham", "tie_aware_map_at_k_hamming", 4),
    ("tie@all lex", "tie_aware_map_all_lex", 4),
    ("tie@all Ham", "tie_aware_map_all_hamming", 4),
    ("mAP@{k} lex*", "map_at_k_lex", 4),
    ("mAP@{k} Ham*", "map_at_k_hamming", 4),
]
_COVERAGE_COLS = [
    ("method", "method", None),
    ("bits", "bits", None),
    ("model", "model", None),
    ("P@H<=2", "p_at_h2", 4),
    ("empty H<=2 %", "p_at_h2_empty", "pct"),
    ("entropy", "entropy", 3),
    ("unique %", "unique_percent", 2),
    ("random %", "random_unique_percent", 2),
    ("collisions", "collisions", 3),
    ("random coll.", "random_collisions", 3),
]
_LEGEND = (
    "tie = tie-aware mAP (expected AP over every order of tied items; independent of database "
    "order); * = ties broken by id (depends on database order); random = what random codes give "
    "at the same N and B (below the class bits when there are any)"
)


def _cells(rows: list[dict], cols) -> tuple[list[str], list[list[str]]]:
    ks = {r["k"] for r in rows}
    k = ks.pop() if len(ks) == 1 else "k"
    header = [c[0].format(k=k) for c in cols]
    body = []
    for r in rows:
        cells = []
        for _, key, nd in cols:
            v = r[key]
            cells.append(f"{100 * v:.1f}" if nd == "pct" else (f"{v:.{nd}f}" if nd else str(v)))
        body.append(cells)
    return header, body


def compare_table(rows: list[dict], markdown: bool = False) -> str:
    """The thesis's Tables 3.4/3.5 across models: a retrieval table and a coverage table."""
    parts = []
    for cols in (_RETRIEVAL_COLS, _COVERAGE_COLS):
        header, body = _cells(rows, cols)
        parts.append(
            _md_table(header, body, "lrl" + "r" * (len(header) - 3)) if markdown else _text_table(header, body)
        )
    legend = _LEGEND if markdown else "\n".join(textwrap.wrap(_LEGEND, 100))
    return "\n\n".join(parts) + "\n\n" + legend


def run_compare(
    model_paths: Sequence[str], base: BenchConfig, out: str | Path, hasher_loader=None
) -> tuple[list[dict], dict]:
    """Bench every model of ``model_paths`` (see :func:`find_models`) on the data of ``base``,
    writing each report into ``out/<n>-<method>/``, then ``compare.md`` and ``compare.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    reports = []
    data_desc = set()
    models = find_models(model_paths)
    errors = []
    for i, p in enumerate(
        tqdm(models, desc="compare", unit="model", disable=not base.progress or len(models) < 2, leave=False)
    ):
        try:
            if p.name == "report.json":
                rep = json.loads(p.read_text())
                if rep.get("format") != FORMAT:
                    raise ValueError(f"not a {FORMAT} report")
            else:
                cfg = dataclasses.replace(base, model=str(p))
                rep = build_report(cfg)
                sub = out / f"{i:02d}-{rep['model']['method']}-{rep['model']['content_hash'][:8]}"
                write_report(rep, sub, plots=base.plots)
                rep["report_dir"] = str(sub)
        except (ValueError, FileNotFoundError, KeyError) as exc:  # one bad model does not stop the others
            log.error("bench compare: %s: %s", p, exc)
            errors.append({"path": str(p), "error": str(exc)})
            continue
        data_desc.add((rep["data"]["name"], rep["data"]["query_size"], rep["data"]["database_size"]))
        reports.append(rep)
    rows = compare_rows(reports)
    if len(data_desc) > 1:
        log.warning("the models were benchmarked on different data: %s", sorted(data_desc))
    summary = {
        "format": FORMAT + "/compare",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rows": rows,
        "reports": [r.get("report_dir") for r in reports],
        "same_data": len(data_desc) <= 1,
        "errors": errors,
    }
    dd = sorted(data_desc)
    md = [
        "# cbir bench compare",
        "",
        "Data: " + "; ".join(f"{a} ({q} queries x {n} database)" for a, q, n in dd) + ".",
        "tie-aware: lex - identical codes tie; Hamming - equal distances tie; mAP@k: DeepHash AP@k; "
        "P@H<=2: empty balls score 0; entropy in bits; collisions: average collision count.",
        "",
        compare_table(rows, markdown=True),
        "",
    ]
    md += ["Reports:", ""] + [f"- {r.get('report_dir') or r['model']['path']}" for r in reports] + [""]
    if errors:
        md += ["Failed:", ""] + [f"- {e['path']}: {e['error']}" for e in errors] + [""]
    (out / "compare.md").write_text("\n".join(md))
    (out / "compare.json").write_text(json.dumps(summary, indent=1, default=json_default))
    return rows, summary
