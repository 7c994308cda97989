"""The OpenAI-compatible server: real app, real tiny model; in-process (TestClient) and as `lmlab serve`."""

import asyncio
import json
import re
import threading

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from conftest import live_server
from lmlab.config import ServeConfig
from lmlab.generate.engine import generate_text
from lmlab.generate.sampling import SamplingParams
from lmlab.serve.app import create_app
from lmlab.serve.errors import add_error_handlers
from lmlab.serve.routes import ServeState, health, models, router
from lmlab.serve.scheduler import QueueFull, Scheduler, Sequence
from lmlab.train.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def ckpt(trained_run):
    return load_checkpoint(trained_run)


@pytest.fixture(scope="module")
def client(ckpt):
    app = create_app(ckpt.model, ckpt.tokenizer, ServeConfig(model_name="tiny", max_new_tokens=64))
    with TestClient(app) as c:
        yield c


def events(response) -> list:
    """The JSON payloads of a server-sent-event stream; checks it ends with [DONE]."""
    lines = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_health_models_and_schema(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert client.get("/v1/models/tiny").json() == models["data"][0]
    missing = client.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(paths)


def test_openapi_names_the_response_schema_of_every_route(client):
    schema = client.get("/openapi.json").json()
    paths, components = schema["paths"], schema["components"]["schemas"]

    def named(response: dict) -> str:
        return response["content"]["application/json"]["schema"]["$ref"].removeprefix("#/components/schemas/")

    for path, method, name in [("/v1/completions", "post", "TextCompletion"),
                               ("/v1/chat/completions", "post", "ChatCompletion"),
                               ("/v1/models", "get", "ModelList"), ("/v1/models/{model}", "get", "Model"),
                               ("/health", "get", "Health")]:
        responses = paths[path][method]["responses"]
        assert named(responses["200"]) == name
        assert all(named(r) == "ErrorResponse" for status, r in responses.items() if status != "200")
    for path, chunk in [("/v1/completions", "TextCompletionChunk"), ("/v1/chat/completions", "ChatCompletionChunk")]:
        responses = paths[path]["post"]["responses"]
        assert {"400", "401", "404", "429", "504"} <= set(responses) and "422" not in responses  # 400, not 422
        events = responses["200"]["content"]["text/event-stream"]["itemSchema"]
        json_event, done = events["properties"]["data"]["anyOf"]
        assert [r["$ref"] for r in json_event["contentSchema"]["anyOf"]] == [
            f"#/components/schemas/{chunk}", "#/components/schemas/ErrorResponse"] and done == {"const": "[DONE]"}
    assert set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(schema))) <= set(components)  # all resolve
    # the documented fields are the fields sent, nulls included
    assert set(client.get("/health").json()) == set(components["Health"]["required"])
    completion = client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}).json()
    assert list(completion) == list(components["TextCompletion"]["properties"])
    assert completion["choices"][0]["logprobs"] is None
    error = client.post("/v1/completions", json={"model": "other", "prompt": "a"}).json()
    assert list(error["error"]) == list(components["ErrorDetail"]["properties"]) and error["error"]["param"] == "model"


def test_handlers_alone_in_an_app_of_their_own(ckpt):
    """The router in a bare FastAPI app with its own state (no create_app), and handlers called directly."""
    state = ServeState.start(ckpt.model, ckpt.tokenizer, ServeConfig(model_name="solo", api_key="k"))
    try:
        app = FastAPI()
        app.state.serve = state
        app.include_router(router)
        add_error_handlers(app)
        with TestClient(app) as c:
            assert c.get("/health").json() == {"status": "ok", "model": "solo", "queued": 0, "running": 0,
                                             "cache_width": 0}
            assert c.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
            key = {"Authorization": "Bearer k"}
            model = {"id": "solo", "object": "model", "created": state.created, "owned_by": "lmlab"}
            assert c.get("/v1/models", headers=key).json() == {"object": "list", "data": [model]}
            assert c.get("/v1/models/solo").status_code == 401
            assert c.get("/v1/models/solo", headers=key).json() == model
            answer = c.post("/v1/completions", json={"model": "solo", "prompt": "the ", "max_tokens": 3}, headers=key)
            assert answer.status_code == 200 and answer.json()["usage"]["prompt_tokens"] == 4
        assert asyncio.run(health(state)).model == "solo"
        assert [m.id for m in asyncio.run(models(state)).data] == ["solo"]
    finally:
        state.close()
    with pytest.raises(ValueError, match="model_name"):
        ServeState.start(ckpt.model, ckpt.tokenizer, ServeConfig())


def test_completion_equals_the_engine_and_streaming_equals_non_streaming(client, ckpt):
    body = {"model": "tiny", "prompt": "the quick ", "max_tokens": 12, "temperature": 0}
    full = client.post("/v1/completions", json=body).json()
    expected = generate_text(ckpt.model, ckpt.tokenizer, "the quick ", SamplingParams(max_new_tokens=12, temperature=0))
    assert full["object"] == "text_completion" and full["choices"][0]["text"] == expected
    assert full["usage"]["prompt_tokens"] == len(ckpt.tokenizer.encode("the quick "))
    assert full["usage"]["total_tokens"] == full["usage"]["prompt_tokens"] + full["usage"]["completion_tokens"]
    chunks = events(client.post("/v1/completions", json={**body, "stream": True,
                                                         "stream_options": {"include_usage": True}}))
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == expected and len(chunks) > 3
    assert chunks[-2]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == full["usage"]


def test_several_prompts_n_choices_and_seeds(client):
    body = {"model": "tiny", "prompt": ["the ", "a lazy "], "n": 2, "max_tokens": 8, "temperature": 1.0, "seed": 5}
    first = client.post("/v1/completions", json=body).json()
    again = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert first["choices"] == again["choices"]  # seeded: reproducible
    assert first["choices"][0]["text"] != first["choices"][1]["text"]  # choice i uses seed + i


def test_stop_strings_and_echo(client):
    body = {"model": "tiny", "prompt": "the quick ", "max_tokens": 20, "temperature": 0}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = text[4:6]
    cut = client.post("/v1/completions", json={**body, "stop": stop}).json()["choices"][0]
    assert cut["text"] == text.split(stop)[0] and cut["finish_reason"] == "stop"
    echoed = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]["text"]
    assert echoed == "the quick " + text


def test_chat_completion_streams_the_same_answer(client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 10, "temperature": 0}  # (the tiny model's context is 32 characters)
    full = client.post("/v1/chat/completions", json=body).json()
    assert full["object"] == "chat.completion"
    message = full["choices"][0]["message"]
    assert message["role"] == "assistant"
    chunks = events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]


@pytest.mark.parametrize("body, status, fragment", [
    ('{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    ('{"model": "other", "prompt": "a"}', 404, "does not exist"),
    ('{"model": "tiny", "prompt": "a", "temperature": "hot"}', 400, "temperature"),
    ('{"model": "tiny", "prompt": "a", "max_tokens": -3}', 400, "max_tokens"),
    ('{"model": "tiny", "prompt": "a", "max_tokens": 100000}', 400, "at most 64"),
    ('{"model": "tiny", "prompt": "a", "top_p": 0}', 400, "top_p"),
    ('{"model": "tiny", "prompt": "a", "n": 1000}', 400, "n"),
    ('{"model": "tiny", "prompt": ""}', 400, "empty"),
    ('{"model": "tiny", "prompt": [1, 99999]}', 400, "token ids"),
    ('{"model": "tiny", "prompt": "a", "logprobs": 2}', 400, "logprobs"),
    ('{"model": "tiny", "prompt": "a", "best_of": 3}', 400, "best_of is not supported"),
    ('{"model": "tiny", "prompt": "a", "suffix": "x"}', 400, "suffix"),
    ('{"model": "tiny", "prompt": "a", "stream_options": {"include_usage": true}}', 400, "only allowed when stream"),
    ('{"model": "tiny", "prompt": "' + "the quick brown fox " * 3 + '"}', 400, "context"),
    ('{"model": "tiny", "prompt": "a", "stop": ["", "x"]}', 400, "stop"),
    ('{"prompt": "a"}', 400, "model"),
    ('[1, 2]', 400, "body"),
])
def test_bad_requests_get_openai_style_errors_and_the_server_keeps_serving(client, body, status, fragment):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"]
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}).status_code == 200


LONE_SURROGATE = '"a\\ud800b"'  # JSON text for a string no tokenizer can encode


@pytest.mark.parametrize("stream", ["false", "true"])
@pytest.mark.parametrize("path, body, fragment", [
    ("/v1/completions", '{"model": "tiny", "prompt": ' + LONE_SURROGATE + '}', "prompt: not valid Unicode"),
    ("/v1/completions", '{"model": "tiny", "prompt": ["a", ' + LONE_SURROGATE + ']}', "prompt.1: not valid Unicode"),
    ("/v1/completions", '{"model": ' + LONE_SURROGATE + ', "prompt": "a"}', "model: not valid Unicode"),
    ("/v1/completions", '{"model": "tiny", "prompt": "a", "stop": ' + LONE_SURROGATE + '}', "stop: not valid"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": ' + LONE_SURROGATE + '}]}',
     "messages.0.content: not valid Unicode"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": ' + LONE_SURROGATE + '}]}]}', "messages.0.content.0.text: not valid Unicode"),
    ("/v1/completions", '{"model": "tiny", "prompt": "a", "seed": 18446744073709551616}', "seed"),
    ("/v1/completions", '{"model": "tiny", "prompt": "a", "seed": -9223372036854775809}', "seed"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "seed": 1e400}',
     "seed"),
])
def test_text_that_is_not_unicode_and_seeds_beyond_64_bits_get_400(client, path, body, fragment, stream):
    body = body[:-1] + f', "max_tokens": 2, "stream": {stream}}}'
    r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]


@pytest.mark.parametrize("extreme", [{"temperature": 1e-40}, {"temperature": 1e-300}, {"repetition_penalty": 1e-30},
                                     {"top_p": 5e-324}, {"n": 2.0, "max_tokens": 3.0, "prompt": [5.0, 6]},
                                     {"seed": -(2 ** 63), "n": 2}, {"seed": 2 ** 63 - 1, "n": 8},
                                     {"repetition_penalty": 5e-324, "temperature": 1e-8, "presence_penalty": 1e-8,
                                      "top_k": 1}])
def test_extreme_but_valid_sampling_values_generate(client, extreme):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 3, **extreme})
    assert r.status_code == 200, r.text


def test_chat_errors(client):
    for body in [{"model": "tiny", "messages": []}, {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]},
                 {"model": "tiny", "messages": [{"role": "user", "content": 3}]}]:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    hi = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra, fragment in [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools (function calling)"),
                            ({"response_format": {"type": "json_object"}}, "response_format 'json_object'"),
                            ({"stream_options": {"include_usage": True}}, "only allowed when stream is true")]:
        r = client.post("/v1/chat/completions", json={**hi, **extra})
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    assert client.post("/v1/chat/completions", json={**hi, "response_format": {"type": "text"}}).status_code == 200
    assert client.post("/v1/nothing", json={}).json()["error"]["type"] == "not_found_error"


def test_body_limit_api_key_and_timeout(ckpt):
    cfg = ServeConfig(model_name="tiny", api_key="sesame", max_body_bytes=2000, request_timeout=0.000001)
    with TestClient(create_app(ckpt.model, ckpt.tokenizer, cfg)) as c:
        body = {"model": "tiny", "prompt": "the ", "max_tokens": 5}
        assert c.post("/v1/completions", json=body).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer sesame"}
        assert c.get("/v1/models", headers=auth).status_code == 200
        assert c.get("/health").status_code == 200  # liveness needs no key
        big = c.post("/v1/completions", json={**body, "prompt": "x" * 5000}, headers=auth)
        assert big.status_code == 413 and "larger than 2000" in big.json()["error"]["message"]
        slow = c.post("/v1/completions", json=body, headers=auth)
        assert slow.status_code == 504 and slow.json()["error"]["type"] == "timeout_error"
        streamed = events(c.post("/v1/completions", json={**body, "stream": True}, headers=auth))
        assert streamed[-1]["error"]["type"] == "timeout_error"


def test_scheduler_bounds_its_queue_and_batches_waiting_requests(ckpt):
    scheduler = Scheduler(ckpt.model, ckpt.tokenizer, max_batch_size=4, max_queue=3)
    loop = asyncio.new_event_loop()
    try:
        with scheduler.lock:  # hold the worker: requests wait in the queue
            queue = asyncio.Queue()
            seqs = [Sequence([1, 2], SamplingParams(max_new_tokens=3, temperature=0), i, queue, loop) for i in range(3)]
            scheduler.submit(seqs[:2])
            scheduler.submit(seqs[2:])
            with pytest.raises(QueueFull):
                scheduler.submit([Sequence([1], SamplingParams(), 0, queue, loop)])
            assert scheduler.queued == 3
        done = []

        async def collect():
            while len(done) < 3:
                kind, index, value = await asyncio.wait_for(queue.get(), 30)
                if kind == "done":
                    done.append(value)
        loop.run_until_complete(collect())
        assert len({tuple(d.token_ids) for d in done}) == 1  # same prompt, greedy: same answer in one batch
    finally:
        scheduler.close()
        loop.close()


def test_a_sequence_the_engine_refuses_gets_an_error_and_the_worker_goes_on(ckpt):
    """The handlers check every request, but should the engine still refuse one, its request gets an error
    event; the worker thread must not die (every later request would wait for its timeout)."""
    scheduler = Scheduler(ckpt.model, ckpt.tokenizer, max_batch_size=4, max_queue=4)
    loop = asyncio.new_event_loop()
    try:
        queue = asyncio.Queue()
        bad = Sequence([1, 2], SamplingParams(max_new_tokens=0), 0, queue, loop)
        good = Sequence([1, 2], SamplingParams(max_new_tokens=2, temperature=0), 1, queue, loop)
        scheduler.submit([bad, good])

        async def collect():
            ends = {}
            while len(ends) < 2:
                kind, index, _ = await asyncio.wait_for(queue.get(), 30)
                if kind != "text":
                    ends[kind] = index
            return ends
        events = loop.run_until_complete(collect())
        assert events == {"error": 0, "done": 1} and scheduler.worker.is_alive()
    finally:
        scheduler.close()
        loop.close()


def test_an_app_started_again_after_a_shutdown_still_generates(ckpt):
    """An ASGI lifespan may run more than once on one app (schemathesis runs one per test): each start needs
    a generation worker, or requests wait until their timeout."""
    app = create_app(ckpt.model, ckpt.tokenizer, ServeConfig(model_name="tiny", request_timeout=30))
    body = {"model": "tiny", "prompt": "the ", "max_tokens": 2}
    for _ in range(2):
        with TestClient(app) as c:
            assert c.post("/v1/completions", json=body).status_code == 200


def test_an_event_for_a_closed_loop_cancels_the_sequence():
    """The worker thread outliving the server's event loop (shutdown) must not die on its next event."""
    loop = asyncio.new_event_loop()
    seq = Sequence([1], SamplingParams(), 0, asyncio.Queue(), loop)
    loop.close()
    seq.send("text", 0, "x")
    assert seq.cancelled


def test_openai_client_against_lmlab_serve(trained_run, ckpt):
    """The official openai package, pointed at `lmlab serve` in a subprocess, with an API key."""
    openai = pytest.importorskip("openai")
    torch.manual_seed(0)
    with live_server(trained_run, "--api-key", "k3y", "--model-name", "tiny") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        done = client.completions.create(model="tiny", prompt="the quick ", max_tokens=10, temperature=0)
        expected = generate_text(ckpt.model, ckpt.tokenizer, "the quick ", SamplingParams(max_new_tokens=10, temperature=0))
        assert done.choices[0].text == expected and done.usage.completion_tokens >= 1
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                max_tokens=8, temperature=0, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=8, temperature=0)
        assert "".join(pieces) == whole.choices[0].message.content
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=5)
        # concurrent requests (batched together by the server) each get what they get alone
        prompts = ["the ", "a lazy dog ", "seven wizards quietly ", "jolly "]
        alone = [generate_text(ckpt.model, ckpt.tokenizer, p, SamplingParams(max_new_tokens=12, temperature=0))
                 for p in prompts]
        results = [None] * len(prompts)

        def ask(i):
            results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=12,
                                                   temperature=0).choices[0].text
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == alone


def test_serve_command_refuses_bad_settings_in_one_line(trained_run, capsys):
    import socket

    from lmlab.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for argv, fragment in [(["--port", str(port)], "cannot listen"), (["--port", "70000"], "port"),
                               (["--max-batch-size", "0"], "max_batch_size"),
                               (["--request-timeout", "-1"], "request_timeout")]:
            assert main(["serve", str(trained_run), *argv]) == 1
            err = capsys.readouterr().err
            assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err


def test_a_prompt_limit_beyond_the_context_is_announced(ckpt, caplog):
    context = ckpt.model.context_length
    with caplog.at_level("WARNING", logger="lmlab"):
        create_app(ckpt.model, ckpt.tokenizer, ServeConfig(model_name="tiny", max_prompt_tokens=context * 2)).state.serve.close()
    assert f"prompts are limited to {context - 1} tokens" in caplog.text


def test_stream_events_stay_one_line_whatever_the_text():
    import json

    from lmlab.serve.routes import sse
    from lmlab.serve.schemas import ErrorResponse

    text = "a\u2028b\u2029c\x85d\ne"
    event = sse(ErrorResponse.model_validate({"error": {"message": text, "type": "t"}}))
    lines = event.splitlines()  # as httpx's aiter_lines splits
    assert lines[0].startswith("data: ") and lines[1:] == [""]
    assert json.loads(lines[0][len("data: "):])["error"]["message"] == text
