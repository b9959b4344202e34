"""The app's static files in `assets/`: the stylesheet, button icons, the diagram, and the prompt lists (examples,
autopilot)."""

from __future__ import annotations

import json
from pathlib import Path


def _assets_dir() -> Path:
    """`assets/` of a source checkout, else the copy an installed wheel ships inside this package."""
    checkout = Path(__file__).resolve().parent.parent / "assets"
    return checkout if checkout.is_dir() else Path(__file__).resolve().parent / "assets"


ASSETS = _assets_dir()


def load_json_list(name: str) -> list[str]:
    """The strings of `assets/<name>` (a JSON list); an empty list when the file is missing or unreadable, so a
    missing example file hides the examples instead of stopping the app."""
    try:
        data = json.loads((ASSETS / name).read_text(encoding="utf-8"))
        return [str(x) for x in data]
    except (OSError, ValueError):
        return []


def icon(name: str) -> str:
    """The path of `assets/icons/<name>.svg` (a button icon)."""
    return str(ASSETS / "icons" / f"{name}.svg")


def read_css() -> str:
    return (ASSETS / "style.css").read_text(encoding="utf-8")
