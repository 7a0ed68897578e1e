"""Atomic checkpoints: write into a temp folder, write the completeness marker last, then rename.

Accelerate's own `total_limit` rotation deletes the oldest checkpoint before writing the new one, so a
failed save can leave nothing; here older checkpoints are pruned only after the new one is complete,
and at least two are kept. A folder without the marker is ignored (and cleaned up) on resume.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def write_atomic(
    target: Path,
    write: Callable[[Path], None],
    info: dict | None = None,
    *,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> None:
    """Have `write(tmp)` fill a temp folder (every process may write into it), then mark and rename.

    The marker and the rename are done by the main process after a barrier, so the final folder appears
    only once every process has finished writing.
    """
    tmp = target.with_name(f".tmp-{target.name}")
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    try:
        write(tmp)
    except BaseException:
        if is_main:  # no half-written folder is left behind (it would never be resumed from anyway)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if is_main:
        (tmp / MARKER).write_text(json.dumps(info or {}, indent=1))
        if target.exists():  # an older complete copy of the same step (e.g. a replay after resume)
            shutil.rmtree(target)
        tmp.rename(target)
    barrier()


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(root: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and leftover temp folders."""
    found = complete_checkpoints(root)
    for _, p in found[: max(0, len(found) - keep)]:
        shutil.rmtree(p)
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p)
