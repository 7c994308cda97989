"""The one evaluation report format: ``results.json`` (every figure) and ``results.md`` (a readable table)
in an output folder, written atomically; a classification report adds ``confusion.png``, a task report
(``lmlab eval task``) samples.jsonl and metrics.png, a comparison of task reports comparison.png."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmlab.eval.metrics import confusion_text, plot_confusion
from lmlab.errors import DataError
from lmlab.runs import atomic_write_text, check_output, list_checkpoints, read_text_file


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


FRACTION_METRICS = ("acc", "acc_norm", "acc_bytes", "exact_match", "f1", "macro_f1")  # 0..1: one bar plot's axis


def write_task_report(result: dict, out_dir: str | Path) -> None:
    """An ``lmlab eval task`` result as results.json (every figure, no samples), samples.jsonl (each
    example's prompt and scores), results.md and metrics.png (the 0..1 metrics as bars, chance as a line)."""
    out_dir = Path(out_dir)
    summary = {k: v for k, v in result.items() if k != "samples"}
    rows = "\n".join(f"| {name} | {_cell(value)} | {_cell(result['stderr'].get(name, ''))} |"
                     for name, value in result["metrics"].items())
    facts = ", ".join(f"{k} {_cell(result[k])}" for k in ("examples", "num_fewshot", "chance", "examples_per_s")
                      if k in result)
    md = (f"# {result['task']}\n\n{result.get('checkpoint', '')}\n\n{result['data']} ({facts})\n\n"
          f"| metric | value | stderr |\n|---|---|---|\n{rows}\n\n![metrics](metrics.png)\n")
    write_results(out_dir, summary, md)
    atomic_write_text(out_dir / "samples.jsonl",
                      "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in result.get("samples", [])))
    plot_bars({result["task"]: result["metrics"]}, out_dir / "metrics.png", result["task"], result.get("chance"))


def read_task_results(paths: list[str | Path]) -> list[dict]:
    """The results.json of ``lmlab eval task`` in each path: a results folder, or a folder (a run) holding
    such folders anywhere below it; each result gains "source", the folder it came from."""
    found = []
    for path in map(Path, paths):
        files = [path / "results.json"] if (path / "results.json").is_file() else sorted(path.rglob("results.json"))
        results = []
        for file in files:
            try:
                data = json.loads(read_text_file(file, "results"))
            except json.JSONDecodeError as e:
                raise DataError(f"{file}: invalid JSON ({e.msg} at line {e.lineno})") from None
            if isinstance(data, dict) and isinstance(data.get("metrics"), dict) and "task" in data:
                bad = {k: v for k, v in data["metrics"].items()
                       if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))}
                if bad:
                    name, value = next(iter(bad.items()))
                    raise DataError(f"{file}: metric {name!r} is {value!r}, not a number; the file was changed by "
                                    f"hand or damaged")
                results.append({**data, "source": str(file.parent)})
        if not results:
            raise DataError(f"{path}: no results.json of lmlab eval task in it (or below it)")
        found += results
    sources = [Path(r["source"]).resolve() for r in found]
    repeated = next((s for s in sources if sources.count(s) > 1), None)
    if repeated is not None:
        raise DataError(f"{repeated}: the same results given twice")
    return found


def write_comparison(results: list[dict], out_dir: str | Path) -> str:
    """Several task results side by side: results.md (one row per result, one column per metric),
    results.json (the rows) and comparison.png (the 0..1 metrics as grouped bars, chance as a line when
    all results share it); returns the Markdown."""
    out_dir = Path(out_dir)
    names = list(dict.fromkeys(m for r in results for m in r["metrics"]))
    head = "| result | task | examples | " + " | ".join(names) + " |\n|---|---|---|" + "---|" * len(names) + "\n"
    rows = [{"result": label, "task": r["task"], "examples": r.get("examples"), "checkpoint": r.get("checkpoint"),
             **{m: r["metrics"].get(m) for m in names}} for label, r in zip(result_labels(results), results)]
    body = "".join(f"| {row['result']} | {row['task']} | {row['examples']} | "
                   + " | ".join("" if row[m] is None else _cell(row[m]) for m in names) + " |\n" for row in rows)
    md = f"# Comparison\n\n{head}{body}\n![comparison](comparison.png)\n"
    write_results(out_dir, {"rows": rows, "sources": [r["source"] for r in results]}, md)
    chances = {r.get("chance") for r in results}
    plot_bars({f"{row['result']} ({row['task']})": r["metrics"] for row, r in zip(rows, results)},
              out_dir / "comparison.png", "comparison", chances.pop() if len(chances) == 1 else None)
    return md


def result_labels(results: list[dict]) -> list[str]:
    """Short distinct names of results: their folders, relative to the folder all of them are in."""
    sources = [Path(r["source"]).resolve() for r in results]
    if len(sources) == 1:
        return [sources[0].name]
    common = Path(os.path.commonpath(sources))
    return [str(s.relative_to(common)) if s != common else s.name for s in sources]


def plot_bars(groups: dict[str, dict[str, float]], path: str | Path, title: str, chance: float | None = None) -> Path:
    """A PNG of grouped bars: one group per metric in FRACTION_METRICS, one bar per entry of ``groups``
    (name -> metrics), values written on the bars; ``chance`` as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in FRACTION_METRICS if any(m in g for g in groups.values())]
    fig, ax = plt.subplots(figsize=(2 + 1.2 * max(1, len(metrics)) * max(1, len(groups)) ** 0.5, 3.5))
    width = 0.8 / max(1, len(groups))
    for i, (name, values) in enumerate(groups.items()):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(metrics))]
        heights = [values.get(m, 0.0) for m in metrics]
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance {chance:.2f}")
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set(ylim=(0, 1.05), title=title)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
