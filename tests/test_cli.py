"""`lossd-client` run as a subprocess against a real server; numbers compared with local torch."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

B, T, V = 6, 40, 257


def run_cli(*args: str, env: dict[str, str] | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}\nimport sys\nfrom lossd_client.cli import main\nsys.exit(main(sys.argv[1:]))"
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=full_env)


@pytest.fixture(scope="module")
def lm_data():
    g = np.random.default_rng(11)
    logits = g.standard_normal((B, T, V), dtype=np.float32) * 3
    tokens = g.integers(0, V, (B, T))
    tokens[0, :7] = -100
    tokens[3, 20:] = -100
    return logits, tokens


def torch_lm(logits: np.ndarray, tokens: np.ndarray) -> tuple[float, int]:
    x = torch.from_numpy(logits[:, :-1]).reshape(-1, V)
    t = torch.from_numpy(tokens[:, 1:]).reshape(-1)
    loss = F.cross_entropy(x.double(), t)
    return float(loss), int((t != -100).sum())


@pytest.fixture(scope="module")
def files(tmp_path_factory, lm_data):
    logits, tokens = lm_data
    d = tmp_path_factory.mktemp("cli")
    paths = {"npz": d / "run.npz", "safetensors": d / "run.safetensors", "pt": d / "run.pt"}
    np.savez(paths["npz"], logits=logits, targets=tokens)
    save_file({"input": logits, "target": tokens}, str(paths["safetensors"]))
    torch.save({"logits": torch.from_numpy(logits), "labels": torch.from_numpy(tokens)}, paths["pt"])
    return paths


@pytest.mark.parametrize("kind", ["npz", "safetensors", "pt"])
def test_score_perplexity_matches_torch_with_progress(server, files, lm_data, kind):
    want_loss, want_counted = torch_lm(*lm_data)
    done = run_cli("--target", server.address, "score", str(files[kind]), "--class-axis", "-1", "--shift", "--json", "--batch-mb", "0.05")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    (one,) = report["files"]
    assert one["requests"] == B  # split into one request per sequence and recombined exactly
    assert one["counted"] == want_counted
    assert one["loss"] == pytest.approx(want_loss, rel=1e-6)
    assert one["perplexity"] == pytest.approx(math.exp(want_loss), rel=1e-6)
    assert report["total"]["perplexity"] == one["perplexity"]
    assert "rows/s" in done.stderr and "B/s" in done.stderr and "100%" in done.stderr


def test_score_table_over_several_files(server, files, lm_data):
    want_loss, want_counted = torch_lm(*lm_data)
    done = run_cli("--target", server.address, "score", str(files["npz"]), str(files["safetensors"]), "--class-axis", "-1", "--shift", "--no-progress")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split()[:5] == ["file", "loss", "(mean)", "counted", "perplexity"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {str(files["npz"]), str(files["safetensors"]), "total"}
    assert int(rows["total"][2]) == 2 * want_counted
    assert float(rows["total"][3]) == pytest.approx(math.exp(want_loss), rel=1e-5)
    assert done.stderr == ""


def test_score_nll_sum_and_per_element_output(server, tmp_path):
    g = np.random.default_rng(5)
    logp = np.log(g.dirichlet(np.ones(9), size=300)).astype(np.float32)
    target = g.integers(0, 9, 300)
    target[::7] = 3
    path = tmp_path / "nll.npz"
    np.savez(path, log_probs=logp, labels=target)
    done = run_cli("--target", server.address, "score", str(path), "--loss", "nll_loss", "--ignore-index", "3", "--reduction", "sum", "--json", "--batch-mb", "0.002")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["total"]
    want = F.nll_loss(torch.from_numpy(logp).double(), torch.from_numpy(target), ignore_index=3, reduction="sum")
    assert report["requests"] > 1
    assert report["loss"] == pytest.approx(float(want), rel=1e-6)
    assert report["counted"] == int((target != 3).sum())

    out = tmp_path / "per_element.npy"
    done = run_cli("--target", server.address, "score", str(path), "--loss", "nll_loss", "--reduction", "none", "--output", str(out), "--batch-mb", "0.002", "--no-progress")
    assert done.returncode == 0, done.stderr
    want = F.nll_loss(torch.from_numpy(logp), torch.from_numpy(target), reduction="none")
    torch.testing.assert_close(torch.from_numpy(np.load(out)), want)


def test_pt_file_with_arbitrary_objects_is_refused_unexecuted(server, tmp_path):
    marker = tmp_path / "was-unpickled"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"logits": torch.zeros(2, 3), "targets": Payload()}, path)
    done = run_cli("--target", server.address, "score", str(path))
    assert done.returncode == 2
    assert "weights_only=True" in done.stderr
    assert not marker.exists()


def test_pt_needs_torch_and_says_so(server, files):
    done = run_cli("--target", server.address, "score", str(files["pt"]), prelude="import sys; sys.modules['torch'] = None")
    assert done.returncode == 2
    assert "needs torch" in done.stderr


def test_missing_arrays_and_unknown_types_are_usage_errors(server, tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, a=np.zeros(3), b=np.zeros(3))
    done = run_cli("--target", server.address, "score", str(path))
    assert done.returncode == 2 and "no logits array" in done.stderr
    bad = tmp_path / "x.csv"
    bad.write_text("1,2")
    done = run_cli("--target", server.address, "score", str(bad))
    assert done.returncode == 2 and "unknown file type" in done.stderr


def test_invalid_request_reports_the_status(server, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, logits=np.zeros((4, 3), np.float32), targets=np.array([0, 1, 2, 5]))
    done = run_cli("--target", server.address, "score", str(path), "--no-progress")
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "target" in done.stderr


def test_health_and_info(server):
    done = run_cli("health", env={"LOSSD_TARGET": server.address})
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr
    done = run_cli("--target", server.address, "info", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["device"] == "cpu" and info["torch_version"] == torch.__version__


def test_health_of_an_unreachable_server_fails():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run_cli("--target", f"127.0.0.1:{port}", "--timeout-s", "5", "health")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr
