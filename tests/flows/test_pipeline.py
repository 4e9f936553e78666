"""The pipeline flow's parameters are the pydantic config: Prefect validates them before a run exists."""

import pytest
from prefect.exceptions import ParameterTypeError

from flows.pipeline import pipeline
from tasks.pipeline_config import PipelineConfig, load_pipeline_config


def test_valid_preset_passes_prefect_parameter_validation() -> None:
    config = load_pipeline_config("tiny")
    validated = pipeline.validate_parameters({"config": config.model_dump(mode="json"), "workdir": "runs/x"})
    assert isinstance(validated["config"], PipelineConfig)
    assert validated["config"] == config


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("pretrain", "model", "top_k"), 99, "top_k=99 must be <="),
        (("pretrain", "optim", "lr"), -1.0, "greater than 0"),
        (("data", "vocab_size"), 10, "greater than or equal to 300"),
        (("search", "active_params_fraction"), 0.05, "search: active_params budget .* is infeasible: the smallest"),
    ],
)
def test_bad_values_are_rejected_before_a_run(path: tuple[str, ...], value: object, message: str) -> None:
    raw = load_pipeline_config("tiny").model_dump(mode="json")
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ParameterTypeError, match=message):
        pipeline.validate_parameters({"config": raw})


def test_parameter_schema_carries_descriptions_for_the_ui() -> None:
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(pipeline.fn).model_dump()
    definitions = schema["definitions"]
    assert schema["properties"]["config"]["$ref"].endswith("PipelineConfig")
    assert definitions["MoEConfig"]["properties"]["top_k"]["description"].startswith("Experts each token")
    assert definitions["SamplingConfig"]["properties"]["policy"]["enum"] == ["full", "random", "sandwich"]


def test_cached_results_belong_to_the_mlflow_store(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A workdir first used with the embedded store, then pointed at a tracking server, must not reuse cached
    results: they name registered versions of the other store."""
    from prefect.cache_policies import CacheKeyFnPolicy

    from flows.stages import cached
    from tasks.pretrain.task import pretrain_task

    def store_key() -> str:
        policies = cached(pretrain_task, str(tmp_path)).cache_policy.policies
        (store,) = [policy for policy in policies if isinstance(policy, CacheKeyFnPolicy)]
        return store.compute_key(None, {}, {})

    embedded = store_key()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store_key() != embedded
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert store_key() == embedded


def test_an_edited_user_file_misses_the_align_cache(tmp_path) -> None:
    """The SFT step's parameters name the user's JSONL; its content is in the cache key, so an edited file is
    trained on rather than answered from the cache."""
    from prefect.cache_policies import CacheKeyFnPolicy

    from flows.stages import cached, user_files
    from tasks.align.config import SFTConfig
    from tasks.align.task import sft_task

    conversations = tmp_path / "mine.jsonl"
    line = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "%s"}]}\n'
    conversations.write_text(line % "hello")
    parameters = {"sft": SFTConfig(extra_jsonl=str(conversations)), "subnet_dir": "subnet"}

    def key() -> str:
        policies = cached(sft_task, str(tmp_path), user_files)
        (files,) = [policy for policy in policies.cache_policy.policies if isinstance(policy, CacheKeyFnPolicy)]
        return files.compute_key(None, parameters, {})

    before = key()
    assert key() == before
    conversations.write_text(line % "hello there")
    assert key() != before


def test_how_pretraining_is_launched_is_not_part_of_its_cache_key(tmp_path) -> None:
    """N processes train what one does (the run's identity leaves `launch` out): launching a finished run on more
    processes must reuse it, not register the same supernet again; a setting that changes the run misses."""
    from prefect.context import TaskRunContext

    from flows.stages import cached, run_identity
    from tasks.pretrain.task import pretrain_task

    pretrain = load_pipeline_config("tiny").pretrain
    policy = cached(pretrain_task, str(tmp_path), run_identity, ("config",)).cache_policy

    def key(config) -> str:
        inputs = {"config": config, "data_dir": "data", "workdir": str(tmp_path), "parent_ref": None}
        return policy.compute_key(TaskRunContext.model_construct(task=pretrain_task), inputs, {})

    launched = pretrain.model_copy(update={"launch": pretrain.launch.model_copy(update={"num_processes": 2})})
    assert key(launched) == key(pretrain)
    assert key(pretrain.model_copy(update={"max_steps": 7})) != key(pretrain)


def test_a_stage_reads_the_data_folder_it_is_given(tmp_path, small_data) -> None:
    """The pipeline hands every later stage the folder pre-training read, so a source that changes (or goes) during
    the run cannot feed them other documents: the folder is used as given, its source not read again; a folder that
    is not prepared data is refused, naming the parameter."""
    from flows.stages import stage_data
    from tasks.data.config import DataConfig

    gone = DataConfig(source=str(tmp_path / "moved-away"), vocab_size=400, data_dir=str(tmp_path / "data"))
    assert stage_data(gone, str(small_data.directory)) == str(small_data.directory)
    with pytest.raises(ValueError, match=r"data_dir: .* is not a prepared data folder"):
        stage_data(gone, str(tmp_path))


def test_a_model_reference_is_retried_for_the_store_never_for_a_typo(tmp_path) -> None:
    """The stage flows resolve their model first: a reference that names nothing registered fails at once, naming
    the parameter; only a store that did not answer is worth the task's retries."""
    from prefect.states import Failed

    from flows.stages import _store_fault, resolve_model_task

    with pytest.raises(ValueError, match="subnet: .*trainonce-subnet") as typo:
        resolve_model_task.fn("subnet", str(tmp_path), "trainonce-subnet/9")
    assert not _store_fault(resolve_model_task, None, Failed(data=typo.value))
    assert _store_fault(resolve_model_task, None, Failed(data=ConnectionError("the tracking server did not answer")))
