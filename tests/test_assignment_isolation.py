"""The real course kit end to end: the solution tree earns every point, the students' copy none, and (slow) each
assignment stripped alone breaks its own tests and nothing else.

The slow check runs the whole suite once with every assignment stripped (the candidates: a test that fails with
one assignment stripped also fails with all of them stripped) and then, per assignment, only those candidates in a
copy where that assignment alone is stripped. Run it with `MINILLM_SLOW_TESTS=1 python -m pytest
tests/test_assignment_isolation.py` (584 s on the 2-core reference machine, with other jobs running).
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from minillm.assignments import grade, has_solution_markers, load_manifest, make_student_copy

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = load_manifest(ROOT)
pytestmark = pytest.mark.skipif(not has_solution_markers(ROOT), reason="a students' copy has no solution markers")
SLOW = os.environ.get("MINILLM_SLOW_TESTS") == "1"


# The default suite grades a few quick assignments; a slow test below grades all of them (about 50 s).
QUICK = ["attention-explicit", "sampling-top-k", "sampling-top-p", "mcq-choose"]


def test_solution_tree_gets_full_points_and_students_copy_gets_none(tmp_path):
    _full_and_none(tmp_path, QUICK)


def _full_and_none(tmp_path: Path, only: list[str] | None) -> None:
    full = grade(ROOT, only=only)
    assert full["score"] == full["max_score"] == sum(a.points for a in MANIFEST.select(only)), full
    out = tmp_path / "course"
    make_student_copy(ROOT, out)  # every assignment stripped
    stripped = grade(out, only=only)
    assert stripped["max_score"] == full["max_score"]
    for t in stripped["tests"]:
        assert t["score"] == 0, t  # every graded test of every assignment fails before the student writes code
        assert not t["output"].startswith("0/0"), t  # and each assignment has tests to grade it


def _failing(xml: Path) -> set[str]:
    out = set()
    for case in ET.parse(xml).getroot().iter("testcase"):
        if any(c.tag in ("failure", "error") for c in case):
            out.add(case.get("classname").replace(".", "/") + ".py::" + case.get("name"))
    return out


def _run(tree: Path, targets: list[str], xml: Path) -> set[str]:
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                    f"--junitxml={xml}", *targets], cwd=tree, capture_output=True, text=True, timeout=3600)
    return _failing(xml)


def _declared(node: str, specs: list[str]) -> bool:
    return any(node == s or node.startswith(s + "[") or node.startswith(s + "::") for s in specs)


@pytest.mark.skipif(not SLOW, reason="slow (about 50 s): set MINILLM_SLOW_TESTS=1")
def test_every_assignment_full_points_in_the_solution_and_none_in_the_students_copy(tmp_path):
    _full_and_none(tmp_path, None)


@pytest.mark.skipif(not SLOW, reason="slow (about 10 minutes): set MINILLM_SLOW_TESTS=1")
def test_each_assignment_alone_breaks_its_own_tests_and_nothing_else(tmp_path):
    everything = tmp_path / "all"
    make_student_copy(ROOT, everything)
    # with all stripped: the package imports and lesson 2's notebook (no assignment) still runs
    candidates = _run(everything, ["tests"], tmp_path / "all.xml")
    assert "tests/test_notebooks.py::test_notebook_runs[02_pretraining]" not in candidates
    candidates = sorted({n.split("[")[0] for n in candidates if "test_notebooks" not in n})
    for a in MANIFEST.assignments:
        tree = tmp_path / a.id
        make_student_copy(ROOT, tree, only=[a.id])
        failed = _run(tree, candidates, tmp_path / f"{a.id}.xml")
        outside = sorted(n for n in failed if not _declared(n, a.tests))
        assert not outside, f"stripping {a.id} breaks tests it does not declare: {outside}"
        missing = [s for s in a.tests if not any(_declared(n, [s]) for n in failed)]
        assert not missing, f"{a.id}: declared tests that pass without its solution: {missing}"
