"""The folder an export writes: new, empty, or an earlier export of the same kind, which it replaces.

A user points `--out` at a folder of their own as easily as at a new one: `~/models`, holding other GGUF files, or a
transformers model they downloaded, whose `config.json` looks like ours. Replacing is a set-aside and a delete, so an
export recognises its own earlier output by a marker file it writes (`trainonce-export.json`, saying which kind)
and refuses any other non-empty folder before anything is computed.
"""

from __future__ import annotations

import json
from pathlib import Path

EXPORT_MARKER = "trainonce-export.json"
HF_EXPORT, GGUF_EXPORT = "hugging-face", "gguf"  # the kinds


def check_replaceable(out_dir: Path, kind: str) -> None:
    """Raise FileExistsError, naming `out`, unless `out_dir` is absent, empty, or an earlier `kind` export."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"out: {out_dir} is a file; give a new or empty folder")
    if not any(out_dir.iterdir()) or _marked_kind(out_dir) == kind:
        return
    raise FileExistsError(
        f"out: {out_dir} is not empty and not an earlier trainonce {kind} export (it has no {EXPORT_MARKER} saying "
        "so); give a new or empty folder (an export made before exports wrote that file: delete it yourself)"
    )


def mark_export(folder: Path, kind: str) -> None:
    """Mark `folder` (being staged) as a `kind` export, which a later export of that kind may replace."""
    (folder / EXPORT_MARKER).write_text(json.dumps({"kind": kind}) + "\n")


def _marked_kind(folder: Path) -> str | None:
    try:
        return json.loads((folder / EXPORT_MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):  # no marker, or not one of ours
        return None
