"""`lossd-client` run as a subprocess against a real server; numbers compared with local torch."""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib

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


@pytest.mark.parametrize("sure", [1000.0, math.nan])
def test_score_perplexity_past_exp_overflow_or_of_nan_is_torchs_exp(server, tmp_path, sure):
    """The table's perplexity (per file and total) is exp of the mean NLL as torch computes it in
    float64: inf past overflow, nan for a NaN mean (it said inf). JSON writes both as null."""
    logits = np.zeros((4, 3), np.float32)
    logits[:, 0] = sure
    target = np.array([1, 2, 1, 2])
    paths = [tmp_path / "a.npz", tmp_path / "b.npz"]
    for path in paths:
        np.savez(path, logits=logits, targets=target)
    done = run_cli("--target", server.address, "score", *map(str, paths), "--no-progress")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines()[1:] if not line.startswith("-")]
    assert [r.split()[0] for r in rows] == [*map(str, paths), "total"]
    want = torch.exp(F.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(target)))
    for row in rows:
        torch.testing.assert_close(torch.tensor(float(row.split()[3]), dtype=torch.float64), want, equal_nan=True)


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


# --------------------------------------------------------------------------- malformed input files
# Every malformed file is answered with one line on stderr naming the file and the problem, exit
# status 2, no traceback. The target is a closed port: a file that got through loading would be
# sent and fail with UNAVAILABLE (exit 1), so each case fails unless the loader refuses the file.
GOOD_LOGITS = np.arange(32, dtype=np.float32).reshape(8, 4)
GOOD_TARGETS = np.array([0, 1, 2, 3, 0, 1, 2, 3])


def _npz_bytes(compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, logits=GOOD_LOGITS, targets=GOOD_TARGETS)
    return buf.getvalue()


def _flip_middle(data: bytes, at: float = 0.5, n: int = 16) -> bytes:
    i = int(len(data) * at)
    return data[:i] + bytes(b ^ 0x5A for b in data[i : i + n]) + data[i + n :]


def _zip_of(**members: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name + ".npy", data)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _st(header: object, data: bytes = b"", raw: bytes | None = None) -> bytes:
    """A .safetensors file: 8-byte little-endian header length, the JSON header, the data."""
    head = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def _st_one(**meta: object) -> bytes:
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16], **meta}
    entry = {k: v for k, v in entry.items() if v is not _DROP}
    return _st({"logits": entry, "targets": {"dtype": "I64", "shape": [2], "data_offsets": [16, 32]}}, bytes(32))


_DROP = object()


def _pt(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


_T = torch.zeros(8, 4)
_Y = torch.zeros(8, dtype=torch.int64)

MALFORMED = {
    # .npz
    "npz-truncated": ("npz", lambda: _npz_bytes()[: len(_npz_bytes()) // 2], "not a readable .npz archive"),
    "npz-truncated-compressed": ("npz", lambda: _npz_bytes(True)[: len(_npz_bytes(True)) * 2 // 3], "not a readable .npz archive"),
    "npz-truncated-to-4-bytes": ("npz", lambda: _npz_bytes()[:4], "not a readable .npz archive"),
    "npz-empty": ("npz", lambda: b"", "not a readable .npz archive"),
    "npz-garbage": ("npz", lambda: b"\x80garbage, not a zip" * 20, "not a readable .npz archive"),
    "npz-corrupt-member": ("npz", lambda: _flip_middle(_npz_bytes(), 0.2), "not a readable .npz archive"),
    "npz-corrupt-compressed-member": ("npz", lambda: _flip_middle(_npz_bytes(True), 0.3), "not a readable .npz archive"),
    "npz-member-not-npy": ("npz", lambda: _zip_of(logits=b"this is not an npy file", targets=b"nor this"), "not a readable .npz archive"),
    "npz-member-huge-shape": ("npz", lambda: _zip_of(logits=_npy_header((2**40, 2**20)) + bytes(64)), "not a readable .npz archive"),
    "npz-member-short-data": ("npz", lambda: _zip_of(logits=_npy_header((1000, 1000)) + bytes(64)), "not a readable .npz archive"),
    "npz-member-negative-shape": ("npz", lambda: _zip_of(logits=_npy_header((-5,)) + bytes(64)), "not a readable .npz archive"),
    "npz-member-object-dtype": ("npz", lambda: _zip_of(logits=_npy_header((2,), "|O") + b"\x80\x04N."), "not a readable .npz archive"),
    "npz-string-logits": ("npz", lambda: _savez(logits=np.array(["a", "b"]), targets=GOOD_TARGETS), "logits 'logits': unsupported numpy dtype"),
    "npz-complex-logits": ("npz", lambda: _savez(logits=np.zeros(3, np.complex64), targets=GOOD_TARGETS), "unsupported numpy dtype complex64"),
    "npz-uint16-targets": ("npz", lambda: _savez(logits=GOOD_LOGITS, targets=np.zeros(8, np.uint16)), "target 'targets': unsupported numpy dtype uint16"),
    # .safetensors
    "st-too-short": ("safetensors", lambda: b"\x01\x02", "too short"),
    "st-header-longer-than-file": ("safetensors", lambda: struct.pack("<Q", 10**6) + b"{}", "header length"),
    "st-header-not-json": ("safetensors", lambda: _st(None, raw=b"{not json"), "header is not JSON"),
    "st-header-not-utf8": ("safetensors", lambda: _st(None, raw=b"\xff\xfe\xfd"), "header is not JSON"),
    "st-header-deeply-nested": ("safetensors", lambda: _st(None, raw=b"[" * 100_000 + b"]" * 100_000), "header is not JSON"),
    "st-header-list": ("safetensors", lambda: _st([1, 2]), "header is a JSON array"),
    "st-header-null": ("safetensors", lambda: _st(None), "header is a JSON null"),
    "st-entry-not-object": ("safetensors", lambda: _st({"logits": 5}), "expected an object with dtype, shape and data_offsets, got a JSON number"),
    "st-missing-dtype": ("safetensors", lambda: _st_one(dtype=_DROP), "has no dtype"),
    "st-missing-shape": ("safetensors", lambda: _st_one(shape=_DROP), "has no shape"),
    "st-missing-offsets": ("safetensors", lambda: _st_one(data_offsets=_DROP), "has no data_offsets"),
    "st-dtype-not-string": ("safetensors", lambda: _st_one(dtype=["F32"]), "dtype must be a string"),
    "st-dtype-unknown": ("safetensors", lambda: _st_one(dtype="Q7"), "unsupported dtype 'Q7'"),
    "st-shape-not-list": ("safetensors", lambda: _st_one(shape=4), "shape must be a list of integers"),
    "st-shape-string": ("safetensors", lambda: _st_one(shape=["2", "2"]), "shape must be a list of integers"),
    "st-shape-float": ("safetensors", lambda: _st_one(shape=[2.0, 2]), "shape must be a list of integers"),
    "st-shape-bool": ("safetensors", lambda: _st_one(shape=[True, 4]), "shape must be a list of integers"),
    "st-shape-negative": ("safetensors", lambda: _st_one(shape=[-2, -2]), "shape must be a list of integers"),
    "st-shape-nan": ("safetensors", lambda: _st(None, bytes(16), raw=b'{"logits": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 16]}}'), "shape must be a list of integers"),
    "st-shape-overflowing-zero": ("safetensors", lambda: _st_one(shape=[0, 2**70], data_offsets=[0, 0]), "malformed .safetensors file"),
    "st-offsets-not-list": ("safetensors", lambda: _st_one(data_offsets="0-16"), "data_offsets must be"),
    "st-offsets-negative": ("safetensors", lambda: _st_one(data_offsets=[-16, 0]), "data_offsets must be"),
    "st-offsets-float": ("safetensors", lambda: _st_one(data_offsets=[0, 16.0]), "data_offsets must be"),
    "st-offsets-strings": ("safetensors", lambda: _st_one(data_offsets=["0", "16"]), "data_offsets must be"),
    "st-offsets-three": ("safetensors", lambda: _st_one(data_offsets=[0, 8, 16]), "data_offsets must be"),
    "st-offsets-reversed": ("safetensors", lambda: _st_one(data_offsets=[16, 0]), "data_offsets must be"),
    "st-offsets-wrong-size": ("safetensors", lambda: _st_one(data_offsets=[0, 12]), "do not hold shape"),
    "st-offsets-past-the-file": ("safetensors", lambda: _st_one(shape=[2, 2**40], data_offsets=[0, 2**43]), "do not hold shape"),
    "st-offsets-huge": ("safetensors", lambda: _st_one(data_offsets=[2**70, 2**70 + 16]), "do not hold shape"),
    # .pt
    "pt-targets-int": ("pt", lambda: _pt({"logits": _T, "targets": 5}), "target 'targets' is of type int, expected a tensor"),
    "pt-targets-list": ("pt", lambda: _pt({"logits": _T, "targets": [0, 1, 2]}), "target 'targets' is of type list, expected a tensor"),
    "pt-targets-dict": ("pt", lambda: _pt({"logits": _T, "labels": {"a": _Y}}), "target 'labels' is of type dict, expected a tensor"),
    "pt-logits-string": ("pt", lambda: _pt({"logits": "not a tensor", "targets": _Y}), "logits 'logits' is of type str, expected a tensor"),
    "pt-pair-of-non-tensors": ("pt", lambda: _pt((1.5, None)), "logits 'logits' is of type float, expected a tensor"),
    "pt-complex-logits": ("pt", lambda: _pt({"logits": torch.zeros(8, 4, dtype=torch.complex64), "targets": _Y}), "unsupported torch dtype torch.complex64"),
    "pt-sparse-targets": ("pt", lambda: _pt({"logits": _T, "targets": _Y.to_sparse()}), "torch.sparse_coo tensor"),
    "pt-mixed-key-types": ("pt", lambda: _pt({0: _T, "x": _Y}), "no logits array"),
    "pt-truncated": ("pt", lambda: _pt({"logits": _T, "targets": _Y})[:300], "not a readable torch file (RuntimeError: PytorchStreamReader"),
    "pt-empty": ("pt", lambda: b"", "not a readable torch file (EOFError)"),
    "pt-garbage": ("pt", lambda: b"\x80\x02garbage that is not a pickle" * 3, "refused to load"),
    "pt-plain-pickle": ("pt", lambda: pickle.dumps({1, 2, 3}, protocol=2), "not a readable torch file (RuntimeError: Invalid magic number"),
}  # fmt: skip


def _savez(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_are_one_line_and_exit_status_2(tmp_path, case):
    kind, build, phrase = MALFORMED[case]
    path = tmp_path / f"{case}.{kind}"
    path.write_bytes(build())
    done = run_cli("--target", "127.0.0.1:1", "--timeout-s", "5", "score", str(path))
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"lossd-client: {path}: "), lines[0]
    assert phrase in lines[0], lines[0]
    assert done.stdout == ""


BAD_ARGUMENTS = {
    "score-output-folder-missing": (["score", "{lm}", "--class-axis", "-1", "--reduction", "none", "--output", "{missing}/out.npy"], "does not exist"),
    "compare-output-folder-missing": (["compare", "{lm}", "{lm}", "--output", "{missing}/out.npz"], "does not exist"),
    "window-zero": (["score", "{lm}", "--window", "0"], "--window: expected an integer >= 1, got 0"),
    "window-negative": (["score", "{lm}", "--window", "-3"], "--window: expected an integer >= 1, got -3"),
    "batch-mb-nan": (["score", "{lm}", "--batch-mb", "nan"], "--batch-mb: expected a finite number > 0, got nan"),
    "batch-mb-inf": (["score", "{lm}", "--batch-mb", "inf"], "--batch-mb: expected a finite number > 0, got inf"),
    "batch-mb-zero": (["score", "{lm}", "--batch-mb", "0"], "--batch-mb: expected a finite number > 0, got 0"),
    # each failed every call at once with only "Deadline Exceeded" (gRPC's deadline overflows past ~7.4e9 s)
    "timeout-nan": (["--timeout-s", "nan", "score", "{lm}"], "--timeout-s: expected a finite number of seconds > 0 and <= 1000000000, got nan"),
    "timeout-inf": (["--timeout-s", "inf", "score", "{lm}"], "--timeout-s: expected a finite number of seconds > 0 and <= 1000000000, got inf"),
    "timeout-negative": (["--timeout-s", "-1", "score", "{lm}"], "--timeout-s: expected a finite number of seconds > 0 and <= 1000000000, got -1"),
    "timeout-1e10": (["--timeout-s", "1e10", "score", "{lm}"], "--timeout-s: expected a finite number of seconds > 0 and <= 1000000000, got 1e10"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_named_with_exit_status_2_before_any_work(server, files, tmp_path, case):
    """Checked before anything is scored: an --output folder that is missing failed only after
    the whole scoring, with a traceback; --window 0 and --batch-mb nan with tracebacks."""
    args, phrase = BAD_ARGUMENTS[case]
    values = {"lm": str(files["npz"]), "missing": str(tmp_path / "no" / "such")}
    done = run_cli("--target", server.address, *[a.format(**values) for a in args], "--no-progress")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert phrase in done.stderr.strip().splitlines()[-1] and done.stdout == ""  # argparse's usage may come first



def _tls_input(kind: str, directory: pathlib.Path) -> str:
    """A path no --tls-*-file may be: a device, a named pipe, a folder, 2 MiB, a file that is no PEM."""
    if kind == "device":
        return "/dev/zero"
    path = directory / f"{kind}.pem"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "huge":
        path.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + b"A" * 2 * 2**20 + b"\n-----END CERTIFICATE-----\n")
    else:
        path.write_text("not-a-certificate\n")
    return str(path)


TLS_INPUTS = {
    "ca-device": ("--tls-ca-file", "device", "not a regular file (a character device)"),  # read until memory ran out
    "ca-fifo": ("--tls-ca-file", "fifo", "not a regular file (a named pipe)"),  # blocked for ever
    "ca-folder": ("--tls-ca-file", "folder", "not a regular file (a directory)"),
    "ca-huge": ("--tls-ca-file", "huge", "larger than 1048576 bytes, which no PEM certificate, key or CA bundle is"),
    "ca-text": ("--tls-ca-file", "text", "not a PEM file with a certificate (-----BEGIN ...CERTIFICATE-----)"),  # was gRPC's log
    "cert-fifo": ("--tls-cert-file", "fifo", "not a regular file (a named pipe)"),
    "key-device": ("--tls-key-file", "device", "not a regular file (a character device)"),
    "key-text": ("--tls-key-file", "text", "not a PEM file with a private key (-----BEGIN ...PRIVATE KEY-----)"),
}


@pytest.mark.parametrize("case", list(TLS_INPUTS))
def test_tls_files_that_are_no_small_regular_pem_file_are_refused_naming_the_option(tmp_path, case):
    """Read whole, whatever they were: /dev/zero until memory ran out, a named pipe for ever; a file
    that is no PEM failed in gRPC's handshake with 4 lines of its log."""
    option, kind, reason = TLS_INPUTS[case]
    files = {}
    if option != "--tls-ca-file":  # the client certificate and key go together: the other one is fine
        (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\n")
        (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
        files = {"--tls-cert-file": str(tmp_path / "cert.pem"), "--tls-key-file": str(tmp_path / "key.pem")}
    files[option] = _tls_input(kind, tmp_path)
    flags = [part for pair in files.items() for part in pair]
    prelude = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))"  # a read without bound: MemoryError
    done = run_cli("--target", "127.0.0.1:1", "--timeout-s", "5", *flags, "health", prelude=prelude)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"lossd-client: {option} {files[option]}: {reason}"]


# --------------------------------------------------------------------------- what the loaders read
def _score_json(server, path: pathlib.Path, *args: str, prelude: str = "") -> dict:
    done = run_cli("--target", server.address, "score", str(path), "--json", "--no-progress", *args, prelude=prelude)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["total"]


def _want_loss() -> float:
    return float(F.cross_entropy(torch.from_numpy(GOOD_LOGITS).double(), torch.from_numpy(GOOD_TARGETS)))


def test_npz_members_that_are_not_used_are_never_read(server, tmp_path):
    """Every member was decompressed and loaded: a 2 MB file with an unused member inflating to 2 GiB
    took 2.1 GB and 28 s. Members no read can survive (a corrupt one, one declaring 4 TB) now stand
    beside the arrays scored; before, each made the file unreadable."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("logits.npy", _npy_bytes(GOOD_LOGITS))
        z.writestr("targets.npy", _npy_bytes(GOOD_TARGETS))
        z.writestr("huge.npy", _npy_header((2**40,)) + bytes(64))
        z.writestr("junk.npy", _npy_bytes(np.zeros(4096, np.float32)))
    data = bytearray(buf.getvalue())
    junk = data.index(b"junk.npy") + len(b"junk.npy")  # its local header's name; the deflated bytes follow
    data[junk + 8 : junk + 24] = bytes(b ^ 0x5A for b in data[junk + 8 : junk + 24])
    path = tmp_path / "extra.npz"
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z, pytest.raises((zipfile.BadZipFile, zlib.error)):
        z.read("junk.npy")  # the corruption is real
    assert _score_json(server, path)["loss"] == pytest.approx(_want_loss(), rel=1e-6)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_an_npz_member_declaring_more_than_it_holds_is_refused_before_it_is_allocated(tmp_path):
    path = tmp_path / "short.npz"
    path.write_bytes(_zip_of(logits=_npy_header((10**12,)) + bytes(64), targets=_npy_bytes(GOOD_TARGETS)))
    prelude = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))"
    done = run_cli("--target", "127.0.0.1:1", "--timeout-s", "5", "score", str(path), prelude=prelude)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"lossd-client: {path}: not a readable .npz archive (member 'logits' declares shape (1000000000000,) of float32 "
        f"(4000000000000 bytes) but holds 64 bytes)"
    ]


def test_a_safetensors_file_of_many_tensors_takes_one_file_descriptor(server, tmp_path):
    """Each tensor was an np.memmap holding a file descriptor of its own: 30,000 tensors said
    'cannot read: Too many open files' of a readable file (here 2,000 under a limit of 256)."""
    tensors = {f"pad{i:04d}": np.full(3, i, np.float32) for i in range(2000)}
    path = tmp_path / "many.safetensors"
    save_file({**tensors, "logits": GOOD_LOGITS, "targets": GOOD_TARGETS}, str(path))
    prelude = "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))"
    assert _score_json(server, path, prelude=prelude)["loss"] == pytest.approx(_want_loss(), rel=1e-6)


def test_the_arrays_a_file_has_are_listed_up_to_twenty(tmp_path):
    """The list named every array: 15.9 MB on one line for a header of 1.7 million tensors."""
    path = tmp_path / "nameless.safetensors"
    save_file({f"{'x' * 100}{i:04d}": np.zeros(1, np.float32) for i in range(1000)}, str(path))
    done = run_cli("--target", "127.0.0.1:1", "--timeout-s", "5", "score", str(path))
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.endswith(", and 980 more); name it with --logits-key"), line
    assert line.count("'... (104 characters)") == 20 and len(line) < 3000, line  # each name cut at 80 characters


def test_a_folder_a_named_pipe_or_a_device_given_as_a_file_is_named_as_such(tmp_path):
    """Each was reported as 'no such file'."""
    folder = tmp_path / "run.npz"
    folder.mkdir()
    pipe = tmp_path / "pipe.npz"
    os.mkfifo(pipe)
    device = tmp_path / "zero.npz"
    device.symlink_to("/dev/zero")
    expected = {
        folder: "is a directory, not a file",
        pipe: "not a regular file (a named pipe)",
        device: "not a regular file (a character device)",
        tmp_path / "none.npz": "no such file",
    }
    for path, reason in expected.items():
        done = run_cli("--target", "127.0.0.1:1", "--timeout-s", "5", "score", str(path))
        assert (done.returncode, done.stderr.splitlines()) == (2, [f"lossd-client: {path}: {reason}"]), done.stderr
