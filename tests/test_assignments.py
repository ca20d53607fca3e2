"""The course kit: markers, the students' copy, grading, the autograder JSON, and every refusal named."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minillm.assignments import (
    find_regions, grade, has_solution_markers, load_manifest, make_student_copy, strip_notebook, strip_source,
)
from minillm.cli import main

ROOT = Path(__file__).resolve().parent.parent

LIB = '''def add(a, b):
    """a + b"""
    check(a)
    # BEGIN ASSIGNMENT add
    s = a + b
    return s
    # END ASSIGNMENT


def mul(a, b):
    # BEGIN ASSIGNMENT mul
    return a * b
    # END ASSIGNMENT


def check(a):
    return a
'''
TESTS = '''from mylib import add, mul


def test_add():
    assert add(2, 3) == 5


def test_add_negative():
    assert add(-2, 3) == 1


def test_mul():
    assert mul(2, 3) == 6


def test_other():
    assert True
'''


def make_repo(tmp_path: Path, lib: str = LIB) -> Path:
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "assignments" / "hidden").mkdir(parents=True)
    (repo / "mylib.py").write_text(lib)
    (repo / "tests" / "test_mylib.py").write_text(TESTS)
    (repo / "assignments" / "hidden" / "secret.py").write_text("ANSWER = 42\n")
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    manifest = {"leave_out": ["assignments/hidden"], "assignments": [
        {"id": "add", "title": "Addition", "lesson": 1, "points": 4, "files": ["mylib.py"],
         "tests": ["tests/test_mylib.py::test_add", "tests/test_mylib.py::test_add_negative"], "hints": ["use +"]},
        {"id": "mul", "title": "Multiplication", "lesson": 2, "points": 6, "files": ["mylib.py"],
         "tests": ["tests/test_mylib.py::test_mul"], "hints": ["use *"]},
    ]}
    (repo / "assignments" / "manifest.json").write_text(json.dumps(manifest))
    return repo


def test_strip_replaces_only_the_selected_block_and_drops_every_marker():
    out, done = strip_source(LIB, {"add": "use +"}, "mylib.py")
    assert done == ["add"]
    assert '    raise NotImplementedError("add: use +")\n' in out
    assert '"""a + b"""' in out and "check(a)" in out  # docstring and code outside the markers stay
    assert "s = a + b" not in out and "return a * b" in out and "ASSIGNMENT" not in out
    namespace: dict = {}
    exec(out, namespace)
    with pytest.raises(NotImplementedError, match="add: use"):
        namespace["add"](1, 2)
    assert namespace["mul"](2, 3) == 6


@pytest.mark.parametrize("bad, message", [
    ("    # BEGIN ASSIGNMENT a\n    x = 1\n", "lib.py:1: BEGIN ASSIGNMENT a is never closed"),
    ("    x = 1\n    # END ASSIGNMENT\n", "lib.py:2: END ASSIGNMENT without a BEGIN"),
    ("# BEGIN ASSIGNMENT a\n# BEGIN ASSIGNMENT b\n# END ASSIGNMENT\n", "lib.py:2: BEGIN ASSIGNMENT b inside a"),
    ("# BEGIN ASSIGNMENT Bad Id\n# END ASSIGNMENT\n", "lib.py:1: malformed marker"),
])
def test_unbalanced_or_malformed_markers_are_named_with_file_and_line(bad, message):
    with pytest.raises(ValueError, match=message):
        find_regions(bad, "lib.py")


def test_notebook_solution_cells_become_stubs():
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["solution"]}, "source": "x = 42", "outputs": [1],
                     "execution_count": 3},
                    {"cell_type": "code", "metadata": {}, "source": "y = 1", "outputs": [], "execution_count": 4}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    out = json.loads(strip_notebook(json.dumps(nb), "# your code\n"))
    assert out["cells"][0]["source"] == "# your code\n" and out["cells"][0]["outputs"] == []
    assert out["cells"][1]["source"] == "y = 1"


def test_make_leaves_out_git_and_hidden_tests_refuses_non_empty_and_is_idempotent(tmp_path):
    repo = make_repo(tmp_path)
    out = tmp_path / "course"
    result = make_student_copy(repo, out)
    assert result["stripped"] == {"add": ["mylib.py"], "mul": ["mylib.py"]}
    assert not (out / ".git").exists() and not (out / "assignments" / "hidden").exists()
    assert (out / "assignments" / "manifest.json").exists() and (out / "tests" / "test_mylib.py").exists()
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="not empty"):
        make_student_copy(repo, out)
    make_student_copy(repo, out, force=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == first  # idempotent
    with pytest.raises(ValueError, match=r"unknown assignment id\(s\) \['div'\]"):
        make_student_copy(repo, tmp_path / "other", only=["div"])


def test_make_refuses_unbalanced_source_before_writing_anything(tmp_path):
    repo = make_repo(tmp_path, LIB.replace("    # END ASSIGNMENT\n\n\ndef mul", "\n\ndef mul", 1))
    with pytest.raises(ValueError, match=r"mylib.py:\d+: BEGIN ASSIGNMENT mul inside add"):
        make_student_copy(repo, tmp_path / "course")
    assert not (tmp_path / "course").exists()


def test_grade_full_points_zero_points_partial_and_json(tmp_path, capsys):
    repo = make_repo(tmp_path)
    full = grade(repo)
    assert full["score"] == 10 and full["max_score"] == 10
    make_student_copy(repo, tmp_path / "course", only=["add"])
    result = grade(tmp_path / "course")
    by_name = {t["name"]: t for t in result["tests"]}
    assert by_name["add: Addition"]["score"] == 0 and "0/2 tests passed" in by_name["add: Addition"]["output"]
    assert by_name["mul: Multiplication"]["score"] == 6 and result["score"] == 6
    # the CLI's JSON is the autograder format: {"score", "tests": [{"name", "score", "max_score", "output"}]}
    out_json = tmp_path / "results.json"
    assert main(["grade", "--repo", str(tmp_path / "course"), "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    assert set(data) == {"score", "tests"} and data["score"] == 6
    for t in data["tests"]:
        assert set(t) == {"name", "score", "max_score", "output"}
        assert isinstance(t["score"], (int, float)) and isinstance(t["max_score"], int) and isinstance(t["output"], str)
    assert "total: 6 of 10 points" in capsys.readouterr().out


def test_extra_tests_count_toward_their_assignment_and_are_removed_after(tmp_path):
    repo = make_repo(tmp_path)
    extra = tmp_path / "private" / "mul"
    extra.mkdir(parents=True)
    (extra / "test_private_mul.py").write_text("from mylib import mul\n\ndef test_zero():\n    assert mul(0, 5) == 1\n")
    result = grade(repo, only=["mul"], extra_tests=tmp_path / "private")
    assert result["tests"][0]["score"] == 3.0  # 1 of 2 passes (the private test is wrong on purpose)
    assert not (repo / "tests" / "extra_mul").exists()


def test_cli_refusals_exit_2_with_the_reason(tmp_path, capsys):
    repo = make_repo(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["assignments", "make", "--repo", str(repo), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["assignments", "make", "--repo", str(repo), "--out", str(tmp_path / "c"), "--only", "nope"]) == 2
    assert "unknown assignment id" in capsys.readouterr().err


# The students' copy has the manifest but no markers: the real-tree tests are for the solution repository.
solution_only = pytest.mark.skipif(not has_solution_markers(ROOT), reason="a students' copy has no solution markers")


@solution_only
def test_real_manifest_every_assignment_has_a_block_and_tests_that_exist():
    manifest = load_manifest(ROOT)
    assert len(manifest.assignments) >= 12
    for a in manifest.assignments:
        regions = [r for f in a.files for r in find_regions((ROOT / f).read_text(), f) if r[0] == a.id]
        assert regions, a.id
        for spec in a.tests:
            assert (ROOT / spec.split("::")[0]).is_file(), spec


@solution_only
def test_real_tree_students_copy_imports_and_each_stripped_function_raises(tmp_path):
    """With every assignment stripped the package imports, and the stripped functions raise with their hint."""
    out = tmp_path / "course"
    make_student_copy(ROOT, out)
    code = ("import minillm, minillm.cli, minillm.pipeline\n"
            "from minillm.align.grpo import group_advantages\nimport torch\n"
            "try:\n    group_advantages(torch.zeros(4), 2)\nexcept NotImplementedError as e:\n    print('raised', e)\n")
    env = {**os.environ, "PYTHONPATH": str(out)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "raised grpo-advantages:" in proc.stdout
