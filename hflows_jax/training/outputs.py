"""Files a run or a benchmark leaves behind, written atomically, and where it ran.

Every file goes to ``PATH.tmp`` first and is renamed into place, so a run killed while
writing leaves the previous version whole.
"""

from __future__ import annotations

import csv
import datetime
import functools
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODE = ("hflows_jax", "experiments")  # what a result's numbers depend on


def atomic_write(path: str, data: str | bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


def write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, out.getvalue())


def write_figure(path: str, fig) -> None:
    """A matplotlib ``Figure`` as PNG; no pyplot, so no global backend is touched."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write(path, buffer.getvalue())


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def commit() -> dict:
    """The git commit of the code, and whether its code differed from it (uncommitted
    changes under ``CODE``); None outside a git checkout."""
    head = _git("rev-parse", "HEAD")
    changed = _git("status", "--porcelain", "--", *CODE)
    return {"commit": head, "code_changed": bool(changed) if head else None}


def command() -> str:
    """The command line this process runs, as typed: ``python -m module flags``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = f"python -m {spec.name}" if spec else f"python {sys.argv[0]}"
    return " ".join([program, *sys.argv[1:]])


@functools.cache
def sha256(path: str, mtime: float) -> str:
    del mtime  # a key only: a file rewritten is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def environment() -> dict:
    """Where a run or benchmark ran and from what: machine, devices, versions, date, the
    git commit (``code_changed`` if the code held uncommitted changes), the command, and
    the SHA-256 of every data file the process read."""
    import flax
    import jax
    import optax

    from hflows_jax.data.sources import FILES_READ

    return {
        **commit(),
        "command": command(),
        "data": {p: sha256(p, os.path.getmtime(p)) for p in FILES_READ if os.path.isfile(p)},
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
    }
