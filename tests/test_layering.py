"""The package layering (issue 13), enforced: every import in src/lamina points down the rank table.

`check_source(source, module)` reads one module's imports with `ast` (every Import / ImportFrom anywhere: module
level, inside functions, under `if TYPE_CHECKING:`; relative imports resolved; `importlib.import_module("lamina.…")`
with a literal name; `alias._private` attribute use on an imported lamina module) and returns one line per
violation. Rules, for an import from package A (the importer's top-level package) of package B != A:

  (a) rank(B) < rank(A), or the edge A -> B is in ALLOWED (same-rank exceptions); otherwise "upward" / "same rank".
  (b) no name or module path segment starting with "_" (dunders such as __version__ excepted): a package's
      private names are its own.
  (c) A and B are in RANKS: a new package must be placed in the table before it can be imported or import.

`lamina/__init__.py` (the lazy facade re-exporting create_model, Trainer, train, ...) is exempt as an importer;
importing facade names (`from lamina import Trainer`) from inside the package is a violation, since it would hide
an upward edge behind the facade.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "lamina"

# Lower rank = lower layer. Packages may import strictly lower ranks (and themselves).
RANKS = {
    "errors": 0,  # the bottom leaf: user-facing errors
    "allocator": 0,  # torch-free: which malloc the process runs on (the CLI re-executes itself before importing torch)
    "io": 1, "plots": 1,  # leaves over errors: atomic writes / safetensors / hashing; matplotlib figures
    "config": 2,
    "nn": 3,
    "models": 4, "data": 4,
    "tasks": 5, "hub": 5,
    "engine": 6,
    "runs": 7,
    # tools: read a run through runs.open_run and target the model contract
    "trust": 8, "compress": 8, "deploy": 8, "report": 8, "search": 8,
    # entry points
    "cli": 9, "__main__": 9,
}
# Same-rank edges that are allowed (public names only; rule (b) still applies).
ALLOWED = {
    ("trust", "report"),  # the audit (trust.audit) runs every check and writes their report (report.html)
    ("search", "report"),  # a study's report page is written with the report package's HTML helpers
    ("__main__", "cli"),  # `python -m lamina` is the CLI
}
FACADE_OK = {"__version__"}  # names a module may import from the lamina facade itself


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def package_of(module: str) -> str | None:
    """'lamina.engine.trainer' -> 'engine'; 'lamina.io' -> 'io'; 'lamina' -> None (the facade)."""
    parts = module.split(".")
    return parts[1] if parts[0] == ROOT and len(parts) > 1 else None


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def _check_edge(importer: str, target: str, lineno: int, where: str, out: list[str]):
    """One import of the lamina module path `target` (maybe with a trailing imported name) by package `importer`."""
    parts = target.split(".")
    pkg = parts[1] if len(parts) > 1 else None
    if pkg is None:
        return  # `import lamina`
    if pkg not in RANKS:
        out.append(f"{where}:{lineno}: {importer} -> {pkg} ({target}): package '{pkg}' is not in the rank table")
        return
    if pkg == importer:
        return
    priv = [p for p in parts[1:] if _private(p)]
    if priv:
        out.append(f"{where}:{lineno}: {importer} -> {pkg} ({target}): private name '{priv[0]}' of another package")
    if (importer, pkg) in ALLOWED:
        return
    a, b = RANKS[importer], RANKS[pkg]
    if b > a:
        out.append(f"{where}:{lineno}: {importer} -> {pkg} ({target}): upward import (rank {a} -> {b})")
    elif b == a:
        out.append(f"{where}:{lineno}: {importer} -> {pkg} ({target}): same-rank import not in ALLOWED (rank {a})")


def check_source(source: str, module: str, is_package: bool = False, where: str | None = None) -> list[str]:
    """Violations of the layering in one module's source (`module`: its dotted name, e.g. 'lamina.engine.trainer';
    `is_package`: the source is a package's __init__.py). Empty list = clean."""
    where = where or module
    if module == ROOT:
        return []  # the lazy facade is exempt
    importer = package_of(module)
    out: list[str] = []
    if importer not in RANKS:
        out.append(f"{where}:1: package '{importer}' is not in the rank table (place it in RANKS)")
        return out
    tree = ast.parse(source)
    lamina_aliases: dict[str, str] = {}  # local name -> lamina module path it is bound to (other packages only)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == ROOT or a.name.startswith(ROOT + "."):
                    _check_edge(importer, a.name, node.lineno, where, out)
                    if a.asname:
                        lamina_aliases[a.asname] = a.name
                    else:
                        lamina_aliases[a.name.split(".")[0]] = ROOT
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            if base != ROOT and not base.startswith(ROOT + "."):
                continue
            for a in node.names:
                if base == ROOT:  # from lamina import engine / __version__ / Trainer
                    if a.name in RANKS:
                        _check_edge(importer, f"{ROOT}.{a.name}", node.lineno, where, out)
                    elif a.name not in FACADE_OK:
                        out.append(f"{where}:{node.lineno}: {importer} -> lamina facade (lamina.{a.name}): import "
                                   f"'{a.name}' from the package that defines it, not the lazy facade")
                else:
                    _check_edge(importer, f"{base}.{a.name}" if a.name != "*" else base, node.lineno, where, out)
                lamina_aliases[a.asname or a.name] = f"{base}.{a.name}"
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and node.args[0].value.startswith(ROOT + ".")
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            _check_edge(importer, node.args[0].value, node.lineno, where, out)
    # private attributes reached through an imported lamina name: `checkpoint._weights`, `lamina.engine._x`
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, v = [node.attr], node.value
            while isinstance(v, ast.Attribute):
                chain.append(v.attr)
                v = v.value
            if isinstance(v, ast.Name) and v.id in lamina_aliases:
                path = ".".join([lamina_aliases[v.id], *reversed(chain)])
                pkg = package_of(path)
                if pkg is not None and pkg != importer and pkg in RANKS:
                    out.append(f"{where}:{node.lineno}: {importer} -> {pkg} ({path}): private name "
                               f"'{node.attr}' of another package")
    return sorted(set(out), key=lambda s: (int(s.split(":")[1]) if s.split(":")[1].isdigit() else 0, s))


def tree_violations(src: Path = SRC) -> list[str]:
    out = []
    pkg_root = src / ROOT
    for entry in sorted(pkg_root.iterdir()):  # (c) for files too: every top-level module/package is placed
        name = entry.stem if entry.suffix == ".py" else entry.name
        is_pkg = entry.is_dir() and any(entry.rglob("*.py"))
        if (entry.suffix == ".py" or is_pkg) and name != "__init__" and name not in RANKS:
            out.append(f"{entry.relative_to(src.parent)}: package '{name}' is not in the rank table (place it in RANKS)")
    for path in sorted(pkg_root.rglob("*.py")):
        rel = path.relative_to(src)
        parts = list(rel.with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        module = ".".join(parts)
        if package_of(module) not in RANKS and module != ROOT:
            continue  # reported once above
        out += check_source(path.read_text(encoding="utf-8"), module, is_package, str(path.relative_to(src.parent)))
    return out


# ----- the real tree ---------------------------------------------------------------------------------
def test_source_tree_follows_the_layering():
    bad = tree_violations()
    assert not bad, (f"{len(bad)} layering violation(s) (issue 13; ranks in tests/test_layering.py RANKS):\n  "
                     + "\n  ".join(bad))


def test_import_lamina_does_not_import_torch():
    code = "import lamina, sys; lamina.__version__; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ----- the checker itself: each cycle issue 13 lists must fail -------------------------------------------
def _bad(source: str, module: str, **kw) -> list[str]:
    out = check_source(source, module, **kw)
    assert out, f"expected a violation for {module}: {source!r}"
    return out


def test_engine_importing_trust_fails_even_inside_a_function():
    out = _bad("def step(self):\n    from lamina.trust.robust import Normalized, adversarial_examples\n",
               "lamina.engine.trainer")
    assert out == ["lamina.engine.trainer:2: engine -> trust (lamina.trust.robust.Normalized): upward import "
                   "(rank 6 -> 8)",
                   "lamina.engine.trainer:2: engine -> trust (lamina.trust.robust.adversarial_examples): upward "
                   "import (rank 6 -> 8)"]


@pytest.mark.parametrize("source", [
    "from lamina.compress.distill import distill_loss\n",
    "import lamina.compress.distill\n",
    "def f():\n    from lamina.trust.overfitting import overfitting_onset\n",
    "from lamina import report\n",
    "from lamina.report import plot_curves\n",
    "import lamina.report as r\n",
    "import importlib\nm = importlib.import_module('lamina.trust.overfitting')\n",
])
def test_runs_importing_a_tool_fails(source):
    out = _bad(source, "lamina.runs.train")
    assert all("runs -> " in v and "upward import (rank 7 -> 8)" in v for v in out), out


def test_report_and_trust_go_one_way_only():
    # the cycle the issue found: trust imported report.plots while report imported trust. Now report imports no
    # tool (its figures come from the leaf lamina.plots, the overfitting rule from lamina.runs), and only the
    # audit (trust -> report) writes a report.
    assert "same-rank" in _bad("from lamina.trust.overfitting import overfitting_onset\n", "lamina.report.html")[0]
    assert "same-rank" in _bad("from ..trust import calibration\n", "lamina.report.html")[0]
    assert check_source("from lamina.report.html import build_report\n", "lamina.trust.audit") == []
    assert "private name '_page'" in _bad("from lamina.report.html import _page\n", "lamina.trust.audit")[0]


def test_hub_importing_a_private_engine_name_fails_twice():
    out = _bad("from lamina.engine.checkpoint import _weights\n", "lamina.hub.pretrained")
    assert any("private name '_weights'" in v for v in out) and any("upward import (rank 5 -> 6)" in v for v in out)
    assert len(out) == 2


def test_private_names_of_another_package_fail_even_downward():
    out = _bad("from lamina.data.tokenizers import _run_tokenizer\n", "lamina.deploy.serve")
    assert out == ["lamina.deploy.serve:1: deploy -> data (lamina.data.tokenizers._run_tokenizer): private name "
                   "'_run_tokenizer' of another package"]
    assert "'_decoder'" in _bad("from lamina.models._decoder import Decoder\n", "lamina.hub.hf")[0]
    assert "'_decoder'" in _bad("import lamina.models._decoder\n", "lamina.hub.hf")[0]
    # reached as an attribute of an imported module
    assert "'_run_tokenizer'" in _bad("from lamina.data import tokenizers\ntokenizers._run_tokenizer(1)\n",
                                      "lamina.deploy.serve")[0]
    assert "'_x'" in _bad("import lamina.data.tokenizers\nlamina.data.tokenizers._x()\n", "lamina.deploy.serve")[0]
    # a package's own private names are its own business
    assert check_source("from lamina.models._decoder import Decoder\n", "lamina.models.gpt") == []
    assert check_source("from ._decoder import Decoder\n", "lamina.models.gpt") == []


def test_downward_imports_and_relative_resolution():
    assert check_source("from lamina.runs import open_run\nimport lamina.nn\n", "lamina.trust.x") == []
    assert check_source("from . import checkpoint\nfrom .checkpoint import save\n", "lamina.engine.trainer") == []
    assert check_source("from .trainer import Trainer\n", "lamina.engine", is_package=True) == []
    assert check_source("from ..nn import RMSNorm\n", "lamina.models.gpt") == []
    assert "upward" in _bad("from ..trust import robust\n", "lamina.engine.trainer")[0]
    assert "upward" in _bad("from .. import cli\n", "lamina.engine.trainer")[0]
    assert "upward" in _bad("from ..runs import train\n", "lamina.engine", is_package=True)[0]


def test_type_checking_imports_count():
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lamina.engine import Trainer\n"
    assert "lamina.tasks.base:3: tasks -> engine" in _bad(src, "lamina.tasks.base")[0]


def test_same_rank_packages_and_the_facade():
    assert "same-rank" in _bad("from lamina.data import load_dataset\n", "lamina.models.registry")[0]
    assert "same-rank" in _bad("import lamina.deploy\n", "lamina.compress.run")[0]
    assert "lazy facade" in _bad("from lamina import Trainer\n", "lamina.nn.x")[0]
    assert check_source("from lamina import __version__\n", "lamina.cli.main") == []
    assert check_source("from lamina import runs\n", "lamina.engine.x") != []  # upward, spelled via the root
    assert check_source("from lamina import runs\n", "lamina.cli.main") == []
    assert check_source("def __getattr__(n):\n    from lamina import runs\n", "lamina") == []  # facade exempt


def test_packages_missing_from_the_rank_table_fail():
    assert "not in the rank table" in _bad("import torch\n", "lamina.fewshot.nas")[0]
    assert "not in the rank table" in _bad("from lamina.fewshot import nas\n", "lamina.cli.main")[0]


def test_tree_walk_reports_file_and_line(tmp_path):
    pkg = tmp_path / "src" / "lamina"
    for d in ("engine", "trust", "newtool"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("def __getattr__(n):\n    from lamina import runs\n")
    (pkg / "engine" / "trainer.py").write_text("import torch\n\n\ndef f():\n    from lamina.trust import robust\n")
    bad = tree_violations(tmp_path / "src")
    assert "src/lamina/newtool: package 'newtool' is not in the rank table (place it in RANKS)" in bad
    assert ("src/lamina/engine/trainer.py:5: engine -> trust (lamina.trust.robust): upward import (rank 6 -> 8)"
            in bad)
    assert len(bad) == 2, bad
