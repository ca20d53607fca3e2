"""Graded assignments made from the solution source: the library is the answer key.

A block of library code between two marker lines is the solution of one assignment:

    def gae(rewards, values, mask, gamma=1.0, lam=0.95):
        \"\"\"docstring with the equation (stays)\"\"\"
        _check_same_shape(...)            # code outside the markers stays
        # BEGIN ASSIGNMENT ppo-gae
        ...                               # the solution
        # END ASSIGNMENT

`assignments/manifest.json` lists every assignment: id, title, lesson, points, the files holding its markers (only
those files are read for markers), the tests that grade it (pytest files or node ids) and hints.
`make_student_copy` writes a copy of the repository where each selected block becomes
`raise NotImplementedError("<id>: <hint>")` and notebook cells tagged `solution` become a stub; `grade` runs the
assignments' tests in one pytest call and turns passed tests into points (`points x passed / total` per
assignment), in the autograder results format
{"score", "tests": [{"name", "score", "max_score", "output"}]}.

This module reads and writes files only; it imports nothing from the library, so a student copy with every
assignment stripped can still be graded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Assignment", "Manifest", "load_manifest", "has_solution_markers", "find_regions", "strip_source",
           "make_student_copy", "grade", "format_table", "MANIFEST"]

MANIFEST = Path("assignments") / "manifest.json"
BEGIN = re.compile(r"^(?P<indent>\s*)# BEGIN ASSIGNMENT (?P<id>[a-z0-9][a-z0-9-]*)\s*$")
END = re.compile(r"^\s*# END ASSIGNMENT\s*$")
# Never copied into a student folder: version control, environments, caches, outputs.
SKIP_NAMES = {".git", ".venv", ".ci-venv", "runs", "__pycache__", ".pytest_cache", ".hypothesis", "build",
              ".ipynb_checkpoints"}
SOLUTION_TAG = "solution"


@dataclass
class Assignment:
    """One entry of the manifest."""

    id: str
    title: str
    lesson: int
    points: int
    files: list[str]
    tests: list[str]
    hints: list[str] = field(default_factory=list)

    @property
    def hint(self) -> str:
        return self.hints[0] if self.hints else "see the docstring"


@dataclass
class Manifest:
    assignments: list[Assignment]
    leave_out: list[str]  # paths (relative to the repository) never copied: hidden tests, answers

    def select(self, only: list[str] | None) -> list[Assignment]:
        """The assignments named in `only` (all when None), refusing an unknown id."""
        if not only:
            return list(self.assignments)
        known = {a.id: a for a in self.assignments}
        unknown = [i for i in only if i not in known]
        if unknown:
            raise ValueError(f"unknown assignment id(s) {unknown}; known: {sorted(known)}")
        return [known[i] for i in only]


def load_manifest(repo: str | os.PathLike) -> Manifest:
    """Read and check `assignments/manifest.json` of `repo` (every field present, ids unique, files exist)."""
    path = Path(repo) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no assignment manifest")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    items = []
    for k, entry in enumerate(raw.get("assignments", [])):
        where = f"{path}: assignments[{k}]"
        missing = [f for f in ("id", "title", "lesson", "points", "files", "tests") if f not in entry]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        if not isinstance(entry["points"], int) or entry["points"] < 1:
            raise ValueError(f"{where}: points must be a positive integer, got {entry['points']!r}")
        for f in entry["files"]:
            if not (Path(repo) / f).is_file():
                raise ValueError(f"{where} ({entry['id']}): file {f} does not exist")
        items.append(Assignment(entry["id"], entry["title"], int(entry["lesson"]), entry["points"],
                                list(entry["files"]), list(entry["tests"]), list(entry.get("hints", []))))
    ids = [a.id for a in items]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate assignment id(s) {dupes}")
    return Manifest(items, list(raw.get("leave_out", [])))


def has_solution_markers(repo: str | os.PathLike) -> bool:
    """True in the solution repository; False in a students' copy (same manifest, markers removed)."""
    manifest = load_manifest(repo)
    return any("# BEGIN ASSIGNMENT" in (Path(repo) / f).read_text() for a in manifest.assignments for f in a.files)


# ----------------------------------------------------------------------------- markers
def find_regions(text: str, where: str) -> list[tuple[str, int, int, str]]:
    """(id, begin line, end line, indent) of every marked block; lines 0-based, both marker lines included.

    Unbalanced or nested markers raise ValueError naming `where`:line.
    """
    regions, open_ = [], None
    for n, line in enumerate(text.splitlines()):
        if m := BEGIN.match(line):
            if open_ is not None:
                raise ValueError(f"{where}:{n + 1}: BEGIN ASSIGNMENT {m['id']} inside {open_[0]} "
                                 f"(opened at line {open_[1] + 1})")
            open_ = (m["id"], n, m["indent"])
        elif "# BEGIN ASSIGNMENT" in line:
            raise ValueError(f"{where}:{n + 1}: malformed marker {line.strip()!r} (expected '# BEGIN ASSIGNMENT <id>')")
        elif END.match(line):
            if open_ is None:
                raise ValueError(f"{where}:{n + 1}: END ASSIGNMENT without a BEGIN")
            regions.append((open_[0], open_[1], n, open_[2]))
            open_ = None
    if open_ is not None:
        raise ValueError(f"{where}:{open_[1] + 1}: BEGIN ASSIGNMENT {open_[0]} is never closed")
    return regions


def strip_source(text: str, hints: dict[str, str], where: str) -> tuple[str, list[str]]:
    """`text` with each block whose id is in `hints` replaced by `raise NotImplementedError("<id>: <hint>")`.

    Blocks of other assignments keep their code (their marker lines are dropped, so the copy has no markers).
    Returns (new text, ids stripped).
    """
    lines = text.splitlines(keepends=True)
    regions = find_regions(text, where)
    out, done, pos = [], [], 0
    for rid, begin, end, indent in regions:
        out.extend(lines[pos:begin])
        if rid in hints:
            message = f"{rid}: {hints[rid]}".replace("\\", "\\\\").replace('"', '\\"')
            out.append(f'{indent}raise NotImplementedError("{message}")\n')
            done.append(rid)
        else:
            out.extend(lines[begin + 1:end])
        pos = end + 1
    out.extend(lines[pos:])
    return "".join(out), done


def strip_notebook(text: str, stub: str) -> str:
    """A notebook's JSON with every code cell tagged `solution` replaced by `stub` (outputs cleared)."""
    nb = json.loads(text)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and SOLUTION_TAG in cell.get("metadata", {}).get("tags", []):
            cell["source"] = stub
            cell["outputs"] = []
            cell["execution_count"] = None
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def _files(repo: Path, leave_out: list[str]) -> list[Path]:
    """Every file of the repository to copy, relative paths, sorted."""
    left = [Path(p) for p in leave_out]
    out = []
    for root, dirs, names in os.walk(repo):
        rel_root = Path(root).relative_to(repo)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_NAMES and not d.endswith(".egg-info")
                         and (rel_root / d) not in left)
        out.extend(rel_root / n for n in sorted(names) if (rel_root / n) not in left and not n.endswith(".pyc"))
    return out


def make_student_copy(repo: str | os.PathLike, out: str | os.PathLike, only: list[str] | None = None,
                      force: bool = False) -> dict[str, Any]:
    """Write the students' repository to `out`: the selected assignments stripped, every marker removed,
    notebook solution cells stubbed, the manifest's `leave_out` paths and .git left out.

    Checks every marker of every file before writing anything; refuses a non-empty `out` unless force.
    Returns {"out", "stripped": {id: [files]}, "files": n}.
    """
    repo, out = Path(repo).resolve(), Path(out).resolve()
    manifest = load_manifest(repo)
    chosen = manifest.select(only)
    if out == repo or repo in out.parents:
        raise ValueError(f"--out {out} is inside the source repository {repo}")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty (pass --force to replace its contents)")
    files = _files(repo, manifest.leave_out)
    hints = {a.id: a.hint for a in chosen}
    known = {a.id for a in manifest.assignments}
    texts: dict[Path, str] = {}
    found: dict[str, list[str]] = {}
    marked = sorted({Path(f) for a in manifest.assignments for f in a.files})
    for rel in marked:  # validate everything first: nothing is written from a source with a bad marker
        text = (repo / rel).read_text()
        for rid, begin, _, _ in find_regions(text, str(rel)):
            if rid not in known:
                raise ValueError(f"{rel}:{begin + 1}: marker for {rid!r}, which the manifest does not list")
            found.setdefault(rid, []).append(str(rel))
        texts[rel] = text
    missing = [a.id for a in chosen if a.id not in found]
    if missing:
        raise ValueError(f"no marked block for assignment(s) {missing} in the source")
    if out.exists() and force:
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        stage = Path(tmp) / "copy"
        for rel in files:
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if rel in texts:
                dest.write_text(strip_source(texts[rel], hints, str(rel))[0])
            elif rel.suffix == ".ipynb" and chosen:
                dest.write_text(strip_notebook((repo / rel).read_text(),
                                               "# Your code here (this cell's solution is part of an assignment).\n"))
            else:
                shutil.copy2(repo / rel, dest)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty (checked above)
        stage.rename(out)  # the copy appears whole or not at all
    return {"out": str(out), "stripped": {a.id: found[a.id] for a in chosen}, "files": len(files)}


# ----------------------------------------------------------------------------- grading
def _junit_results(path: Path) -> dict[str, tuple[bool, str]]:
    """{node id: (passed, message)} from a pytest junit XML file; skipped tests (e.g. a reference library that is
    not installed) are left out, so they neither earn nor cost points."""
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        if any(c.tag == "skipped" for c in case):
            continue
        module = case.get("classname", "").replace(".", "/") + ".py"
        failure = next((c for c in case if c.tag in ("failure", "error")), None)
        message = "" if failure is None else (failure.get("message") or "")[:500]
        results[f"{module}::{case.get('name', '')}"] = (failure is None, message)
    return results


def _matches(node: str, spec: str) -> bool:
    """A test spec is a folder, a file ("tests/test_x.py") or a node id, possibly a parametrised family."""
    return node == spec or any(node.startswith(spec + sep) for sep in ("::", "[", "/"))


def grade(repo: str | os.PathLike = ".", only: list[str] | None = None, extra_tests: str | os.PathLike | None = None,
          timeout: int = 1800) -> dict[str, Any]:
    """Run the selected assignments' tests in `repo` (one pytest process) and score them.

    extra_tests: a folder of instructor tests; its subfolder <id>/ adds tests to assignment <id>.
    Returns the autograder results dict {"score", "max_score", "tests": [...]}.
    """
    repo = Path(repo).resolve()
    chosen = load_manifest(repo).select(only)
    specs = {a.id: list(a.tests) for a in chosen}
    copied: list[Path] = []
    if extra_tests is not None:  # copied into the tree for the run, so they import the tree's package
        extra = Path(extra_tests).resolve()
        if not extra.is_dir():
            raise FileNotFoundError(f"{extra}: extra-tests folder not found")
        for a in chosen:
            if (extra / a.id).is_dir():
                dest = repo / "tests" / f"extra_{a.id.replace('-', '_')}"
                shutil.copytree(extra / a.id, dest, dirs_exist_ok=True)
                copied.append(dest)
                specs[a.id].append(str(dest.relative_to(repo)))
    # Whole files, filtered below: a node id inside a module that skips itself (a reference library not installed)
    # would be "not found", and pytest would then run nothing at all.
    targets = sorted({s.split("::")[0] for ss in specs.values() for s in ss})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            xml = Path(tmp) / "results.xml"
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                   f"--junitxml={xml}", *targets]
            proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
            if not xml.exists():
                raise RuntimeError(f"pytest did not run in {repo}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            results = _junit_results(xml)
    finally:
        for dest in copied:
            shutil.rmtree(dest, ignore_errors=True)
    rows = []
    for a in chosen:
        nodes = {n: r for n, r in results.items() if any(_matches(n, s) for s in specs[a.id])}
        passed = sum(ok for ok, _ in nodes.values())
        score = round(a.points * passed / len(nodes), 2) if nodes else 0.0
        failures = [f"{n}: {msg}" for n, (ok, msg) in nodes.items() if not ok]
        output = f"{passed}/{len(nodes)} tests passed" + ("" if nodes else " (no test collected)")
        if failures:
            output += "\n" + "\n".join(failures[:10])
        rows.append({"name": f"{a.id}: {a.title}", "score": score, "max_score": a.points, "output": output})
    return {"score": round(sum(r["score"] for r in rows), 2), "max_score": sum(r["max_score"] for r in rows),
            "tests": rows}


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain text table for the terminal."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:{w}}}" for w in widths)
    lines = [line.format(*header), line.format(*("-" * w for w in widths))] + [line.format(*map(str, r)) for r in rows]
    return "\n".join(x.rstrip() for x in lines)
