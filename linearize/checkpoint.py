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

from linearize.errors import LinearizeError

MARKER = "COMPLETE"


class SaveError(LinearizeError):
    """A folder could not be written (full disk, quota, lost mount); `reason` says why in words."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


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
        barrier()
        if is_main:
            (tmp / MARKER).write_text(json.dumps(info or {}, indent=1))
    except BaseException as err:
        if is_main:  # no half-written folder is left behind (it would never be resumed from anyway)
            shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(err, target) if isinstance(err, Exception) else None
        if reason is None:
            raise
        raise SaveError(
            f"could not write {target}: {reason}; what was saved before is intact: free space and rerun the same "
            "command to resume",
            reason,
        ) from None
    if is_main:
        if target.exists():  # an older complete copy of the same step (e.g. a replay after resume)
            shutil.rmtree(target)
        tmp.rename(target)
    barrier()


def nearest_existing(path: Path) -> Path:
    """`path` itself, or the nearest of its parents that exists (where a folder would be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_failure(err: BaseException, where: Path) -> str | None:
    """Why a save failed, in words ("the disk is full (12 MB free)"), when `err` is a failed write; None for
    any other error. A full disk reaches us as OSError from plain writes, `RuntimeError: ... unexpected pos
    ...` from torch.save's zip writer and `SafetensorError: ... No space left on device` from safetensors."""
    import errno

    write_error = isinstance(err, OSError) or re.search(
        r"unexpected pos|PytorchStreamWriter|No space left|Disk quota|I/O error|os error \d+", str(err)
    )
    if not write_error:
        return None
    existing = nearest_existing(where)
    free = shutil.disk_usage(existing).free
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < 64 * 2**20:
        return f"the disk is full ({free / 2**20:.0f} MB free under {existing})"
    return getattr(err, "strerror", None) or str(err).splitlines()[0]


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
