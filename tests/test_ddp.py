"""Distributed training (torch.distributed + DDP under torchrun, cbir.distributed.ddp).

* the sharded sampler splits every global P x K batch into disjoint per-rank parts;
* the global-batch NT-Xent on 2 real gloo processes gives the 1-process loss and gradients;
* (slow) ``torchrun --nproc-per-node 2 -m cbir.cli train`` on the CPU matches a 1-process run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.data.sampler import ClassBalancedBatchSampler, DistributedClassBalancedBatchSampler
from cbir.distributed import ddp
from cbir.losses.contrastive import PerClassNTXent


def test_sharded_sampler_splits_global_batches():
    labels = np.repeat(np.arange(5), 13)
    base = ClassBalancedBatchSampler(labels, 3, 7, seed=4)
    base.set_epoch(2)
    glob = list(base)
    parts = []
    for r in range(3):
        s = ddp.ShardedBatchSampler(ClassBalancedBatchSampler(labels, 3, 7, seed=4), r, 3)
        s.set_epoch(2)
        assert len(s) == len(base) and s.p == 3 and s.k == 7
        parts.append(list(s))
    for i, g in enumerate(glob):
        mine = [parts[r][i] for r in range(3)]
        assert sorted(sum(mine, [])) == sorted(g)  # disjoint parts covering the global batch
        assert all(len(m) == 7 for m in mine)
    with pytest.raises(ValueError, match="rank"):
        ddp.ShardedBatchSampler(base, 3, 3)
    for r in range(3):  # the sampler module's own distributed sampler: the same parts
        ds = DistributedClassBalancedBatchSampler(labels, 3, 7, r, 3, seed=4)
        ds.set_epoch(2)
        assert list(ds) == parts[r]
    with pytest.raises(ValueError, match="rank"):
        DistributedClassBalancedBatchSampler(labels, 3, 7, 2, 2)
    plain = ddp.ShardedBatchSampler([[1, 2, 3, 4, 5]], 1, 2)  # any batch sampler, e.g. the seeded shuffle
    assert list(plain) == [[2, 4]]


def test_detect_reads_the_torchrun_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert ddp.detect() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ddp.detect() == ddp.DistEnv(1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="invalid torchrun environment"):
        ddp.detect()


def _data():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    t = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 2, 0])
    return z1, z2, t


def _worker(rank, world, init, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    z1, z2, t = _data()
    a, b = z1[rank::world].clone().requires_grad_(), z2[rank::world].clone().requires_grad_()
    with ddp.global_batch():
        loss = PerClassNTXent(0.5)(a, b, t[rank::world])
    loss.backward()
    # the all-gather's backward sums every rank's gradient of the (same) global loss into the
    # local rows; DDP's gradient average then divides by the world size
    torch.save({"loss": loss.detach(), "ga": a.grad / world, "gb": b.grad / world}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_global_batch_ntxent_matches_one_process_on_two_gloo_processes(tmp_path):
    z1, z2, t = _data()
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref = PerClassNTXent(0.5)(a, b, t)
    ref.backward()
    torch.multiprocessing.spawn(_worker, args=(2, f"file://{tmp_path}/rdv", str(tmp_path)), nprocs=2)
    for r in range(2):
        got = torch.load(tmp_path / f"{r}.pt")
        assert torch.allclose(got["loss"], ref.detach(), atol=1e-6)
        assert torch.allclose(got["ga"], a.grad[r::2], atol=1e-6)
        assert torch.allclose(got["gb"], b.grad[r::2], atol=1e-6)
    # and a local (non-gathered) loss would differ: the check above can fail
    local = PerClassNTXent(0.5)(z1[0::2], z2[0::2], t[0::2])
    assert abs(float(local.detach()) - float(ref.detach())) > 1e-3


def _balance_method():
    from cbir.models.registry import MethodSpec, create_method

    torch.manual_seed(3)  # the same initial tree in every process
    m = create_method(
        "ddtl",
        MethodSpec("convnet", 3, None, depth=4, backbone_kwargs=(("width", 4),)),
        {"two_stage": True, "balance": 1.0, "beta": 0.0},
    )
    m.set_stage("tree")
    g = torch.Generator().manual_seed(1)
    d = m.backbone.feature_dim
    f1, f2 = torch.randn(16, d, generator=g), torch.randn(16, d, generator=g)
    t = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 2, 0, 0, 0, 1, 0])
    return m, f1, f2, t


def _balance_grads(m):
    return [p.grad.clone() for p in m.head.g1.parameters()]


def _balance_worker(rank, world, init, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    m, f1, f2, t = _balance_method()
    with ddp.global_batch():
        loss, logs = m.head_loss((f1[rank::world], f2[rank::world]), t[rank::world])
    loss.backward()
    grads = _balance_grads(m)
    for gr in grads:  # what DDP does: the mean of the ranks' gradients
        dist.all_reduce(gr)
        gr /= world
    torch.save({"balance": logs["balance"], "loss": loss.detach(), "grads": grads}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_ddtl_node_balance_is_the_global_batch_term_on_two_gloo_processes(tmp_path):
    m, f1, f2, t = _balance_method()
    loss, logs = m.head_loss((f1, f2), t)
    loss.backward()
    ref = _balance_grads(m)
    assert logs["balance"] > 0.69 and any(float(gr.abs().max()) > 1e-4 for gr in ref)
    torch.multiprocessing.spawn(_balance_worker, args=(2, f"file://{tmp_path}/rdv", str(tmp_path)), nprocs=2)
    for r in range(2):
        got = torch.load(tmp_path / f"{r}.pt")
        assert abs(got["balance"] - logs["balance"]) < 1e-6, (r, got["balance"], logs["balance"])
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)
        for a, b in zip(got["grads"], ref):
            assert torch.allclose(a, b, atol=1e-6)
    # and a rank's own half would give another value: the check above can fail
    m2, *_ = _balance_method()
    _, local = m2.head_loss((f1[0::2], f2[0::2]), t[0::2])
    assert abs(local["balance"] - logs["balance"]) > 1e-3, (local["balance"], logs["balance"])


ARGS = [
    "--method",
    "ddtl",
    "--backbone",
    "convnet",
    "--width",
    "8",
    "--dataset",
    "digits",
    "--image-size",
    "12",
    "--epochs",
    "3",
    "--batch-size",
    "64",
    "--images-per-class",
    "16",
    "--threads",
    "1",
    "--no-progress",
    "--seed",
    "0",
]
TOL = 0.03  # relative difference of each epoch's mean loss (measured: < 1.5 %)


def _env():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun():
    exe = Path(sys.executable).with_name("torchrun")
    return str(exe) if exe.exists() else shutil.which("torchrun")


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_one_process():
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        _run([sys.executable, "-m", "cbir.cli", "train", *ARGS, "--out", str(d / "p1")])
        tr = [_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "cbir.cli", "train", *ARGS]
        r2 = _run(tr + ["--out", str(d / "p2")])
        assert r2.stdout.count('"checkpoint"') == 1  # only rank 0 reports (and writes)
        h1, h2 = _history(d / "p1"), _history(d / "p2")
        c1 = json.loads((d / "p1" / "config.json").read_text())
        c2 = json.loads((d / "p2" / "config.json").read_text())
        l1, l2 = [h["loss"] for h in h1], [h["loss"] for h in h2]
        print("1-process loss per epoch", l1, "\n2-process loss per epoch", l2)
        assert len(l1) == len(l2) == 3 and [h["step"] for h in h1] == [h["step"] for h in h2]
        for a, b in zip(l1, l2):
            assert abs(a - b) <= TOL * a, (l1, l2)
        assert l2[-1] < l2[0] - 0.1  # it trains
        assert c1["layout"] == c2["layout"] and c1["batches"] == c2["batches"]
        assert c2["distributed"] == {"world_size": 2, "backend": "gloo"} and "distributed" not in c1
        # --resume under torchrun: finished run, outputs rewritten from train_state.pt by rank 0
        for f in ("model.pt", "config.json", "history.jsonl"):
            (d / "p2" / f).unlink()
        _run(tr + ["--out", str(d / "p2"), "--resume"])
        c3 = json.loads((d / "p2" / "config.json").read_text())
        assert c3["content_hash"] == c2["content_hash"] and _history(d / "p2") == h2
        # frozen-feature paths are refused under torchrun
        bad = subprocess.run(
            [
                _torchrun(),
                "--standalone",
                "--nproc-per-node",
                "1",
                "-m",
                "cbir.cli",
                "train",
                "--freeze-backbone",
                "--method",
                "itq",
                "--init-from",
                str(d / "p1"),
                "--threads",
                "1",
                "--out",
                str(d / "bad"),
            ],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
        assert bad.returncode != 0 and "single-process only" in bad.stdout + bad.stderr


DEMO_ARGS = [
    "--no-progress",
    "--param",
    "two_stage=false",  # only the image stage is distributed
    "--epochs",
    "1",
    "--image-size",
    "12",
    "--width",
    "8",
    "--batch-size",
    "64",
    "--images-per-class",
    "16",
    "--grpc-queries",
    "2",
    "--depth",
    "6",
    "--threads",
    "1",
]


@pytest.mark.slow
def test_demo_under_torchrun_rank_0_alone_serves_searches_and_prints(tmp_path):
    r = _run(
        [_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "cbir.cli", "demo", "--out", str(tmp_path)]
        + DEMO_ARGS
    )
    out = r.stdout
    # every step and result line once: rank 1 returned right after training
    for line in ("[1/5] training", "[4/5] gRPC server", "serving on 127.0.0.1:", "example: the query", "report:"):
        assert out.count(line) == 1, (line, out)
    assert "balanced batches on 2 processes" in out
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert report["train"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    # both ranks trained (each logged its epoch); only rank 0's log has the server's lines
    rank0, rank1 = (tmp_path / "demo.log").read_text(), (tmp_path / "demo.rank1.log").read_text()
    assert "cbir.train: epoch 1" in rank0 and "cbir.train: epoch 1" in rank1
    assert "rpc method=Search" in rank0 and "cbir.server" not in rank1
