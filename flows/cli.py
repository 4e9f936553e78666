"""The `trainonce` command line: each stage on its own, and `demo`, the whole job on a preset."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from serving.batching import DEFAULT_BATCHING, Batching
from tasks.pipeline_config import PipelineConfig, load_pipeline_config, parse_overrides


def _load(args: argparse.Namespace) -> PipelineConfig:
    try:
        return load_pipeline_config(args.config, parse_overrides(args.set))
    except ValidationError as error:
        raise SystemExit(f"invalid configuration {args.config!r}:\n{error}") from error
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from error


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from tasks.data.corpus import prepare_data

    prepared = prepare_data(_load(args).data)
    print(
        json.dumps(
            {
                "directory": str(prepared.directory),
                "fingerprint": prepared.fingerprint,
                "train_tokens": prepared.train_tokens,
                "val_tokens": prepared.val_tokens,
            },
            indent=2,
        )
    )


def cmd_pretrain(args: argparse.Namespace) -> None:
    """Pre-train (resuming from the last checkpoint in --workdir) and register, without Prefect."""
    from flows.workdir_lock import workdir_lock
    from tasks.data.corpus import prepare_data
    from tasks.pretrain.task import pretrain_task, retrain_data_config

    config = _load(args)
    workdir = str(Path(args.workdir).resolve())
    with workdir_lock(workdir):  # not beside a pipeline on the same workdir: both would train into one folder
        data_dir = prepare_data(retrain_data_config(config.data, config.pretrain, workdir)).directory  # as flows do
        pretrained = pretrain_task.fn(config.pretrain, str(data_dir), workdir)
    print("\n".join(pretrained.summary()))


def cmd_info(args: argparse.Namespace) -> None:
    from models.accounting import subnet_cost
    from models.subnet import Importance

    config = _load(args)
    model_config, space = config.pretrain.model, config.pretrain.elastic
    importance = Importance.identity(model_config)
    print(f"{'sub-model':<14}{'total params':>14}{'active params':>15}{'fwd MFLOP/token':>17}")
    rows = [("supernet", None), *((s.describe(), s) for s in space.enumerate(model_config, importance))]
    for label, spec in rows:
        cost = subnet_cost(model_config, spec, config.pretrain.seq_len)
        print(
            f"{label:<14}{cost.total_params:>14,}{cost.active_params:>15,}{cost.forward_flops_per_token / 1e6:>17.2f}"
        )


def cmd_params(args: argparse.Namespace) -> None:
    """Print the validated configuration as the pipeline deployment's parameters, for
    `prefect deployment run 'pipeline/...' --params "$(trainonce params --config small --set ...)"`."""
    print(json.dumps({"config": _load(args).model_dump(mode="json"), "workdir": args.workdir}))


# Prefect's temporary server migrates a fresh SQLite database before it answers; its start-up budget (20 s by
# default) is not met on a busy machine. Ten minutes is a deadline for a server that will not start, not a wait.
EPHEMERAL_STARTUP_SECONDS = 600


@contextmanager
def local_prefect_settings(workdir: Path) -> Iterator[None]:
    """Prefect's home (its database) in the workdir, no analytics, a start-up budget for a loaded machine; a value
    the user set in the environment or a profile wins. Prefect reads its environment once, when it is imported (our
    stages import it), so setting os.environ here would be ignored: this enters a settings context instead."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    (workdir / ".prefect").mkdir(parents=True, exist_ok=True)
    defaults = {
        PREFECT_HOME: workdir / ".prefect",
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EPHEMERAL_STARTUP_SECONDS,
    }
    with temporary_settings(set_defaults=defaults):
        yield


def cmd_pipeline(args: argparse.Namespace) -> None:
    """Run the Prefect pipeline flow in-process (Prefect's temporary local server when none is set)."""
    workdir = Path(args.workdir).resolve()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    config = _load(args)  # validated before Prefect or any compute starts
    from registry.tracking import check_artifact_store
    from tasks.deploy.llama_cpp import check_gguf_request

    try:  # the flow checks again (deployment runs start there); here it fails before Prefect even starts
        check_artifact_store(workdir)
        check_gguf_request("deploy.gguf", config.deploy.gguf)
    except RuntimeError as error:
        raise SystemExit(f"cannot run the pipeline: {error}") from error
    from flows.pipeline import pipeline

    with local_prefect_settings(workdir):
        result = pipeline(config=config, workdir=str(workdir))
    print("\n".join(result.summary(str(workdir))))
    if os.environ.get("MLFLOW_TRACKING_URI"):
        from registry.database import is_database_uri, masked

        uri = os.environ["MLFLOW_TRACKING_URI"]
        if is_database_uri(uri):
            print(f"MLflow tracking database: {masked(uri)}")
        else:
            print(f"MLflow tracking server: {uri}")
    else:
        store = workdir / "mlflow.db"
        print(f"MLflow store: {store}  (mlflow ui --backend-store-uri sqlite:///{store})")


def _integer(low: int, high: int | None = None, what: str = "an integer") -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when None), refused naming the range."""
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what} {allowed}, got {value}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def cmd_serve(args: argparse.Namespace) -> None:
    from serving.server import serve

    try:
        serve(
            args.workdir,
            [args.model, *args.also],
            None if args.version else args.alias,
            args.version,
            args.host,
            args.port,
            args.api_key,
            args.poll_seconds,
            args.threads,
            batching=Batching(args.max_batch, args.max_waiting, args.max_wait_seconds),
        )
    except (LookupError, ValueError) as error:
        raise SystemExit(f"cannot serve: {error}") from error


def cmd_promote(args: argparse.Namespace) -> None:
    from registry.promotion import promote
    from tasks.deploy.task import promotion_slot

    try:
        with promotion_slot(args.workdir, args.model):  # not while a gate (or another command) moves the alias
            version = promote(args.workdir, args.model, args.version, reason=args.reason)
    except LookupError as error:
        raise SystemExit(str(error)) from error
    print(f"{args.model}@champion -> version {version}")


def cmd_rollback(args: argparse.Namespace) -> None:
    from registry.promotion import rollback
    from tasks.deploy.task import promotion_slot

    try:
        with promotion_slot(args.workdir, args.model):
            previous, current = rollback(args.workdir, args.model)
    except LookupError as error:
        raise SystemExit(str(error)) from error
    print(f"{args.model}@champion -> version {current} (was {previous})")


def _registered_checkpoint(workdir: str, ref: str):
    """The PyTorch checkpoint a ref names; `trainonce-chat` refs (ONNX packages) give the PyTorch model they were
    exported from (their `parent_model` tag)."""
    from registry.models import download_checkpoint, resolve_version, version_tags
    from registry.names import CHAT_MODEL

    version = resolve_version(workdir, ref)
    if version.name == CHAT_MODEL:
        ref = version_tags(workdir, version)["parent_model"]
    return download_checkpoint(workdir, ref)


def cmd_export_hf(args: argparse.Namespace) -> None:
    """A registered checkpoint as a Hugging Face directory."""
    from models.chat_format import chat_format_of
    from tasks.deploy.hugging_face import export_hf

    try:
        checkpoint = _registered_checkpoint(args.workdir, args.model)
        chat_format = chat_format_of(checkpoint.extra)
        out = export_hf(checkpoint.checkpoint_dir, checkpoint.tokenizer_path, chat_format, args.out)
    except (LookupError, ValueError, FileExistsError) as error:
        raise SystemExit(f"export-hf: {error}") from error
    print(f"{checkpoint.version.uri} -> {out} (AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained)")


def cmd_export_gguf(args: argparse.Namespace) -> None:
    """A registered checkpoint as GGUF files, by llama.cpp's converter and quantizer."""
    from models.chat_format import chat_format_of
    from tasks.deploy.gguf import export_gguf
    from tasks.deploy.llama_cpp import check_gguf_request

    try:
        check_gguf_request("--types", args.types)  # before downloading anything
        checkpoint = _registered_checkpoint(args.workdir, args.model)
        chat_format = chat_format_of(checkpoint.extra)
        files = export_gguf(
            checkpoint.checkpoint_dir,
            checkpoint.tokenizer_path,
            chat_format,
            args.out,
            args.types,
            name=checkpoint.version.name,
            version=checkpoint.version.version,
        )
    except (LookupError, ValueError, FileExistsError, RuntimeError) as error:
        raise SystemExit(f"export-gguf: {error}") from error
    for gguf_type, path in files.items():
        print(f"{checkpoint.version.uri} -> {path} ({gguf_type}, {path.stat().st_size / 1e6:.1f} MB)")


def _gguf_types(text: str) -> tuple[str, ...]:
    from tasks.deploy.llama_cpp import GGUF_TYPES

    types = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown or not types:
        raise argparse.ArgumentTypeError(f"{unknown or 'none'}: choose from {','.join(GGUF_TYPES)}")
    return types


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def cmd_import_hf(args: argparse.Namespace) -> None:
    """A local transformers ERNIE 4.5 MoE checkpoint as a new `trainonce-supernet` version."""
    from models.subnet import ElasticSpace
    from tasks.init_from.task import import_hf

    lists = {"depths": args.depths, "expert_counts": args.expert_counts, "top_ks": args.top_ks}
    try:
        elastic = ElasticSpace(**{k: v for k, v in lists.items() if v}) if any(lists.values()) else None
        version = import_hf(
            args.directory,
            Path(args.workdir).resolve(),
            elastic,
            args.pretrain_tokens,
            Path(args.chat_template) if args.chat_template else None,
        )
    except (ValueError, FileNotFoundError, ValidationError) as error:
        raise SystemExit(f"import-hf: {error}") from error
    print(f"{args.directory} -> {version.uri}")


def _add_registry_commands(commands: argparse._SubParsersAction) -> None:
    """serve, promote, rollback, export-hf, export-gguf: they act on a registry (a workdir's store, or
    MLFLOW_TRACKING_URI)."""
    from registry.names import CHAT_MODEL
    from tasks.deploy.llama_cpp import GGUF_TYPES

    def registry_parser(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--workdir", default="runs/pipeline", help="the pipeline folder whose MLflow store to use")
        sub.add_argument("--model", default=CHAT_MODEL, help="registered model name")
        sub.set_defaults(handler=handler)
        return sub

    serve = registry_parser("serve", cmd_serve, "OpenAI-compatible server over a registered chat model")
    serve.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="MODEL",
        help="another registered model to serve, on the same alias (a family's members; repeatable)",
    )
    serve.add_argument("--alias", default="champion", help="alias to serve and follow as it moves")
    serve.add_argument("--version", default=None, help="serve this fixed version instead of an alias")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: local only)")
    serve.add_argument("--port", type=_integer(0, 65535, "a TCP port (0: any free one)"), default=8000)
    serve.add_argument("--api-key", default=None, help="require this bearer key (or set TRAINONCE_API_KEY)")
    serve.add_argument(
        "--poll-seconds", type=_positive_seconds, default=5.0, help="how often to check whether the alias moved"
    )
    serve.add_argument("--threads", type=_integer(0), default=0, help="onnxruntime intra-op threads (0: all cores)")
    serve.add_argument(
        "--max-batch",
        type=_integer(1),
        default=DEFAULT_BATCHING.max_batch,
        help="sequences per batched decode step (1: one at a time)",
    )
    serve.add_argument(
        "--max-waiting",
        type=_integer(1),
        default=DEFAULT_BATCHING.max_waiting,
        help="sequences queued for the batch before requests get 429",
    )
    serve.add_argument(
        "--max-wait-seconds",
        type=_positive_seconds,
        default=DEFAULT_BATCHING.max_wait_seconds,
        help="how long a queued sequence may wait for a batch row before its request gets 429",
    )
    promote = registry_parser("promote", cmd_promote, "point MODEL@champion at VERSION (which must exist)")
    promote.add_argument("version", help="registered version number")
    promote.add_argument("--reason", default="manual promotion", help="recorded on the version")
    registry_parser("rollback", cmd_rollback, "move MODEL@champion back to the previous champion")
    export = registry_parser(
        "export-hf", cmd_export_hf, "write a registered model (NAME@ALIAS or NAME/VERSION) as a Hugging Face directory"
    )
    export.add_argument("--out", required=True, help="the folder to write (new, empty, or an earlier export)")
    export.set_defaults(model=f"{CHAT_MODEL}@champion")
    gguf = registry_parser(
        "export-gguf",
        cmd_export_gguf,
        "write a registered model as GGUF files for llama.cpp and Ollama (needs `make llama-cpp`)",
    )
    gguf.add_argument("--out", required=True, help="the folder to write (new, empty, or an earlier GGUF export)")
    gguf.add_argument(
        "--types",
        type=_gguf_types,
        default=("f32", "q8_0", "q4_k_m"),
        help=f"comma-separated GGUF types: {', '.join(GGUF_TYPES[:3])} (converted), {', '.join(GGUF_TYPES[3:])} "
        "(llama-quantize from f32); default f32,q8_0,q4_k_m. The Modelfile's FROM is the first",
    )
    gguf.set_defaults(model=f"{CHAT_MODEL}@champion")
    imported = commands.add_parser(
        "import-hf",
        help="register a local transformers ERNIE 4.5 MoE checkpoint as a trainonce-supernet version",
        description="register a local transformers ERNIE 4.5 MoE checkpoint as a trainonce-supernet version",
    )
    imported.add_argument("directory", help="folder with config.json, *.safetensors and tokenizer.json")
    imported.add_argument("--workdir", default="runs/pipeline", help="the pipeline folder whose MLflow store to use")
    imported.add_argument("--depths", type=_int_list, default=None, help="elastic depths, e.g. 14,21,28")
    imported.add_argument("--expert-counts", type=_int_list, default=None, help="experts per layer, e.g. 16,32,64")
    imported.add_argument("--top-ks", type=_int_list, default=None, help="routing top-k values, e.g. 2,4,6")
    imported.add_argument(
        "--pretrain-tokens",
        type=int,
        default=0,
        help="tokens the checkpoint was pre-trained on (from its model card or report); sizes the distillation "
        "budget of extracted sub-models (0: extraction without distillation unless init_steps continues training)",
    )
    imported.add_argument(
        "--chat-template",
        default=None,
        help="Jinja chat template file to use instead of the checkpoint's own (a base model without one)",
    )
    imported.set_defaults(handler=cmd_import_hf)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainonce", description="Train one elastic MoE, deploy many models.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler, help_text: str, workdir: bool = False, default_workdir: str = "runs/pretrain") -> None:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", default="tiny", help="preset in configs/ (tiny, small) or a YAML path")
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set pretrain.max_steps=10",
        )
        if workdir:
            sub.add_argument("--workdir", default=default_workdir, help="folder for checkpoints and outputs")
        sub.set_defaults(handler=handler)

    add(
        "pipeline",
        cmd_pipeline,
        "run the whole Prefect pipeline on a preset (data -> pre-training -> ... -> champion)",
        workdir=True,
        default_workdir="runs/pipeline",
    )
    add(
        "params",
        cmd_params,
        "print a preset with overrides as the JSON parameters of a pipeline deployment run",
        workdir=True,
        default_workdir="runs/pipeline",
    )
    add("prepare-data", cmd_prepare_data, "tokenize the corpus into train/validation memmaps")
    add("pretrain", cmd_pretrain, "elastic pre-training of the supernet", workdir=True)
    add("info", cmd_info, "parameter and FLOP accounting of every sub-model in the elastic space")
    _add_registry_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main(sys.argv[1:])
