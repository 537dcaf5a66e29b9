"""An index built with another model is refused with an error that names the real flag."""

from __future__ import annotations

import pytest


def test_model_mismatch_names_the_flag(tmp_path, hasher, dataset, server_factory):
    from cbir.indexer import build_index, open_index

    ids, codes, metas = dataset
    ix = build_index(tmp_path / "ix", ids, codes, meta=metas, layout=hasher.layout, model_hash="0" * 64)
    with open_index(ix) as r:
        with pytest.raises(ValueError, match="--allow-model-mismatch"):
            server_factory(r, hasher)
    with open_index(ix) as r:
        server_factory(r, hasher, allow_model_mismatch=True)  # served, with a warning


def test_serve_flag_reaches_the_options():
    import argparse

    from cbir.cli import serve_cmd

    p = argparse.ArgumentParser()
    serve_cmd.register(p.add_subparsers())
    args = p.parse_args(["serve", "--index", "x", "--allow-model-mismatch"])
    assert serve_cmd._options(args).allow_model_mismatch is True
    assert serve_cmd._options(p.parse_args(["serve", "--index", "x"])).allow_model_mismatch is False
