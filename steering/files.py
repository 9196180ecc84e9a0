"""The files the app writes for people to download (recipes, exported vectors): one folder per
kind under the temp directory, the newest few kept, so a busy public server never fills the disk.
Whoever copies these files elsewhere (Gradio's cache, steering/ui/serving.py) registers a hook
with `after_prune` that deletes the copies of the files deleted here."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

KEEP = 32  # newest files kept per kind
PREFIX = "steering-"  # every file's name: steering-<kind>-<time>-<random><suffix>
_NAME = re.compile(rf"{PREFIX}([a-z]+)-\d{{8}}-\d{{6}}-")
_AFTER_PRUNE: list[Callable[[], object]] = []


def _folder(kind: str) -> Path:
    return Path(tempfile.gettempdir()) / f"steering-lab-{kind}"


def after_prune(hook: Callable[[], object]) -> None:
    """Call `hook()` whenever old files have been deleted (once per hook, however often registered)."""
    if hook not in _AFTER_PRUNE:
        _AFTER_PRUNE.append(hook)


def still_kept(name: str) -> bool:
    """Whether the app file named `name` (a copy's name is its original's) still exists; True
    for any other name (not ours to delete)."""
    match = _NAME.match(name)
    return match is None or (_folder(match.group(1)) / name).exists()


def app_file(kind: str, suffix: str) -> Path:
    """A new empty file `steering-<kind>-<time>-<random><suffix>` in the app's folder for `kind`;
    the oldest files beyond `KEEP` are deleted first (and, through `after_prune`, their copies)."""
    folder = _folder(kind)
    folder.mkdir(parents=True, exist_ok=True)
    old = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime)
    for stale in old[: max(0, len(old) - KEEP + 1)]:
        stale.unlink(missing_ok=True)
    for hook in list(_AFTER_PRUNE):
        hook()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.mkstemp(prefix=f"{PREFIX}{kind}-{stamp}-", suffix=suffix, dir=folder)[1])
