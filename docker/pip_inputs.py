"""Derive pip inputs for the image build from the repo's own metadata (no duplicated pins).

Used by docker/Dockerfile and docker/Dockerfile.cuda:

  python pip_inputs.py constraints requirements.txt  > constraints.txt
      every plain ``name==version`` pin of requirements.txt (comments, markers-free pins only;
      paths, ``-e``/``-r`` lines and unpinned names are dropped, so the file is always a valid
      pip constraints file).
  python pip_inputs.py deps client/pyproject.toml server/pyproject.toml  > deps.txt
      the union of [project].dependencies of the given pyproject files, minus the project's
      own distributions (lossd-*), so the third-party dependencies can be installed in a
      layer that does not change when the source changes.
"""

from __future__ import annotations

import re
import sys
import tomllib

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*(?:\[[^\]]*\])?)\s*==\s*([^\s;#]+)\s*(?:#.*)?$")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints(paths: list[str]) -> list[str]:
    out: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                m = _PIN.match(line)
                if m:
                    name = re.sub(r"\[.*\]", "", m.group(1))  # constraints may not carry extras
                    out.append(f"{name}=={m.group(2)}")
    return out


def deps(paths: list[str]) -> list[str]:
    own = set()
    reqs: list[str] = []
    for path in paths:
        with open(path, "rb") as fh:
            project = tomllib.load(fh).get("project", {})
        if "name" in project:
            own.add(_norm(project["name"]))
        reqs.extend(project.get("dependencies", []))
    seen: set[str] = set()
    out: list[str] = []
    for req in reqs:
        m = _NAME.match(req)
        if not m or _norm(m.group(1)) in own or _norm(m.group(1)).startswith("lossd-"):
            continue
        if req not in seen:
            seen.add(req)
            out.append(req)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] not in ("constraints", "deps"):
        print(__doc__, file=sys.stderr)
        return 2
    lines = constraints(argv[2:]) if argv[1] == "constraints" else deps(argv[2:])
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
