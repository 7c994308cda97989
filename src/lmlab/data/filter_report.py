"""``lmlab data prepare --report DIR``: the filters' report as report.md + report.json + lengths.png.

Everything comes from meta.json's "filters" (FilterPipeline.report), so a report can be remade from a
prepared folder. The folder is written whole or not at all (runs.atomic_dir).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmlab.runs import atomic_dir


def write_filter_report(out_dir: str | os.PathLike, report: dict) -> Path:
    """Write report.md (per-filter table, decontamination per file, removed examples), report.json and
    lengths.png (word-count histogram before/after) into ``out_dir`` (checked by the caller: runs.check_output)."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _plot_lengths(report["word_histogram"], tmp / "lengths.png")
        (tmp / "report.md").write_text(_markdown(report), encoding="utf-8")
    return out


def _markdown(report: dict) -> str:
    """The report as Markdown."""
    inp, kept = report["input"], report["kept"]
    lines = ["# Document filters", "",
             f"{inp['documents']:,} documents ({inp['bytes']:,} bytes) in; {kept['documents']:,} "
             f"({kept['bytes']:,} bytes) kept.", "",
             "Config (fields changed from the defaults): `" + json.dumps(report["config"]) + "`", "",
             "| filter | documents removed | bytes removed |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['documents']:,} | {r['bytes']:,} |" for name, r in report["removed"].items()]
    decon = report.get("decontamination")
    if decon:
        lines += ["", f"## Decontamination ({decon['ngram']}-grams of {decon['tokens']}; {decon['applies_to']})", "",
                  "| evaluation file | texts | shorter than n | n-grams | training documents removed |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {s['texts']:,} | {s['short_texts']:,} | {s['ngrams']:,} | {s['documents']:,} |"
                  for name, s in decon["files"].items()]
    lines += ["", "![word counts before and after filtering](lengths.png)", "", "## Removed examples"]
    for name, examples in report["examples"].items():
        lines += ["", f"### {name}", ""]
        lines += [f"- `{e['source']}`: " + " ".join(e["text"].split()) for e in examples] or ["(none)"]
    return "\n".join(lines) + "\n"


def _plot_lengths(histogram: dict, path: Path) -> None:
    """Bars of documents per word-count bin, before and after filtering, on a log2 axis of words."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for label, bins in histogram.items():
        edges = [0.5 if b == "0" else 2 ** ((int(b) - 1) / 2) for b in bins]
        widths = [0.5 if b == "0" else 2 ** (int(b) / 2) - 2 ** ((int(b) - 1) / 2) for b in bins]
        ax.bar(edges, list(bins.values()), width=widths, align="edge", alpha=0.55, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("words per document")
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
