"""Execute every lesson notebook top to bottom and save it with its outputs (figures included).

    python tools/run_notebooks.py              # all of notebooks/*.ipynb
    python tools/run_notebooks.py 05 06        # the notebooks whose name starts with these prefixes

The committed notebooks carry the outputs of this command, so they render on GitHub without running anything;
`tests/test_notebooks.py` executes them again on every test run. Runs on CPU, like the tests.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent


def main(prefixes: list[str]) -> None:
    paths = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if prefixes:
        paths = [p for p in paths if any(p.name.startswith(x) for x in prefixes)]
    for path in paths:
        t0 = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
        tmp = path.with_name(f".{path.name}.tmp")
        nbformat.write(nb, tmp)
        tmp.replace(path)  # a failed run leaves the committed notebook as it was
        print(f"{path.name}: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
