"""Generate the Python protobuf/gRPC code for the lossd contract.

`python proto/generate.py` writes into client/lossd_client/_proto (the committed copy);
`python proto/generate.py --out DIR` writes elsewhere (the drift test compares the two).
The generated gRPC module imports its message module by the proto path (`from lossd.v1 import
loss_pb2`); it is rewritten to a package-relative import so the code lives inside lossd_client.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUT = REPO_ROOT / "client" / "lossd_client" / "_proto"
PROTO_FILES = ["lossd/v1/loss.proto"]


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(PROTO_ROOT / p) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(out_dir.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = path.read_text()
        fixed = text.replace("from lossd.v1 import loss_pb2", "from . import loss_pb2")
        if fixed != text:
            path.write_text(fixed)
        written.append(path)
    for pkg in (out_dir / "lossd", out_dir / "lossd" / "v1"):
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text("")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
