"""Tests of ``cbir bench`` (cbir/bench.py, cbir/cli/bench_cmd.py): the report's figures equal
direct cbir.metrics calls on the same codes, files and plots are written, the overlap check,
``bench compare``, multi-label manifests end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cbir import metrics as M
from cbir.bench import (
    BenchConfig,
    build_report,
    load_bench_data,
    perturb_jitter,
    perturb_occlusion,
    robustness_report,
    write_report,
)
from cbir.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = dict(
    limit_queries=40,
    limit_database=300,
    k=100,
    robustness_images=12,
    jitter=(0.2, 0.5),
    occlusion=(0.1, 0.3),
    progress=False,
)
SMALL_ARGS = [
    "--limit-queries",
    "30",
    "--limit-database",
    "200",
    "--k",
    "50",
    "--robustness-images",
    "8",
    "--jitter",
    "0.3",
    "--occlusion",
    "0.2",
    "--no-progress",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from cbir.engine import TrainConfig, train

    out = tmp_path_factory.mktemp("bench_model")
    train(
        TrainConfig(
            method="ddtl",
            dataset="digits",
            backbone="convnet",
            depth=4,
            epochs=1,
            max_steps_per_epoch=3,
            batch_size=64,
            out=str(out),
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="module")
def hasher(model_dir):
    from cbir.models.hasher import Hasher

    return Hasher.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def second_model(model_dir, tmp_path_factory):
    """Another valid checkpoint: the first model with perturbed weights (no training)."""
    import torch

    from cbir.models.hasher import Hasher

    h = Hasher.load(model_dir, device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in h.method.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 else 1.0))
    out = tmp_path_factory.mktemp("bench_model2")
    h.save(out / "model.pt")
    return out


@pytest.fixture(scope="module")
def report_run(model_dir, hasher, tmp_path_factory):
    cfg = BenchConfig(model=str(model_dir), dataset="digits", **SMALL)
    rep = build_report(cfg, hasher=hasher)
    out = tmp_path_factory.mktemp("bench_report")
    files = write_report(rep, out)
    return cfg, rep, out, files


def _direct(cfg, hasher):
    """Encode the benchmark's query/database sets directly and return codes and labels."""
    data = load_bench_data(cfg, hasher.image_size)
    qc, _, qi = hasher.encode_imageset(data.query)
    dc, _, di = hasher.encode_imageset(data.database)
    return qc, data.query_labels[qi], dc, data.db_labels[di]


def test_report_matches_direct_metric_calls(report_run, hasher):
    cfg, _, out, _ = report_run
    rep = json.loads((out / "report.json").read_text())  # what was written, after a JSON round trip
    qc, ql, dc, dl = _direct(cfg, hasher)
    r = rep["retrieval"]
    assert r["k"] == 100 and r["k_requested"] == 100
    for order in ("lex", "hamming"):
        assert r["map_at_k"][order] == M.mean_average_precision(qc, ql, dc, dl, 100, order=order)
        assert r["map_all"][order] == M.mean_average_precision(qc, ql, dc, dl, None, order=order)
        np.testing.assert_array_equal(
            r["precision_at_k"][order], M.precision_at_k(qc, ql, dc, dl, r["ks"], order=order)
        )
        np.testing.assert_array_equal(r["recall_at_k"][order], M.recall_at_k(qc, ql, dc, dl, r["ks"], order=order))
        assert r["tie_aware_map_at_k"][order] == M.tie_aware_average_precision(qc, ql, dc, dl, 100, order)
        assert r["tie_aware_map_all"][order] == M.tie_aware_average_precision(qc, ql, dc, dl, None, order)
    pr = M.precision_recall_by_radius(qc, ql, dc, dl)
    np.testing.assert_array_equal(r["pr_by_radius"]["precision"], pr.precision)
    np.testing.assert_array_equal(r["pr_by_radius"]["recall"], pr.recall)
    np.testing.assert_array_equal(r["pr_by_radius"]["empty_fraction"], pr.empty_fraction)
    rp = M.precision_within_radius(qc, ql, dc, dl, 2)
    assert (r["p_at_h2"]["precision"], r["p_at_h2"]["empty_fraction"]) == (rp.precision, rp.empty_fraction)
    assert r["ks"] == sorted(r["ks"]) and max(r["ks"]) <= 300 and 100 in r["ks"]
    cov = rep["coverage"]["database"]
    ref = M.coverage_report(dc)
    for key in ("entropy_bits", "unique_percent", "average_collision_count", "prefix_entropy", "bucket_size_histogram"):
        assert cov[key] == ref[key], key
    h = rep["headline"]
    assert h["map_at_k_lex"] == r["map_at_k"]["lex"] and h["entropy"] == cov["entropy_bits"]
    assert h["tie_aware_map_at_k_lex"] == r["tie_aware_map_at_k"]["lex"]
    assert h["tie_aware_map_all_hamming"] == r["tie_aware_map_all"]["hamming"]
    cb = rep["model"]["layout"]["class_bits"]
    assert h["random_unique_percent"] == M.random_expectation(dc, cb if 0 < cb < dc.nbits else 0)["unique_percent"]
    # the printed table leads with the tie-aware figures, id-order mAP after them
    from cbir.bench import headline_table

    lines = headline_table(rep).splitlines()
    assert lines[3].startswith("tie-aware mAP@100 (lexicographic)")
    assert lines[4].startswith("tie-aware mAP@100 (Hamming)")
    assert h["collisions"] == cov["average_collision_count"] and h["p_at_h2"] == rp.precision


def test_run_facts(report_run, hasher):
    _, rep, _, _ = report_run
    d = rep["data"]
    assert (d["train_size"], d["query_size"], d["database_size"]) == (1497, 40, 300)
    assert (d["query_source_size"], d["database_source_size"]) == (300, 1497)
    assert rep["model"]["content_hash"] == hasher.content_hash
    assert rep["model"]["nbits"] == hasher.nbits == len(rep["coverage"]["database"]["prefix_entropy"])
    assert rep["overlap"] == {"checked_by": "pixels", "overlapping_queries": 0, "allowed": False}
    assert rep["server"] is None and d["database_codes"] == "encoded"
    assert d["relevance"] == "same class" and not d["multilabel"]
    for key in ("load_data", "encode_queries", "encode_database", "retrieval", "robustness", "total"):
        assert rep["wall_s"][key] >= 0


def test_robustness_section(report_run, hasher):
    _, rep, _, _ = report_run
    rob = rep["robustness"]
    assert rob["n_images"] == 12
    assert [e["strength"] for e in rob["jitter"]] == [0.2, 0.5]
    assert [e["strength"] for e in rob["occlusion"]] == [0.1, 0.3]
    for e in rob["jitter"] + rob["occlusion"]:
        ret = np.array(e["retention"])
        assert len(ret) == hasher.nbits and ((0 <= ret) & (ret <= 1)).all()
        assert (np.diff(ret) <= 0).all()  # a longer prefix is retained at most as often


def test_zero_strength_perturbations_retain_every_code(hasher):
    """Strength 0 leaves the pixels unchanged, so retention is 1 at every depth (the clean and
    perturbed codes go through the same raw-pixel -> eval-transform path)."""
    from cbir.data import load_dataset

    q = load_dataset("digits").query
    rob = robustness_report(hasher, q, np.arange(10), jitter=(0.0,), occlusion=(0.0,), progress=False)
    for kind in ("jitter", "occlusion"):
        assert rob[kind][0]["retention"] == [1.0] * hasher.nbits


def test_perturbations():
    import torch

    rng = np.random.default_rng(0)
    imgs = [torch.randint(0, 256, (3, 10, 12), dtype=torch.uint8), torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)]
    assert all(torch.equal(a, b) for a, b in zip(perturb_jitter(imgs, 0.0, rng), imgs))
    j = perturb_jitter(imgs, 0.5, rng)
    assert [x.shape for x in j] == [x.shape for x in imgs] and all(x.dtype == torch.uint8 for x in j)
    assert not torch.equal(j[0], imgs[0])
    white = [torch.full((3, 10, 10), 255, dtype=torch.uint8)]
    o = perturb_occlusion(white, 0.25, rng)[0]
    assert int((o == 0).all(dim=0).sum()) == 25  # a 5x5 black square = 25 % of the area
    assert torch.equal(perturb_occlusion(white, 0.0, rng)[0], white[0])


def test_files_and_plots_written(report_run):
    _, rep, out, files = report_run
    assert files["json"].is_file() and files["markdown"].is_file()
    names = {p.name for p in files["plots"]}
    assert names == {"pr_curve.png", "precision_at_k.png", "retention.png", "bucket_sizes.png", "prefix_entropy.png"}
    for p in files["plots"]:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, p
    md = (out / "report.md").read_text()
    assert "mAP@100 (lexicographic)" in md and "P@H<=2" in md and "retention" in md
    assert json.loads((out / "report.json").read_text())["files"]["plots"] == [p.name for p in files["plots"]]


def test_overlap_check_raises(model_dir, hasher, tmp_path):
    """The same source as queries and database: every query is in the database."""
    src = _write_manifest(tmp_path, n=12)
    cfg = BenchConfig(model=str(model_dir), queries=str(src), database=str(src), robustness=False, progress=False, k=5)
    with pytest.raises(ValueError, match="overlap"):
        build_report(cfg, hasher=hasher)
    cfg.allow_overlap = True
    rep = build_report(cfg, hasher=hasher)
    assert rep["overlap"] == {"checked_by": "path", "overlapping_queries": 12, "allowed": True}
    # in-memory sets: the digits protocol's query images used as the database too
    cfg2 = BenchConfig(model=str(model_dir), queries="digits", database="digits", robustness=False, progress=False)
    with pytest.raises(ValueError, match="overlap check \\(pixels\\)"):
        build_report(cfg2, hasher=hasher)


def test_config_validation(model_dir):
    with pytest.raises(ValueError, match="not both"):
        BenchConfig(model=str(model_dir), dataset="digits", queries="a", database="b").validate()
    with pytest.raises(ValueError, match="go together"):
        BenchConfig(model=str(model_dir), queries="a").validate()


# --- multi-label manifests --------------------------------------------------------------------
LABEL_SETS = ["cat|dog", "dog", "cat", "bird|cat", "bird", "dog|bird", "fish", "fish|cat"]


def _write_manifest(folder: Path, n: int = 24, name: str = "manifest.csv", labels=LABEL_SETS, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img_dir = folder / f"{Path(name).stem}_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        arr[: 4 + i % 8] = (i * 37) % 256
        p = img_dir / f"img{i:03d}.png"
        Image.fromarray(arr, "RGB").save(p)
        rows.append((f"{img_dir.name}/{p.name}", labels[i % len(labels)]))
    path = folder / name
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        w.writerows(rows)
    return path


def test_multilabel_manifest_end_to_end(model_dir, tmp_path, capsys):
    src = _write_manifest(tmp_path)
    out = tmp_path / "ml_report"
    rc = main(
        [
            "bench",
            "--model",
            str(model_dir),
            "--dataset",
            str(src),
            "--query-fraction",
            "0.25",
            "--k",
            "10",
            "--robustness-images",
            "4",
            "--jitter",
            "0.3",
            "--occlusion",
            "0.2",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "multi-label" in printed and "mAP@10 (lexicographic)" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["multilabel"] and rep["data"]["relevance"] == "shares at least one label"
    assert rep["data"]["query_size"] + rep["data"]["database_size"] == 24
    assert rep["overlap"]["checked_by"] == "path" and rep["overlap"]["overlapping_queries"] == 0
    # the figures equal direct metric calls with multi-hot labels
    from cbir.models.hasher import Hasher

    h = Hasher.load(model_dir, device="cpu")
    cfg = BenchConfig(model=str(model_dir), dataset=str(src), query_fraction=0.25)
    qc, ql, dc, dl = _direct(cfg, h)
    assert ql.ndim == 2 and ql.shape[1] == 4
    assert rep["retrieval"]["map_at_k"]["hamming"] == M.mean_average_precision(qc, ql, dc, dl, 10, order="hamming")
    assert rep["retrieval"]["tie_aware_map_all"]["hamming"] == M.tie_aware_average_precision(qc, ql, dc, dl)
    assert rep["retrieval"]["tie_aware_map_all"]["lex"] == M.tie_aware_average_precision(qc, ql, dc, dl, None, "lex")
    for p in rep["files"]["plots"]:
        assert (out / p).read_bytes()[:8] == PNG_MAGIC


def test_separate_query_and_database_manifests_share_a_vocabulary(model_dir, hasher, tmp_path):
    """Queries labelled {cat, dog}, database {dog, fish}: labels are matched by name."""
    q = _write_manifest(tmp_path, n=6, name="q.csv", labels=["cat", "cat|dog"], seed=1)
    d = _write_manifest(tmp_path, n=10, name="d.csv", labels=["dog", "fish", "dog|fish", "fish", "fish"], seed=2)
    cfg = BenchConfig(model=str(model_dir), queries=str(q), database=str(d), robustness=False, progress=False, k=10)
    data = load_bench_data(cfg, hasher.image_size)
    assert data.multilabel and set(data.class_names) == {"cat", "dog", "fish"}
    rep = build_report(cfg, hasher=hasher)
    # queries "cat" have no relevant item; "cat|dog" share "dog" with the 4 dog images
    assert rep["retrieval"]["queries_without_relevant_items"] == 3
    assert rep["retrieval"]["mean_relevant_per_query"] == pytest.approx(4 * 3 / 6)
    assert rep["data"]["train_size"] is not None  # from the model's config.json


# --- CLI ---------------------------------------------------------------------------------------
def test_cli_bench_and_compare(model_dir, second_model, tmp_path, capsys):
    out = tmp_path / "one"
    assert (
        main(["bench", "--model", str(model_dir), "--dataset", "digits", *SMALL_ARGS, "--no-plots", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "mAP@50 (Hamming)" in printed and "30 queries x 200 database" in printed
    assert (out / "report.json").is_file() and not list(out.glob("*.png"))

    cmp_out = tmp_path / "cmp"
    assert (
        main(
            [
                "bench",
                "compare",
                str(model_dir),
                str(second_model),
                "--dataset",
                "digits",
                *SMALL_ARGS,
                "--no-robustness",
                "--no-plots",
                "--out",
                str(cmp_out),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    lines = [ln for ln in table.splitlines() if ln.startswith("ddtl")]
    assert len(lines) == 4  # a retrieval table and a coverage table, one row per model each
    headers = [ln for ln in table.splitlines() if ln.startswith("method")]
    assert len(headers) == 2
    for col in ("method", "bits", "tie@50 lex", "tie@all Ham", "mAP@50 lex*"):
        assert col in headers[0]
    for col in ("P@H<=2", "entropy", "unique %", "random %", "collisions", "random coll."):
        assert col in headers[1]
    assert max(len(ln) for ln in table.split("\nwritten:")[0].splitlines()) <= 110
    summary = json.loads((cmp_out / "compare.json").read_text())
    assert len(summary["rows"]) == 2 and summary["same_data"]
    assert summary["rows"][0]["model"] != summary["rows"][1]["model"]
    md = (cmp_out / "compare.md").read_text()
    assert md.count("| ddtl |") == 4
    # earlier reports (report.json files or their directories) are compared without re-running
    assert main(["bench", "compare", str(out / "report.json"), *summary["reports"], "--out", str(tmp_path / "c3")]) == 0
    assert sum(ln.startswith("ddtl") for ln in capsys.readouterr().out.splitlines()) == 2 * 3  # two tables


def test_cli_compare_accepts_reports_and_options_before_compare(tmp_path, report_run, capsys):
    _, _, out, _ = report_run
    cmp_out = tmp_path / "cmp2"
    assert (
        main(
            ["bench", "--k", "7", "compare", str(out / "report.json"), str(out / "report.json"), "--out", str(cmp_out)]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert sum(ln.startswith("ddtl") for ln in table.splitlines()) == 4  # two tables
    assert "mAP@100 lex" in table and "tie@100 lex" in table  # the reports' own k, not re-run
    # a broken model does not stop the others; it is listed and the exit code is 1
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["bench", "compare", str(out / "report.json"), str(bad), "--out", str(cmp_out)]) == 1
    captured = capsys.readouterr()
    assert sum(ln.startswith("ddtl") for ln in captured.out.splitlines()) == 2 * 1  # two tables
    assert "failed: " in captured.err and "broken.pt" in captured.err
    summary = json.loads((cmp_out / "compare.json").read_text())
    assert len(summary["rows"]) == 1 and summary["errors"][0]["path"].endswith("broken.pt")


def test_cli_help_mentions_both_forms(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "cbir bench --model M" in text and "cbir bench compare M1 M2" in text and "--address" in text


def test_cli_errors(model_dir, capsys):
    assert main(["bench"]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["bench", "--model", str(model_dir), "--queries", "digits"]) == 2
    assert "go together" in capsys.readouterr().err


# --- --index and --address ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_db(hasher):
    """The digits benchmark database encoded once: (data, codes, encoded rows)."""
    data = load_bench_data(BenchConfig(model="", dataset="digits"), hasher.image_size)
    codes, _, idx = hasher.encode_imageset(data.database)
    return data, codes, idx


@pytest.fixture(scope="module")
def digits_index(model_dir, tmp_path_factory):
    """The digits database indexed by the real `cbir index build` (ids = database positions)."""
    pytest.importorskip("cbir.indexer")
    out = tmp_path_factory.mktemp("bench_ix") / "index"
    assert (
        main(["index", "build", "--model", str(model_dir), "--dataset", "digits", "--out", str(out), "--no-progress"])
        == 0
    )
    return out


def test_index_gives_the_same_figures(model_dir, hasher, digits_index):
    base = dict(
        model=str(model_dir),
        dataset="digits",
        limit_queries=20,
        limit_database=400,
        robustness=False,
        progress=False,
        k=50,
    )
    enc = build_report(BenchConfig(**base), hasher=hasher)
    ix = build_report(BenchConfig(**base, index=str(digits_index)), hasher=hasher)
    assert ix["data"]["database_codes"].startswith("index")
    assert ix["data"]["index"]["used"] == 400 and ix["data"]["index"]["missing_from_index"] == 0
    assert ix["data"]["index"]["spot_checked"] > 0
    assert ix["headline"] == enc["headline"] and ix["retrieval"] == enc["retrieval"]


def test_index_from_another_model_or_data_is_refused(
    model_dir, hasher, second_model, digits_db, digits_index, tmp_path
):
    from cbir.indexer import build_index
    from cbir.models.hasher import Hasher

    other = Hasher.load(second_model, device="cpu")
    with pytest.raises(ValueError, match="built with model"):
        build_report(
            BenchConfig(
                model=str(second_model),
                dataset="digits",
                index=str(digits_index),
                limit_queries=5,
                robustness=False,
                progress=False,
            ),
            hasher=other,
        )
    # right model hash, but codes that are not the images' codes (every bit inverted): the spot
    # check (re-encoding a sample of database images) catches it
    from cbir.codes import Codes

    data, codes, idx = digits_db
    flipped = Codes.from_bits(1 - codes.to_bits())
    bad = build_index(
        tmp_path / "bad", data.database_positions[idx], flipped, layout=hasher.layout, model_hash=hasher.content_hash
    )
    with pytest.raises(ValueError, match="spot-checked"):
        build_report(
            BenchConfig(
                model=str(model_dir),
                dataset="digits",
                index=str(bad),
                limit_queries=5,
                robustness=False,
                progress=False,
            ),
            hasher=hasher,
        )


def _write_folder(root: Path, per_class: int, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
            arr[:, : 10 if c == "a" else 3] = 255
            Image.fromarray(arr, "RGB").save(root / c / f"{c}{i:02d}.png")
    return root


def test_index_of_a_folder_is_matched_by_path(model_dir, hasher, tmp_path):
    """`cbir index build --images` numbers the files its own way; bench matches them by path."""
    pytest.importorskip("cbir.indexer")
    qdir = _write_folder(tmp_path / "q", 2, seed=1)
    ddir = _write_folder(tmp_path / "db", 8, seed=2)
    ix = tmp_path / "ix"
    assert (
        main(["index", "build", "--model", str(model_dir), "--images", str(ddir), "--out", str(ix), "--no-progress"])
        == 0
    )
    base = dict(model=str(model_dir), queries=str(qdir), database=str(ddir), robustness=False, progress=False, k=5)
    enc = build_report(BenchConfig(**base), hasher=hasher)
    rep = build_report(BenchConfig(**base, index=str(ix)), hasher=hasher)
    assert rep["data"]["index"]["matched_by"] == "path" and rep["data"]["index"]["used"] == 16
    assert rep["retrieval"] == enc["retrieval"]


def test_address_figures_equal_in_process(model_dir, hasher, digits_index, tmp_path, capsys):
    server = pytest.importorskip("cbir.server")
    with server.serve_in_process(digits_index, hasher) as (address, _stub):
        out = tmp_path / "srv"
        rc = main(
            [
                "bench",
                "--model",
                str(model_dir),
                "--dataset",
                "digits",
                "--address",
                address,
                "--limit-queries",
                "25",
                "--k",
                "100",
                "--no-robustness",
                "--no-plots",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"server {address}" in printed and "(equal)" in printed
    rep = json.loads((out / "report.json").read_text())
    srv = rep["server"]
    assert srv["equal_in_process"] and srv["server_count"] == 1497
    for order in ("lex", "hamming"):
        assert srv[order]["map_at_k"] == rep["retrieval"]["map_at_k"][order]
        assert srv[order]["precision_at_k"] == rep["retrieval"]["precision_at_k"][order]
        assert srv[order]["map_all"] == rep["retrieval"]["map_all"][order]
        assert srv[order]["search_calls"] >= 1


def test_address_with_limited_database_is_refused(model_dir):
    with pytest.raises(ValueError, match="--limit-database"):
        BenchConfig(model=str(model_dir), dataset="digits", address="127.0.0.1:1", limit_database=10).validate()


def test_pr_curve_labels_never_overprint():
    from cbir.bench.render import _label_groups

    # radii 0, 1, 2 at (almost) the same point share one label; 4 and 8 stand apart
    xs, ys = [0.0, 0.001, 0.01, 0.2, 0.3, 0.5, 0.6, 0.7, 0.9], [1.0, 1.0, 0.99, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3]
    groups = _label_groups(xs, ys, (0, 1, 2, 4, 8))
    assert [g[1] for g in groups] == [[0, 1, 2], [4], [8]]
    assert _label_groups(xs[:3], ys[:3], (0, 1, 2, 4, 8)) == [((0.0, 1.0), [0, 1, 2])]
