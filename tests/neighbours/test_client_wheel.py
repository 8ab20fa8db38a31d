"""The client as its users install it: built wheels, a fresh venv with only lossd-client, no torch.

``python -m build --wheel`` builds client/ and server/ (from copies, so the source tree gets no
build/ or egg-info); a new ``python -m venv`` gets only the lossd-client wheel (numpy, grpcio,
grpcio-health-checking and protobuf come from the package index or pip's cache, as for a user);
``import torch`` must fail there. From that venv the README's numpy example and
``lossd-client score`` on an .npz file run against a real server; their numbers are checked
against torch in this (the test's) process.

Skips, with the reason, only when the package index is unreachable (build isolation and the
venv's dependencies need it).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hostenv import REPO, skip_unless_registries
from serverproc import start_server

README = REPO / "README.md"
pytestmark = pytest.mark.timeout(600)


def readme_numpy_example() -> str:
    """The ```python block that follows the README's "numpy in, numpy out" sentence."""
    text = README.read_text()
    at = text.find("numpy in and numpy out")
    assert at >= 0, "README lost its numpy example"
    block = re.search(r"```python\n(.*?)```", text[at:], re.S)
    assert block, "no ```python block after the numpy sentence"
    code = block.group(1)
    assert "import torch" not in code and "127.0.0.1:50051" in code, code
    return code


def run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, **kw)


def build_wheel(project: str, tmp_path) -> str:
    src = tmp_path / "src" / project
    shutil.copytree(REPO / project, src, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
    out = tmp_path / "dist"
    done = run([sys.executable, "-m", "build", "--wheel", "--outdir", out, src], timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (wheel,) = out.glob(f"lossd_{project}-*.whl")
    return str(wheel)


def metadata(wheel: str) -> tuple[dict, list[str], list[str]]:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        msg = Parser().parsestr(z.read(name).decode())
        return dict(msg.items()), msg.get_all("Requires-Dist") or [], z.namelist()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, str]:
    skip_unless_registries(pypi=True, debian=False)
    tmp = tmp_path_factory.mktemp("wheels")
    return {"client": build_wheel("client", tmp), "server": build_wheel("server", tmp)}


@pytest.fixture(scope="module")
def user_venv(wheels, tmp_path_factory):
    venv = tmp_path_factory.mktemp("user") / "venv"
    done = run([sys.executable, "-m", "venv", venv], timeout=120)
    assert done.returncode == 0, done.stderr
    py = venv / "bin" / "python"
    done = run([py, "-m", "pip", "install", "--disable-pip-version-check", "-q", wheels["client"]], timeout=500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    listed = run([py, "-m", "pip", "list", "--format", "json"]).stdout
    print("user venv:", {p["name"]: p["version"] for p in json.loads(listed)})
    return venv


@pytest.fixture(scope="module")
def wheel_server():
    proc = start_server("--drain-s", "0")
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()


def test_wheels_declare_what_users_get(wheels):
    meta, requires, files = metadata(wheels["client"])
    assert meta["Name"] == "lossd-client"
    core = [r for r in requires if "extra ==" not in r]
    assert {re.split(r"[<>=!~ ;\[]", r)[0].lower() for r in core} == {"grpcio", "grpcio-health-checking", "protobuf", "numpy"}, core
    assert not any(r.lower().startswith("torch") for r in core), core
    assert any(r.startswith("transformers") and 'extra == "hf"' in r for r in requires), requires
    assert "lossd_client/py.typed" in files and "lossd_client/_proto/lossd/v1/loss_pb2.py" in files
    assert "lossd_client/hf.py" in files
    smeta, srequires, _ = metadata(wheels["server"])
    assert smeta["Name"] == "lossd-server"
    assert "torch==2.13.0" in srequires and any(r.startswith("lossd-client") for r in srequires), srequires


def test_torch_is_absent_from_the_user_venv(user_venv):
    done = run([user_venv / "bin" / "python", "-c", "import torch"])
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr, done.stdout + done.stderr
    done = run([user_venv / "bin" / "python", "-c", "import lossd_client, sys; print(lossd_client.__version__, 'torch' in sys.modules)"])
    assert done.returncode == 0 and done.stdout.split() == ["0.1.0", "False"], done.stdout + done.stderr


def test_readme_numpy_example_from_the_user_venv(user_venv, wheel_server):
    code = readme_numpy_example().replace("127.0.0.1:50051", wheel_server.address)
    done = run([user_venv / "bin" / "python", "-c", code], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    first, second = done.stdout.strip().splitlines()
    remote, per_token = re.fullmatch(r"(\S+) \[(\S+)\]", first).groups()

    # The same inputs, here, through torch.
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    target = torch.tensor([2])
    assert np.float32(remote) == F.cross_entropy(logits, target).numpy()
    assert np.float32(per_token) == F.cross_entropy(logits, target, reduction="none", label_smoothing=0.1).numpy()[0]
    rng = np.random.default_rng(0)
    lm_logits, tokens = rng.standard_normal((2, 8, 50), dtype=np.float32), rng.integers(0, 50, (2, 8))
    want = F.cross_entropy(torch.from_numpy(lm_logits[:, :-1]).reshape(-1, 50).double(), torch.from_numpy(tokens[:, 1:]).reshape(-1))
    assert math.isclose(float(second), math.exp(float(want)), rel_tol=1e-6), (second, math.exp(float(want)))

    # numpy in, numpy out, with torch's shapes and dtypes.
    probe = code + (
        "\nassert type(remote).__name__ == 'ndarray' and remote.shape == () and remote.dtype == np.float32, (type(remote), remote)"
        "\nassert per_token.shape == (1,) and per_token.dtype == np.float32, per_token"
    )
    done = run([user_venv / "bin" / "python", "-c", probe], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_lossd_client_score_from_the_user_venv(user_venv, wheel_server, tmp_path):
    g = np.random.default_rng(3)
    logits = (g.standard_normal((5, 33, 61)) * 2).astype(np.float32)
    tokens = g.integers(0, 61, (5, 33))
    tokens[1, :9] = -100
    path = tmp_path / "run.npz"
    np.savez(path, logits=logits, targets=tokens)
    cli = user_venv / "bin" / "lossd-client"
    health = run([cli, "--target", wheel_server.address, "health"], timeout=60)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stdout + health.stderr
    done = run(
        [
            cli,
            "--target",
            wheel_server.address,
            "score",
            path,
            "--class-axis",
            "-1",
            "--shift",
            "--json",
            "--no-progress",
            "--batch-mb",
            "0.01",
        ],
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    total = json.loads(done.stdout)["total"]
    x = torch.from_numpy(logits[:, :-1]).reshape(-1, 61).double()
    t = torch.from_numpy(tokens[:, 1:]).reshape(-1)
    want = float(F.cross_entropy(x, t))
    assert total["counted"] == int((t != -100).sum())
    assert math.isclose(total["loss"], want, rel_tol=1e-6), (total, want)
    assert math.isclose(total["perplexity"], math.exp(want), rel_tol=1e-6)
    assert total["requests"] > 1  # split into several requests and recombined exactly
