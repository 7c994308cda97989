"""The run folder and atomic writes: the only module that spells a run's paths.

    RUN/
      config.yaml            the resolved config the run was started with
      metrics.jsonl          one JSON object per logged step or evaluation
      plots/                 loss.png, val_loss_time.png (and a task's own plots)
      tensorboard/           with train.tensorboard
      checkpoints/step-N/    model.safetensors, tokenizer.json, state.pt, manifest.json (train/checkpoint.py)

Every file lmlab writes goes through a temporary file or folder and a rename, so a crash or Ctrl-C
never leaves a half-written file where a complete one is expected.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMPORARY = re.compile(r"^\..+\.(?:tmp|old)-(\d+)$")  # what atomic_dir leaves if the process is killed


class RunFolder:
    """The paths of one run folder (nothing is created until something is written)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> "RunFolder":
        """The run a checkpoint folder (``RUN/checkpoints/step-N``) belongs to."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint at ``step``."""
        return self.checkpoints_dir / f"step-{step:06d}"

    def checkpoints(self) -> list[Path]:
        """The step-N checkpoint folders of the run, oldest first."""
        folder = self.checkpoints_dir
        if not folder.is_dir():
            return []
        steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(steps)]

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest ``keep`` checkpoints (``keep`` <= 0 keeps them all)."""
        for old in self.checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary folders that killed processes left behind (``.step-N.tmp-PID``)."""
        removed = []
        for folder in (self.root, self.checkpoints_dir):
            for p in folder.iterdir() if folder.is_dir() else []:
                m = _TEMPORARY.match(p.name)
                if m and not _process_alive(int(m.group(1))):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                    removed.append(p)
        return removed


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The step-N checkpoint folders of a run, oldest first."""
    return RunFolder(run_dir).checkpoints()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` whole.

    A failure (or Ctrl-C) inside the block deletes the temporary folder and leaves ``path`` as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
