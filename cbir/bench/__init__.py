"""``cbir bench`` reports: every retrieval, coverage and robustness figure of one model.

:func:`build_report` encodes the query and database sets with a model (or reads the database
codes from an index), computes every figure with :mod:`cbir.metrics` (nothing is re-defined
here; the definitions are the docstrings there) and :func:`write_report` writes

* ``report.json`` - everything (the schema is the dict returned by :func:`build_report`);
* ``report.md`` - the same figures as Markdown tables;
* PNG plots: ``pr_curve.png`` (precision-recall over Hamming radius), ``precision_at_k.png``,
  ``retention.png`` (hash-code retention vs prefix depth, colour jitter and occlusion),
  ``bucket_sizes.png`` (bucket-size histogram of the database codes) and
  ``prefix_entropy.png`` (entropy of the depth-``d`` prefixes).

Figures
-------
* Ranked retrieval, for both engine orders (``lex``: lexicographic; ``hamming``: Hamming then
  lexicographic then id): mAP@k, mAP@all, P@k and recall@k curves.
* **The headline: tie-aware mAP@k and mAP@all** for both orders (He et al., CVPR 2018):
  expected AP over all orders of tied items (lex: identical codes; Hamming: equal distance),
  independent of database order. The id-order mAP figures follow them: with many shared
  codes they move with database order alone, so they are never the headline.
* Hamming-ball retrieval: precision/recall for every radius ``r = 0..B``, and P@H<=2 with the
  fraction of queries whose radius-2 ball is empty (those score 0 and count).
* Coverage of the database codes (thesis Table 3.5): entropy, unique %, average collision
  count, per-depth prefix entropy and balance, per-bit balance, bit correlation; unique % and
  collisions beside what random codes give at the same N and B
  (:func:`cbir.metrics.random_expectation`; below the class prefix when there are class bits).
* Robustness (thesis §3.3.2): for colour jitter and occlusion of increasing strength, the
  fraction of query images whose code prefix of depth ``d`` is unchanged, for every ``d``.
  Perturbations are applied to the raw ``uint8`` pixels, then the model's eval transform.
* Run facts: train / query / database sizes, the overlap check (a query whose pixels (in-memory
  sets) or file (file-backed sets) also occur in the database is an error unless
  ``allow_overlap``), the model's content hash, wall times.

Relevance is "same class", or "at least one shared label" for multi-label data.
"""

from cbir.bench.compare import compare_rows, compare_table, find_models, run_compare
from cbir.bench.config import (
    DEFAULT_JITTER,
    DEFAULT_KS,
    DEFAULT_OCCLUSION,
    FORMAT,
    BenchConfig,
    BenchData,
    load_bench_data,
)
from cbir.bench.render import headline_table, report_markdown, write_plots, write_report
from cbir.bench.report import build_report, headline
from cbir.bench.robustness import perturb_jitter, perturb_occlusion, robustness_report
from cbir.bench.sources import GrpcSearcher

__all__ = [
    "BenchConfig",
    "BenchData",
    "load_bench_data",
    "build_report",
    "write_report",
    "write_plots",
    "headline",
    "headline_table",
    "compare_rows",
    "compare_table",
    "run_compare",
    "GrpcSearcher",
    "find_models",
    "report_markdown",
    "robustness_report",
    "perturb_jitter",
    "perturb_occlusion",
    "FORMAT",
    "DEFAULT_JITTER",
    "DEFAULT_OCCLUSION",
    "DEFAULT_KS",
]
