"""The files the app writes for people to download (recipes, exported vectors): one folder per
kind under the temp directory, the newest few kept, so a busy public server never fills the disk."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

KEEP = 32  # newest files kept per kind


def app_file(kind: str, suffix: str) -> Path:
    """A new empty file `steering-<kind>-<time>-<random><suffix>` in the app's folder for `kind`;
    the oldest files beyond `KEEP` are deleted first."""
    folder = Path(tempfile.gettempdir()) / f"steering-lab-{kind}"
    folder.mkdir(parents=True, exist_ok=True)
    old = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime)
    for stale in old[: max(0, len(old) - KEEP + 1)]:
        stale.unlink(missing_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.mkstemp(prefix=f"steering-{kind}-{stamp}-", suffix=suffix, dir=folder)[1])
