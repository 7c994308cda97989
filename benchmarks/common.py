"""Shared by the benchmark scripts: machine description, result tables, JSON + Markdown output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def machine_info() -> dict:
    """CPU model, core count, memory, GPU, and library versions: what a figure depends on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["lmlab_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of dict rows (floats shown with 4 significant digits)."""
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], summary: dict, notes: str = "", columns: list[str] | None = None,
                  extra_md: str = "", extra_json: dict | None = None) -> tuple[Path, Path]:
    """Print the table and write results/<name>.json and results/<name>.md (machine info included);
    ``extra_md`` goes into the Markdown below the summary, ``extra_json`` into the JSON beside the rows."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    table = markdown_table(rows, columns)
    print(table)
    for key, value in summary.items():
        print(f"{key}: {value}")
    payload = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "machine": machine, "summary": summary, "rows": rows, **(extra_json or {})}
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(json_path)
    summary_md = "\n".join(f"- **{k}**: {v}" for k, v in summary.items())
    machine_md = ", ".join(f"{k} {v}" for k, v in machine.items() if v is not None)
    md = (f"# {name}\n\n{notes}\n\n{table}\n\n{summary_md}\n\n{extra_md}\n\n"
          f"Command: `{payload['command']}`\n\nMachine: {machine_md}\n")
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text(md)
    tmp.replace(md_path)
    return json_path, md_path
