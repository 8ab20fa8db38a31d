"""The client's API reference: `make docs` (pdoc) builds it, and every public name has a docstring.

Public: every name in ``lossd_client.__all__`` and ``lossd_client.hf.__all__``, and the public
methods and properties of the client classes and the result classes. A dataclass without a
docstring counts as undocumented (Python fills ``__doc__`` with its signature), and so does a
class or method that only inherits one (its own ``__doc__`` is what pdoc shows first).
No server is involved: this checks documentation, not behaviour.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys

import lossd_client
import lossd_client.base
import lossd_client.hf
import pytest
from hostenv import REPO

MODULES = ("lossd_client", "lossd_client.hf")
CLASSES_WITH_METHODS = (
    lossd_client.LossClient,
    lossd_client.AsyncLossClient,
    lossd_client.base.ClientBase,  # the methods both clients share (cross_entropy, perplexity, ...)
    lossd_client.ServerInfo,
    lossd_client.LossRequest,
    lossd_client.EvaluateResult,
    lossd_client.PerplexityResult,
    lossd_client.LoglikelihoodResult,
    lossd_client.SequenceStats,
    lossd_client.hf.LossdPerplexity,
)


def own_doc(obj: object) -> str:
    """The docstring written for ``obj`` itself ('' when absent, inherited or generated)."""
    if isinstance(obj, type):
        doc = obj.__dict__.get("__doc__") or ""
        if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return ""  # dataclasses' generated signature
        return doc.strip()
    if isinstance(obj, property):
        obj = obj.fget
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return (getattr(obj, "__doc__", None) or "").strip()


def public_names() -> dict[str, object]:
    names: dict[str, object] = {}
    for module in (lossd_client, lossd_client.hf):
        names[module.__name__] = module
        for name in module.__all__:
            names[f"{module.__name__}.{name}"] = getattr(module, name)
    for cls in CLASSES_WITH_METHODS:
        for name, member in vars(cls).items():
            if name.startswith("_"):
                continue
            if isinstance(member, property) or inspect.isfunction(member) or isinstance(member, (staticmethod, classmethod)):
                names[f"{cls.__module__.split('.')[0]}.{cls.__qualname__}.{name}"] = member
    return names


def test_every_public_name_has_a_docstring():
    names = public_names()
    assert len(names) > 40, sorted(names)  # the walk found the API, not an empty list
    missing = sorted(name for name, obj in names.items() if not own_doc(obj))
    assert not missing, f"{len(missing)} public names have no docstring:\n  " + "\n  ".join(missing)


def test_the_docstring_rule_catches_an_undocumented_name():
    @dataclasses.dataclass
    class Bare:
        x: int

    class Inherits(lossd_client.LossdError):
        pass

    def nothing() -> None:
        pass

    assert own_doc(Bare) == "" and own_doc(Inherits) == "" and own_doc(nothing) == ""
    assert own_doc(lossd_client.combine) and own_doc(lossd_client.LossClient)


@pytest.mark.timeout(120)
def test_make_docs_builds_the_reference(tmp_path):
    """What `make docs` runs, into a temporary directory."""
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^docs:.*\n\t(.+)$", makefile, re.M)
    assert recipe, "Makefile has no docs target"
    args = recipe.group(1).split()
    assert args[0] == "$(VENV)/bin/pdoc" and "-o" in args, recipe.group(1)
    out = tmp_path / "api"
    args[0:1] = [sys.executable, "-m", "pdoc"]
    args[args.index("-o") + 1] = str(out)
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "index.html").is_file()
    for module in MODULES:
        page = out / (module.replace(".", "/") + ".html")
        assert page.is_file(), sorted(p.relative_to(out).as_posix() for p in out.rglob("*.html"))
        html = page.read_text()
        for name in sys.modules[module].__all__:
            assert f'id="{name}"' in html, f"{name} is not in {page.name}"
    html = (out / "lossd_client.html").read_text()
    for method in (
        "LossClient.perplexity",
        "LossClient.evaluate",
        "LossClient.cross_entropy",
        "AsyncLossClient.evaluate_many",
        "AsyncLossClient.nll_loss",
        "PerplexityResult.perplexity",
        "ServerInfo.device_name",
    ):
        assert f'id="{method}"' in html, method
