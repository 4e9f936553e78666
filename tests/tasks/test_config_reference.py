"""docs/config.md is generated from the pydantic models and must match them (tasks/config_reference.py)."""

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from tasks.config_reference import REFERENCE_PATH, bounds, flatten, main, render, type_name
from tasks.pipeline_config import CONFIG_DIR, PipelineConfig


def test_the_committed_reference_is_what_the_models_generate() -> None:
    assert REFERENCE_PATH.read_text() == render(), (
        "docs/config.md is stale: regenerate it with `.venv/bin/python -m tasks.config_reference` and commit it"
    )


def test_every_field_and_preset_is_in_the_reference() -> None:
    text = render()
    for dotted in flatten(PipelineConfig().model_dump(mode="json")):
        section, _, name = dotted.rpartition(".")
        assert f"| `{name}` |" in text, dotted
        assert f"### `{section}`" in text if section else "### Top level" in text, dotted
    for preset in CONFIG_DIR.glob("*.yaml"):
        assert f"| `{preset.stem}` |" in text, preset.name


def test_bounds_and_types_read_as_the_field_declares_them() -> None:
    class Example(BaseModel):
        share: float = Field(0.5, gt=0, lt=1)
        steps: int | None = Field(None, ge=1, le=100_000)
        depths: tuple[int, ...] = Field((1,), min_length=1)
        mode: Literal["a", "b"] = "a"
        floor: int = Field(0, ge=-3)

    fields = Example.model_fields
    assert bounds(fields["share"]) == "(0, 1)"
    assert bounds(fields["steps"]) == "[1, 100,000]"
    assert bounds(fields["depths"]) == "at least 1 long"
    assert bounds(fields["floor"]) == ">= -3"
    assert bounds(fields["mode"]) == ""
    assert type_name(fields["steps"].annotation) == "int or null"
    assert type_name(fields["depths"].annotation) == "list of int"
    assert type_name(fields["mode"].annotation) == "one of `a`, `b`"


def test_check_mode_refuses_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "config.md"
    stale.write_text("# Configuration reference\n")
    with pytest.raises(SystemExit, match="stale"):
        main(["--check", "--out", str(stale)])
    main(["--out", str(stale)])
    main(["--check", "--out", str(stale)])
    assert stale.read_text() == render()
