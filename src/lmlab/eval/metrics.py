"""Classification metrics: accuracy, per-class and macro precision/recall/F1, the confusion matrix.

Written out (a few lines of counting) rather than taken from scikit-learn, which would be a large
dependency for this; tests/test_eval_metrics.py checks the figures against scikit-learn when present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion_matrix(gold: list[int], predicted: list[int], n_labels: int) -> np.ndarray:
    """counts[i, j] = how many examples of true label i were predicted as j."""
    counts = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(counts, (np.asarray(gold, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return counts


def classification_report(gold: list[int], predicted: list[int], labels: list[str]) -> dict:
    """Accuracy, macro precision/recall/F1 and per-label figures (a label never predicted has precision 0)."""
    counts = confusion_matrix(gold, predicted, len(labels))
    true_pos = np.diag(counts).astype(float)
    predicted_n, gold_n = counts.sum(0), counts.sum(1)
    precision = np.divide(true_pos, predicted_n, out=np.zeros_like(true_pos), where=predicted_n > 0)
    recall = np.divide(true_pos, gold_n, out=np.zeros_like(true_pos), where=gold_n > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    return {
        "examples": int(counts.sum()),
        "accuracy": float(true_pos.sum() / max(counts.sum(), 1)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_label": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                      for name, p, r, f, n in zip(labels, precision, recall, f1, gold_n)},
        "labels": list(labels),
        "confusion_matrix": counts.tolist(),
    }


def confusion_text(report: dict) -> str:
    """The confusion matrix as an aligned text table (rows: true label, columns: predicted)."""
    labels, counts = report["labels"], report["confusion_matrix"]
    width = max(8, *(len(str(x)) for x in labels))
    head = "true \\ pred".ljust(width + 2) + "".join(str(x).rjust(width + 2) for x in labels)
    rows = [str(name).ljust(width + 2) + "".join(str(c).rjust(width + 2) for c in row) for name, row in zip(labels, counts)]
    return "\n".join([head, *rows])


def plot_confusion(report: dict, path: str | Path, title: str = "confusion matrix") -> Path:
    """A PNG heat map of the confusion matrix with the counts written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, counts = report["labels"], np.asarray(report["confusion_matrix"])
    size = 2.5 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if counts[i, j] > counts.max() / 2 else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
