"""Files a run or a benchmark leaves behind, written atomically, and where it ran.

Every file goes to ``PATH.tmp`` first and is renamed into place, so a run killed while
writing leaves the previous version whole.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import platform
from typing import Any


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


def environment() -> dict:
    """Where a run or benchmark ran: machine, devices, versions and date."""
    import flax
    import jax
    import optax

    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
    }
