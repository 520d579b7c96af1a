"""The package's layout is its architecture: a core that imports no wing, and three wings that import the
core and, of each other, only what one offers another (each subpackage's docstring says the same)."""

import ast
import importlib

from helpers import REPO

WINGS = ("training", "evaluation", "vectors")
# (importer, wing) → the modules that wing offers that importer; no other import crosses between wings.
OFFERED = {
    ("training", "evaluation"): {"metrics", "label_free", "judge", "html_report"},
    ("evaluation", "vectors"): {"store", "duplicates"},
}


def imported_modules(path):
    """Every byolcli module a file imports, at the top or inside a function."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("byolcli."):
            parts = node.module.split(".")
            if len(parts) == 2:  # from byolcli.core import scan, files
                yield from ((parts[1], alias.name) for alias in node.names)
            else:
                yield parts[1], parts[2]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("byolcli."):
                    parts = alias.name.split(".")
                    yield parts[1], parts[2] if len(parts) > 2 else ""


def crossings():
    """(importing file, package.module) for every import that breaks the layering."""
    found = []
    for package in ("core", *WINGS):
        for path in sorted((REPO / "byolcli" / package).glob("*.py")):
            for target, module in imported_modules(path):
                allowed = target in ("core", package) or module in OFFERED.get((package, target), ())
                if not allowed:
                    found.append((f"{package}/{path.name}", f"{target}.{module}"))
    return found


def test_the_core_imports_no_wing_and_wings_import_each_other_only_through_what_they_offer():
    assert crossings() == []
    assert {path.name for path in (REPO / "byolcli").glob("*.py")} == {"__init__.py", "__main__.py", "cli.py"}


def test_the_layering_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    rogue = tmp_path / "byolcli" / "core"
    rogue.mkdir(parents=True)
    (rogue / "rogue.py").write_text("def f():\n    from byolcli.training.plan import Plan\n")
    monkeypatch.setattr("test_layout.REPO", tmp_path)
    assert crossings() == [("core/rogue.py", "training.plan")]


def test_every_subpackage_says_what_it_holds_and_may_import():
    for package in ("core", *WINGS):
        doc = importlib.import_module(f"byolcli.{package}").__doc__ or ""
        assert "import" in doc and len(doc.split()) > 30, package
