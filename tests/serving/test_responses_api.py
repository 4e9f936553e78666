"""/v1/responses through the official `openai` client's `client.responses` against the real server: the output
is what the package itself generates for the same conversation, streamed events add up to the whole response,
the sampling controls and budget act, and what the server cannot do is refused with a 400 naming the field."""

import httpx
import numpy as np
import openai
import pytest

from models.chat_format import Message
from models.sampling import SamplingParams
from registry.names import CHAT_MODEL
from serving.engine import ChatPackage

from .test_server import API_KEY

QUESTION = "Repeat: king queen"


def generated(package: ChatPackage, messages: list[Message], budget: int) -> tuple[str, list[int], str]:
    """What the package generates greedily for `messages`: its text, the prompt's token ids and the finish."""
    prompt = package.chat_prompt(messages)
    completion = package.complete(prompt, budget)
    return completion.text, prompt, completion.finish_reason


def test_a_response_is_the_models_reply_with_its_usage(fp32_client: openai.OpenAI, fp32_package: ChatPackage) -> None:
    response = fp32_client.responses.create(model=CHAT_MODEL, input=QUESTION, max_output_tokens=12)
    text, prompt, finish = generated(fp32_package, [Message(role="user", content=QUESTION)], 12)
    assert response.object == "response" and response.model == CHAT_MODEL
    assert response.output_text == text
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert response.usage.input_tokens == len(prompt)
    assert response.usage.total_tokens == len(prompt) + response.usage.output_tokens
    assert response.status == ("incomplete" if finish == "length" else "completed")
    assert response.store is False and response.previous_response_id is None and response.tools == []
    assert response.temperature == 0.0  # what was used: greedy, the package's default


def test_instructions_come_first_and_messages_are_the_conversation(
    fp32_client: openai.OpenAI, fp32_package: ChatPackage
) -> None:
    history = [
        {"role": "user", "content": "Name a king."},
        # an earlier output sent back as history, as a client that keeps the conversation does
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_earlier",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Lear", "annotations": []}],
        },
        {"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "And a "}, {"type": "input_text", "text": "queen?"}],
        },
    ]
    response = fp32_client.responses.create(
        model=CHAT_MODEL, instructions="Answer.", input=history, max_output_tokens=10
    )
    conversation = [
        Message(role="system", content="Answer."),
        Message(role="user", content="Name a king."),
        Message(role="assistant", content="Lear"),
        Message(role="system", content="Be brief."),
        Message(role="user", content="And a queen?"),
    ]
    text, prompt, _ = generated(fp32_package, conversation, 10)
    assert response.output_text == text and response.usage.input_tokens == len(prompt)
    assert response.instructions == "Answer."


def test_the_stream_is_the_responses_events_adding_up_to_the_whole(fp32_client: openai.OpenAI) -> None:
    fields = {"model": CHAT_MODEL, "input": QUESTION, "max_output_tokens": 16, "metadata": {"run": "7"}}
    whole = fp32_client.responses.create(**fields)
    events = list(fp32_client.responses.create(stream=True, **fields))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.usage is None
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage == whole.usage
    assert final.status == whole.status and final.metadata == {"run": "7"}
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    # the client's own accumulator (responses.stream) checks the events' order and identities
    with fp32_client.responses.stream(**fields) as stream:
        accumulated = stream.get_final_response()
    assert accumulated.output_text == whole.output_text


def test_max_output_tokens_ends_an_incomplete_response(fp32_client: openai.OpenAI) -> None:
    response = fp32_client.responses.create(
        model=CHAT_MODEL, input=QUESTION, max_output_tokens=3, extra_body={"ignore_eos": True}
    )
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.output[0].status == "incomplete"
    events = list(
        fp32_client.responses.create(
            model=CHAT_MODEL, input=QUESTION, max_output_tokens=3, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert events[-1].type == "response.completed" and events[-1].response.status == "incomplete"  # as vLLM


def test_temperature_and_top_p_are_honoured(fp32_client: openai.OpenAI) -> None:
    def sample(seed: int, **fields) -> str:
        extra = {"seed": seed, "ignore_eos": True}
        return fp32_client.responses.create(
            model=CHAT_MODEL, input=QUESTION, max_output_tokens=12, temperature=1.0, extra_body=extra, **fields
        ).output_text

    greedy = fp32_client.responses.create(model=CHAT_MODEL, input=QUESTION, max_output_tokens=12).output_text
    assert sample(4) == sample(4)  # seeded: repeats
    assert len({sample(seed) for seed in range(5)}) >= 3  # sampled: varies
    assert {sample(seed, top_p=0.01) for seed in range(3)} == {greedy}  # only the most likely token is left
    response = fp32_client.responses.create(model=CHAT_MODEL, input=QUESTION, temperature=0.7, top_p=0.9)
    assert (response.temperature, response.top_p) == (0.7, 0.9)


def test_included_logprobs_are_the_models_own_scores(fp32_client: openai.OpenAI, fp32_package: ChatPackage) -> None:
    response = fp32_client.responses.create(
        model=CHAT_MODEL,
        input=QUESTION,
        max_output_tokens=8,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    logprobs = response.output[0].content[0].logprobs
    prompt = fp32_package.chat_prompt([Message(role="user", content=QUESTION)])
    expected = fp32_package.complete(prompt, 8, SamplingParams(ignore_eos=True, logprobs=2)).tokens
    assert [lp.token for lp in logprobs] == [fp32_package.token_texts(t.token_id)[0] for t in expected]
    np.testing.assert_allclose([lp.logprob for lp in logprobs], [t.logprob for t in expected], atol=1e-4)
    assert all(len(lp.top_logprobs) == 2 for lp in logprobs)
    plain = fp32_client.responses.create(model=CHAT_MODEL, input=QUESTION, max_output_tokens=8)
    assert plain.output[0].content[0].logprobs == []  # only when `include` asks


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}, "tools"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"text": {"format": {"type": "json_object"}}}, "text"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"truncation": "auto"}, "truncation"),
        ({"max_tokens": 5}, "max_tokens"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        ({"input": "word " * 400}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "4"}]}, "input.0.type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.content.0.type",
        ),
        ({"input": [{"role": "tool", "content": "4"}]}, "input.0.role"),
        ({"top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_what_the_server_cannot_do_is_refused_by_name(fp32_client: openai.OpenAI, fields: dict, param: str) -> None:
    request = {"model": CHAT_MODEL, "input": QUESTION, **fields}
    refused = httpx.post(
        f"{fp32_client.base_url}responses", json=request, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    )
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == param and isinstance(error["code"], str) and error["type"] == "invalid_request_error"


def test_defaults_a_client_sends_are_served(fp32_client: openai.OpenAI) -> None:
    served = fp32_client.responses.create(
        model=CHAT_MODEL,
        input=QUESTION,
        max_output_tokens=4,
        store=True,  # the API's default: accepted, and answered `store: false`
        tools=[],
        tool_choice="none",
        text={"format": {"type": "text"}},
        truncation="disabled",
        reasoning={"effort": None},
        parallel_tool_calls=False,
        user="someone",
    )
    assert served.store is False and served.status in ("completed", "incomplete")


@pytest.mark.slow
def test_langchain_openai_on_the_responses_api(fp32_url: str, fp32_client: openai.OpenAI) -> None:
    """langchain-openai's `use_responses_api=True` (its requests and its parsing of the answer and the events)."""
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model=CHAT_MODEL,
        base_url=f"{fp32_url}/v1",
        api_key=API_KEY,
        use_responses_api=True,
        max_tokens=12,
        temperature=0,
        max_retries=0,
    )
    expected = fp32_client.responses.create(model=CHAT_MODEL, input=QUESTION, max_output_tokens=12, temperature=0)
    reply = chat.invoke([("system", "Answer."), ("human", QUESTION)])
    with_instructions = fp32_client.responses.create(
        model=CHAT_MODEL,
        input=[{"role": "system", "content": "Answer."}, {"role": "user", "content": QUESTION}],
        max_output_tokens=12,
    )
    assert reply.text == with_instructions.output_text
    assert reply.usage_metadata["input_tokens"] == with_instructions.usage.input_tokens
    streamed = "".join(chunk.text for chunk in chat.stream(QUESTION))
    assert streamed == expected.output_text
