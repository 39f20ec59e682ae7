"""The wire protocol: SPEC.md, the golden vectors and the codec agree; bad frames get codes."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ffai_client import protocol as p
from ffai_client.errors import ERROR_CODES, ProtocolError
from ffai_client.types import (
    ChatMessage,
    ChatTemplateOptions,
    GenerationChunk,
    GenerationParameters,
    GenerationStats,
    TokenLogprob,
)

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "protocol" / "SPEC.md"
VECTORS = REPO / "protocol" / "vectors"
CODEC_CODES = {"bad_frame", "unsupported_version", "unknown_type", "invalid_request"}
CLIENT_CODES = CODEC_CODES | {"invalid_parameters"}

CLIENT_CLASSES: dict[str, type] = {
    c.TYPE: c
    for c in (
        p.Hello,
        p.Generate,
        p.Cancel,
        p.Ping,
        p.InfoRequest,
        p.TokenizeRequest,
        p.DetokenizeRequest,
        p.RenderRequest,
    )
}
WORKER_CLASSES: dict[str, type] = {
    c.TYPE: c
    for c in (
        p.Welcome,
        p.Chunk,
        p.Error,
        p.Pong,
        p.InfoReply,
        p.TokenizeReply,
        p.DetokenizeReply,
        p.RenderReply,
    )
}


def pack(obj: object, **kwargs: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True, **kwargs)
    return data


def load_vectors() -> list[tuple[str, dict[str, Any]]]:
    return [(f.name, json.loads(f.read_text("utf-8"))) for f in sorted(VECTORS.glob("*.json"))]


VECTOR_FILES = load_vectors()
INVALID = json.loads((VECTORS / "invalid" / "client_frames.json").read_text("utf-8"))


def decoder(direction: str) -> Any:
    return p.decode_client if direction == "client_to_worker" else p.decode_worker


def default_of(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    assert f.default_factory is not MISSING, f.name
    return f.default_factory()


def typed(name: str, raw: Any) -> Any:
    """What the codec's typed field should hold for a wire value (types.py builds it)."""
    builders: dict[str, Any] = {
        "params": GenerationParameters.from_dict,
        "options": ChatTemplateOptions.from_dict,
        "messages": lambda ms: [ChatMessage.from_dict(m) for m in ms],
        "stats": lambda s: GenerationStats(**s),
        "limits": lambda lim: p.Limits(**lim),
        "logprobs": lambda lps: [TokenLogprob.from_dict(lp) for lp in lps],
    }
    return builders.get(name, lambda v: v)(raw)


# -- golden vectors --------------------------------------------------------------------------


@pytest.mark.parametrize("name,vec", VECTOR_FILES, ids=[n for n, _ in VECTOR_FILES])
def test_vector_round_trips(name: str, vec: dict[str, Any]) -> None:
    data = bytes.fromhex(vec["msgpack_hex"])
    value = vec["value"]
    assert vec["direction"] in ("client_to_worker", "worker_to_client")
    assert value["v"] == 1 and value["type"] == vec["type"] and vec["description"]
    # The JSON value is the frame: packing it gives the same bytes, key order included.
    assert pack(value) == data
    msg = decoder(vec["direction"])(data)
    classes = CLIENT_CLASSES if vec["direction"] == "client_to_worker" else WORKER_CLASSES
    assert type(msg) is classes[vec["type"]]
    names = [f.name for f in fields(msg)]
    assert set(value) - {"v", "type"} <= set(names), "a vector holds a field the codec lacks"
    for f in fields(msg):
        got = getattr(msg, f.name)
        if f.name in value:
            assert got == typed(f.name, value[f.name]), f.name
            if isinstance(value[f.name], float):
                assert type(got) is float
        else:
            assert got == default_of(f), f"{f.name} is absent, so it must hold its default"
    assert p.encode(msg) == data


def test_vectors_cover_every_message_and_error_code() -> None:
    seen = {(v["direction"], v["type"]) for _, v in VECTOR_FILES}
    assert seen == {("client_to_worker", t) for t in p.CLIENT_MESSAGE_TYPES} | {
        ("worker_to_client", t) for t in p.WORKER_MESSAGE_TYPES
    }
    codes = [v["value"]["code"] for _, v in VECTOR_FILES if v["type"] == "error"]
    assert sorted(codes) == sorted(ERROR_CODES)


def test_vectors_hold_the_required_edge_cases() -> None:
    values = {name: v["value"] for name, v in VECTOR_FILES}
    generates = [v for v in values.values() if v["type"] == "generate"]
    chunks = [v for v in values.values() if v["type"] == "chunk"]
    assert any("\u200d" in g.get("prompt", "") for g in generates)  # ZWJ emoji
    assert any("\u200d" in c["text"] for c in chunks)
    assert any(g.get("tokens") for g in generates)
    assert any(g.get("messages") and g.get("options") for g in generates)
    assert any(g.get("params", {}).get("logit_bias") for g in generates)
    finals = [c for c in chunks if "stats" in c]
    stats_names = [f.name for f in fields(GenerationStats)]
    assert {c["finish_reason"] for c in finals} == {"stop", "length", "cancelled"}
    for c in finals:
        assert c["text"] == "" and c["tokens"] == [] and list(c["stats"]) == stats_names


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_vectors_are_what_the_generator_writes() -> None:
    gen = _load_generator()
    built = gen.build()
    on_disk = {str(f.relative_to(VECTORS)) for f in VECTORS.rglob("*.json")}
    assert on_disk == set(built)
    for name, content in built.items():
        assert (VECTORS / name).read_text("utf-8") == gen.dumps(content), name


@pytest.mark.parametrize("case", INVALID, ids=[c["description"] for c in INVALID])
def test_invalid_vector_gets_its_code(case: dict[str, Any]) -> None:
    with pytest.raises(p.FrameError) as info:
        p.decode_client(bytes.fromhex(case["msgpack_hex"]))
    assert (info.value.code, info.value.request_id) == (case["code"], case["request_id"])
    assert info.value.message


def test_invalid_vectors_cover_every_codec_code() -> None:
    assert {c["code"] for c in INVALID} == CLIENT_CODES


# -- SPEC.md ---------------------------------------------------------------------------------

SPEC_TEXT = SPEC.read_text("utf-8")


def spec_sections() -> dict[str, dict[str, list[list[str]]]]:
    """## section → ### heading → rows (header first) of the first table under that heading."""
    out: dict[str, dict[str, list[list[str]]]] = {}
    rows: list[list[str]] = []
    section = ""
    for line in SPEC_TEXT.splitlines():
        if line.startswith("## "):
            section = line[3:]
            out[section] = {}
            rows = []
        elif line.startswith("### "):
            rows = out[section][line[4:]] = []
        elif line.startswith("|") and (not rows or rows[-1]):
            if not line.startswith("| ---"):
                rows.append([cell.strip() for cell in line.split("|")[1:-1]])
        elif rows and rows[-1]:
            rows.append([])  # the table ended: ignore later ones under this heading
    for headings in out.values():
        for table in headings.values():
            while table and not table[-1]:
                table.pop()
    return out


SECTIONS = spec_sections()


def section(title: str) -> dict[str, list[list[str]]]:
    (key,) = [k for k in SECTIONS if title in k]
    return SECTIONS[key]


def message_headings(title: str) -> list[str]:
    names = []
    for heading in section(title):
        match = re.fullmatch(r"`([a-z_]+)`", heading)
        assert match, f"message headings look like ### `name`, got {heading!r}"
        names.append(match.group(1))
    return names


def test_spec_lists_the_codec_message_types() -> None:
    assert tuple(message_headings("Client → worker messages")) == p.CLIENT_MESSAGE_TYPES
    assert tuple(message_headings("Worker → client messages")) == p.WORKER_MESSAGE_TYPES


def _spec_default(cell: str) -> Any:
    token = cell.split(" ")[0].strip("`")
    return None if token == "nil" else json.loads(token)


def _check_fields(rows: list[list[str]], cls: type, where: str) -> None:
    header, body = rows[0], rows[1:]
    names = [r[0].strip("`") for r in body]
    assert names == [f.name for f in fields(cls)], where
    by_name = {f.name: f for f in fields(cls)}
    for row in body:
        cells = dict(zip(header, row, strict=True))
        f = by_name[row[0].strip("`")]
        if cells.get("Req") == "yes":
            assert f.default is MISSING and f.default_factory is MISSING, f"{where}.{f.name}"
        elif "Default" in cells and cells.get("Req") != "always":
            wire_default = default_of(f)
            if isinstance(wire_default, GenerationParameters):
                wire_default = wire_default.to_dict()
            assert _spec_default(cells["Default"]) == wire_default, f"{where}.{f.name}"


def test_spec_field_tables_match_the_dataclasses() -> None:
    for title, classes in (
        ("Client → worker messages", CLIENT_CLASSES),
        ("Worker → client messages", WORKER_CLASSES),
    ):
        for heading, rows in section(title).items():
            kind = heading.strip("`")
            _check_fields(rows, classes[kind], kind)
    shared = section("Shared structures")
    for heading, cls in (
        ("6.1 GenerationParameters (`params`)", GenerationParameters),
        ("6.2 ChatTemplateOptions (`options`)", ChatTemplateOptions),
        ("6.3 ChatMessage (elements of `messages`)", ChatMessage),
        ("6.4 GenerationStats (`stats` of the final chunk)", GenerationStats),
        ("6.5 Limits (`limits` of `welcome` and `info`)", p.Limits),
    ):
        _check_fields(shared[heading], cls, heading)


def test_spec_lists_every_error_code() -> None:
    rows = section("Errors")["7.1 Codes"]
    assert tuple(r[0].strip("`") for r in rows[1:]) == ERROR_CODES


def test_spec_example_is_a_real_vector() -> None:
    block = re.search(r"## 11\. Golden vectors.*?```json\n(.*?)```", SPEC_TEXT, re.S)
    assert block
    example = json.loads(block.group(1))
    assert example == json.loads((VECTORS / "c2w_ping.json").read_text("utf-8"))
    dump = re.search(r"## 12\. Worked example.*?```\n(.*?)```", SPEC_TEXT, re.S)
    assert dump
    hex_bytes = "".join(re.findall(r"^((?:[0-9a-f]{2} ?)+)\s", dump.group(1), re.M))
    assert bytes.fromhex(hex_bytes) == p.encode(p.Ping(id="p1"))


# -- errors ----------------------------------------------------------------------------------


def gen(**extra: Any) -> dict[str, Any]:
    return {"v": 1, "type": "generate", "id": "g", "prompt": "Once upon a time", **extra}


ERROR_CASES = [
    ("random bytes", b"\x93\x01", "bad_frame", None),
    ("not msgpack", b"\xc1", "bad_frame", None),
    ("non-map", pack([1, 2, 3]), "bad_frame", None),
    ("missing id", pack({"v": 1, "type": "generate", "prompt": "x"}), "invalid_request", None),
    ("missing text", pack({"v": 1, "type": "tokenize", "id": "t"}), "invalid_request", "t"),
    ("ill-typed prompt", pack(gen(prompt=17)), "invalid_request", "g"),
    ("ill-typed tokens", pack(gen(prompt=None, tokens="1 2")), "invalid_request", "g"),
    ("unknown type", pack({"v": 1, "type": "explode", "id": "e"}), "unknown_type", "e"),
    ("v=2", pack({"v": 2, "type": "ping"}), "unsupported_version", None),
    ("top_p=7", pack(gen(params={"top_p": 7})), "invalid_parameters", "g"),
    ("NaN temperature", pack(gen(params={"temperature": math.nan})), "invalid_parameters", "g"),
    ("max_tokens 2**64-1", pack(gen(params={"max_tokens": 2**64 - 1})), "invalid_parameters", "g"),
    ("negative max_tokens", pack(gen(params={"max_tokens": -5})), "invalid_parameters", "g"),
    ("prompt+tokens", pack(gen(tokens=[1, 2])), "invalid_request", "g"),
    ("prompt+messages", pack(gen(messages=[{"role": "user"}])), "invalid_request", "g"),
    ("tokens+messages", pack(gen(prompt=None, tokens=[1], messages=[])), "invalid_request", "g"),
]


@pytest.mark.parametrize("name,data,code,rid", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_frames_get_their_codes(name: str, data: bytes, code: str, rid: str | None) -> None:
    with pytest.raises(p.FrameError) as info:
        p.decode_client(data)
    assert info.value.code == code and info.value.request_id == rid
    assert isinstance(info.value, ProtocolError)


def test_max_message_bytes() -> None:
    data = pack(gen(prompt="x" * 1000))
    assert isinstance(p.decode_client(data, max_message_bytes=len(data)), p.Generate)
    with pytest.raises(p.FrameError) as info:
        p.decode_client(data, max_message_bytes=len(data) - 1)
    assert info.value.code == "bad_frame"


@pytest.mark.parametrize("depth,ok", [(63, True), (64, False), (5000, False)])
def test_nesting_limit(depth: int, ok: bool) -> None:
    # The top-level map is level 1, so `depth` arrays inside it reach level depth + 1.
    head = pack(gen())
    assert head[0] == 0x84  # a 4-entry map: add a fifth, built by hand (too deep for packb)
    data = b"\x85" + head[1:] + b"\xa6future" + b"\x91" * depth + b"\x00"
    if ok:
        assert isinstance(p.decode_client(data), p.Generate)
    else:
        with pytest.raises(p.FrameError) as info:
            p.decode_client(data)
        assert info.value.code == "bad_frame"


def test_worker_frames_are_checked() -> None:
    chunk = p.to_wire(p.Chunk(id="a", text="", tokens=[], position=3))
    stats = GenerationStats().to_dict()
    final = {**chunk, "finish_reason": "stop", "stats": stats}
    pong = {"v": 1, "type": "pong", "running": 0, "waiting": 0}
    welcome = p.to_wire(
        p.Welcome(
            protocol=1,
            server="s",
            model="m",
            heartbeat_interval_s=1.0,
            limits=p.Limits(1, 1, 1, 1, 1, 1),
        )
    )
    for good in (chunk, final, welcome, pong):
        assert p.decode_worker(pack(good)).TYPE == good["type"]
    bad = [
        {**chunk, "finish_reason": "stop"},  # no stats
        {**chunk, "stats": stats},  # no finish_reason
        {**final, "finish_reason": "eos"},
        {**final, "text": "x"},
        {**final, "tokens": [5]},
        {**final, "stats": {k: v for k, v in stats.items() if k != "prompt_tokens"}},
        {**final, "stats": {**stats, "queue_time_s": math.inf}},
        {**final, "stats": {**stats, "generated_tokens": 1.0}},
        {**chunk, "position": -1},
        {**chunk, "tokens": [True]},
        {**welcome, "heartbeat_interval_s": 0.0},
        {**welcome, "heartbeat_interval_s": math.nan},
        {**welcome, "limits": {"max_batch": 1}},
        {**pong, "running": -1},
        {**pong, "running": True},  # a bool is not an int
        {"v": 1, "type": "error", "code": 5, "message": "x"},
        {"v": 1, "type": "generate", "id": "x", "prompt": "a worker never sends this"},
    ]
    for frame in bad:
        with pytest.raises(p.FrameError):
            p.decode_worker(pack(frame))


def test_unknown_codes_and_fields_pass_through() -> None:
    err = p.decode_worker(
        pack({"v": 1, "type": "error", "code": "brand_new", "message": "m", "x": 1})
    )
    assert err == p.Error(code="brand_new", message="m")


# -- lenient reading, canonical writing ------------------------------------------------------


def test_decoders_accept_any_valid_encoding() -> None:
    # Shuffled keys, nil for optionals, unknown fields, ints and float32 where floats go.
    frame = {
        "future": {"anything": [1, 2.5]},
        "limits": {"context_length": 8, "max_queue": 1, "max_batch": 1, "max_tokens": 8,
                   "max_prompt_tokens": 7, "max_message_bytes": 100, "new_limit": 3},
        "heartbeat_interval_s": 2,
        "model": "m", "server": "s", "protocol": 1, "type": "welcome", "v": 1,
    }  # fmt: skip
    welcome = p.decode_worker(pack(frame))
    assert isinstance(welcome, p.Welcome)
    assert welcome.heartbeat_interval_s == 2.0 and type(welcome.heartbeat_interval_s) is float
    assert welcome.limits == p.Limits(100, 7, 8, 1, 1, 8)
    single = p.decode_client(pack(gen(params={"top_p": 0.5}, options=None), use_single_float=True))
    assert isinstance(single, p.Generate)
    assert single.params.top_p == 0.5 and single.options is None
    nil_id = p.decode_client(pack({"v": 1, "type": "ping", "id": None}))
    assert nil_id == p.Ping()
    int_keys = p.decode_client(pack(gen(params={"logit_bias": {3: 1, 1: -2}})))
    assert isinstance(int_keys, p.Generate) and int_keys.params.logit_bias == {3: 1.0, 1: -2.0}


def test_canonical_encoding() -> None:
    assert msgpack.unpackb(p.encode(p.Generate(id="a", prompt="x"))) == {
        "v": 1,
        "type": "generate",
        "id": "a",
        "prompt": "x",
    }
    msg = p.Generate(
        id="a", prompt="x", params=GenerationParameters(temperature=1, logit_bias={9: 1, 2: -1})
    )
    data = p.encode(msg)
    assert b"\xabtemperature\xcb\x3f\xf0" + b"\x00" * 6 in data  # float64 even from an int
    assert b"\xaalogit_bias\x82\xa12\xcb\xbf\xf0" in data  # sorted by token id
    assert list(msgpack.unpackb(data)) == ["v", "type", "id", "prompt", "params"]
    assert p.encode(msg) == data == p.encode(p.decode_client(data))


def test_chunk_converts_to_and_from_generation_chunk() -> None:
    final = GenerationChunk(
        text="", tokens=[], position=9, stats=GenerationStats(prompt_tokens=4), finish_reason="stop"
    )
    for chunk in (GenerationChunk(text="é", tokens=[5, 6], position=7), final):
        wire = p.Chunk.from_generation_chunk("r", chunk)
        back = p.decode_worker(p.encode(wire))
        assert isinstance(back, p.Chunk) and back.id == "r"
        assert back.to_generation_chunk() == chunk
        assert back.is_final == chunk.is_final


# -- fuzzing ---------------------------------------------------------------------------------

INTS = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(), st.text(max_size=12), st.binary(max_size=6)
)
VALUES = st.recursive(
    SCALARS,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), INTS), kids, max_size=4),
    ),
    max_leaves=16,
)
EDGES = st.sampled_from(
    [0, -1, 2**31, 2**63, 2**64 - 1, math.nan, math.inf, 1.5, "", "x", True, None, b"", [], {}]
).map(copy.deepcopy)  # fresh containers: a shared one could end up inside itself
VALUE_MAPS = [v["value"] for _, v in VECTOR_FILES]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place inside a decoded frame (dict keys and list indices)."""
    found = [prefix]
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    )
    for key, child in items:
        found += _paths(child, (*prefix, key))
    return found


@st.composite
def perturbed(draw: st.DrawFn, maps: list[dict[str, Any]] = VALUE_MAPS) -> bytes:
    """A valid frame with a few values replaced, removed or added: reaches every field check."""
    frame = copy.deepcopy(draw(st.sampled_from(maps)))
    for _ in range(draw(st.integers(1, 3))):
        # `v` and `type` stay: the random maps and byte mutations cover those checks.
        path = draw(st.sampled_from([q for q in _paths(frame) if q not in (("v",), ("type",))]))
        target = frame
        for key in path[:-1]:
            target = target[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if not path or action == "add":
            inner = frame if not path else target[path[-1]]
            if isinstance(inner, dict):
                inner[draw(st.sampled_from(["future", "id", "v", "type", "role"]))] = draw(EDGES)
        elif action == "delete":
            del target[path[-1]]
        else:
            target[path[-1]] = draw(st.one_of(EDGES, SCALARS, VALUES))
    return pack(frame)


VALID = [bytes.fromhex(v["msgpack_hex"]) for _, v in VECTOR_FILES]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        byte = draw(st.integers(0, 255))
        if op == "insert" or pos == len(data):
            data.insert(pos, byte)
        elif op == "set":
            data[pos] = byte
        else:
            del data[pos]
    return bytes(data)


WITH_PARAMS = [v for v in VALUE_MAPS if "params" in v or "messages" in v]
FRAMES = st.one_of(
    st.binary(max_size=64), VALUES.map(pack), perturbed(), perturbed(WITH_PARAMS), mutated()
)
FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))


def _decodes_or_frame_error(decode: Any, data: bytes, codes: set[str]) -> None:
    try:
        msg = decode(data)
    except p.FrameError as exc:
        assert exc.code in codes, (exc.code, exc.message)
        assert exc.request_id is None or isinstance(exc.request_id, str)
        return
    again = p.encode(msg)  # whatever decodes, encodes; and its canonical form is a fixed point
    assert p.encode(decode(again)) == again


@FUZZ
@given(FRAMES)
def test_decoders_only_raise_frame_errors(data: bytes) -> None:
    _decodes_or_frame_error(p.decode_client, data, CLIENT_CODES)
    _decodes_or_frame_error(p.decode_worker, data, CODEC_CODES)


# -- one rule, one place -----------------------------------------------------------------------


def test_message_rules_are_the_types_rules() -> None:
    """The codec refuses what the types refuse, with the types' own words."""
    cases = [
        (gen(tokens=[1]), lambda: p.Generate(id="g", prompt="x", tokens=[1])),
        (gen(id="é" * 129), lambda: p.Generate(id="é" * 129, prompt="x")),
        (gen(params={"top_p": 7}), lambda: GenerationParameters(top_p=7)),
        (gen(params={"logit_bias": {"007": 1}}), lambda: GenerationParameters.from_dict(
            {"logit_bias": {"007": 1}})),
        (gen(prompt=None, messages=[{"role": ""}]), lambda: ChatMessage(role="")),
    ]  # fmt: skip
    for frame, build in cases:
        with pytest.raises(ValueError) as typed_error:
            build()
        with pytest.raises(p.FrameError) as wire_error:
            p.decode_client(pack(frame))
        assert str(typed_error.value) in wire_error.value.message


def test_nil_is_absence_inside_structures() -> None:
    """SPEC 2.3 rule 1 holds in section 6 structures too (but nil content is a value)."""
    params = {"max_tokens": None, "stop": None, "temperature": None, "stop_on_eos": None}
    options = {"add_generation_prompt": None, "extra": None}
    msg = p.decode_client(pack(gen(params=params, options=options)))
    assert isinstance(msg, p.Generate)
    assert msg.params == GenerationParameters() and msg.options == ChatTemplateOptions()
    chat = p.decode_client(pack(gen(prompt=None, messages=[{"role": "a", "content": None}])))
    assert isinstance(chat, p.Generate) and chat.messages == [ChatMessage("a", None)]
