"""Regenerate the golden vectors of protocol/SPEC.md from the Python reference codec.

    .venv/bin/python protocol/vectors/make_vectors.py

Writes one JSON file per valid frame into this folder and the frames a worker
must refuse into `invalid/client_frames.json`. tests/test_protocol.py checks
that the committed files equal what this script builds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]

from ffai_client import protocol as p
from ffai_client.errors import ERROR_CODES
from ffai_client.types import (
    ChatMessage,
    ChatTemplateOptions,
    GenerationParameters,
    GenerationStats,
    TokenLogprob,
    TopLogprob,
)

HERE = Path(__file__).resolve().parent
C2W, W2C = "client_to_worker", "worker_to_client"

UNICODE_TEXT = (
    "Grüße, 世界! Family 👨\u200d👩\u200d👧\u200d👦, flag 🏳️\u200d🌈,"
    " wave 👋🏽, e + combining acute: e\u0301"
)
LIMITS = p.Limits(
    max_message_bytes=16 << 20,
    max_prompt_tokens=511,
    max_tokens=512,
    max_batch=16,
    max_queue=64,
    context_length=512,
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
CONVERSATION = [
    ChatMessage(role="system", content="You are a helpful assistant. Réponds en français."),
    ChatMessage(role="user", content=[{"type": "text", "text": "Quel temps à Zürich ? 🌦️"}]),
    ChatMessage(
        role="assistant",
        content=None,
        thinking="The user wants the weather: call the tool.",
        tool_calls=[
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
            }
        ],
    ),
    ChatMessage(
        role="tool",
        content='{"sky": "rain", "celsius": 14}',
        tool_call_id="call_0",
        name="get_weather",
    ),
]
STATS = GenerationStats(
    prompt_tokens=5,
    generated_tokens=64,
    context_size=512,
    queue_time_s=0.0,
    prefill_time_s=0.00731,
    decode_time_s=0.389,
    time_to_first_token_ms=8.02,
    steady_tokens_per_second=166.25,
    baseline_memory_bytes=1048576,
    post_prefill_memory_bytes=1114112,
    post_decode_memory_bytes=1179648,
    prefill_peak_memory_bytes=1245184,
    decode_peak_memory_bytes=1310720,
    weights_bytes=1040384,
    kv_cache_allocated_bytes=65536,
    kv_cache_used_bytes=17408,
    cached_prompt_tokens=0,
    max_batch_size=3,
)

# (file stem, description, message)
CLIENT_FRAMES: list[tuple[str, str, p.ClientMessage]] = [
    ("hello", "hello naming the client", p.Hello(client="ffai-vim/0.3 (lua)")),
    ("hello_empty", "hello with no fields", p.Hello()),
    (
        "generate_prompt",
        "the smallest generate: an id and a prompt, all defaults",
        p.Generate(id="1", prompt="Once upon a time"),
    ),
    (
        "generate_unicode",
        "non-ASCII prompt (ZWJ family, ZWJ flag, skin tone, combining mark), no special tokens",
        p.Generate(id="ü-2", prompt=UNICODE_TEXT, add_special_tokens=False),
    ),
    (
        "generate_tokens",
        "a prompt given as token ids (ids up to 2^31-1 are valid frames)",
        p.Generate(
            id="tok-3",
            tokens=[1, 9038, 2501, 263, 931, 2147483647],
            params=GenerationParameters(max_tokens=16, temperature=0.0),
        ),
    ),
    (
        "generate_params",
        "every parameter set; logit_bias is written sorted by token id; seed is uint64 max",
        p.Generate(
            id="params-4",
            prompt="Lily and Ben",
            params=GenerationParameters(
                max_tokens=300,
                temperature=1.0,
                top_p=0.9,
                top_k=40,
                min_p=0.05,
                repetition_penalty=1.1,
                repetition_context_size=64,
                presence_penalty=0.5,
                frequency_penalty=-0.25,
                logit_bias={50256: -100.0, 7: 2.5, 0: -1.0},
                seed=2**64 - 1,
                stop=["\n\n", "The End", "終"],
                stop_token_ids=[2, 32000],
                stop_on_eos=False,
                prefill_step_size=256,
            ),
        ),
    ),
    (
        "generate_warm",
        "a warm-up: prefill only, the prompt stays cached; max_tokens 1 for old workers",
        p.Generate(
            id="warm-6",
            prompt="You are a helpful assistant. The open file:",
            params=GenerationParameters(max_tokens=1),
            warm=True,
        ),
    ),
    (
        "generate_messages",
        "a chat generate: tool call, tool result, content parts, thinking, options with tools",
        p.Generate(
            id="chat-5",
            messages=CONVERSATION,
            params=GenerationParameters(max_tokens=128, temperature=0.7, stop=["<|im_end|>"]),
            options=ChatTemplateOptions(
                enable_thinking=False,
                tools=[WEATHER_TOOL],
                extra={"date_string": "24 Nov 2025", "custom_flag": True},
            ),
        ),
    ),
    (
        "generate_json_schema",
        "structured output: OpenAI's json_schema response_format, with logprobs",
        p.Generate(
            id="json-11",
            prompt="A person as JSON:",
            params=GenerationParameters(
                max_tokens=64,
                response_format={
                    "type": "json_schema",
                    "json_schema": {
                        "name": "person",
                        "strict": True,
                        "schema": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string", "maxLength": 20},
                                "age": {"type": "integer", "minimum": 0, "maximum": 130},
                            },
                            "required": ["name", "age"],
                            "additionalProperties": False,
                        },
                    },
                },
                logprobs=2,
            ),
        ),
    ),
    (
        "generate_choice",
        "a choice constraint, greedy, with prompt logprobs",
        p.Generate(
            id="choice-12",
            prompt="Is the sky blue? Answer:",
            params=GenerationParameters(
                temperature=0.0,
                response_format={"type": "choice", "choices": [" yes", " no"]},
                prompt_logprobs=True,
            ),
        ),
    ),
    (
        "generate_regex",
        "a regex constraint",
        p.Generate(
            id="re-13",
            prompt="Date:",
            params=GenerationParameters(
                response_format={"type": "regex", "pattern": "[0-9]{4}-[0-9]{2}-[0-9]{2}"}
            ),
        ),
    ),
    ("cancel", "cancel a generate", p.Cancel(id="chat-5")),
    ("ping", "ping with an id", p.Ping(id="p1")),
    ("ping_no_id", "the client watchdog's id-less ping", p.Ping()),
    ("info", "ask for model and load information", p.InfoRequest(id="info-6")),
    (
        "tokenize",
        "tokenize non-ASCII text without special tokens",
        p.TokenizeRequest(id="t-7", text="naïve café 🙂", add_special_tokens=False),
    ),
    (
        "detokenize",
        "detokenize keeping special tokens",
        p.DetokenizeRequest(id="d-8", tokens=[1, 9038, 2501, 2], skip_special_tokens=False),
    ),
    (
        "render",
        "render a conversation, default options",
        p.RenderRequest(id="r-9", messages=CONVERSATION[:2]),
    ),
    (
        "render_continue",
        "render that continues the final (assistant) message",
        p.RenderRequest(
            id="r-10",
            messages=[
                ChatMessage(role="user", content="Write a haiku."),
                ChatMessage(role="assistant", content="Autumn moonlight—"),
            ],
            options=ChatTemplateOptions(add_generation_prompt=False, continue_final_message=True),
        ),
    ),
]

ERROR_MESSAGES = {
    "bad_frame": (None, "not one valid msgpack object: Unpack failed: incomplete input"),
    "unsupported_version": ("a", "protocol version 2 is not supported (this end speaks 1)"),
    "unknown_type": ("b", "unknown message type 'explode'"),
    "invalid_request": ("c", "generate.prompt/tokens/messages: give exactly one, got none"),
    "invalid_parameters": ("d", "generate.params are invalid: top_p must be in (0, 1], got 7.0"),
    "prompt_too_long": ("e", "the prompt has 2049 tokens; at most 511 fit (context length 512)"),
    "duplicate_id": ("f", "request id 'f' is already active"),
    "busy": ("g", "the waiting queue is full (64 requests)"),
    "no_chat_template": ("h", "this model has no chat template"),
    "template_error": ("i", "Conversation roles must alternate user/assistant/user/assistant/…"),
    "shutting_down": ("j", "the worker is stopping"),
    "internal": ("k", "RuntimeError: something unexpected"),
}

WORKER_FRAMES: list[tuple[str, str, p.WorkerMessage]] = [
    (
        "welcome",
        "answer to hello",
        p.Welcome(
            protocol=1,
            server="ffai-worker/0.1.0",
            model="tinystories-260k",
            heartbeat_interval_s=1.0,
            limits=LIMITS,
        ),
    ),
    ("chunk", "a streamed chunk", p.Chunk(id="1", text=" there", tokens=[612], position=6)),
    (
        "chunk_emoji",
        "a ZWJ emoji that took several tokens comes out whole",
        p.Chunk(
            id="ü-2", text=" 👩\u200d💻", tokens=[29871, 243, 162, 148, 172, 30722], position=31
        ),
    ),
    (
        "chunk_partial_utf8",
        "tokens whose bytes do not complete a character yet: empty text",
        p.Chunk(id="ü-2", text="", tokens=[243, 162], position=33),
    ),
    (
        "chunk_text_only",
        "text held back for a possible stop string, released without new tokens",
        p.Chunk(id="params-4", text=" The", tokens=[], position=40),
    ),
    (
        "chunk_logprobs",
        "a chunk of a request with logprobs=2: one entry per token, alternatives most likely first",
        p.Chunk(
            id="json-11",
            text='{"name',
            tokens=[5018, 609],
            position=8,
            logprobs=[
                TokenLogprob(
                    token=5018,
                    text='{"',
                    logprob=-0.25,
                    top=[
                        TopLogprob(token=5018, text='{"', logprob=-0.25),
                        TopLogprob(token=90, text="{", logprob=-1.5),
                    ],
                ),
                TokenLogprob(
                    token=609,
                    text="name",
                    logprob=-0.0078125,
                    top=[TopLogprob(token=609, text="name", logprob=-0.0078125)],
                ),
            ],
        ),
    ),
    (
        "chunk_prompt_logprobs",
        "the first chunk of a request with prompt_logprobs: prompt tokens 2..n",
        p.Chunk(
            id="choice-12",
            text=" yes",
            tokens=[10035],
            position=8,
            prompt_logprobs=[-7.5, -3.25, -0.5, -11.0, -2.0, -0.125],
        ),
    ),
    (
        "chunk_final_length",
        "an empty final chunk carrying full stats",
        p.Chunk(id="1", text="", tokens=[], position=69, finish_reason="length", stats=STATS),
    ),
    (
        "chunk_final_stop",
        "final chunk after EOS; under 11 tokens so steady_tokens_per_second is nil",
        p.Chunk(
            id="tok-3",
            text="",
            tokens=[],
            position=15,
            finish_reason="stop",
            stats=GenerationStats(
                prompt_tokens=6,
                generated_tokens=9,
                context_size=512,
                queue_time_s=0.0001,
                prefill_time_s=0.004,
                decode_time_s=0.05,
                time_to_first_token_ms=4.5,
                weights_bytes=1040384,
                kv_cache_allocated_bytes=32768,
                kv_cache_used_bytes=3840,
            ),
        ),
    ),
    (
        "chunk_final_cancelled",
        "final chunk of a cancelled request on a big model (uint64 byte counts)",
        p.Chunk(
            id="chat-5",
            text="",
            tokens=[],
            position=1873,
            finish_reason="cancelled",
            stats=GenerationStats(
                prompt_tokens=1800,
                generated_tokens=73,
                context_size=131072,
                queue_time_s=1.25,
                prefill_time_s=2.5,
                decode_time_s=3.0,
                time_to_first_token_ms=3750.0,
                steady_tokens_per_second=23.4,
                baseline_memory_bytes=4_600_000_000,
                post_prefill_memory_bytes=4_900_000_000,
                post_decode_memory_bytes=4_910_000_000,
                prefill_peak_memory_bytes=5_400_000_000,
                decode_peak_memory_bytes=4_950_000_000,
                weights_bytes=4_520_000_000,
                kv_cache_allocated_bytes=268_435_456,
                kv_cache_used_bytes=245_366_784,
                cached_prompt_tokens=1024,
                max_batch_size=8,
            ),
        ),
    ),
    *(
        (
            f"error_{code}",
            f"error frame with code {code}"
            + (" (no id: the frame was unreadable)" if not rid else ""),
            p.Error(id=rid, code=code, message=message),
        )
        for code, (rid, message) in ERROR_MESSAGES.items()
    ),
    ("pong", "answer to a ping with an id", p.Pong(id="p1", running=2, waiting=0)),
    ("pong_no_id", "answer to an id-less ping", p.Pong(running=16, waiting=5)),
    (
        "info",
        "info of an unquantized model",
        p.InfoReply(
            id="info-6",
            model="tinystories-260k",
            architecture="llama",
            context_length=512,
            dtype="float32",
            has_chat_template=False,
            limits=LIMITS,
            running=1,
            waiting=0,
            kv_cache_bytes=65536,
            blas="openblas 0.3.21 (/usr/lib/x86_64-linux-gnu/libopenblas.so.0)",
        ),
    ),
    (
        "info_quantized",
        "info of a 4-bit MLX-quantized model",
        p.InfoReply(
            id="info-7",
            model="mlx-community/Qwen2.5-0.5B-Instruct-4bit",
            architecture="qwen2",
            context_length=32768,
            dtype="bfloat16",
            quantization={"group_size": 64, "bits": 4},
            has_chat_template=True,
            limits=p.Limits(
                max_message_bytes=16 << 20,
                max_prompt_tokens=32767,
                max_tokens=32768,
                max_batch=8,
                max_queue=64,
                context_length=32768,
            ),
            running=0,
            waiting=0,
            kv_cache_bytes=0,
            blas="accelerate",
        ),
    ),
    (
        "info_counters",
        "info with the optional service counters (frames sent, service CPU seconds)",
        p.InfoReply(
            id="info-8",
            model="tinystories-260k",
            architecture="llama",
            context_length=512,
            dtype="float32",
            has_chat_template=False,
            limits=LIMITS,
            running=0,
            waiting=0,
            kv_cache_bytes=0,
            blas="openblas 0.3.21 (/usr/lib/x86_64-linux-gnu/libopenblas.so.0)",
            frames_sent=70000,
            service_cpu_s=1.5,
        ),
    ),
    (
        "info_prompt_cache",
        "info with the optional prefix cache figures",
        p.InfoReply(
            id="info-9",
            model="tinystories-260k",
            architecture="llama",
            context_length=512,
            dtype="float32",
            has_chat_template=False,
            limits=LIMITS,
            running=1,
            waiting=0,
            kv_cache_bytes=524288,
            blas="accelerate",
            prompt_cache_capacity_bytes=8 << 30,
            prompt_cache_bytes=1048576,
            prompt_cache_entries=3,
            prompt_cache_hits=12,
            prompt_cache_hit_tokens=40960,
            prompt_cache_misses=2,
            prompt_cache_evictions=0,
        ),
    ),
    ("tokenize", "token ids of a text", p.TokenizeReply(id="t-7", tokens=[1, 2, 3, 4, 5])),
    ("detokenize", "text of token ids", p.DetokenizeReply(id="d-8", text="<s> Once upon</s>")),
    (
        "render",
        "a rendered conversation",
        p.RenderReply(
            id="r-9",
            text="<|im_start|>user\nQuel temps à Zürich ? 🌦️<|im_end|>\n<|im_start|>assistant\n",
            tokens=[151644, 872, 198, 151645, 198, 151644, 77091, 198],
        ),
    ),
]


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _gen(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "type": "generate", "id": "x", "prompt": "hi", **fields}


_EXT = msgpack.ExtType(5, b"x")


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


_BAD_UTF8 = b"\x84\xa1v\x01\xa4type\xa8generate\xa2id\xa1x\xa6prompt\xa2\xff\xfe"


def _gp(**params: Any) -> bytes:
    """A generate whose params are `params`."""
    return pack(_gen(params=params))


def _gm(*messages: Any) -> bytes:
    """A generate whose messages are `messages`."""
    return pack(_gen(prompt=None, messages=list(messages)))


def _gt(*tokens: Any) -> bytes:
    """A generate whose tokens are `tokens`."""
    return pack(_gen(prompt=None, tokens=list(tokens)))


def _msg(kind: str, **fields: Any) -> bytes:
    return pack({"v": 1, "type": kind, **fields})


# Frames a worker must refuse, by the code it answers with: (description, frame, error id).
INVALID_FRAMES: dict[str, list[tuple[str, bytes, str | None]]] = {
    "bad_frame": [
        ("random bytes", b"\xc1\xff\x00garbage", None),
        ("empty frame", b"", None),
        ("truncated map", pack(_gen())[:-3], None),
        ("trailing bytes after the map", pack(_gen()) + b"\x00", None),
        ("an array, not a map", pack([1, "generate", "x"]), None),
        ("a str, not a map", pack("generate"), None),
        ("invalid UTF-8 in a str", _BAD_UTF8, None),
        ("65 levels of nesting", pack(_gen(deep=_nested(64))), "x"),
    ],
    "unsupported_version": [
        ("v missing", pack({"type": "ping", "id": "p"}), "p"),
        ("v = 2", pack({"v": 2, "type": "ping", "id": "p"}), "p"),
        ("v as str", pack({"v": "1", "type": "ping"}), None),
        ("v = true (a bool is not an int)", pack({"v": True, "type": "ping"}), None),
        ("v = 2 outranks an unknown type", pack({"v": 2, "type": "explode"}), None),
    ],
    "unknown_type": [
        ("type missing", pack({"v": 1}), None),
        ("unknown type", _msg("explode", id="e"), "e"),
        ("a worker type sent to the worker", _msg("chunk"), None),
        ("type as bin", pack({"v": 1, "type": b"ping"}), None),
    ],
    "invalid_request": [
        ("generate without id", _msg("generate", prompt="x"), None),
        ("empty id", pack(_gen(id="")), None),
        ("id of 257 bytes", pack(_gen(id="é" * 128 + "x")), None),
        ("id as int", pack(_gen(id=7)), None),
        ("none of prompt/tokens/messages", _msg("generate", id="x"), "x"),
        ("prompt and tokens", pack(_gen(tokens=[1, 2])), "x"),
        ("prompt, tokens and messages", pack(_gen(tokens=[1], messages=[])), "x"),
        ("prompt as bin", pack(_gen(prompt=b"hi")), "x"),
        ("prompt as int", pack(_gen(prompt=17)), "x"),
        ("negative token id", _gt(1, -1), "x"),
        ("token id 2^31", _gt(2**31), "x"),
        ("token id as bool", _gt(True), "x"),
        ("token id as float", _gt(1.0), "x"),
        ("messages not an array", pack(_gen(prompt=None, messages={"role": "user"})), "x"),
        ("message without role", _gm({"content": "hi"}), "x"),
        ("message content as int", _gm({"role": "user", "content": 5}), "x"),
        ("ext inside a content part", _gm({"role": "user", "content": [{"d": _EXT}]}), "x"),
        ("bin inside tool_calls", _gm({"role": "assistant", "tool_calls": [b"x"]}), "x"),
        (
            "options.add_generation_prompt = 1",
            pack(_gen(options={"add_generation_prompt": 1})),
            "x",
        ),
        ("options.extra with an int key", pack(_gen(options={"extra": {1: "a"}})), "x"),
        ("add_special_tokens = 0", pack(_gen(add_special_tokens=0)), "x"),
        ("two prompts outrank bad params", pack(_gen(tokens=[1], params={"top_p": 7.0})), "x"),
        ("cancel without id", _msg("cancel"), None),
        ("ping with an int id", _msg("ping", id=5), None),
        ("hello with an int client", _msg("hello", client=5), None),
        ("info without id", _msg("info"), None),
        ("tokenize without text", _msg("tokenize", id="t"), "t"),
        ("detokenize tokens as str", _msg("detokenize", id="d", tokens="1 2"), "d"),
        ("render without messages", _msg("render", id="r"), "r"),
    ],
    "invalid_parameters": [
        ("params not a map", pack(_gen(params=[1, 2])), "x"),
        ("top_p = 7", _gp(top_p=7), "x"),
        ("temperature NaN", _gp(temperature=float("nan")), "x"),
        ("temperature +inf", _gp(temperature=float("inf")), "x"),
        ("temperature as str", _gp(temperature="0.5"), "x"),
        ("max_tokens = 2^64-1", _gp(max_tokens=2**64 - 1), "x"),
        ("max_tokens = -1", _gp(max_tokens=-1), "x"),
        ("max_tokens = 0", _gp(max_tokens=0), "x"),
        ("max_tokens = 5.0 (a float)", _gp(max_tokens=5.0), "x"),
        ("max_tokens = true", _gp(max_tokens=True), "x"),
        ("top_k = 2^63", _gp(top_k=2**63), "x"),
        ("seed = -1", _gp(seed=-1), "x"),
        ("logit_bias key not a number", _gp(logit_bias={"abc": 1.0}), "x"),
        ("logit_bias key with a leading zero", _gp(logit_bias={"007": 1.0}), "x"),
        ("logit_bias key negative", _gp(logit_bias={"-1": 1.0}), "x"),
        ("logit_bias key beyond 2^31-1", _gp(logit_bias={"2147483648": 1.0}), "x"),
        ("logit_bias value NaN", _gp(logit_bias={"5": float("nan")}), "x"),
        ("logit_bias value as str", _gp(logit_bias={"5": "1"}), "x"),
        ("empty stop string", _gp(stop=[""]), "x"),
        ("stop_on_eos = 0", _gp(stop_on_eos=0), "x"),
        ("response_format of an unknown type", _gp(response_format={"type": "yaml"}), "x"),
        ("regex without pattern", _gp(response_format={"type": "regex"}), "x"),
        ("json_schema without a schema", _gp(response_format={"type": "json_schema"}), "x"),
        ("choice with no choices", _gp(response_format={"type": "choice", "choices": []}), "x"),
        ("response_format as str", _gp(response_format="json"), "x"),
        ("logprobs = 21", _gp(logprobs=21), "x"),
        ("logprobs = -1", _gp(logprobs=-1), "x"),
        ("prompt_logprobs = 1", _gp(prompt_logprobs=1), "x"),
    ],
}


def vector(direction: str, description: str, message: p.Message) -> dict[str, Any]:
    data = p.encode(message)
    return {
        "direction": direction,
        "type": message.TYPE,
        "description": description,
        "value": msgpack.unpackb(data, raw=False),
        "msgpack_hex": data.hex(),
    }


def build() -> dict[str, Any]:
    """Relative path → JSON content, for every file this script owns."""
    out: dict[str, Any] = {}
    for stem, description, c_msg in CLIENT_FRAMES:
        out[f"c2w_{stem}.json"] = vector(C2W, description, c_msg)
    for stem, description, w_msg in WORKER_FRAMES:
        out[f"w2c_{stem}.json"] = vector(W2C, description, w_msg)
    assert {f"w2c_error_{c}.json" for c in ERROR_CODES} <= set(out)
    out["invalid/client_frames.json"] = [
        {"description": d, "msgpack_hex": data.hex(), "code": code, "request_id": rid}
        for code, cases in INVALID_FRAMES.items()
        for d, data, rid in cases
    ]
    return out


def dumps(content: Any) -> str:
    return json.dumps(content, ensure_ascii=False, indent=2) + "\n"


def main() -> int:
    for name, content in build().items():
        path = HERE / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(dumps(content), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
