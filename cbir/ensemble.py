"""Ensembles of hashers: one checkpoint, every member encodes, the t-test says how sure they are.

"Looking for controversy" (2022): ``E`` members trained with perturbed training (random
starting points ``seed``, bootstrap samples of the training set ``bootstrap``, or different
backbones ``arch``) share one :class:`~cbir.codes.CodeLayout`. :class:`EnsembleHasher` encodes with every member and combines
them with :mod:`cbir.uncertainty`:

* **class answer**: every member's class logits -> per-class t-test confidence, prediction set,
  IDK flag and hardness (:func:`cbir.uncertainty.class_decision`);
* **the index code**: the class bits are the binary of the ensemble's most confident class (the
  class bits of all members mean the same thing, so the ensemble decides them); the remaining
  (path / free) bits are the **primary member's** (member 0): members trained independently
  grow different trees, so their path bits do not correspond and a bit-wise majority of them
  would be a code no member produces. :func:`cbir.uncertainty.bit_agreement` measures how much
  they agree anyway (reported, not used for the code);
* the per-bit confidence is the primary member's.

**Shared backbone.** When every member has the same backbone (same architecture and weights:
heads-only members fitted with ``--freeze-backbone`` on one ``--init-from`` start), the
ensemble runs the backbone once per batch and the ``E`` heads on its output
(``shared_backbone``, detected at construction; set it to False to force the per-member path).
The codes and confidences are those of the per-member path (tested); the per-member path also
runs each member's backbone once per batch for both its code and its class logits.

``encode`` returns ``(Codes, conf)`` like :class:`~cbir.models.hasher.Hasher`, so an ensemble
builds indexes and serves queries unchanged; :meth:`EnsembleHasher.encode_ensemble` returns
everything else. ``Hasher.load`` of an ensemble checkpoint returns an :class:`EnsembleHasher`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cbir.codes import Codes
from cbir.models.hasher import Hasher, batch_images, eval_loader
from cbir.uncertainty import DEFAULT_TAU, ClassDecision, bit_agreement, class_decision

__all__ = ["EnsembleHasher", "EnsembleEncoding", "train_ensemble", "search_prediction_set", "FORMAT", "PERTURBATIONS"]

FORMAT = "cbir-ensemble/1"
PERTURBATIONS = ("seed", "bootstrap", "arch")
#: methods whose ``encode(x)`` is ``f(self.backbone(x))``, so a shared backbone's output can be fed
#: to each member's head (see ``_head_view``)
SHARED_HEAD_METHODS = ("ddtl", "ce")

log = logging.getLogger("cbir.ensemble")


@dataclass
class EnsembleEncoding:
    codes: Codes  # the index code (see the module docstring)
    conf: np.ndarray  # (N, B) float32, the primary member's per-bit confidence
    decision: ClassDecision  # class answer: confidence, prediction set, IDK, hardness
    member_codes: list[Codes]  # every member's own code
    bit_agreement: np.ndarray  # (N, B) fraction of members agreeing with the majority


class EnsembleHasher:
    """``E >= 2`` :class:`~cbir.models.hasher.Hasher` members with one CodeLayout."""

    def __init__(self, members: Sequence, perturb: str = "seed", tau: float = DEFAULT_TAU, margin: float = 1.0):
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        lay = members[0].layout
        for i, m in enumerate(members[1:], 1):
            if m.layout != lay or m.image_size != members[0].image_size:
                raise ValueError(
                    f"member {i} has another code layout or image size than member 0; "
                    "every member must make the same kind of code"
                )
            if getattr(m.method, "class_head", None) is None:
                raise ValueError(f"member {i} ({m.method_name}) has no class head: ensembles need class logits")
        if lay.class_bits == 0 or lay.multilabel:
            raise ValueError("ensembles need single-label codes with class bits (e.g. ddtl, ce)")
        if perturb not in PERTURBATIONS:
            raise ValueError(f"perturb must be one of {PERTURBATIONS}, got {perturb!r}")
        self.members = members
        self.perturb = perturb
        self.tau = float(tau)
        self.margin = float(margin)
        #: per member: how it was trained (seed, backbone, bootstrap draw); set by train_ensemble,
        #: saved in the checkpoint and covered by the content hash
        self.member_info: list[dict] = []
        #: run the backbone once per batch and every member's head on it (see the module docstring)
        self.shared_backbone = _same_backbone(members)
        self._heads: list | None = None

    # the Hasher interface the index builder and the server use --------------------------------
    primary = property(lambda self: self.members[0])
    layout = property(lambda self: self.primary.layout)
    nbits = property(lambda self: self.primary.nbits)
    image_size = property(lambda self: self.primary.image_size)
    class_names = property(lambda self: self.primary.class_names)
    eval_transform = property(lambda self: self.primary.eval_transform)
    device = property(lambda self: self.primary.device)
    method_name = property(lambda self: f"ensemble[{self.primary.method_name} x{len(self.members)}]")
    config = property(lambda self: self.primary.config)
    spec = property(lambda self: self.primary.spec)

    @property
    def batch_size(self) -> int:
        return self.primary.batch_size

    @property
    def content_hash(self) -> str:
        h = hashlib.sha256(FORMAT.encode())
        h.update(f"{self.perturb}|{self.tau}|{self.margin}".encode())
        for m in self.members:
            h.update(m.content_hash.encode())
        if self.member_info:  # absent from older checkpoints: their hash is unchanged
            h.update(json.dumps(self.member_info, sort_keys=True, default=str).encode())
        return h.hexdigest()

    def preprocess(self, images):
        return self.primary.preprocess(images)

    # encoding -----------------------------------------------------------------------------------
    def _head_views(self) -> list:
        if self._heads is None:
            self._heads = [_head_view(m.method) for m in self.members]
        return self._heads

    @torch.inference_mode()
    def _member_outputs(self, x: torch.Tensor):
        """Every member's ``(Codes, conf)`` and class logits ``(E, N, C)`` of a float batch."""
        if x.ndim != 4:
            raise ValueError(f"expected a (N, 3, H, W) batch, got shape {tuple(x.shape)}")
        e, bs = len(self.members), self.batch_size
        heads = self._head_views()
        for m in self.members:
            m.method.eval()
        bits: list[list] = [[] for _ in range(e)]
        confs: list[list] = [[] for _ in range(e)]
        logits: list[list] = [[] for _ in range(e)]
        for s in range(0, x.shape[0], bs):
            feats = None
            for i, m in enumerate(self.members):
                if feats is None or not self.shared_backbone:
                    feats = m.method.backbone(x[s : s + bs].to(m.device, non_blocking=True))
                b, c = heads[i].encode(feats)
                bits[i].append(b.cpu().numpy())
                confs[i].append(c.float().cpu().numpy())
                logits[i].append(m.method.class_head(feats).float().cpu().numpy())
        if x.shape[0] == 0:
            c = len(self.class_names)
            return (
                [Codes.empty(self.nbits) for _ in range(e)],
                [np.zeros((0, self.nbits), np.float32) for _ in range(e)],
                np.zeros((e, 0, c)),
            )
        codes = [Codes.from_bits(np.concatenate(b)) for b in bits]
        confs_out = [np.concatenate(c).astype(np.float32) for c in confs]
        return codes, confs_out, np.stack([np.concatenate(z) for z in logits])

    def encode_ensemble(self, x: torch.Tensor) -> EnsembleEncoding:
        """Encode a float batch in the evaluation transform with every member."""
        from cbir.models.base import binary_of_class

        codes, confs, logits = self._member_outputs(x)
        dec = class_decision(logits, self.tau, self.margin)
        cb = self.layout.class_bits
        bits = codes[0].to_bits().copy()
        bits[:, :cb] = binary_of_class(torch.from_numpy(dec.predicted), cb).numpy()
        agree = bit_agreement(np.stack([c.to_bits() for c in codes]))
        return EnsembleEncoding(Codes.from_bits(bits), confs[0], dec, codes, agree)

    def encode_tensor(self, x: torch.Tensor) -> tuple[Codes, np.ndarray]:
        e = self.encode_ensemble(x)
        return e.codes, e.conf

    def encode(self, x) -> tuple[Codes, np.ndarray]:
        if isinstance(x, (list, tuple)):
            x = self.preprocess(x)
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                "EnsembleHasher.encode takes a float batch or a list of images; use encode_imageset for datasets"
            )
        return self.encode_tensor(x)

    # the loader loops of a Hasher, over this class's encode_tensor
    encode_batches = Hasher.encode_batches
    encode_imageset = Hasher.encode_imageset

    def encode_batches_decisions(
        self, batches, progress: bool = False, desc: str = "encode"
    ) -> tuple[Codes, np.ndarray, np.ndarray, ClassDecision]:
        """:meth:`encode_batches` that also returns every item's class answer (hardness, IDK,
        prediction set): ``(codes, conf, dataset indices, ClassDecision)``."""
        codes, confs, idx, decs = [], [], [], []
        for images, ix in batch_images(batches, progress, desc):
            e = self.encode_ensemble(images)
            codes.append(e.codes)
            confs.append(e.conf)
            decs.append(e.decision)
            idx.append(ix)
        dec = ClassDecision.concat(decs, len(self.class_names))
        if not codes:
            return Codes.empty(self.nbits), np.zeros((0, self.nbits), np.float32), np.zeros(0, np.int64), dec
        return Codes.concat(codes), np.concatenate(confs), np.concatenate(idx).astype(np.int64), dec

    def encode_imageset_decisions(
        self,
        imageset,
        batch_size: int | None = None,
        num_workers: int = 0,
        progress: bool = False,
        skip_log=None,
        desc: str = "encode",
    ) -> tuple[Codes, np.ndarray, np.ndarray, ClassDecision]:
        """:meth:`encode_imageset` plus every item's class answer (see :meth:`encode_batches_decisions`)."""
        loader = eval_loader(imageset, self.eval_transform, batch_size or self.batch_size, num_workers, skip_log)
        return self.encode_batches_decisions(loader, progress=progress, desc=desc)

    # persistence --------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """One file holding every member's checkpoint dict (each with its own content hash)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT,
            "perturb": self.perturb,
            "tau": self.tau,
            "margin": self.margin,
            "members": [m.payload() for m in self.members],
            "members_info": self.member_info,
            "content_hash": self.content_hash,
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def from_payload(cls, payload: dict, where, device="auto", batch_size: int = 256) -> "EnsembleHasher":
        members = [
            Hasher.from_payload(p, f"{where} member {i}", device=device, batch_size=batch_size)
            for i, p in enumerate(payload["members"])
        ]
        ens = cls(members, payload["perturb"], payload["tau"], payload["margin"])
        ens.member_info = list(payload.get("members_info") or [])
        if ens.content_hash != payload["content_hash"]:
            raise ValueError(f"{where}: content hash mismatch (file corrupted or edited)")
        return ens


def _same_backbone(members) -> bool:
    """True when every member's backbone has the same architecture and the same weights (and the
    members are methods whose heads can be fed a shared backbone's output)."""
    first = members[0]
    if any(m.method_name not in SHARED_HEAD_METHODS for m in members):
        return False
    key = (first.spec.backbone, tuple(first.spec.backbone_kwargs))
    ref = first.method.backbone.state_dict()
    for m in members[1:]:
        if (m.spec.backbone, tuple(m.spec.backbone_kwargs)) != key or m.device != first.device:
            return False
        sd = m.method.backbone.state_dict()
        if sd.keys() != ref.keys() or any(not torch.equal(sd[k], ref[k]) for k in ref):
            return False
    return True


def _head_view(method):
    """``method`` with an identity backbone: ``view.encode(features)`` is ``method.encode(x)``
    for ``features = method.backbone(x)`` (the methods of ``SHARED_HEAD_METHODS``). The view
    shares every other sub-module (no weights are copied)."""
    view = copy.copy(method)
    view._modules = dict(method._modules)
    view._modules["backbone"] = torch.nn.Identity()
    return view


def train_ensemble(cfg, members: int, perturb: str = "seed", backbones: Sequence[str] = ()) -> Path:
    """Train ``members`` models from ``cfg`` (a :class:`cbir.engine.TrainConfig`) and write one
    ensemble checkpoint ``<cfg.out>/model.pt``; member ``i`` lives in ``<cfg.out>/member-<i>``.

    Perturbations of "Looking for controversy" (2022), one per run:

    * ``"seed"`` (random starting point): member ``i`` uses seed ``cfg.seed + i`` (its head /
      model initialisation and data order);
    * ``"bootstrap"``: every member trains with seed ``cfg.seed`` on its own bootstrap sample of
      the training set, ``n`` draws with replacement from the ``n`` items seeded
      ``cfg.seed + i`` (:mod:`cbir.data.bootstrap`; a stratified draw when a plain one would
      starve a class of the class-balanced sampler, recorded with the reason);
    * ``"arch"``: member ``i`` uses backbone ``backbones[i]`` (and seed ``cfg.seed + i``).

    Each member's seed, backbone and bootstrap draw (seed, kind, size, distinct items, SHA-256
    of the indices) are recorded in the checkpoint (``EnsembleHasher.member_info``) and in the
    member's own config (``config["ensemble_member"]``).
    """
    from cbir.engine import train

    if members < 2:
        raise ValueError(f"--ensemble needs at least 2 members, got {members}")
    if perturb not in PERTURBATIONS:
        raise ValueError(f"--perturb must be one of {', '.join(PERTURBATIONS)}, got {perturb!r}")
    backbones = list(backbones)
    if perturb == "arch" and len(backbones) != members:
        raise ValueError(
            f"--perturb arch needs one backbone per member: {members} members but {len(backbones)} backbones given"
        )
    if perturb != "arch" and backbones:
        raise ValueError(f"backbones are given only with --perturb arch (got {backbones} with --perturb {perturb})")
    out = Path(cfg.out)
    hashers, info = [], []
    for i in range(members):
        seed = cfg.seed if perturb == "bootstrap" else cfg.seed + i
        mcfg = dataclasses.replace(
            cfg,
            seed=seed,
            out=str(out / f"member-{i}"),
            backbone=backbones[i] if perturb == "arch" else cfg.backbone,
        )
        if perturb == "bootstrap":
            mcfg = dataclasses.replace(mcfg, bootstrap_seed=cfg.seed + i)
        res = train(mcfg)
        hasher = res.hasher
        rec: dict = {"index": i, "seed": seed, "backbone": mcfg.backbone, "bootstrap": res.config.get("bootstrap")}
        hasher.config = dict(hasher.config or {}, ensemble_member=dict(rec, perturb=perturb))
        hashers.append(hasher)
        info.append(rec)
    ens = EnsembleHasher(hashers, perturb)
    ens.member_info = info
    return ens.save(out / "model.pt")


#: a small index is ranked whole by one lexicographic search instead of one search per class of
#: the prediction set when it holds at most ``(set size + 1) x k`` items (the ranked hits the
#: server's work limit charges a prediction-set search) plus this many: on the sorted-base fast
#: path (codes <= 64 bits) a search costs ~25 us of its own, as much as ranking ~2,000 to 4,000
#: more rows (measured, 2 cores, k = 1000, 4,660 to 8,000 items: class-only 4-bit and 16-bit
#: codes), so the one search then costs about what the searches it replaces do, or less. The
#: answer is the same either way.
WHOLE_READ_EXTRA_ROWS = 2048


def _index_codes(packed: np.ndarray, nbits: int) -> Codes:
    """:class:`Codes` of contiguous rows read from an index (valid codes already), made without
    repeating ``Codes``' checks (they cost about as much as the merge of a 1000-item answer)."""
    out = object.__new__(Codes)
    object.__setattr__(out, "packed", packed)
    object.__setattr__(out, "nbits", int(nbits))
    return out


def _take_rows(packed: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``packed[idx]`` for (N, nb) uint8 rows, gathered as one nb-byte item per row (much
    faster than numpy's row gather of a narrow 2-D array)."""
    nb = packed.shape[1]
    rows = np.ascontiguousarray(packed).view(np.dtype((np.void, nb))).ravel()
    return rows[idx].view(np.uint8).reshape(-1, nb)


def _path_xor_keys(packed: np.ndarray, q: np.ndarray, nbits: int, cb: int) -> np.ndarray:
    """The big-endian XOR of the path bits of packed codes (N, nb) with those of ``q``, as
    unsigned integers of the smallest width holding ``nbits - cb`` bits (codes <= 64 bits)."""
    n, nb = packed.shape
    w = 1 if nb == 1 else 2 if nb == 2 else 4 if nb <= 4 else 8
    if w == nb:
        u = np.ascontiguousarray(packed).view(f">u{w}").ravel()
    else:
        buf = np.zeros((n, w), np.uint8)
        buf[:, :nb] = packed
        u = buf.view(f">u{w}").ravel()
    shift = 8 * w - nbits  # the pad bits (zero) and the bytes added on the right
    path = (1 << (nbits - cb)) - 1
    x = (u.astype(f"u{w}") >> shift) ^ (int.from_bytes(q.tobytes().ljust(w, b"\0"), "big") >> shift)
    x &= path
    pb = nbits - cb
    return x.astype(np.uint8 if pb <= 8 else np.uint16 if pb <= 16 else np.uint32 if pb <= 32 else np.uint64)


def search_prediction_set(reader, code: Codes, classes: Sequence[int], k: int = 10, fill: bool = True):
    """Search every class subtree of a query's prediction set and merge (issue: IDK queries).

    ``code`` is the query's 1-row code, ``classes`` its prediction set best first
    (:meth:`ClassDecision.sets`). For every class ``c`` the best ``k`` items of ``c``'s subtree in
    the query's order are read from ``reader`` (a :mod:`cbir.indexer` reader) by one
    lexicographic search re-aimed at the subtree (the query's class bits := ``c``): the
    subtree's items come first in that order, so its first ``k`` results that carry class ``c``
    are the subtree's best ``k`` (all of it when it holds fewer). The merge is a total order:
    ascending big-endian XOR of the **path** bits with the query's path bits, then the class's
    rank in the prediction set, then id — within one class it is exactly the index's
    lexicographic order. For class-only codes (``ce``: every item of a class has one code) the
    merge serves whole classes in set order, so class ``r`` is asked only for the slots the
    classes before it left, and the search stops once ``k`` are found.

    **Searches made once.** In a lexicographic answer the items of one class form one block
    (the class bits lead the code) in that class's own order (path XOR, then id), and the blocks
    come in ascending ``class XOR aimed class``. So a block that ends before the answer does, or
    any block of an answer shorter than asked (the whole index), is the class's whole subtree
    (possibly empty), and a block of ``p`` items is the first ``p`` of its subtree. A class of
    the set is searched only when no answer read before (the plain search, the searches of the
    classes before it) holds the items asked of it. A small index (at most ``(set size + 1) x k
    +`` :data:`WHOLE_READ_EXTRA_ROWS` items, codes of <= 64 bits) is ranked whole by one plain
    search instead, which then serves every class and the fill. The classes' best items are
    kept in their (path XOR, id) order, so the merge is one stable sort of the path XOR (codes
    of <= 64 bits; longer codes: a lexsort of every byte).

    **Filling k** (``fill``, default on): when the set's subtrees hold fewer than ``k`` items
    (then every one of them was read whole), the remaining slots are filled with the other items
    in the plain lexicographic order of ``code`` (the set's classes dropped), so the answer has
    ``min(k, index size)`` items like a plain search. Without it a class-only code whose set
    holds two classes of ~N/C items each left ~9 % of the 1000 slots of the cifar10-subset
    figure empty. The whole answer is one total order: the set's items first (in the order
    above), then the others by big-endian ``code XOR c``, then id. ``fill=False`` returns the
    set's items only. The plain search of ``code`` is the re-aimed search of ``code``'s own
    class (normally the set's first): it is made once and serves both.

    Returns ``(ids int64, codes Codes)`` of the best ``k``. A class that does not fit the
    index's class bits is a ValueError.
    """
    layout = reader.layout
    cb = int(layout.class_bits)
    if cb == 0:
        raise ValueError("prediction-set search needs codes with class bits")
    if len(code) != 1:
        raise ValueError(f"one query code expected, got {len(code)}")
    k, nbits = int(k), code.nbits
    q = code.packed[0]
    nb = q.shape[0]
    nbc = (cb + 7) // 8  # bytes holding the class bits
    classes = [int(c) for c in classes]
    for c in classes:
        if not 0 <= c < 1 << cb:
            raise ValueError(f"class {c} of the prediction set does not fit the index's {cb} class bits")
    shift = 8 * nbc - cb  # path bits in the class bytes
    qb = q.tobytes()
    tail = qb[nbc:]
    head = int.from_bytes(qb[:nbc], "big")
    own, low = head >> shift, head & ((1 << shift) - 1)  # the query's class; its path bits there
    class_only = nbits == cb
    uniq = list(dict.fromkeys(classes))  # the set's classes, once each
    # every answer read: (the whole index?, ids, packed codes, {class of the set: (lo, hi) of
    # its block in the answer})
    answers: list[tuple[bool, np.ndarray, np.ndarray, dict]] = []

    def read(c: int, need: int):
        """The lexicographic search re-aimed at class ``c`` (``need`` items), its blocks found."""
        aim = (c << shift) | low
        res = reader.search_lex(aim.to_bytes(nbc, "big") + tail, need)
        ids, packed = np.asarray(res.ids, dtype=np.int64), res.codes.packed
        if nbc == 1:  # the lead byte XOR the aimed one: ascending, the class XOR in its top cb bits
            lead = packed[:, 0] ^ np.uint8(aim)
            xs = np.array([(u ^ c) << shift for u in uniq], np.uint8)
            his = lead.searchsorted(xs | np.uint8((1 << shift) - 1), side="right").tolist()
        else:
            v = packed[:, 0].astype(np.int64)
            for j in range(1, nbc):
                v = (v << 8) | packed[:, j]
            lead = (v >> shift) ^ c  # the class XOR c: ascending
            xs = np.array([u ^ c for u in uniq], np.int64)
            his = lead.searchsorted(xs, side="right").tolist()
        got = (len(ids) < need, ids, packed, dict(zip(uniq, zip(lead.searchsorted(xs).tolist(), his))))
        answers.append(got)
        return got

    def block(c: int, need: int):
        """The first ``min(need, subtree size)`` items of ``c``'s subtree (ids, packed codes)."""
        for whole, ids, packed, where in answers:
            lo, hi = where[c]
            if whole or hi < len(ids) or hi - lo >= need:  # the whole subtree, or enough of it
                hi = min(hi, lo + need)
                return ids[lo:hi], packed[lo:hi]
        _, ids, packed, where = read(c, need)  # (always enough: the subtree comes first)
        lo, hi = where[c]
        hi = min(hi, lo + need)
        return ids[lo:hi], packed[lo:hi]

    plain = None  # the plain search of the query code (= the one re-aimed at its own class, k asked)
    n_index = int(reader.count()) if nb <= 8 and len(uniq) > 1 and k > 0 and hasattr(reader, "count") else -1
    if 0 <= n_index <= (len(uniq) + 1) * k + WHOLE_READ_EXTRA_ROWS:
        plain = read(own, n_index + 1)  # a small index ranked whole, once; its first k: the plain answer
    ids_all, codes_all = [], []
    taken = 0
    for c in classes:
        need = k - taken if class_only else k
        if need <= 0:
            break
        if c == own and need == k and plain is None:
            plain = read(c, k)
        i, p = block(c, need)
        ids_all.append(i)
        codes_all.append(p)
        taken += len(i)
    if class_only or sum(len(i) > 0 for i in ids_all) <= 1:  # whole classes in set order / one chunk
        parts_i, parts_c = ids_all, codes_all  # (a chunk holds at most k)
    else:
        ids = np.concatenate(ids_all)
        packed = np.concatenate(codes_all)
        if nb <= 8:  # every chunk is in (path XOR, id) order: a stable sort of the XOR keeps (rank, id)
            order = np.argsort(_path_xor_keys(packed, q, nbits, cb), kind="stable")[:k]
        else:  # longer codes: one key per byte column
            pmask = np.full_like(q, 0xFF)  # packed mask of the path bits
            pmask[:nbc] = np.frombuffer(((1 << shift) - 1).to_bytes(nbc, "big"), np.uint8)
            # big-endian XOR of the path bits = XOR of the whole codes with the class bits masked out
            x = (packed ^ q) & pmask
            ranks = np.repeat(np.arange(len(ids_all)), [len(i) for i in ids_all])
            order = np.lexsort((ids, ranks) + tuple(x[:, j] for j in range(nb - 1, -1, -1)))[:k]
        parts_i, parts_c = [ids[order]], [_take_rows(packed, order)]
        taken = len(order)
    if fill and 0 < k and taken < k:
        # fewer than k: every subtree of the set was read whole, so dropping the set's classes
        # drops exactly the items already taken, and the first k of the plain order hold at
        # least k - taken others: the rows of the plain answer outside the set's blocks
        if plain is None:
            plain = read(own, k)
        _, pids, cand, where = plain
        rem, at = k - taken, 0
        for lo, hi in sorted(where.values()) + [(len(pids), len(pids))]:
            if lo > at:
                e = min(lo, at + rem)
                parts_i.append(pids[at:e])
                parts_c.append(cand[at:e])
                rem -= e - at
                if rem <= 0:
                    break
            at = max(at, hi)
    if not parts_i:
        return np.zeros(0, np.int64), _index_codes(np.zeros((0, nb), np.uint8), nbits)
    if len(parts_i) == 1:
        return parts_i[0], _index_codes(np.ascontiguousarray(parts_c[0]), nbits)
    return np.concatenate(parts_i), _index_codes(np.concatenate(parts_c), nbits)
