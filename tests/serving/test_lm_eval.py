"""lm-evaluation-harness itself (`lm_eval --model local-completions` and `local-chat-completions`, as a user evaluates
a vLLM server) against the real server, on tasks of our own (task YAMLs over a local JSONL file, so nothing is
downloaded): in the multiple-choice task every choice's log-likelihood lm-eval reports equals the model's
teacher-forced score of it, computed here from the package, and so do its chosen answers and accuracy; in the
generation task every answer is the package's own greedy continuation, of the question as text or as a chat turn."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from models.chat_format import Message
from models.sampling import SamplingParams
from registry.names import CHAT_MODEL
from serving.engine import TOKENIZER_FILE, ChatPackage

from .test_server import API_KEY

# questions whose right answer the tiny model may or may not prefer: the point is that lm-eval's numbers are the
# model's, not that the model is right
QUESTIONS = [
    {"question": "Who was the king of Denmark?", "choices": ["Hamlet", "Claudius", "Lear"], "answer": 1},
    {"question": "To be, or not to", "choices": ["be", "go", "sleep"], "answer": 0},
    {"question": "My lord, the queen", "choices": ["is dead", "is here", "sleeps"], "answer": 0},
    {"question": "What is in a name?", "choices": ["a rose", "a king", "nothing"], "answer": 0},
    {"question": "Now is the winter of our", "choices": ["discontent", "summer", "king"], "answer": 0},
]
DATA = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{question}}}}"
"""
TASKS = {
    # scored: each choice's log-likelihood after the question (echo + logprobs), the best one chosen
    "trainonce_choice": """output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
""",
    # generated: greedy continuations of the questions, cut at a full stop
    "trainonce_generate": """output_type: generate_until
doc_to_target: "{{choices[answer]}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}
GENERATED = SamplingParams(stop=(".",))


def choice_loglikelihood(package: ChatPackage, context: str, continuation: str) -> float:
    """The model's log-probability of `continuation` after `context`, tokenized as lm-eval tokenizes a pair (the
    whole text, then the context alone: the continuation is the rest), each token scored given all before it."""
    whole = package.text_prompt(context + continuation)
    context_tokens = len(package.text_prompt(context))
    scored = package.prompt_logprobs(whole, 0)
    return float(sum(t.logprob for t in scored[context_tokens:]))


def write_tasks(tmp_path: Path) -> Path:
    """The task YAMLs and their JSONL data under `tmp_path`; the folder for `--include_path`."""
    data = tmp_path / "choices.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, task in TASKS.items():
        (tasks / f"{name}.yaml").write_text(f"task: {name}\n" + DATA.format(data=data) + task)
    return tasks


def run_lm_eval(model: str, model_args: list[str], tasks: Path, task_names: list[str], out: Path, *extra: str) -> None:
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", ",".join(model_args)]
    command += ["--tasks", ",".join(task_names), "--include_path", str(tasks), *extra]
    command += ["--output_path", str(out), "--log_samples"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]


@pytest.mark.slow
def test_lm_eval_scores_and_generates_with_the_models_own_numbers(
    fp32_url: str, fp32_package: ChatPackage, tmp_path: Path
) -> None:
    tasks = write_tasks(tmp_path)
    # lm-eval tokenizes with a Hugging Face tokenizer: the package's own tokenizer.json, as transformers loads it
    tokenizer = tmp_path / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_file=str(fp32_package.directory / TOKENIZER_FILE)).save_pretrained(tokenizer)
    model_args = [
        f"model={CHAT_MODEL}",
        f"base_url={fp32_url}/v1/completions",
        "tokenizer_backend=huggingface",
        f"tokenizer={tokenizer}",
        f"max_length={fp32_package.config.max_seq_len}",
        "num_concurrent=2",
    ]
    out = tmp_path / "out"
    run_lm_eval("local-completions", model_args, tasks, list(TASKS), out, "--batch_size", "4")

    samples = logged_samples(out, "trainonce_choice")
    chosen = []
    for sample, question in zip(samples, QUESTIONS, strict=True):
        # per choice: [[loglikelihood, is_greedy]], logged as strings
        reported = [float(response[0][0]) for response in sample["resps"]]
        # lm-eval's request: the question, then the choice after its target delimiter (a space)
        expected = [choice_loglikelihood(fp32_package, question["question"], f" {c}") for c in question["choices"]]
        np.testing.assert_allclose(reported, expected, atol=1e-4)
        chosen.append(int(np.argmax(expected)))
        assert sample["acc"] == float(chosen[-1] == question["answer"])
    [results_file] = out.rglob("results_*.json")
    accuracy = json.loads(results_file.read_text())["results"]["trainonce_choice"]["acc,none"]
    assert accuracy == pytest.approx(np.mean([c == q["answer"] for c, q in zip(chosen, QUESTIONS, strict=True)]))

    for sample, question in zip(logged_samples(out, "trainonce_generate"), QUESTIONS, strict=True):
        prompt = fp32_package.text_prompt(question["question"])
        assert sample["resps"] == [[fp32_package.complete(prompt, 8, GENERATED).text]]


@pytest.mark.slow
def test_lm_eval_chat_generates_the_models_own_chat_replies(
    fp32_url: str, fp32_package: ChatPackage, tmp_path: Path
) -> None:
    """`local-chat-completions` with `--apply_chat_template`: each question is a user turn on /v1/chat/completions,
    and every reply lm-eval logs is the package's greedy reply to that turn."""
    tasks = write_tasks(tmp_path)
    model_args = [f"model={CHAT_MODEL}", f"base_url={fp32_url}/v1/chat/completions", "num_concurrent=2"]
    out = tmp_path / "out"
    run_lm_eval("local-chat-completions", model_args, tasks, ["trainonce_generate"], out, "--apply_chat_template")
    for sample, question in zip(logged_samples(out, "trainonce_generate"), QUESTIONS, strict=True):
        prompt = fp32_package.chat_prompt([Message(role="user", content=question["question"])])
        assert sample["resps"] == [[fp32_package.complete(prompt, 8, GENERATED).text]]


def logged_samples(out: Path, task: str) -> list[dict]:
    """What `--log_samples` wrote for `task`: one record per question, in the questions' order."""
    [samples_file] = out.rglob(f"samples_{task}_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(samples) == len(QUESTIONS)
    return samples
