"""Progress bars (placeholder until the plain-line version lands)."""

from __future__ import annotations

from tqdm import tqdm


def progress_bar(total: int | None = None, unit: str = "step", desc: str | None = None, enabled: bool = True,
                 initial: int = 0):
    """A tqdm progress bar with rate and ETA."""
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5)
