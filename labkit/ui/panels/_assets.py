"""Where the front-end files live: ``labkit/_widgets`` in an installed wheel (hatch force-includes the top-level
``widgets/`` folder there), the repository's ``widgets/`` in an editable install. Read from disk, never a CDN."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parents[2]  # the labkit package folder


def asset(name: str) -> Path:
    """Path of one front-end file (ESM or CSS) by name, e.g. ``"token_stream.js"``."""
    for folder in (_HERE / "_widgets", _HERE.parent / "widgets"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"labkit front-end file {name!r} is missing (looked in labkit/_widgets and widgets/); "
                            f"reinstall labkit")
