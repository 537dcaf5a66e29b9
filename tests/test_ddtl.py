"""DDTL (Darlow 2022, ch. 3): tree head, per-class contrastive loss, training and checkpoints."""

import json
import math

import numpy as np
import pytest
import torch

from cbir.engine import TrainConfig, train
from cbir.losses import PerClassNTXent
from cbir.models.hasher import Hasher
from cbir.models.heads import greedy_path, leaf_log_probs
from cbir.models.registry import MethodSpec, create_method


def test_leaf_probabilities_sum_to_one_and_match_path_products():
    torch.manual_seed(0)
    depth = 4
    u = torch.randn(5, 2**depth - 1, dtype=torch.float64) * 2
    z = leaf_log_probs(u, depth).exp()
    assert torch.allclose(z.sum(1), torch.ones(5, dtype=torch.float64))
    sig = torch.sigmoid(u)
    for leaf in range(2**depth):
        path = [(leaf >> (depth - 1 - j)) & 1 for j in range(depth)]  # MSB first
        node, prod = 0, torch.ones(5, dtype=torch.float64)
        for s in path:
            prod = prod * (sig[:, node] if s else 1 - sig[:, node])
            node = 2 * node + 1 + s
        assert torch.allclose(z[:, leaf], prod)


def test_hard_path_is_greedy_descent_from_root():
    torch.manual_seed(1)
    depth = 6
    u = torch.randn(20, 2**depth - 1)
    bits, nodes = greedy_path(u, depth)
    for i in range(20):
        node = 0
        for j in range(depth):
            assert nodes[i, j] == node
            s = bool(torch.sigmoid(u[i, node]) > 0.5)
            assert bool(bits[i, j]) == s
            node = 2 * node + 1 + int(s)


def _ntxent_by_hand(z1, z2, labels, tau):
    """Loop version of the per-class NT-Xent of the loss docstring."""
    per_class = []
    for c in sorted(set(labels)):
        idx = [i for i, l in enumerate(labels) if l == c]
        if len(idx) < 2:
            continue
        vecs = [z1[i] for i in idx] + [z2[i] for i in idx]
        vecs = [v / np.linalg.norm(v) for v in vecs]
        n = len(idx)
        losses = []
        for a in range(2 * n):
            p = (a + n) % (2 * n)
            sims = {j: float(vecs[a] @ vecs[j]) / tau for j in range(2 * n) if j != a}
            losses.append(-sims[p] + math.log(sum(math.exp(s) for s in sims.values())))
        per_class.append(sum(losses) / len(losses))
    return sum(per_class) / len(per_class)


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_per_class_ntxent_matches_hand_computation(tau):
    rng = np.random.default_rng(0)
    z1 = rng.random((6, 5))
    z2 = rng.random((6, 5))
    labels = [0, 0, 1, 2, 2, 2]  # class 1 has a single image: no negative, left out
    got = PerClassNTXent(tau)(torch.tensor(z1), torch.tensor(z2), torch.tensor(labels))
    assert got.item() == pytest.approx(_ntxent_by_hand(z1, z2, labels, tau), rel=1e-10)


def test_per_class_ntxent_tiny_case_by_hand():
    # one class, two images; views identical to their image, images orthogonal:
    # anchor sims: positive cos=1, negatives cos=0 (twice) -> l = -1 + log(e + 2)
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = PerClassNTXent(1.0)(z1, z1.clone(), torch.tensor([3, 3]))
    assert loss.item() == pytest.approx(-1 + math.log(math.e + 2))
    # no class with two images: zero, but still differentiable
    z = torch.rand(2, 3, requires_grad=True)
    out = PerClassNTXent()(z, z, torch.tensor([0, 1]))
    out.backward()
    assert out.item() == 0.0
    with pytest.raises(ValueError, match="tau"):
        PerClassNTXent(0.0)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = create_method("ddtl", MethodSpec("convnet", 4, None, depth=5))
    x = torch.randn(8, 3, 16, 16)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss, logs = m.training_loss((x, x + 0.05 * torch.randn_like(x)), y)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert set(logs) == {"ce", "ntxent", "saturation", "paths_per_class", "path_spread"}
    # the tree parameters get gradient from the contrastive term alone
    m.zero_grad()
    m.params.alpha = 0.0
    loss, _ = m.training_loss((x, x + 0.05 * torch.randn_like(x)), y)
    loss.backward()
    assert m.head.g1.weight.grad.abs().sum() > 0


def test_bits_layout_and_confidence():
    m = create_method("ddtl", MethodSpec("convnet", 10, 16)).eval()
    assert (m.layout.class_bits, m.layout.depth, m.layout.nbits) == (4, 12, 16)
    bits, conf = m.encode(torch.randn(5, 3, 16, 16))
    assert bits.shape == conf.shape == (5, 16) and bits.dtype == torch.bool
    assert ((conf >= 0) & (conf <= 1)).all()
    class_logits, _ = m.head(m.backbone(torch.zeros(1, 3, 16, 16)))
    with pytest.raises(ValueError, match="class bits"):
        create_method("ddtl", MethodSpec("convnet", 10, 4))
    with pytest.raises(ValueError, match="disagrees"):
        create_method("ddtl", MethodSpec("convnet", 10, 16, depth=5))


def test_class_bits_are_argmax_class_msb_first():
    m = create_method("ddtl", MethodSpec("convnet", 10, None, depth=3)).eval()
    x = torch.randn(6, 3, 16, 16)
    logits, _ = m.head(m.backbone(x))
    bits, _ = m.encode(x)
    cls = logits.argmax(1)
    expect = [[(int(c) >> s) & 1 for s in (3, 2, 1, 0)] for c in cls]
    assert bits[:, :4].int().tolist() == expect


def test_training_lowers_loss_and_checkpoint_roundtrip(tmp_path):
    cfg = TrainConfig(
        method="ddtl",
        dataset="digits",
        backbone="convnet",
        depth=6,
        epochs=4,
        batch_size=64,
        lr=3e-3,
        max_steps_per_epoch=6,
        out=str(tmp_path / "m"),
        progress=False,
        seed=3,
    )
    res = train(cfg)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["train_config"]["depth"] == 6 and saved["content_hash"] == res.hasher.content_hash
    assert (tmp_path / "m" / "history.jsonl").read_text().count("\n") == 4

    x = torch.randn(7, 3, 32, 32)
    c1, f1 = res.hasher.encode(x)
    h2 = Hasher.load(res.checkpoint)
    c2, f2 = h2.encode(x)
    assert c1 == c2 and np.allclose(f1, f2)
    assert h2.content_hash == res.hasher.content_hash and h2.layout == res.hasher.layout
    # PIL input goes through the evaluation transform
    from cbir.data import load_dataset

    splits = load_dataset("digits")
    pil = [splits.query.get_pil(i) for i in range(3)]
    c3, _ = h2.encode(pil)
    c4, _, idx = h2.encode_imageset(splits.query.subset([0, 1, 2]))
    assert c3 == c4 and idx.tolist() == [0, 1, 2]


def test_resume_continues_where_it_stopped(tmp_path):
    base = dict(
        method="ddtl",
        dataset="digits",
        backbone="convnet",
        depth=4,
        batch_size=64,
        lr=3e-3,
        max_steps_per_epoch=2,
        progress=False,
        seed=5,
    )
    full = train(TrainConfig(epochs=2, out=str(tmp_path / "full"), **base))
    train(TrainConfig(epochs=1, out=str(tmp_path / "part"), **base))
    # resuming with a different epoch count is a different run: refused
    with pytest.raises(ValueError, match="different config"):
        train(TrainConfig(epochs=3, out=str(tmp_path / "part"), resume=True, **base))
    assert len(full.history) == 2


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable cbir checkpoint"):
        Hasher.load(bad)
    with pytest.raises(FileNotFoundError):
        Hasher.load(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    "depth,max_d,expected",
    [
        (12, 12, [12]),
        (8, 12, [8]),
        (20, 12, [10, 10]),
        (28, 12, [10, 9, 9]),
        (44, 12, [11, 11, 11, 11]),
        (5, 2, [2, 2, 1]),
    ],
)
def test_split_depth_balances_trees(depth, max_d, expected):
    from cbir.models.heads import split_depth

    assert split_depth(depth, max_d) == expected
    assert sum(expected) == depth


def test_split_depth_rejects_bad_arguments():
    from cbir.models.heads import split_depth

    with pytest.raises(ValueError, match="max_tree_depth"):
        split_depth(10, 0)
    with pytest.raises(ValueError, match="path depth"):
        split_depth(0, 12)


def test_forest_is_concatenation_of_independent_trees():
    from cbir.models.heads import forest_greedy_path, forest_leaf_probs

    torch.manual_seed(3)
    depths = [3, 2, 2]
    u = torch.randn(7, sum(2**d - 1 for d in depths), dtype=torch.float64)
    z = forest_leaf_probs(u, depths)
    bits, nodes = forest_greedy_path(u, depths)
    assert z.shape == (7, 8 + 4 + 4) and bits.shape == nodes.shape == (7, 7)
    start, col, leaf_col = 0, 0, 0
    for d in depths:
        sub = u[:, start : start + 2**d - 1]
        assert torch.allclose(z[:, leaf_col : leaf_col + 2**d], leaf_log_probs(sub, d).exp())
        assert torch.allclose(z[:, leaf_col : leaf_col + 2**d].sum(1), torch.ones(7, dtype=torch.float64))
        b, nd = greedy_path(sub, d)
        assert torch.equal(bits[:, col : col + d], b)
        assert torch.equal(nodes[:, col : col + d], nd + start)
        start, col, leaf_col = start + 2**d - 1, col + d, leaf_col + 2**d


def test_long_ddtl_code_uses_a_forest_and_encodes_in_order():
    m = create_method("ddtl", MethodSpec(num_classes=10, backbone="convnet", nbits=32, backbone_kwargs=(("width", 8),)))
    assert m.layout.nbits == 32 and m.layout.class_bits == 4 and m.layout.depth == 28
    assert m.head.tree_depths == [10, 9, 9]
    m.eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        bits, conf = m.encode(x)
        class_logits, node_logits = m.head(m.backbone(x))
    assert bits.shape == conf.shape == (5, 32)
    from cbir.models.heads import forest_greedy_path

    assert torch.equal(bits[:, 4:], forest_greedy_path(node_logits, [10, 9, 9])[0])
    assert bool(((conf >= 0) & (conf <= 1)).all())
    loss, logs = m.training_loss((x, x.flip(-1)), torch.tensor([0, 1, 1, 2, 2]))
    assert torch.isfinite(loss) and {"ce", "ntxent", "saturation"} <= set(logs)


def test_batched_preprocess_equals_per_image_transform():
    """Hasher.preprocess groups same-size images into one transform call: rows must equal the
    per-image eval transform, in input order, for mixed sizes and PIL / tensor inputs."""
    from PIL import Image

    from cbir.models.registry import resolve_params

    spec = MethodSpec(backbone="convnet", num_classes=10, nbits=None, depth=4, backbone_kwargs=(("width", 8),))
    params = resolve_params("ddtl", None)
    h = Hasher(create_method("ddtl", spec, params), "ddtl", spec, params, image_size=24, device="cpu")
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (40, 28), (32, 32), (24, 24), (40, 28), (32, 32)]
    imgs = [Image.fromarray(rng.integers(0, 256, (hh, ww, 3), dtype=np.uint8)) for hh, ww in sizes]
    imgs[3] = torch.from_numpy(np.array(imgs[3])).permute(2, 0, 1).contiguous()  # a uint8 CHW tensor
    got = h.preprocess(imgs)
    from torchvision.transforms.v2 import functional as TF

    for i, im in enumerate(imgs):
        t = im if isinstance(im, torch.Tensor) else TF.pil_to_tensor(im)
        assert torch.allclose(got[i], h.eval_transform(t), atol=1e-6), i
    assert got.shape == (6, 3, 24, 24) and h.preprocess([]).shape == (0, 3, 24, 24)


def test_node_balance_matches_hand_computation():
    from cbir.losses import PerClassNodeBalance

    torch.manual_seed(3)
    u = torch.randn(6, 3, dtype=torch.float64)  # depth 2: root 0, children 1 (left) and 2 (right)
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    loss = PerClassNodeBalance(min_items=1.0, decay=0.5)(u, 2, y)
    s = torch.sigmoid(u)

    def ce(a):
        return -(0.5 * math.log(a) + 0.5 * math.log(1 - a))

    per_class = []
    for c in (0, 1):
        idx = (y == c).nonzero()[:, 0]
        n_c = len(idx)
        levels = min(2, int(math.floor(math.log2(n_c))) + 1)  # 2^level <= n_c / min_items
        root = ce(float(s[idx, 0].mean()))
        if levels == 1:
            per_class.append(root)
            continue
        reach_l, reach_r = 1 - s[idx, 0], s[idx, 0]
        a_l = float((reach_l * s[idx, 1]).sum() / reach_l.sum())
        a_r = float((reach_r * s[idx, 2]).sum() / reach_r.sum())
        w_l, w_r = float(reach_l.sum() / n_c), float(reach_r.sum() / n_c)
        per_class.append((root + 0.5 * (w_l * ce(a_l) + w_r * ce(a_r))) / 1.5)
    assert loss.item() == pytest.approx(sum(per_class) / 2, rel=1e-9)
    # a perfectly balanced split costs log 2; a class piled on one side costs more
    even = torch.tensor([[5.0, 0, 0], [-5.0, 0, 0]], dtype=torch.float64)
    assert PerClassNodeBalance(min_items=1.0)(even, 2, torch.tensor([0, 0])).item() == pytest.approx(
        math.log(2), abs=1e-2
    )
    piled = torch.tensor([[5.0, 5.0, 0], [5.0, 5.0, 0]], dtype=torch.float64)
    assert PerClassNodeBalance(min_items=1.0)(piled, 2, torch.tensor([0, 0])).item() > 1.5


def test_two_stage_tree_loss_uses_only_the_tree_and_adds_the_balance_term():
    spec = MethodSpec(backbone="convnet", num_classes=3, nbits=None, depth=3)
    m = create_method("ddtl", spec, {"two_stage": True, "balance": 1.0})
    m.set_stage("tree")
    assert {id(p) for p in m.head_parameters()} == {id(p) for p in m.head.g1.parameters()}
    f = torch.randn(6, m.backbone.feature_dim)
    loss, logs = m.head_loss((f, f + 0.01), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert "balance" in logs and "ce" not in logs
    loss.backward()
    assert m.head.g2.fc.weight.grad is None and m.head.g1.weight.grad is not None


def test_pca_median_tree_splits_every_class_in_half_at_every_node():
    from cbir.models.heads import DDTLHead, fit_pca_median_tree, greedy_path

    torch.manual_seed(0)
    head = DDTLHead(8, 3, depth=3, class_bias=True)
    feats = torch.randn(96, 8) * torch.linspace(3, 0.5, 8)
    cls = head.g2(feats).argmax(1)
    info = fit_pca_median_tree(head, feats)
    assert info["nodes"] == 7
    _, node_logits = head(feats)
    bits, _ = greedy_path(node_logits, 3)
    for c in torch.unique(cls):
        b = bits[cls == c]
        n = len(b)
        assert abs(int(b[:, 0].sum()) - n // 2) <= 1  # the root halves the class
        leaves = (b.long() * torch.tensor([4, 2, 1])).sum(1)
        assert torch.bincount(leaves, minlength=8).max() <= -(-n // 8) + 1  # near-even leaves
    # without per-class offsets the root splits all items at their median instead
    head2 = DDTLHead(8, 3, depth=3)
    fit_pca_median_tree(head2, feats)
    assert abs(int(greedy_path(head2(feats)[1], 3)[0][:, 0].sum()) - 48) <= 1
