"""The pipeline's configuration: one pydantic model per stage, loaded from a YAML preset in configs/ (package data).
The code's defaults are the tiny preset's values, so a preset holds only its differences."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from registry.names import CHAT_MODEL
from registry.promotion import GateRules
from tasks.align.config import DPOConfig, GRPOConfig, SFTConfig
from tasks.data.config import DataConfig, ImagesConfig
from tasks.deploy.config import DeployConfig
from tasks.deploy.graph_limits import check_fused_graph, variant_quant
from tasks.extract.config import ExtractConfig
from tasks.pretrain.config import PretrainConfig
from tasks.search.config import ImportanceConfig, SearchConfig
from tasks.search.search import check_parameter_budgets

# The presets ship inside the package (configs/__init__.py), so a wheel install finds them as a checkout does.
CONFIG_DIR = Path(str(importlib.resources.files("configs")))


DEFAULT_PRESET = "tiny"


def merge_sections(base: dict, changes: dict) -> dict:
    """`changes` over `base`, field by field: a nested section merges with the base's, any other value (a list
    too) replaces it. A section that sets one field keeps the base's other fields instead of code defaults."""
    merged = dict(base)
    for key, value in changes.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = merge_sections(base[key], value) if nested else value
    return merged


class FamilyMember(BaseModel):
    """Another member of the family to deploy beside the main one: the same elastic run, searched under its own
    budgets, extracted, aligned, exported and gated on its own, registered as `trainonce-chat-<name>` with its own
    aliases, so that one server can serve the whole family (`trainonce serve --also trainonce-chat-<name>`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$", description="Member name: lower case, digits, hyphens.")
    total_params_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="Upper bound on total parameters, as a fraction of the supernet's."
    )
    active_params_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="Upper bound on active parameters, as a fraction of the supernet's."
    )
    latency_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="Upper bound on decode latency, as a fraction of the supernet's."
    )

    @model_validator(mode="after")
    def _has_a_budget(self) -> FamilyMember:
        if not self.budgets():
            raise ValueError(f"family member {self.name!r}: give at least one budget (a *_fraction field)")
        return self

    def budgets(self) -> dict[str, float]:
        return self.model_dump(exclude={"name"}, exclude_none=True)

    def search(self, base: SearchConfig) -> SearchConfig:
        """The main search's settings with this member's budgets in place of the main member's."""
        cleared = dict.fromkeys(("total_params", "active_params", "latency_ms", *FamilyMember.model_fields), None)
        cleared.pop("name")
        return SearchConfig.model_validate({**base.model_dump(), **cleared, **self.budgets()})

    def model_name(self) -> str:
        return f"{CHAT_MODEL}-{self.name}"


class PipelineConfig(BaseModel):
    """All stages' settings; every field is validated before any compute starts. What a config leaves unset, a
    whole section or one field of it, takes the code's default, which is the tiny CPU preset's value: `PipelineConfig()`
    (and so the Prefect form, and a deployment run with no parameters) is the run the README's first command makes.
    A preset file holds only its differences (and can name another preset as its `base:`)."""

    model_config = ConfigDict(extra="forbid")

    data: DataConfig = Field(default_factory=DataConfig, description="Corpus, tokenizer and split.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="Elastic pre-training.")
    importance: ImportanceConfig = Field(
        default_factory=ImportanceConfig, description="Expert and layer ranking before the search."
    )
    search: SearchConfig = Field(default_factory=SearchConfig, description="Sub-model search under budgets.")
    extract: ExtractConfig = Field(default_factory=ExtractConfig, description="Extraction and distillation.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning on verifiable tasks.")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Preference optimisation after SFT.")
    grpo: GRPOConfig = Field(
        default_factory=GRPOConfig, description="Reinforcement learning on verifiable rewards after DPO."
    )
    deploy: DeployConfig = Field(default_factory=DeployConfig, description="ONNX export, quantization, candidate.")
    gate: GateRules = Field(default_factory=GateRules, description="When the candidate replaces the champion.")
    family: tuple[FamilyMember, ...] = Field(
        (),
        max_length=16,
        description="More members to deploy from the same elastic run, each under its own budgets (none: one model).",
    )
    init_from: str | None = Field(
        None,
        pattern=r"^(hf:.+|(models:/)?[\w.-]+(@[\w-]+|/(\d+|latest)))$",
        description="Start from a pretrained MoE instead of pre-training: `hf:<dir>` (a transformers ERNIE 4.5 MoE "
        "checkpoint, imported once) or a registered supernet (NAME@ALIAS, NAME/VERSION). Its architecture, elastic "
        "space and tokenizer replace pretrain.model, pretrain.elastic and the data tokenizer.",
    )
    init_steps: int = Field(
        0, ge=0, le=10_000_000, description="Elastic continued pre-training steps after init_from (0: none)."
    )

    @model_validator(mode="after")
    def _stages_fit_the_model(self) -> PipelineConfig:
        """Every stage tokenizes with the model's vocabulary and stays within its context length."""
        if self.data.vocab_size != self.pretrain.model.vocab_size:
            raise ValueError(
                f"pretrain.model.vocab_size={self.pretrain.model.vocab_size} must equal "
                f"data.vocab_size={self.data.vocab_size}"
            )
        for field, seq_len in (
            ("search.seq_len", self.search.seq_len),
            ("extract.seq_len", self.extract.seq_len),
            ("sft.max_len", self.sft.max_len),
            ("dpo.max_len", self.dpo.max_len),
            ("deploy.evaluation.seq_len", self.deploy.evaluation.seq_len),
        ):
            if seq_len > self.pretrain.model.max_seq_len:
                raise ValueError(
                    f"{field}={seq_len} exceeds pretrain.model.max_seq_len={self.pretrain.model.max_seq_len}"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _image_codes_from_the_data(cls, raw: Any) -> Any:
        """With data.images the model's image_token_range follows from the data settings (the codes are the
        vocabulary's last codebook_size ids), so a preset never repeats it; an explicit value is checked below."""
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            return raw
        images = raw["data"].get("images")
        pretrain = raw.get("pretrain", {})
        if images is None or not isinstance(pretrain, dict) or not isinstance(pretrain.get("model", {}), dict):
            return raw
        try:
            codes = ImagesConfig.model_validate(images).codebook_size
            vocab_size = int(raw["data"].get("vocab_size", DataConfig.model_fields["vocab_size"].default))
        except (ValidationError, TypeError, ValueError):
            return raw  # the field's own validation reports it
        model = pretrain.get("model", {})
        if "image_token_range" in model:
            return raw
        filled = {**model, "image_token_range": (vocab_size - codes, codes)}
        return {**raw, "pretrain": {**pretrain, "model": filled}}

    @model_validator(mode="after")
    def _image_codes_match_the_data(self) -> PipelineConfig:
        """The model routes by where the data put the image codes; a heterogeneous model needs images and leaves
        as ONNX only (Hugging Face's and llama.cpp's ERNIE route every token in one pool)."""
        model, images = self.pretrain.model, self.data.images
        if images is not None and self.init_from is not None:
            raise ValueError(
                "data.images with init_from: the imported model's vocabulary has no image codes (pre-train a supernet "
                "with images instead)"
            )
        expected = (self.data.vocab_size - images.codebook_size, images.codebook_size) if images else None
        if self.init_from is None and model.image_token_range != expected:
            raise ValueError(
                f"pretrain.model.image_token_range={model.image_token_range} must be {expected}: where data.images "
                "puts the image codes (leave it unset: it follows from the data)"
            )
        if model.routing == "heterogeneous":
            refused = {
                "deploy.hugging_face": self.deploy.hugging_face,
                "deploy.gguf": bool(self.deploy.gguf),
                "deploy.graph=fused": self.deploy.graph == "fused",
            }
            if any(refused.values()):
                names = ", ".join(name for name, on in refused.items() if on)
                raise ValueError(
                    f"pretrain.model.routing=heterogeneous leaves as a traced ONNX graph only: turn off {names} "
                    "(deploy.hugging_face: false, deploy.gguf: [], deploy.graph: traced)"
                )
        return self

    @model_validator(mode="after")
    def _image_settings_need_images(self) -> PipelineConfig:
        """The image settings of later stages (the search's image weight, the digit tasks) need data.images, and
        with drawing tasks every stage that generates an answer needs room for a drawing (the markers, its codes and
        the end of the turn)."""
        if self.search.image_loss_weight and self.data.images is None:
            raise ValueError(f"search.image_loss_weight={self.search.image_loss_weight} needs data.images")
        digit_tasks = {"digit_read", "digit_draw"} & set(self.sft.task_mix.tasks)
        if digit_tasks and self.data.images is None:
            raise ValueError(f"sft.task_mix.tasks: {', '.join(sorted(digit_tasks))} need data.images")
        if "digit_draw" in digit_tasks and self.data.images is not None:
            patch = self.data.images.patch
            drawing = (8 // patch[0]) * (8 // patch[1]) + 3
            for field, limit in (
                ("sft.max_new_tokens", self.sft.max_new_tokens),
                ("dpo.max_new_tokens", self.dpo.max_new_tokens),
                ("grpo.max_new_tokens", self.grpo.max_new_tokens),
                ("deploy.evaluation.max_new_tokens", self.deploy.evaluation.max_new_tokens),
            ):
                if limit < drawing:
                    raise ValueError(
                        f"{field}={limit}: digit_draw's answers take {drawing} tokens; allowed: >= {drawing}"
                    )
        return self

    @model_validator(mode="after")
    def _image_share_is_whole_rows(self) -> PipelineConfig:
        """Pre-training draws token_share of every batch's rows from the image-text documents: a whole number."""
        images, batch_size = self.data.images, self.pretrain.batch_size
        if images is not None and abs(images.token_share * batch_size - round(images.token_share * batch_size)) > 1e-9:
            nearest = max(1, min(batch_size - 1, round(images.token_share * batch_size))) / batch_size
            raise ValueError(
                f"data.images.token_share={images.token_share} x pretrain.batch_size={batch_size} is not a whole "
                f"number of rows; allowed: a multiple of 1/{batch_size}, e.g. {nearest:g}"
            )
        return self

    @model_validator(mode="after")
    def _deploy_graph_fits_the_model(self) -> PipelineConfig:
        """A shape the fused ONNX graph cannot express is refused now, not after training (a model imported with
        init_from is checked when it is exported)."""
        if self.deploy.graph == "fused" and self.init_from is None:
            for variant in ("fp32", *self.deploy.variants):
                check_fused_graph(self.pretrain.model, variant_quant(variant, self.deploy))
        return self

    @model_validator(mode="after")
    def _continued_pretraining_outlasts_warmup(self) -> PipelineConfig:
        """Continued pre-training runs init_steps steps with the preset's schedule, warm-up included."""
        if self.init_from and self.init_steps and self.pretrain.optim.warmup_steps >= self.init_steps:
            raise ValueError(
                f"pretrain.optim.warmup_steps={self.pretrain.optim.warmup_steps} must be < init_steps={self.init_steps}"
            )
        return self

    @model_validator(mode="after")
    def _search_budgets_are_reachable(self) -> PipelineConfig:
        """An unreachable budget would otherwise fail only at the search, after pre-training; so would a second
        member under the main member's name."""
        searches = {"search": self.search, **{f"family[{m.name}]": m.search(self.search) for m in self.family}}
        for where, search in searches.items():
            try:
                check_parameter_budgets(search, self.pretrain.model, self.pretrain.elastic)
            except ValueError as error:
                raise ValueError(
                    f"{where}: {error} in pretrain.elastic (raise the budget or widen the space)"
                ) from error
        names = [self.deploy.model_name, *(m.model_name() for m in self.family)]
        if len(set(names)) != len(names):
            raise ValueError(f"family: every member needs its own name; registered model names {names}")
        return self


def preset_path(name_or_path: str | Path) -> Path:
    """`tiny` -> configs/tiny.yaml; a path is taken as given."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        return path
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no preset {name_or_path!r}; available: {available}")
    return preset


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """`["pretrain.max_steps=10"]` -> {"pretrain.max_steps": 10}; values are parsed as YAML."""
    overrides: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def read_preset(name_or_path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """A preset's fields merged over its `base:` preset's (recursively), without the `base` key."""
    path = preset_path(name_or_path).resolve()
    if path in seen:
        raise ValueError(f"base: presets form a cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config file is a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    return merge_sections(read_preset(base, (*seen, path)), raw) if base else raw


def load_pipeline_config(name_or_path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """Validate a YAML preset (plus optional nested overrides) into a PipelineConfig."""
    raw = read_preset(name_or_path)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            if node.get(key) is None:  # absent, or an optional section set to null: the override opens it
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                parent = ".".join(parents[: depth + 1])
                raise ValueError(f"{dotted}: {parent} is a value ({node!r}), not a section with fields")
        node[leaf] = value
    return PipelineConfig.model_validate(raw)
