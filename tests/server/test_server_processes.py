"""``cbir serve --processes 2``: real processes on one port (SO_REUSEPORT), read-only replicas,
writes refused with FAILED_PRECONDITION, SIGTERM drains and stops every process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cbir import client as cc
from tests.server.test_server_cli import _read_line_with


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(") ", 1)[1][0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT load spreading is Linux's")
@pytest.mark.parametrize("with_model", [False, True])
def test_two_processes_share_one_port(index_dir, dataset, hasher, images, tmp_path, with_model):
    ids, codes, _ = dataset
    model = ["--model", str(hasher.save(tmp_path / "model.pt")), "--torch-threads", "1"] if with_model else []
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cbir.cli",
            "serve",
            "--index",
            str(index_dir),
            "--address",
            "127.0.0.1:0",
            "--processes",
            "2",
            "--grace",
            "5",
            *model,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        line = _read_line_with(proc, "SERVING", timeout=120)
        address = line.split(" on ", 1)[1].split()[0]
        assert "[2 processes" in line and "read-only" in line
        pids = {int(p) for p in line.split("pids ", 1)[1].split(";")[0].split(",")}
        assert len(pids) == 2 and os.getpid() not in pids
        with open(f"/proc/{proc.pid}/maps") as f:  # the parent forked before loading torch or LMDB
            maps = f.read()
        assert "libtorch" not in maps and "/lmdb/" not in maps
        seen, clients, by_image = set(), [], set()
        try:
            for j in range(64):  # each channel is its own connection: the kernel spreads them
                c = cc.CbirClient(address, options=[("grpc.use_local_subchannel_pool", 1), ("cbir.test", j)])
                clients.append(c)
                st = c.stats()
                assert st.count == len(ids) and st.details["server"]["writable"] is False
                seen.add(int(st.details["server"]["pid"]))
                res = c.search(code=codes[j % 10 : j % 10 + 1], k=5, mode="hamming")
                assert res.hamming[0] == 0 and len(res) == 5
                if with_model:  # every process loaded the same model: the same code for an image
                    by_image.add(c.get_code(images[:1])[0].packed.tobytes())
                if seen == pids:
                    break
            assert seen == pids, f"calls reached {seen} of {pids}"
            assert len(by_image) == (1 if with_model else 0)
            with pytest.raises(cc.FailedPrecondition) as e:
                clients[0].add([1], codes[:1])
            assert "--processes" in e.value.details and "single-process" in e.value.details
            with pytest.raises(cc.FailedPrecondition):
                clients[0].delete([int(ids[0])])
            assert clients[0].search(id=int(ids[0]), k=1).ids.tolist() == [int(ids[0])]  # nothing was deleted
        finally:
            for c in clients:
                c.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert "stopped" in out
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_processes_flag_errors(index_dir, capsys):
    from cbir.cli import main

    assert main(["serve", "--index", str(index_dir), "--processes", "0"]) == 2
    assert "--processes must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--index", str(index_dir), "--address", "0.0.0.0:0", "--processes", "2"]) == 2
    assert "--insecure" in capsys.readouterr().err


def test_single_process_reports_writable(served):
    with cc.CbirClient(served.address) as c:
        st = c.stats()
        assert (
            st.details["server"] == {"pid": float(os.getpid()), "writable": True}
            or st.details["server"]["pid"] == os.getpid()
        )
        assert np.isfinite(st.entropy)
