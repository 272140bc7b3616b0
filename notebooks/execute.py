"""Execute notebooks in place, so that they are committed with their outputs (``make notebook-outputs``).

Usage: ``python notebooks/execute.py notebooks/your_own_model.ipynb ...``. Runs each at its full
size (``METAPRIOR_NOTEBOOK_QUICK`` unset), with progress bars off so the outputs stay readable;
a notebook that raises is not written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbclient
import nbformat


def main(paths: list[str]) -> int:
    os.environ.pop("METAPRIOR_NOTEBOOK_QUICK", None)
    os.environ["METAPRIOR_PROGRESS"] = "0"
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend: figures become outputs
    for name in paths:
        path = Path(name)
        nb = nbformat.read(path, as_version=4)
        resources = {"metadata": {"path": str(path.parent)}}
        nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3", resources=resources).execute()
        tmp = path.with_suffix(".ipynb.tmp")
        nbformat.write(nb, tmp)
        tmp.replace(path)  # atomic: a failed run leaves the committed notebook as it was
        print(f"executed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
