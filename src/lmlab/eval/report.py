"""The one evaluation report format: ``results.json`` (every figure) and ``results.md`` (a readable table)
in an output folder, written atomically; a classification report adds ``confusion.png``."""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.eval.metrics import confusion_text, plot_confusion
from lmlab.runs import atomic_write_text, check_output, list_checkpoints


def check_report_output(out_dir: str | Path, checkpoint: str | Path, data: list[str], force: bool = False) -> Path:
    """Check ``out_dir`` for a report of ``checkpoint`` on ``data`` before the evaluation (runs.check_output).

    Of a run folder, the input is the checkpoint read (its newest), so that a report may go into the
    run folder beside its checkpoints (RUN/eval) but never replace or enter them.
    """
    found = list_checkpoints(checkpoint)
    return check_output(out_dir, "report", [found[-1] if found else checkpoint, *data], force)


def write_results(out_dir: str | Path, results: dict, markdown: str) -> None:
    """Write ``results`` as results.json and ``markdown`` as results.md into ``out_dir``."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out_dir / "results.md", markdown)


def write_metrics_report(report: dict, out_dir: str | Path, title: str) -> None:
    """A flat report (metric -> value) as results.json and a two-column results.md table (a "|" in a value,
    as in sacrebleu's signatures, escaped so that it stays in its cell)."""
    rows = "\n".join(f"| {k} | {_cell(v)} |" for k, v in report.items())
    write_results(out_dir, report, f"# {title}\n\n| metric | value |\n|---|---|\n{rows}\n")


def _cell(value) -> str:
    """A value as a Markdown table cell: a float to 4 places, any "|" escaped."""
    return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", r"\|")


def write_classification_report(report: dict, out_dir: str | Path, title: str, extra: dict | None = None) -> None:
    """results.json, results.md (metrics, per-label table, confusion matrix) and confusion.png in ``out_dir``."""
    out_dir = Path(out_dir)
    payload = {**{k: v for k, v in (extra or {}).items() if k != "val"}, **report}
    rows = [f"| {k} | {report[k]:.4f} |" for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "loss")
            if k in report]
    per_label = [f"| {name} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
                 for name, v in report["per_label"].items()]
    md = (f"# {title}\n\n{report['examples']} examples\n\n| metric | value |\n|---|---|\n" + "\n".join(rows)
          + "\n\n| label | precision | recall | F1 | support |\n|---|---|---|---|---|\n" + "\n".join(per_label)
          + f"\n\nConfusion matrix (rows: true label, columns: predicted):\n\n```\n{confusion_text(report)}\n```\n\n"
          + "![confusion matrix](confusion.png)\n")
    write_results(out_dir, payload, md)
    plot_confusion(report, out_dir / "confusion.png", title)
