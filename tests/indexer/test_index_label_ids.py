"""An index built from a folder numbers labels in the model's class order, not alphabetically."""

from __future__ import annotations

import numpy as np

from cbir.cli import main
from cbir.indexer import open_index


def test_folder_index_label_ids_follow_the_model(tmp_path):
    import torch
    from PIL import Image

    from cbir.models.hasher import Hasher
    from cbir.models.registry import MethodSpec, create_method, resolve_params

    torch.manual_seed(0)
    spec = MethodSpec(
        backbone="convnet",
        num_classes=3,
        nbits=None,
        depth=6,
        class_names=("dog", "cat", "owl"),
        backbone_kwargs=(("width", 8),),
    )
    params = resolve_params("ddtl", None)
    model = Hasher(create_method("ddtl", spec, params), "ddtl", spec, params, image_size=32, device="cpu").save(
        tmp_path / "m.pt"
    )
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "zebra"):  # alphabetical: cat=0, dog=1; the model: dog=0, cat=1
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                str(model),
                "--images",
                str(tmp_path / "imgs"),
                "--out",
                str(tmp_path / "ix"),
                "--no-progress",
            ]
        )
        == 0
    )
    with open_index(tmp_path / "ix") as r:
        metas = [it.meta for it in r.get_many(np.arange(6))]
    ids = {m["label"]: m.get("label_id") for m in metas}
    assert ids == {"dog": 0, "cat": 1, "zebra": None}  # a class the model does not know: no id
