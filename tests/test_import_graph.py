"""The import graph stays layered (docs/architecture.md section 1): no circle between modules,
none between packages when lazy imports count, and no upward import."""

import ast

import pytest
from import_graph import ROOT, circles, edges, modules, report, upward


@pytest.fixture(scope="module")
def graph():
    return report()


def test_no_circles_and_no_upward_imports(graph):
    assert graph["modules"] > 100  # the scan saw the packages
    assert graph["module_circles"] == []
    assert graph["package_circles"] == []
    assert graph["upward"] == [] and graph["package_upward"] == []


def test_the_scan_finds_a_planted_circle(tmp_path):
    """The checks can fail: a lazy import back into the importer's importer is a circle."""
    pkg = tmp_path / "kvjax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from kvjax import high\n")
    (pkg / "high.py").write_text("from kvjax import low\n")
    known = {"kvjax": pkg / "__init__.py", "kvjax.low": pkg / "low.py",
             "kvjax.high": pkg / "high.py"}
    top, lazy = edges(known)
    assert top == {("kvjax.high", "kvjax.low")} and lazy == {("kvjax.low", "kvjax.high")}
    assert circles(top) == [] and circles(top | lazy) == [["kvjax.high", "kvjax.low"]]
    assert upward(top | lazy) == [("kvjax.high", "kvjax.low"), ("kvjax.low", "kvjax.high")]


def test_argparse_lives_in_the_cli_only():
    users = sorted(str(p.relative_to(ROOT)) for p in modules().values()
                   if any(isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)
                          for n in ast.walk(ast.parse(p.read_text()))))
    assert users and all(u.startswith("kvjax/cli/") for u in users), users
