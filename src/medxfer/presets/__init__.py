"""Packaged run specs (``paper``, ``demo``)."""
from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from medxfer.errors import UsageError


def load_preset(name: str) -> dict[str, Any]:
    """The preset ``name`` as a dict (a RunSpec mapping, plus demo-only keys for ``demo``)."""
    path = resources.files("medxfer").joinpath("presets", f"{name}.yaml")
    if not path.is_file():
        known = sorted(p.name.removesuffix(".yaml") for p in resources.files("medxfer").joinpath("presets").iterdir()
                       if p.name.endswith(".yaml"))
        raise UsageError(f"unknown preset {name!r}; presets: {', '.join(known)}")
    return yaml.safe_load(path.read_text())
