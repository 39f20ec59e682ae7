"""StreamingDetokenizer: deltas add up to exactly the text the generated ids add (invariant 5)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ffai_worker  # noqa: F401  (preloads BLAS before anything imports mlx)
from ffai_worker.text import tokenizer as tokenizer_module
from ffai_worker.text.tokenizer import BYTE, CONTINUATION, StreamingDetokenizer, Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
FOLDERS = {
    "tinystories": SHARED / "models" / "tinystories-260k",
    "llama3": SHARED / "tokenizers" / "llama3",
    "qwen2.5": SHARED / "tokenizers" / "qwen2.5",
    "deepseek-v4": SHARED / "tokenizers" / "deepseek-v4",
}
NAMES = list(FOLDERS)
FFFD = "\ufffd"

SNIPPETS = [
    "Lily and Ben",
    " were playing in the park.",
    " Once upon a time, there was a little girl.",
    "\n\n",
    "\tindented\twith  tabs\n",
    "def f(x):\n    return  x   * 2  # double\n",
    "    ",
    "你好，世界！",
    "今日は良い天気ですね。",
    "안녕하세요",
    " 👩‍👩‍👧‍👦",
    "👍🏽",
    " 🇫🇷🇯🇵🇺🇸",
    "café",
    " cafe\u0301 and e\u0301\u0302",  # combining accents
    " مرحبا بالعالم",
    " नमस्ते दुनिया",
    "Ω≈ç√∫ ½ ²",
    "🤖🦜",
    " 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]
ENGLISH = (
    "Once upon a time, there was a little girl named Lily. She liked to play outside in the sun. "
    "One day, she saw a big red ball in the park. She ran to get it, and her friend Ben came too.\n"
)


@cache
def load(name: str) -> Tokenizer:
    return Tokenizer.from_folder(FOLDERS[name])


@cache
def pools(name: str) -> tuple[list[int], list[int], list[int]]:
    """(special ids, ids that are pieces of characters, non-special added ids)."""
    tok = load(name)
    pieces = [i for i, c in enumerate(tok.token_classes) if c in (BYTE, CONTINUATION)]
    added = tok.backend.get_added_tokens_decoder()
    plain_added = sorted(i for i, t in added.items() if not t.special)
    return sorted(tok.special_token_ids), pieces, plain_added


def expected(tok: Tokenizer, prompt: Sequence[int], generated: Sequence[int]) -> str:
    """The documented rule: D(P + G) after its longest common prefix with D(P)."""
    before, after = tok.decode(list(prompt)), tok.decode([*prompt, *generated])
    k = 0
    while k < min(len(before), len(after)) and before[k] == after[k]:
        k += 1
    return after[k:]


def stream(tok: Tokenizer, prompt: Sequence[int], generated: Sequence[int]) -> list[str]:
    det = StreamingDetokenizer(tok, prompt)
    return [det.add(t) for t in generated] + [det.flush()]


def check(tok: Tokenizer, prompt: list[int], generated: list[int]) -> list[str]:
    deltas = stream(tok, prompt, generated)
    full = tok.decode(prompt + generated)
    assert "".join(deltas) == expected(tok, prompt, generated)
    before = tok.decode(prompt)
    if full.startswith(before):  # the main contract
        assert "".join(deltas) == full[len(before) :]
    if FFFD not in full:
        assert not any(FFFD in d for d in deltas)
    return deltas


@contextmanager
def windows(max_window: int, held_window: int, prompt_context: int) -> Iterator[None]:
    """Tiny windows re-anchor on almost every token: the hardest case for exactness."""
    saved = (
        tokenizer_module.MAX_WINDOW,
        tokenizer_module.HELD_WINDOW,
        tokenizer_module.PROMPT_CONTEXT,
    )
    tokenizer_module.MAX_WINDOW = max_window
    tokenizer_module.HELD_WINDOW = held_window
    tokenizer_module.PROMPT_CONTEXT = prompt_context
    try:
        yield
    finally:
        (
            tokenizer_module.MAX_WINDOW,
            tokenizer_module.HELD_WINDOW,
            tokenizer_module.PROMPT_CONTEXT,
        ) = saved


WINDOWS = {"default": None, "tiny": (1, 4, 1)}


def random_ids(
    draw: Callable[[st.SearchStrategy[list[int]]], list[int]], name: str, max_size: int
) -> list[int]:
    tok = load(name)
    specials, pieces, plain_added = pools(name)
    choices = [
        st.integers(0, tok.vocab_size - 1),
        st.sampled_from(specials),
        st.sampled_from(pieces),
        st.integers(tok.vocab_size, tok.vocab_size + 300),  # padded embedding rows
    ]
    if plain_added:
        choices.append(st.sampled_from(plain_added))
    return draw(st.lists(st.one_of(choices), max_size=max_size))


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_ids(name: str, window: str, data: st.DataObject) -> None:
    tok = load(name)
    prompt = random_ids(data.draw, name, 12)
    generated = random_ids(data.draw, name, 60)
    sizes = WINDOWS[window]
    if sizes is None:
        check(tok, prompt, generated)
    else:
        with windows(*sizes):
            check(tok, prompt, generated)


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(st.sampled_from(SNIPPETS), min_size=1, max_size=8),
    split=st.floats(0.0, 1.0),
    bos=st.booleans(),
)
def test_real_text_split_anywhere(
    name: str, window: str, parts: list[str], split: float, bos: bool
) -> None:
    tok = load(name)
    ids = tok.encode("".join(parts), add_special_tokens=bos)
    k = int(split * len(ids))
    full = tok.decode(ids)
    assert FFFD not in full
    sizes = WINDOWS[window]
    if sizes is None:
        deltas = check(tok, ids[:k], ids[k:])
    else:
        with windows(*sizes):
            deltas = check(tok, ids[:k], ids[k:])
    assert not any(FFFD in d for d in deltas)
    assert full.endswith("".join(deltas))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_add_many_gives_the_same_text(name: str, data: st.DataObject) -> None:
    tok = load(name)
    text = "".join(data.draw(st.lists(st.sampled_from(SNIPPETS), min_size=1, max_size=6)))
    ids = tok.encode(text)
    k = data.draw(st.integers(0, len(ids)))
    prompt, generated = ids[:k], ids[k:] + random_ids(data.draw, name, 10)
    det = StreamingDetokenizer(tok, prompt)
    out, i = [], 0
    while i < len(generated):
        n = data.draw(st.integers(1, 5))
        out.append(det.add_many(generated[i : i + n]))
        i += n
    out.append(det.flush())
    assert "".join(out) == "".join(stream(tok, prompt, generated))


def test_sentencepiece_leading_space_survives() -> None:
    tok = load("tinystories")
    prompt = tok.encode("Lily and Ben")
    generated = tok.encode(" were playing", add_special_tokens=False)
    assert [tok.backend.id_to_token(i) for i in generated] == ["▁we", "re", "▁play", "ing"]
    assert tok.decode(generated[:1]) == "we"  # decoding a token alone drops its space
    deltas = stream(tok, prompt, generated)
    assert deltas == [" we", "re", " play", "ing", ""]
    assert tok.decode(prompt) + "".join(deltas) == "Lily and Ben were playing"


def test_skipped_specials_do_not_eat_the_space() -> None:
    # a window starting at a special token would strip " were"'s space; the full decode keeps it
    tok = load("tinystories")
    lily, were = tok.encode("Lily", add_special_tokens=False), tok.encode(" were")[1:]
    assert [tok.backend.id_to_token(i) for i in were] == ["▁we", "re"]
    with windows(1, 4, 1):
        deltas = stream(tok, [1, *lily], [1, 2, 1, 2, *were, 1])
    assert "".join(deltas) == " were" == tok.decode([1, *lily, 1, 2, 1, 2, *were])[4:]
    # with an empty (or all-special) prompt the full decode does strip the first space
    assert "".join(stream(tok, [1], were)) == "were" == tok.decode([1, *were])


def test_multibyte_character_is_held_until_complete() -> None:
    tok = load("deepseek-v4")
    ids = tok.encode("Hi 👩!", add_special_tokens=False)
    pieces = [tok.backend.id_to_token(i) for i in ids]
    assert pieces == ["Hi", "ĠðŁĳ", "©", "!"]  # the emoji's 4 bytes span two tokens
    assert tok.decode(ids[:2]) == "Hi " + FFFD
    assert stream(tok, [], ids) == ["Hi", " ", "👩", "!", ""]


def test_byte_fallback_run_is_held_until_it_ends() -> None:
    tok = load("tinystories")
    ids = tok.encode("Lily 你好 ok", add_special_tokens=False)
    tokens = [tok.backend.id_to_token(i) for i in ids]
    assert tokens[2:8] == ["<0xE4>", "<0xBD>", "<0xA0>", "<0xE5>", "<0xA5>", "<0xBD>"]
    deltas = stream(tok, [], ids)
    # any later byte could still turn the run into U+FFFDs: it is emitted when a non-byte comes
    assert deltas[2:8] == [""] * 6 and deltas[8].startswith("你好 ")
    assert "".join(deltas) == "Lily 你好 ok"


def test_byte_fallback_run_invalidated_later() -> None:
    # tokenizers replaces a whole byte run by U+FFFDs when any byte of it is invalid
    tok = load("tinystories")
    you = tok.encode("你", add_special_tokens=False)[1:]  # <0xE4> <0xBD> <0xA0>
    stray, we = 3 + 0x80, tok.token_to_id("▁we")
    assert we is not None
    lily = tok.encode("Lily", add_special_tokens=False)
    assert tok.decode(lily + you + [stray, we]) == "Lily" + FFFD * 4 + " we"
    assert stream(tok, lily, [*you, stray, we]) == ["", "", "", "", FFFD * 4 + " we", ""]
    # the prompt ending in that run: the rule emits from where the decodes part (LCP)
    assert "".join(stream(tok, lily + you, [stray, we])) == FFFD * 4 + " we"


def test_prompt_ending_mid_character() -> None:
    tok = load("deepseek-v4")
    ids = tok.encode("Hi 👩!", add_special_tokens=False)
    prompt, generated = ids[:2], ids[2:]
    assert tok.decode(prompt) == "Hi " + FFFD
    # D(P + G) does not start with D(P): the completed character comes out whole
    assert stream(tok, prompt, generated) == ["👩", "!", ""]


def test_invalid_bytes_are_emitted_eventually() -> None:
    tok = load("qwen2.5")
    vocab = tok.backend.get_vocab()
    lone = [vocab["Ģ"], vocab["ä"]]  # 0x80 (a stray continuation byte), 0xE4 (a lead byte)
    hello = tok.encode(" hello", add_special_tokens=False)
    deltas = stream(tok, hello, [*lone, *hello])
    # only a final U+FFFD can still change: the first is out as soon as 0xE4 follows it
    assert deltas == ["", FFFD, FFFD + " hello", ""]
    assert stream(tok, hello, lone) == ["", FFFD, FFFD]  # flush emits the rest
    assert tok.decode(hello + lone).endswith(FFFD * 2)


def test_ids_past_the_vocabulary_add_nothing() -> None:
    tok = load("qwen2.5")
    hello = tok.encode(" hello world", add_special_tokens=False)
    generated = [hello[0], tok.vocab_size + 5, 151935, hello[1]]
    assert stream(tok, [], generated) == [" hello", "", "", " world", ""]


def test_flush_ends_the_stream() -> None:
    tok = load("llama3")
    det = StreamingDetokenizer(tok, tok.encode("Hi"))
    assert det.add(tok.encode(" there", add_special_tokens=False)[0]) == " there"
    assert det.flush() == ""
    assert det.flush() == ""
    with pytest.raises(RuntimeError):
        det.add(13)


def longest_byte_run(tok: Tokenizer, ids: Sequence[int]) -> int:
    best = run = 0
    for t in ids:
        run = run + 1 if tok.token_classes[t] == BYTE else 0
        best = max(best, run)
    return best


@pytest.mark.parametrize("name", NAMES)
def test_work_per_token_is_bounded(name: str) -> None:
    tok = load(name)
    text = (ENGLISH + "".join(SNIPPETS)) * 60
    tokens = tok.encode(text, add_special_tokens=False)[:5000]
    assert len(tokens) == 5000
    prompt = tok.encode("Tell me a story.")
    det = StreamingDetokenizer(tok, prompt)
    decoded = {"ids": 0, "calls": 0}
    inner = det._decode

    def counting_decode(ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        decoded["ids"] += len(ids)
        decoded["calls"] += 1
        return inner(ids, skip_special_tokens=skip_special_tokens)

    det._decode = counting_decode
    out, largest = [], 0
    for t in tokens:
        out.append(det.add(t))
        largest = max(largest, det.window_size)
    out.append(det.flush())
    assert "".join(out) == tok.decode(prompt + tokens)[len(tok.decode(prompt)) :]
    # the window spans at most the ids since the clean cut before the last one
    bound = 2 * (tokenizer_module.MAX_WINDOW + longest_byte_run(tok, tokens))
    assert largest <= bound
    assert decoded["calls"] <= 2 * len(tokens)
    assert decoded["ids"] <= 2 * tokenizer_module.MAX_WINDOW * len(tokens)


def test_window_is_bounded_when_text_keeps_ending_in_fffd() -> None:
    # " \xe4"-like tokens: every step ends in an incomplete character, so no clean cut comes
    tok = load("qwen2.5")
    stuck = [
        i
        for i in range(20000)
        if (s := tok.decode([i])).endswith(FFFD) and s.count(FFFD) == 1 and s[0] == " "
    ][:50]
    assert len(stuck) >= 10
    rng = random.Random(7)
    generated = [rng.choice(stuck) for _ in range(2000)]
    det = StreamingDetokenizer(tok, tok.encode("Hi"))
    out, largest = [], 0
    for t in generated:
        out.append(det.add(t))
        largest = max(largest, det.window_size)
    out.append(det.flush())
    assert "".join(out) == expected(tok, tok.encode("Hi"), generated)
    assert largest <= tokenizer_module.HELD_WINDOW + 1
