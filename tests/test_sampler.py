"""Class-balanced P x K batches (cbir.data.sampler) and their use by the engine."""

import json

import numpy as np
import pytest

from cbir.data.sampler import ClassBalancedBatchSampler, resolve_pk


def test_single_label_batches_hold_p_classes_of_k_distinct_images():
    labels = np.repeat(np.arange(6), [40, 40, 40, 40, 40, 7])  # class 5 smaller than K
    s = ClassBalancedBatchSampler(labels, classes_per_batch=3, images_per_class=10, num_batches=40, seed=1)
    seen_classes = np.zeros(6, int)
    for batch in s:
        assert len(set(batch)) == len(batch)  # no image twice in a batch
        cls, counts = np.unique(labels[batch], return_counts=True)
        assert len(cls) == 3
        for c, n in zip(cls, counts):
            assert n == (7 if c == 5 else 10)
        seen_classes[cls] += 1
    assert seen_classes.min() == seen_classes.max() == 20  # the class cycle visits every class equally


def test_images_are_drawn_without_replacement_until_a_pool_is_used_up():
    labels = np.repeat(np.arange(2), 20)
    s = ClassBalancedBatchSampler(labels, 2, 5, num_batches=4, seed=0)
    items = [i for b in s for i in b]
    assert sorted(items) == list(range(40))  # 4 batches x 2 classes x 5 = every image exactly once


def test_order_is_a_function_of_seed_and_epoch():
    labels = np.repeat(np.arange(4), 30)
    a = ClassBalancedBatchSampler(labels, 2, 8, seed=3)
    b = ClassBalancedBatchSampler(labels, 2, 8, seed=3)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert len(a) == len(list(a)) == -(-120 // 16)


def test_multilabel_batches_take_k_images_per_chosen_label_once_each():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 5)) < 0.3).astype(np.uint8)
    labels[:3] = 0
    labels[:3, 4] = 1  # label 4 is common anyway; add a rare label 3 pattern below
    labels[:, 3] = 0
    labels[10:16, 3] = 1  # only 6 images carry label 3
    s = ClassBalancedBatchSampler(labels, classes_per_batch=5, images_per_class=4, num_batches=10, seed=0)
    for batch in s:
        assert len(set(batch)) == len(batch)
        per_label = labels[batch].sum(0)
        assert (per_label >= 4).all()  # every label has its K images (an image may carry several)


def test_resolve_pk_defaults_and_errors():
    assert resolve_pk(10, 128, None, None) == (4, 32)
    assert resolve_pk(10, 512, None, 51) == (10, 51)
    assert resolve_pk(3, 128, 8, 16) == (3, 16)
    with pytest.raises(ValueError, match="K"):
        resolve_pk(10, 128, None, 1)


def test_ddtl_trains_on_balanced_batches_and_logs_tree_statistics(tmp_path):
    from cbir.engine import TrainConfig, train

    cfg = TrainConfig(
        method="ddtl",
        dataset="digits",
        backbone="convnet",
        backbone_kwargs={"width": 8},
        depth=4,
        epochs=1,
        max_steps_per_epoch=3,
        batch_size=32,
        images_per_class=8,
        image_size=16,
        out=str(tmp_path),
        progress=False,
        threads=1,
    )
    res = train(cfg)
    assert res.config["batches"] == {"sampler": "balanced", "classes_per_batch": 4, "images_per_class": 8}
    rec = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[0])
    assert 0 <= rec["saturation"] <= 1 and 1 <= rec["paths_per_class"] <= 8 and 0 < rec["path_spread"] <= 1
    cfg2 = TrainConfig(**dict(cfg.to_dict(), sampler="random", out=str(tmp_path / "r")))
    assert train(cfg2).config["batches"] == {"sampler": "random", "batch_size": 32}
