"""Every bad request gets its documented status and error body; the safety switches hold.

OpenAI routes answer `{"error": {"message", "type", "param", "code"}}`;
Ollama routes `{"error": "..."}`. Worker refusals map to HTTP: busy → 429
with Retry-After, prompt_too_long → 400 context_length_exceeded, no worker → 503.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest
from click.testing import CliRunner
from conftest import TINYSTORIES, WorkerProcess
from gateway_process import GatewayProcess
from test_gateway import _metric, _wait, ping

from ffai_client.gateway.cli import main as gateway_main

MODEL = "tinystories-260k"
HI = [{"role": "user", "content": "Hi"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def gateway(tinystories_worker: WorkerProcess) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tinystories_worker.endpoint)
    yield gw
    gw.stop()


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HI, "max_tokens": 4, **fields}


# (path, body, status, code, param)
OPENAI_CASES: list[tuple[str, Any, int, str, str | None]] = [
    (CHAT, b"{not json", 400, "invalid_json", None),
    (CHAT, [1, 2], 400, "invalid_json", None),
    (CHAT, {"model": MODEL}, 400, "missing_required_parameter", "messages"),
    (CHAT, chat(temperature="hot"), 400, "invalid_value", "temperature"),
    (CHAT, chat(top_p=2), 400, "invalid_value", "top_p"),
    (CHAT, chat(max_tokens=0), 400, "invalid_value", "max_tokens"),
    (CHAT, chat(max_completion_tokens=-1), 400, "invalid_value", "max_completion_tokens"),
    (CHAT, chat(stop=["a", ""]), 400, "invalid_value", "stop"),
    (CHAT, chat(logit_bias={"x": 1}), 400, "invalid_value", "logit_bias"),
    (CHAT, chat(logit_bias={"100000": 1}), 400, "invalid_parameters", None),
    (CHAT, chat(logprobs=True), 400, "unsupported_parameter", "logprobs"),
    (CHAT, chat(top_logprobs=3), 400, "unsupported_parameter", "top_logprobs"),
    (CHAT, chat(response_format={"type": "bogus"}), 400, "invalid_value", "response_format"),
    (CHAT, chat(response_format="json"), 400, "invalid_value", "response_format"),
    (CHAT, chat(n=0), 400, "invalid_value", "n"),
    (
        CHAT,
        chat(tool_choice="required", tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "unsupported_parameter",
        "tool_choice",
    ),
    (CHAT, chat(tools=[{"type": "function"}]), 400, "invalid_value", "tools[0]"),
    (CHAT, chat(stream_options={"include_usage": True}), 400, "invalid_value", "stream_options"),
    (
        CHAT,
        chat(messages=[{"role": "robot", "content": "x"}]),
        400,
        "invalid_value",
        "messages[0].role",
    ),
    (
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
        "unsupported_parameter",
        "messages[0].content[0]",
    ),
    (CHAT, chat(model="no-such-model"), 404, "model_not_found", "model"),
    (
        CHAT,
        chat(messages=[{"role": "user", "content": "hello " * 600}]),
        400,
        "context_length_exceeded",
        "messages",
    ),
    (
        COMPLETIONS,
        {"model": MODEL, "prompt": "Once", "suffix": "end"},
        400,
        "unsupported_parameter",
        "suffix",
    ),
    (
        COMPLETIONS,
        {"model": MODEL, "prompt": "hello " * 600, "stream": True},
        400,
        "context_length_exceeded",
        "prompt",
    ),
    (COMPLETIONS, {"model": MODEL}, 400, "missing_required_parameter", "prompt"),
    (
        COMPLETIONS,
        {"model": MODEL, "prompt": "x", "best_of": 3},
        400,
        "unsupported_parameter",
        "best_of",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), OPENAI_CASES)
def test_openai_bad_requests(
    gateway: GatewayProcess, path: str, body: Any, status: int, code: str, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(gateway.url + path, content=content, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


OLLAMA_CASES: list[tuple[str, Any, int, str]] = [
    ("/api/generate", b"[", 400, "not valid JSON"),
    (
        "/api/generate",
        {"model": MODEL, "prompt": "x", "options": {"num_ctx": 100000}},
        400,
        "options.num_ctx: 100000 exceeds the model's context length (512 tokens)",
    ),
    (
        "/api/generate",
        {"model": MODEL, "prompt": "x", "options": {"mirostat": 2}},
        400,
        "options.mirostat",
    ),
    ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"warp": 9}}, 400, "options.warp"),
    (
        "/api/generate",
        {"model": MODEL, "prompt": "x", "options": {"num_predict": 0}},
        400,
        "options.num_predict",
    ),
    ("/api/generate", {"model": MODEL, "prompt": "x", "format": "json"}, 400, "format"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "images": ["aGk="]}, 400, "images"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/api/chat", {"model": "llama3:8b", "messages": HI}, 404, "llama3:8b"),
    (
        "/api/chat",
        {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 600}]},
        400,
        "prompt",
    ),
    (
        "/api/chat",
        {"model": MODEL, "messages": HI, "options": {"temperature": "warm"}},
        400,
        "options.temperature",
    ),
    ("/api/show", {}, 400, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "fragment"), OLLAMA_CASES)
def test_ollama_bad_requests(
    gateway: GatewayProcess, path: str, body: Any, status: int, fragment: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(gateway.url + path, content=content, timeout=30)
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"]
    assert fragment in response.json()["error"]


def test_official_clients_raise_with_the_status(gateway: GatewayProcess) -> None:
    oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model=MODEL, messages=HI, logprobs=True)  # type: ignore[arg-type]
    assert bad.value.code == "unsupported_parameter" and bad.value.param == "logprobs"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=gateway.url).generate(MODEL, "x", options={"num_ctx": 4096})
    assert err.value.status_code == 400 and "num_ctx" in err.value.error


def test_unknown_routes_and_methods(gateway: GatewayProcess) -> None:
    missing = httpx.get(gateway.url + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(gateway.url + CHAT)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert httpx.get(gateway.url + "/api/nothing").json() == {
        "error": "GET /api/nothing: Not Found"
    }


def test_no_worker_is_503() -> None:
    gw = GatewayProcess("ipc:///nonexistent-ffai-dir/w.sock")
    try:
        response = httpx.post(gw.url + CHAT, json=chat(), timeout=30)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "worker_unavailable"
        assert response.headers["retry-after"]
        ollama_reply = httpx.post(gw.url + "/api/chat", json={"model": MODEL, "messages": HI})
        assert ollama_reply.status_code == 503 and "error" in ollama_reply.json()
        assert httpx.get(gw.url + "/v1/models").json() == {"object": "list", "data": []}
    finally:
        gw.stop()


LONG = {
    "model": MODEL,
    "prompt": "Once upon a time",
    "max_tokens": 480,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}


def test_busy_is_429_with_retry_after(fresh_worker_factory: type[WorkerProcess]) -> None:
    worker = fresh_worker_factory(TINYSTORIES, "--max-batch", "1", "--max-queue", "0")
    gw = GatewayProcess(worker.endpoint)
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            with http.stream("POST", COMPLETIONS, json=LONG) as running:
                assert running.status_code == 200
                lines = running.iter_lines()  # kept: dropping it would close the stream
                next(lines)
                busy = http.post(COMPLETIONS, json={**LONG, "stream": False})
                assert busy.status_code == 429
                assert busy.headers["retry-after"] == "1"
                assert busy.json()["error"]["code"] == "rate_limit_exceeded"
                streamed_busy = http.post(COMPLETIONS, json=LONG)  # streams fail before starting
                assert streamed_busy.status_code == 429
                olla = http.post("/api/generate", json={"model": MODEL, "prompt": "x", "raw": True})
                assert olla.status_code == 429 and "busy" in olla.json()["error"]
    finally:
        gw.stop()


def test_leaving_while_queued_cancels_the_queued_request(
    fresh_worker_factory: type[WorkerProcess],
) -> None:
    worker = fresh_worker_factory(TINYSTORIES, "--max-batch", "1", "--max-queue", "4")
    gw = GatewayProcess(worker.endpoint)
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as http:
            with http.stream("POST", COMPLETIONS, json=LONG) as running:
                lines = running.iter_lines()  # kept: dropping it would close the stream
                next(lines)
                # A second request waits behind the first; its client then hangs up.
                raw = socket.create_connection(("127.0.0.1", gw.port))
                body = json.dumps({**LONG, "max_tokens": 8}).encode()
                raw.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                _wait(lambda: ping(worker.endpoint) == (1, 1), 5.0)
                raw.close()
                _wait(lambda: ping(worker.endpoint) == (1, 0), 2.0)
                assert _metric(gw, "ffai_gateway_cancels_total") == 1
    finally:
        gw.stop()


def test_api_key_cors_and_body_limit(tinystories_worker: WorkerProcess) -> None:
    origin = "http://editor.example"
    gw = GatewayProcess(
        tinystories_worker.endpoint,
        extra=("--api-key", "s3cret", "--cors-origin", origin, "--max-body-bytes", "4096"),
    )
    try:
        denied = httpx.post(gw.url + CHAT, json=chat())
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.post(gw.url + "/api/chat", json=chat(), headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
        oai = openai.OpenAI(base_url=gw.url + "/v1", api_key="s3cret", max_retries=0)
        assert oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices  # type: ignore[arg-type]
        preflight = httpx.options(
            gw.url + CHAT, headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
        )
        assert preflight.headers["access-control-allow-origin"] == origin
        auth = {"Authorization": "Bearer s3cret"}
        big = httpx.post(
            gw.url + CHAT,
            headers=auth,
            json=chat(messages=[{"role": "user", "content": "x" * 5000}]),
        )
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    finally:
        gw.stop()


def test_cors_is_off_by_default(gateway: GatewayProcess) -> None:
    preflight = httpx.options(
        gateway.url + CHAT,
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    plain = httpx.get(gateway.url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in plain.headers


def test_remote_listen_needs_allow_remote_and_a_key() -> None:
    runner = CliRunner()
    refused = runner.invoke(gateway_main, ["--listen", "0.0.0.0:18999"])
    assert refused.exit_code == 2 and "--allow-remote" in refused.output
    keyless = runner.invoke(
        gateway_main,
        ["--listen", "0.0.0.0:18999", "--allow-remote"],
        env={"FFAI_GATEWAY_API_KEY": ""},
    )
    assert keyless.exit_code == 2 and "--api-key" in keyless.output
    bad = runner.invoke(gateway_main, ["--listen", "nowhere"])
    assert bad.exit_code == 2 and "HOST:PORT" in bad.output


def test_slow_reader_does_not_delay_other_streams(gateway: GatewayProcess) -> None:
    """A client that stops reading holds only its own stream; another one finishes meanwhile."""
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        with http.stream("POST", COMPLETIONS, json=LONG) as stalled:
            assert stalled.status_code == 200  # opened, then never read
            start = time.monotonic()
            quick = http.post(COMPLETIONS, json={"model": MODEL, "prompt": "Hi", "max_tokens": 8})
            assert quick.status_code == 200 and quick.json()["usage"]["completion_tokens"] == 8
            assert time.monotonic() - start < 10.0
