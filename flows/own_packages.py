"""A loud error when another installed project's package shadows one of ours.

trainonce keeps its promised layout (top-level `models`, `tasks`, `flows`, `registry`, `serving`, `configs`), and
those are generic names: a second project with a `models` package earlier on the import path would make our imports fail
deep inside a stage, with a message about a missing attribute. The CLI calls `check_own_packages` first, so such a
clash is reported at once, naming the package, where it came from and where ours is.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

OWN_PACKAGES = ("models", "tasks", "flows", "registry", "serving", "configs")
ROOT = Path(__file__).resolve().parents[1]


def check_own_packages() -> None:
    """Raise ImportError naming every top-level package that does not resolve to this checkout's folder."""
    clashes = []
    for name in OWN_PACKAGES:
        spec = importlib.util.find_spec(name)
        found = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
        if found != ROOT / name:
            clashes.append(f"`{name}` resolves to {found or 'nothing'}, not {ROOT / name}")
    if clashes:
        raise ImportError(
            "another project's packages shadow trainonce's (same top-level names): "
            + "; ".join(clashes)
            + ". Run trainonce from its own virtual environment."
        )
