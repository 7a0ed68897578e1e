"""Files shipped inside the package: the bundled teacher and text (`bundled:NAME`), recipes, launch configs."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED_PREFIX = "bundled:"


def package_folder(name: str) -> Path:
    """A folder of the installed package: `assets`, `recipes`, `launch`."""
    return Path(str(resources.files("linearize") / name))


def bundled_path(name: str) -> Path:
    """Path of a file or folder shipped in `linearize/assets`."""
    folder = package_folder("assets")
    path = folder / name
    if not path.exists():
        shipped = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"no bundled asset {name!r}; bundled: {', '.join(shipped)}")
    return path


def resolve_bundled(path: str) -> str:
    """`bundled:NAME` → the packaged file or folder; anything else as it is."""
    return str(bundled_path(path[len(BUNDLED_PREFIX) :])) if path.startswith(BUNDLED_PREFIX) else path
