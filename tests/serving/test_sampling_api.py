"""Every decoding control a vLLM user sends, through the official `openai` client against the real server:
each honoured one is checked by an effect that would fail if it were ignored, each unsupported one is refused
with a 400 that names it."""

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.chat_format import Message
from models.sampling import log_softmax
from registry.names import CHAT_MODEL
from serving.engine import EVERY_TOKEN, ChatPackage

from .test_server import API_KEY

PROMPT = "Repeat: king queen"
USER = [{"role": "user", "content": PROMPT}]
SPEECH = "To be, or not to be"


@pytest.fixture()
def client(fp32_client: openai.OpenAI) -> openai.OpenAI:
    return fp32_client


@pytest.fixture()
def package(fp32_package: ChatPackage) -> ChatPackage:
    return fp32_package


def chat(client: openai.OpenAI, **fields):
    return client.chat.completions.create(model=CHAT_MODEL, messages=USER, **fields)


def greedy_text(client: openai.OpenAI, max_tokens: int = 24) -> str:
    return chat(client, max_tokens=max_tokens, extra_body={"ignore_eos": True}).choices[0].message.content


def test_stop_strings_truncate_on_both_endpoints_streamed_or_not(client: openai.OpenAI) -> None:
    sampled = {"max_tokens": 24, "temperature": 1.0, "seed": 5, "extra_body": {"ignore_eos": True}}
    text = chat(client, **sampled).choices[0].message.content  # seeded: the same text again below
    stop = text[len(text) // 3 : len(text) // 3 + 3]  # a stop string from the middle of the reply
    assert stop.strip(), f"the reply has no text to stop at: {text!r}"
    expected = text[: text.index(stop)]
    whole = chat(client, stop=[stop, "\x00never"], **sampled)
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    chunks = list(chat(client, stop=stop, stream=True, **sampled))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    prompted = {"model": CHAT_MODEL, "prompt": "To be, or not to be", **sampled}
    plain = client.completions.create(**prompted).choices[0].text
    cut = plain[len(plain) // 2 : len(plain) // 2 + 2]
    assert client.completions.create(stop=cut, **prompted).choices[0].text == plain[: plain.index(cut)]
    stream = client.completions.create(stop=cut, stream=True, **prompted)
    assert "".join(c.choices[0].text for c in stream) == plain[: plain.index(cut)]


def test_a_seed_reproduces_and_temperature_varies_across_seeds(client: openai.OpenAI) -> None:
    def sample(seed: int, **fields) -> str:
        return chat(client, max_tokens=16, temperature=1.0, seed=seed, **fields).choices[0].message.content

    assert sample(3) == sample(3)
    assert len({sample(seed) for seed in range(5)}) >= 3
    greedy = chat(client, max_tokens=16).choices[0].message.content
    assert chat(client, max_tokens=16, temperature=0).choices[0].message.content == greedy
    # top_k=1 leaves one candidate, top_p=0.01 the most likely one, min_p=1 only the top: greedy again
    for cut in ({"top_k": 1}, {"min_p": 1.0}):
        assert {sample(seed, extra_body=cut) for seed in range(3)} == {greedy}
    assert {sample(seed, top_p=0.01) for seed in range(3)} == {greedy}


@pytest.mark.parametrize("seed", [-1, -(2**63), 0, 2**63 - 1])
def test_any_integer_is_a_seed_on_both_endpoints_streamed_or_not(client: openai.OpenAI, seed: int) -> None:
    """Some clients send -1 for "random"; numpy refuses negative seeds, which used to answer 500 (retried 3 times)."""
    sampled = {"max_tokens": 8, "temperature": 1.0, "seed": seed}
    first, again = (chat(client, **sampled).choices[0].message.content for _ in range(2))
    assert first == again  # a seed, negative or not, reproduces
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True, **sampled))
    assert streamed == first
    completion = {"model": CHAT_MODEL, "prompt": "The king", **sampled}
    text = client.completions.create(**completion).choices[0].text
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **completion)) == text


def test_n_choices_are_independent_and_counted(client: openai.OpenAI) -> None:
    reply = chat(client, max_tokens=12, temperature=1.0, seed=11, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1
    again = chat(client, max_tokens=12, temperature=1.0, seed=11, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    streamed = list(chat(client, max_tokens=12, temperature=1.0, seed=11, n=3, stream=True))
    by_index = {
        i: "".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i) for i in range(3)
    }
    assert by_index == {c.index: c.message.content for c in reply.choices}
    one = client.completions.create(model=CHAT_MODEL, prompt="The king", max_tokens=8)
    two = client.completions.create(model=CHAT_MODEL, prompt="The king", max_tokens=8, n=2)
    assert [c.text for c in two.choices] == [one.choices[0].text] * 2  # greedy: the same twice
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens
    assert two.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once


def test_many_prompts_as_texts_or_token_ids_each_get_n_choices_in_order(
    client: openai.OpenAI, package: ChatPackage
) -> None:
    texts = ["The king", SPEECH]
    fields = {"model": CHAT_MODEL, "max_tokens": 6, "n": 2, "extra_body": {"ignore_eos": True}}
    alone = [client.completions.create(prompt=text, **fields) for text in texts]
    expected = [c.text for reply in alone for c in reply.choices]  # prompt i's choices at i*n .. i*n+n-1
    ids = [package.text_prompt(text) for text in texts]
    for prompt in (texts, ids):
        reply = client.completions.create(prompt=prompt, **fields)
        assert [c.index for c in reply.choices] == [0, 1, 2, 3]
        assert [c.text for c in reply.choices] == expected
        assert reply.usage.prompt_tokens == sum(len(i) for i in ids)  # each prompt counts once
        assert reply.usage.completion_tokens == 4 * 6
        streamed = list(client.completions.create(prompt=prompt, stream=True, **fields))
        by_index = ["".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in range(4)]
        assert by_index == expected
    one = client.completions.create(prompt=ids[1], **fields)  # token ids alone: one prompt
    assert [c.text for c in one.choices] == expected[2:]


def test_echo_returns_the_prompt_with_its_teacher_forced_logprobs(client: openai.OpenAI, package: ChatPackage) -> None:
    ids = package.text_prompt(SPEECH)
    # the model's own scores of the prompt, computed here from the fp32 package's logits
    logits, _ = package.generator.forward(np.asarray([ids]), package.generator.empty_past(1))
    expected = [log_softmax(logits[0, i])[t] for i, t in enumerate(ids[1:])]
    scored = {"model": CHAT_MODEL, "echo": True, "logprobs": 1}
    for prompt in (SPEECH, ids):  # as lm-evaluation-harness scores a continuation: max_tokens 0, or 1
        only = client.completions.create(prompt=prompt, max_tokens=0, **scored).choices[0]
        assert only.text == SPEECH and only.finish_reason == "length"
        logprobs = only.logprobs
        assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None
        np.testing.assert_allclose(logprobs.token_logprobs[1:], expected, atol=1e-4)
        greedy = [int(row.argmax()) for row in logits[0, :-1]]  # lm-eval's is_greedy: the best alternative
        best = [max(alt, key=alt.get) for alt in logprobs.top_logprobs[1:]]
        assert [b == t for b, t in zip(best, logprobs.tokens[1:], strict=True)] == [
            g == t for g, t in zip(greedy, ids[1:], strict=True)
        ]
    generating = {"max_tokens": 3, "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(model=CHAT_MODEL, prompt=SPEECH, logprobs=1, **generating)
    echoed = client.completions.create(prompt=SPEECH, **generating, **scored)
    choice = echoed.choices[0]
    assert choice.text == SPEECH + plain.choices[0].text
    assert choice.logprobs.token_logprobs[len(ids) :] == plain.choices[0].logprobs.token_logprobs
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1 : len(ids)], expected, atol=1e-4)
    assert echoed.usage == plain.usage  # the echoed prompt is not completion tokens
    streamed = list(client.completions.create(prompt=[SPEECH, SPEECH], stream=True, **generating, **scored))
    for index in (0, 1):
        chunks = [c.choices[0] for c in streamed if c.choices[0].index == index]
        assert "".join(c.text for c in chunks) == choice.text
        streamed_logprobs = [lp for c in chunks if c.logprobs for lp in c.logprobs.token_logprobs]
        assert streamed_logprobs[0] is None and len(streamed_logprobs) == len(choice.logprobs.token_logprobs)
        # two prompts decode in one batch here: the same math, summed in another order (fp32 rounding)
        np.testing.assert_allclose(streamed_logprobs[1:], choice.logprobs.token_logprobs[1:], atol=1e-5)
    text_only = client.completions.create(prompt=SPEECH, max_tokens=0, model=CHAT_MODEL, echo=True).choices[0]
    assert text_only.text == SPEECH and text_only.logprobs is None


def test_chat_logprobs_are_the_models_own_scores(client: openai.OpenAI, package: ChatPackage) -> None:
    reply = chat(client, max_tokens=12, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 12
    assert b"".join(bytes(t.bytes) for t in content).decode() == reply.choices[0].message.content
    for entry in content:  # greedy: the chosen token is the best alternative
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    # teacher-forced scores of the same tokens by the same graph, computed here
    prompt = package.chat_prompt([Message(role="user", content=PROMPT)])
    generated = list(package.complete(prompt, 12, EVERY_TOKEN).token_ids)
    logits, _ = package.generator.forward(np.asarray([prompt + generated[:-1]]), package.generator.empty_past(1))
    expected = [log_softmax(logits[0, len(prompt) - 1 + i])[t] for i, t in enumerate(generated)]
    np.testing.assert_allclose([t.logprob for t in content], expected, atol=1e-4)
    assert sum(t.logprob for t in content) == pytest.approx(sum(expected), abs=1e-3)
    streamed = list(chat(client, max_tokens=12, logprobs=True, stream=True, extra_body={"ignore_eos": True}))
    streamed_logprobs = [t.logprob for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    np.testing.assert_allclose(streamed_logprobs, expected, atol=1e-4)


def test_completion_logprobs_offsets_and_usage_in_the_stream(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model=CHAT_MODEL, prompt="To be, or not to be", max_tokens=8, logprobs=2, extra_body={"ignore_eos": True}
    )
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert all(len(alternatives) <= 2 for alternatives in logprobs.top_logprobs)
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    chunks = list(
        client.completions.create(
            model=CHAT_MODEL,
            prompt="To be, or not to be",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].choices == []


def test_bias_penalties_and_lengths_change_the_output(client: openai.OpenAI, package: ChatPackage) -> None:
    forced_token = package.tokenizer.encode(" king").ids[0]
    forced = chat(client, max_tokens=5, logit_bias={str(forced_token): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].message.content == package.tokenizer.decode([forced_token] * 5)
    greedy = greedy_text(client, 32)
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = chat(client, max_tokens=32, extra_body={"ignore_eos": True}, **penalty)
        assert penalised.choices[0].message.content != greedy, penalty
    repeated = chat(client, max_tokens=32, extra_body={"ignore_eos": True, "repetition_penalty": 2.0})
    assert repeated.choices[0].message.content != greedy
    short = chat(client, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    end = package.config.eos_token_id
    at_least = chat(client, max_tokens=6, logit_bias={str(end): 100}, extra_body={"min_tokens": 4})
    assert at_least.usage.completion_tokens == 4 and at_least.choices[0].finish_reason == "stop"
    ended = chat(
        client, max_tokens=6, extra_body={"stop_token_ids": [forced_token]}, logit_bias={str(forced_token): 100}
    )
    assert ended.choices[0].message.content == "" and ended.choices[0].finish_reason == "stop"


def token_ids(reply) -> list[int]:  # noqa: ANN001 - a chat completion or chunk
    """The chosen tokens of a reply asked with `return_tokens_as_token_ids`."""
    return [int(t.token.removeprefix("token_id:")) for t in reply.choices[0].logprobs.content]


def test_allowed_token_ids_limit_every_choice_greedy_or_sampled(client: openai.OpenAI, package: ChatPackage) -> None:
    allowed = package.tokenizer.encode(" king queen").ids[:2]
    as_ids = {"return_tokens_as_token_ids": True, "ignore_eos": True}
    greedy = chat(client, max_tokens=8, logprobs=True, extra_body=as_ids)
    assert set(token_ids(greedy)) - set(allowed)  # without it the model chooses other tokens
    for fields in ({}, {"temperature": 1.0, "seed": 2, "n": 3}):
        reply = chat(client, max_tokens=8, logprobs=True, extra_body={**as_ids, "allowed_token_ids": allowed}, **fields)
        for choice in reply.choices:
            chosen = [int(t.token.removeprefix("token_id:")) for t in choice.logprobs.content]
            assert len(chosen) == 8 and set(chosen) <= set(allowed), (fields, chosen)
    for wrong in ([], [package.config.vocab_size]):
        with pytest.raises(openai.BadRequestError) as refused:
            chat(client, max_tokens=2, extra_body={"allowed_token_ids": wrong})
        assert refused.value.param.split(".")[0] == "allowed_token_ids"


def test_bad_words_are_never_generated(client: openai.OpenAI, package: ChatPackage) -> None:
    def generated(**extra) -> list[int]:
        body = {"return_tokens_as_token_ids": True, "ignore_eos": True, **extra}
        reply = client.completions.create(model=CHAT_MODEL, prompt=SPEECH, max_tokens=24, logprobs=0, extra_body=body)
        return [int(t.removeprefix("token_id:")) for t in reply.choices[0].logprobs.tokens]

    greedy = generated()
    word = max(package.tokenizer.decode(greedy).split(), key=len)  # a word of the greedy continuation
    variants = [package.tokenizer.encode(w, add_special_tokens=False).ids for w in (word, " " + word)]
    chosen = generated(bad_words=[word])
    assert chosen != greedy
    for ids in variants:  # neither tokenization of the word appears, at the start of the text or inside it
        assert not any(chosen[i : i + len(ids)] == ids for i in range(len(chosen))), (word, ids, chosen)
    reply = chat(client, max_tokens=16, extra_body={"ignore_eos": True, "bad_words": [word]})
    assert word not in reply.choices[0].message.content.split()
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, max_tokens=2, extra_body={"bad_words": ["  "]})
    assert refused.value.param == "bad_words.0"


def test_return_tokens_as_token_ids_names_every_token(client: openai.OpenAI, package: ChatPackage) -> None:
    fields = {"max_tokens": 6, "extra_body": {"ignore_eos": True, "return_tokens_as_token_ids": True}}
    reply = chat(client, logprobs=True, top_logprobs=2, **fields)
    plain = chat(client, logprobs=True, max_tokens=6, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert all(t.token.startswith("token_id:") for t in content)
    assert (
        package.tokenizer.decode(token_ids(reply))
        == reply.choices[0].message.content
        == plain.choices[0].message.content
    )
    assert all(a.token.startswith("token_id:") for t in content for a in t.top_logprobs)
    assert b"".join(bytes(t.bytes) for t in content).decode() == reply.choices[0].message.content
    completion = client.completions.create(model=CHAT_MODEL, prompt="The king", logprobs=1, **fields)
    logprobs = completion.choices[0].logprobs
    assert package.tokenizer.decode([int(t.removeprefix("token_id:")) for t in logprobs.tokens]) == (
        completion.choices[0].text
    )
    assert all(key.startswith("token_id:") for top in logprobs.top_logprobs for key in top)
    streamed = list(chat(client, logprobs=True, stream=True, **fields))
    assert [t.token for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.content] == [
        t.token for t in content
    ]


def test_skip_special_tokens_false_keeps_them_in_the_text(client: openai.OpenAI, package: ChatPackage) -> None:
    end = package.config.eos_token_id
    assert end in package.token_texts.special
    forced = {"max_tokens": 3, "logit_bias": {str(end): 100}, "extra_body": {"ignore_eos": True}}
    assert chat(client, **forced).choices[0].message.content == ""  # skipped by default, as vLLM does
    kept = {**forced, "extra_body": {"ignore_eos": True, "skip_special_tokens": False}}
    assert chat(client, **kept).choices[0].message.content == package.tokenizer.id_to_token(end) * 3
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True, **kept))
    assert streamed == package.tokenizer.id_to_token(end) * 3
    completion = client.completions.create(model=CHAT_MODEL, prompt="The king", **kept)
    assert completion.choices[0].text == package.tokenizer.id_to_token(end) * 3


def test_continuous_usage_stats_put_usage_in_every_chunk(client: openai.OpenAI) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    fields = {"max_tokens": 6, "n": 2, "stream": True, "extra_body": {"ignore_eos": True}}
    for chunks in (
        list(chat(client, stream_options=options, **fields)),
        list(client.completions.create(model=CHAT_MODEL, prompt="The king", stream_options=options, **fields)),
    ):
        assert all(c.usage is not None for c in chunks)
        counts = [c.usage.completion_tokens for c in chunks]
        assert counts == sorted(counts) and counts[-1] == 12 and counts[-2] == 12
        assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
        assert chunks[-1].choices == []
    final_only = list(chat(client, stream_options={"include_usage": True}, **fields))
    assert [c.usage is not None for c in final_only] == [False] * (len(final_only) - 1) + [True]
    without = list(chat(client, stream_options={"continuous_usage_stats": True}, **fields))
    assert all(c.usage is None for c in without)  # as vLLM: only together with include_usage


def test_assistant_tool_calls_in_the_history_are_refused(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [*USER, {"role": "assistant", "content": "", "tool_calls": [call]}, *USER]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=2)
    assert refused.value.param == "messages.1.tool_calls"
    empty = [*USER, {"role": "assistant", "content": "Hi", "tool_calls": []}, *USER]
    assert client.chat.completions.create(model=CHAT_MODEL, messages=empty, max_tokens=2).choices


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"extra_body": {"best_of": 2}}, "best_of"),
        ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
        ({"extra_body": {"logits_processors": ["my_module.Processor"]}}, "logits_processors"),
        ({"extra_body": {"priority": 1}}, "priority"),
        ({"top_p": 5}, "top_p"),
        ({"extra_body": {"min_p": 3}}, "min_p"),
        ({"extra_body": {"top_k": -2}}, "top_k"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"temperature": 2.5}, "temperature"),
        ({"n": 17}, "n"),
        ({"logit_bias": {"100000": 1}}, "logit_bias"),
        ({"logit_bias": {"3": 150}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop": [str(i) for i in range(17)]}, "stop"),
    ],
)
def test_unsupported_and_out_of_range_parameters_are_refused_by_name(
    client: openai.OpenAI, fields: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, max_tokens=2, **fields)
    assert refused.value.param is not None and refused.value.param.split(".")[0] == param, refused.value.message
    assert refused.value.status_code == 400


def test_completions_refuse_suffix_and_out_of_range_prompts(client: openai.OpenAI) -> None:
    for fields, param in (
        ({"suffix": "end"}, "suffix"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt": [[1, 2], [3, 10**9]]}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"max_tokens": 0}, "max_tokens"),  # only an echo may generate nothing
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(**{"model": CHAT_MODEL, "prompt": "The king", "max_tokens": 2, **fields})
        assert refused.value.param == param, refused.value.message


def test_a_client_sending_explicit_defaults_is_served(client: openai.OpenAI) -> None:
    reply = chat(
        client,
        max_tokens=4,
        tools=openai.NOT_GIVEN,
        tool_choice="none",
        response_format={"type": "text"},
        extra_body={"best_of": 1, "top_p": None, "temperature": None, "stop": None, "priority": 0},
    )
    assert reply.choices[0].message.content == chat(client, max_tokens=4).choices[0].message.content
    automatic = chat(client, max_tokens=4, tool_choice="auto")  # with no tools, "auto" is plain text too
    assert automatic.choices[0].message.content == reply.choices[0].message.content


def scrape(client: openai.OpenAI) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus-client's own parser: (sample name, labels) -> value."""
    text = httpx.get(str(client.base_url).removesuffix("/v1/") + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_requests_tokens_and_latencies(client: openai.OpenAI) -> None:
    before = scrape(client)
    model = (("model", CHAT_MODEL),)
    reply = chat(client, max_tokens=6, n=2, extra_body={"ignore_eos": True})
    list(chat(client, max_tokens=5, stream=True, extra_body={"ignore_eos": True}))
    with pytest.raises(openai.BadRequestError):
        chat(client, max_tokens=2, top_p=5)
    after = scrape(client)

    def delta(name: str, labels: tuple = model) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    chat_route = "/v1/chat/completions"
    assert delta("trainonce_requests_total", (("endpoint", chat_route), ("status", "200"))) == 2
    assert delta("trainonce_requests_total", (("endpoint", chat_route), ("status", "400"))) == 1
    assert delta("trainonce_generation_tokens_total") == 12 + 5
    assert delta("trainonce_prompt_tokens_total") == 2 * reply.usage.prompt_tokens
    assert delta("trainonce_time_to_first_token_seconds_count") == 3  # one per choice
    assert delta("trainonce_inter_token_latency_seconds_count") == (12 - 2) + (5 - 1)
    assert delta("trainonce_e2e_request_latency_seconds_count") == 3
    assert after[("trainonce_requests_running", model)] == 0


def test_a_budget_error_names_the_field_the_client_sent(client: openai.OpenAI) -> None:
    for fields, param in (
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"max_completion_tokens": 100_000}, "max_completion_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            chat(client, **fields)
        assert refused.value.param == param, refused.value.message


@pytest.mark.parametrize(
    ("route", "fields", "headers"),
    [
        ("chat/completions", {"messages": USER, "max_tokens": 0}, {}),
        ("chat/completions", {"messages": USER, "max_tokens": 100_000}, {}),
        ("chat/completions", {"messages": USER, "logit_bias": {"100000": 1}}, {}),
        ("chat/completions", {"messages": USER, "extra_body_field": 1, "echo": True}, {}),
        ("chat/completions", {"messages": USER}, {"X-Max-Ms-Per-Token": "fast"}),
        ("completions", {"prompt": ""}, {}),
        ("completions", {"prompt": ["a", ""]}, {}),
        ("completions", {"prompt": [1, 10**9]}, {}),
        ("completions", {"prompt": "a", "max_tokens": 0}, {}),
        ("completions", {"prompt": "word " * 400}, {}),
    ],
)
def test_every_refusal_has_a_code(client: openai.OpenAI, route: str, fields: dict, headers: dict) -> None:
    refused = httpx.post(
        f"{client.base_url}{route}",
        json={"model": CHAT_MODEL, **fields},
        headers={"Authorization": f"Bearer {API_KEY}", **headers},
    )
    assert refused.status_code == 400 and isinstance(refused.json()["error"]["code"], str), refused.text
