"""Print pip constraints pinning each integration library to the oldest release pyproject.toml names.

Usage: ``python requirements/floor.py pyproject.toml > floor.txt`` (``make test-floor`` does this). Only the
libraries pdt-hf calls into are pinned to their floor; everything else resolves as pip chooses, so the floor
environment tests the ranges pyproject.toml promises for those libraries.
"""

from __future__ import annotations

import re
import sys
import tomllib

FLOORED = ("transformers", "accelerate", "datasets", "peft", "safetensors", "sentence-transformers")


def floors(pyproject: dict) -> list[str]:
    project = pyproject["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+).*", requirement)
        if match and match.group(1).lower() in FLOORED:
            pins[match.group(1).lower()] = match.group(2)
    missing = sorted(set(FLOORED) - set(pins))
    if missing:
        raise SystemExit(f"pyproject.toml names no '>=' floor for {missing}; add one or drop it from FLOORED.")
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


if __name__ == "__main__":
    with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as handle:
        print("\n".join(floors(tomllib.load(handle))))
