"""The one metrics logger: JSON lines, optional TensorBoard, and PNG plots of the curves."""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.errors import ConfigError
from lmlab.runs import RunFolder, atomic_write_text


class MetricsLogger:
    """Appends one JSON object per record to the run's ``metrics.jsonl``; mirrors scalars to TensorBoard
    if asked. Nothing is created until the first record; a logger that is not ``enabled`` (a process
    other than rank 0) writes nothing."""

    def __init__(self, run: RunFolder, tensorboard: bool = False, enabled: bool = True):
        self.run = run
        self.enabled = enabled
        self.path = run.metrics
        self.tb = None
        self.SummaryWriter = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard needs the tensorboard package: pip install 'lmlab[tensorboard]'") from None
            self.SummaryWriter = SummaryWriter

    def log(self, record: dict) -> None:
        """Write one record (must contain ``step``)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.SummaryWriter is not None and self.tb is None:
            self.tb = self.SummaryWriter(str(self.run.tensorboard))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites what came after its checkpoint), and a last
        line cut short by a killed process."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if (record_step := _step_of(line)) is not None and record_step <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a blank line or one that is not a whole JSON record."""
    try:
        return json.loads(line).get("step", 0) if line.strip() else None
    except (json.JSONDecodeError, AttributeError):
        return None


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_losses(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write loss.png (train/val loss against step) and val_loss_time.png (val loss against wall time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"], r.get("elapsed_s", 0.0)) for r in records if "val_loss" in r]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", label="val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(_save(fig, out_dir / "loss.png"))

    if val:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([v[2] for v in val], [v[1] for v in val], "o-")
        ax.set(xlabel="wall time (s)", ylabel="val loss (nats/token)", title="Validation loss against wall time")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "val_loss_time.png"))
    plt.close("all")
    return written


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    return path
