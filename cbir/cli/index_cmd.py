"""``cbir index``: build an on-disk index from a trained model, and print its statistics.

``cbir index build --model M (--images DIR | --dataset NAME) --out DIR [--batch-size N]
[--workers N]``: DataLoader workers decode the images, the hasher encodes them in inference
mode, the codes are sorted and appended to LMDB. Unreadable images are reported (path and
reason) and skipped. The index is built in a temporary directory and renamed into place, so an
interrupted build leaves the previous index (or none); rerunning is a clean restart (there is
no partial resume). ``--out`` must be new, empty or an existing cbir index: cbir refuses to
replace anything else (a folder of photos, a file) and never deletes a file it did not write.

``--shards S`` (a power of two) splits the collection by its leading ``log2 S`` code bits into
S complete LMDB indexes under ``DIR/shards/`` with one top-level manifest
(:mod:`cbir.indexer.sharded`); ``open_index`` answers every search on it exactly. Sharded
indexes are read-only (rebuild to change them).

``--engine ray`` (``pip install -e ".[distributed]"``): Ray Data reads and decodes the files
in parallel tasks and encodes them with ``map_batches`` on an actor pool (GPU actors when CUDA
is available) in the same batches as the local path, so the codes are the same byte for byte
(:mod:`cbir.distributed.ray_encode`); the index is then written by one sorted append pass.

An ensemble checkpoint (``cbir train --ensemble E``) also stores each item's class answer in
its metadata: ``hardness`` (in (0, 1], 1 / (1 + the gap between the two most confident
classes' t-test confidences)), ``idk`` (its prediction set is not exactly one class) and
``prediction_set`` (class ids, most confident first); ``build_params.ensemble`` records E, the
perturbation, the thresholds and the number of IDK items (local engine only).

``cbir index stats DIR [--json]``: counts, layout, disk use and the coverage figures of
``cbir.metrics.coverage`` (entropy, unique %, average collision count, per-depth prefix
entropy, bucket-size histogram) -- the same dict the server's Stats call returns.

``cbir index compact DIR``: rewrite the LMDB file without its free pages (pages freed by
upserts and deletes, or pinned by a reader that did not refresh) and swap the compacted copy in
atomically; open readers see it on their next ``refresh()``, writers on their next write.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("cbir.index")


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help="build an on-disk index / print index statistics", description=__doc__)
    sub = p.add_subparsers(dest="index_command", metavar="ACTION")
    sub.required = True

    b = sub.add_parser("build", help="encode images with a trained model and build an index")
    b.add_argument("--model", required=True, type=Path, help="model checkpoint (from `cbir train`)")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of images (class = first sub-folder, if any)")
    src.add_argument("--dataset", help="dataset name or path understood by cbir.data.load_dataset")
    b.add_argument(
        "--split",
        default="database",
        choices=["database", "query", "train"],
        help="--dataset split to index (default: %(default)s)",
    )
    b.add_argument(
        "--out",
        required=True,
        type=Path,
        help="index directory to create, or an existing cbir index to replace; any "
        "other existing path is refused (see --force)",
    )
    b.add_argument(
        "--force",
        action="store_true",
        help="write into an --out that is not a cbir index (or lies inside the image "
        "source): only manifest.json, lmdb/ and derived/ are written there, every "
        "other file stays",
    )
    b.add_argument("--batch-size", type=int, default=128, help="encoding batch size (default: %(default)s)")
    b.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader worker processes; with --engine ray: encoder actors (0 = one per "
        "GPU, else half the CPUs) (default: %(default)s)",
    )
    b.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process (and --workers DataLoader workers); ray: Ray Data reads "
        "the files in parallel tasks and encodes on actors (GPU actors when CUDA is "
        'available), needs pip install -e ".[distributed]" (default: %(default)s)',
    )
    b.add_argument("--device", default="auto", help="torch device (default: %(default)s)")
    b.add_argument(
        "--shards",
        type=int,
        default=1,
        help="split the index by its leading code bits into this many LMDB indexes "
        "(a power of two; each shard a complete index; read-only; default: "
        "%(default)s = one plain index)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=run_build)

    s = sub.add_parser("stats", help="print the statistics of an index")
    s.add_argument("index", type=Path, help="index directory")
    s.add_argument("--json", action="store_true", help="print the full statistics as JSON")
    s.set_defaults(func=run_stats)

    c = sub.add_parser("compact", help="compact an index's LMDB file (atomic swap)")
    c.add_argument("index", type=Path, help="index directory")
    c.set_defaults(func=run_compact)


# ---------------------------------------------------------------------------------------------
def _image_folder(root: Path):
    """An ImageSet over every image file under ``root`` (:func:`cbir.data.sources.image_files`);
    class = first sub-folder, ``(none)`` for images directly in ``root``."""
    from cbir.data import ImageSet
    from cbir.data.sources import image_files

    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: no such directory")
    files = image_files(root)
    if not files:
        raise ValueError(f"--images {root}: no image files found")
    cls = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "(none)" for p in files]
    classes = sorted(set(cls) - {"(none)"})
    if "(none)" in cls:
        classes = ["(none)"] + classes
    cidx = {c: i for i, c in enumerate(classes)}
    return ImageSet(
        np.array([cidx[c] for c in cls], dtype=np.int64), classes, paths=[str(p) for p in files], name=root.name
    )


def _metadata(imageset, indices: np.ndarray, source: str, model_classes=()) -> list[dict]:
    """Item metadata: source, path, label name(s) and label id(s). Label ids are the *model's*
    class indices (``model_classes``, the CodeLayout's class names), so an index built from a
    folder numbers labels as the model does; a label the model does not know gets no id."""
    names = imageset.class_names
    paths = getattr(imageset, "paths", None)
    labels = np.asarray(imageset.labels)
    model_id = {c: i for i, c in enumerate(model_classes or ())}

    def lid(j: int):
        return model_id.get(names[j]) if model_id else j

    out = []
    for i in indices.tolist():
        m: dict = {"source": source, "index": int(i)}
        if paths is not None:
            m["path"] = str(paths[i])
        if imageset.multilabel:
            on = np.flatnonzero(labels[i]).tolist()
            m["labels"] = [names[j] for j in on]
            m["label_ids"] = [lid(j) for j in on if lid(j) is not None]
        else:
            j = int(labels[i])
            m["label"] = names[j] if names else j
            if lid(j) is not None:
                m["label_id"] = lid(j)
        out.append(m)
    return out


def _is_ensemble(hasher) -> bool:
    return hasattr(hasher, "encode_imageset_decisions")


def _add_hardness(meta: list[dict], decision) -> None:
    """An ensemble's class answer per item (:func:`cbir.uncertainty.class_decision`):
    ``hardness`` in (0, 1] (1 / (1 + gap between the two most confident classes)), ``idk`` (the
    prediction set is not exactly one class) and ``prediction_set`` (model class ids, best first)."""
    for m, h, k, ps in zip(meta, decision.hardness.tolist(), decision.idk.tolist(), decision.sets()):
        m["hardness"] = float(h)
        m["idk"] = bool(k)
        m["prediction_set"] = [int(c) for c in ps]


def build_from_model(
    model: Path,
    out: Path,
    imageset,
    source: str,
    batch_size: int = 128,
    workers: int = 0,
    device: str = "auto",
    progress: bool = True,
    extra_params: dict | None = None,
    force: bool = False,
    shards: int = 1,
    engine: str = "local",
) -> dict:
    """Encode ``imageset`` with the checkpoint ``model`` and build the index at ``out``
    (``shards`` > 1: a sharded index, :func:`cbir.indexer.build_sharded_index`)."""
    from cbir.data import SkipLog
    from cbir.indexer import build_sharded_index
    from cbir.indexer.publish import check_output
    from cbir.models.hasher import Hasher

    check_output(out, force)  # refuse a bad --out before minutes of encoding

    hasher = Hasher.load(model, device=device, batch_size=batch_size)
    if shards > 1:
        from cbir.indexer.sharded import shard_bits_for

        shard_bits_for(shards, hasher.nbits)  # a bad --shards fails before the encoding
    skip = SkipLog()
    t0 = time.perf_counter()
    decision = None  # an ensemble's class answers (local engine)
    if engine == "ray":  # same batches, same model: the same codes (cbir.distributed.ray_encode)
        from cbir.distributed.ray_encode import encode_with_ray

        codes, conf, idx = encode_with_ray(
            model, imageset, batch_size, actors=workers, device=device, skip_log=skip, progress=progress
        )
        if _is_ensemble(hasher):
            log.warning("--engine ray encodes codes only: the ensemble's per-item hardness is not stored")
    elif engine == "local" and _is_ensemble(hasher):
        codes, conf, idx, decision = hasher.encode_imageset_decisions(
            imageset, batch_size=batch_size, num_workers=workers, progress=progress, skip_log=skip, desc="index: encode"
        )
    elif engine == "local":
        codes, conf, idx = hasher.encode_imageset(
            imageset, batch_size=batch_size, num_workers=workers, progress=progress, skip_log=skip, desc="index: encode"
        )
    else:
        raise ValueError(f"unknown engine {engine!r}: use local or ray")
    t_enc = time.perf_counter() - t0
    order = np.argsort(idx, kind="stable")
    codes, conf, idx = codes[order] if len(codes) else codes, conf[order], idx[order]
    meta = _metadata(imageset, idx, source, hasher.layout.class_names)
    ens_params = None
    if decision is not None:
        decision = decision.take(order)
        _add_hardness(meta, decision)
        ens_params = {
            "members": len(hasher.members),
            "perturb": hasher.perturb,
            "tau": hasher.tau,
            "margin": hasher.margin,
            "idk_items": int(decision.idk.sum()),
            "meta_fields": ["hardness", "idk", "prediction_set"],
        }
    params = {
        "model": str(model),
        "source": source,
        "batch_size": batch_size,
        "workers": workers,
        "engine": engine,
        "images": len(imageset),
        "skipped": skip.count,
        "encode_seconds": round(t_enc, 3),
        "resume": "none (an interrupted build restarts from scratch)",
    }
    if ens_params is not None:
        params["ensemble"] = ens_params
    params.update(extra_params or {})
    t1 = time.perf_counter()
    path = build_sharded_index(
        out,
        idx,
        codes,
        shards,
        meta,
        conf=conf,
        layout=hasher.layout,
        model_hash=hasher.content_hash,
        build_params=params,
        progress=progress,
        force=force,
    )
    return {
        "path": str(path),
        "count": int(len(idx)),
        "skipped": skip.count,
        "skipped_items": skip.items,
        "encode_s": t_enc,
        "write_s": time.perf_counter() - t1,
        "nbits": hasher.nbits,
        "model_hash": hasher.content_hash,
    }


def run_build(args) -> int:
    if args.batch_size <= 0 or args.workers < 0:
        raise ValueError("--batch-size must be > 0 and --workers >= 0")
    if args.shards < 1:
        raise ValueError("--shards must be >= 1 (a power of two; 1 = one plain index)")
    from cbir.indexer.publish import OutputExistsError, check_output, inside

    src_dir = args.images if args.images is not None else Path(args.dataset)
    if src_dir.is_dir() and inside(args.out, src_dir) and not args.force:
        raise OutputExistsError(
            f"--out {args.out} lies inside the image source {src_dir}: its "
            "files would mix with your images. Choose an --out outside it "
            "(or pass --force)"
        )
    check_output(args.out, args.force)
    if args.engine == "ray":
        from cbir.distributed.ray_encode import require_ray

        require_ray()  # a clear error (how to install it) before any work
    if args.images is not None:
        imageset = _image_folder(args.images)
        source = str(args.images)
    else:
        from cbir.data import load_dataset

        splits = load_dataset(args.dataset)
        imageset = getattr(splits, args.split)
        source = f"{args.dataset}:{args.split}"
    res = build_from_model(
        args.model,
        args.out,
        imageset,
        source,
        args.batch_size,
        args.workers,
        args.device,
        progress=not args.no_progress and sys.stderr.isatty(),
        force=args.force,
        shards=args.shards,
        engine=args.engine,
    )
    # each unreadable image was already reported (path and reason) as it was met
    print(
        f"indexed {res['count']} images ({res['skipped']} unreadable skipped) with "
        f"{res['nbits']}-bit codes into {res['path']}" + (f" ({args.shards} shards)" if args.shards > 1 else "") + " "
        f"(encode {res['encode_s']:.1f} s, write {res['write_s']:.1f} s)"
    )
    return 0


def _fmt_stats(st: dict) -> str:
    lay = st["layout"]
    lines = [
        f"index        {st.get('path', '')}",
        f"items        {st['count']}",
        f"code bits    {st['nbits']} (class bits {lay.get('class_bits', 0)}, depth {lay.get('depth', 0)},"
        f" method {lay.get('method') or '-'})",
        f"model hash   {st['model_hash'] or '-'}",
        f"generation   {st['generation']}",
        *(
            [
                (
                    f"shards       {len(st['shards'])} by the leading {st['shard_bits']} bits, items "
                    + " ".join(str(x["count"]) for x in st["shards"])
                )
            ]
            if st.get("shards")
            else []
        ),
        f"disk         {st['disk_bytes']} bytes"
        + (f" ({st['disk_bytes_per_item']:.1f} per item)" if st.get("disk_bytes_per_item") else ""),
    ]
    cov = st.get("coverage")
    if cov:
        lines += [
            f"unique codes {cov['unique_codes']} ({cov['unique_percent']:.2f} %)",
            f"entropy      {cov['entropy_bits']:.3f} bits (max {cov['max_entropy_bits']:.3f})",
            f"avg collisions {cov['average_collision_count']:.3f}",
            f"largest bucket {cov['largest_bucket']}",
        ]
        pe = cov.get("prefix_entropy", [])
        if pe:
            lines.append("prefix entropy by depth: " + " ".join(f"{d + 1}:{v:.2f}" for d, v in enumerate(pe)))
        h = cov.get("bucket_size_histogram", {})
        if h.get("sizes"):
            pairs = list(zip(h["sizes"], h["buckets"]))
            shown = pairs[:12]
            more = f" ... (+{len(pairs) - 12} sizes)" if len(pairs) > 12 else ""
            lines.append("bucket sizes (size x buckets): " + " ".join(f"{s}x{b}" for s, b in shown) + more)
    return "\n".join(lines)


def run_stats(args) -> int:
    from cbir.indexer import open_index

    with open_index(args.index) as r:
        st = dict(r.stats())
    st["path"] = str(args.index)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(_fmt_stats(st))
    return 0


def run_compact(args) -> int:
    from cbir.indexer import compact_index

    if not (args.index / "manifest.json").exists():
        print(f"cbir index compact: error: {args.index} is not a cbir index (no manifest.json)", file=sys.stderr)
        return 2
    out = compact_index(args.index)
    mb = 1 << 20
    print(
        f"compacted {args.index}: {out['before'] / mb:.1f} MiB -> {out['after'] / mb:.1f} MiB "
        f"(generation {out['generation']})"
    )
    return 0
