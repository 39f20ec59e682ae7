"""Tokenizer and streaming detokenizer, on the `tokenizers` library alone (no transformers).

`Tokenizer` loads an HF-layout folder (tokenizer.json, tokenizer_config.json,
chat_template.jinja, generation_config.json) and matches transformers'
`AutoTokenizer` for encode / decode. `StreamingDetokenizer` turns one sequence's
generated ids into text deltas whose concatenation is exactly the text the
generated tokens add after the prompt (DESIGN.md, invariant 5).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

REPLACEMENT = "\ufffd"

# Token classes, one byte per id (see `Tokenizer.token_classes`).
NORMAL = 0
SKIPPED = 1  # special token: decode(skip_special_tokens=True) drops it before decoding
BYTE = 2  # "<0xHH>" piece read by a ByteFallback decoder
CONTINUATION = 3  # byte-level piece whose first byte is a UTF-8 continuation byte

# Longer texts are encoded through encode_batch, which releases the GIL while
# Rust works (encode holds it: 1 MB froze every other thread for ~1 s).
GIL_FREE_ENCODE_CHARS = 4096
# How many input bytes a normalizer may fold into one byte (NFC/NFKC: at most 3).
NORMALIZER_SHRINK = 4


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _load_chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """Template sources by name; files beside the config replace its entries, as in transformers."""
    files: dict[str, str] = {}
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        files["default"] = jinja.read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            files[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if files:
        return files
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {
            item["name"]: item["template"]
            for item in value
            if isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and isinstance(item.get("template"), str)
        }
    return {}


def _decoder_types(node: Any) -> set[str]:
    """All decoder type names in tokenizer.json's (possibly nested) "decoder" entry."""
    if not isinstance(node, dict):
        return set()
    found = {node["type"]} if isinstance(node.get("type"), str) else set()
    for child in node.get("decoders") or []:
        found |= _decoder_types(child)
    return found


@lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (char -> byte)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


class Tokenizer:
    """One model's tokenizer: encode / decode with transformers' semantics, EOS ids, templates."""

    def __init__(
        self,
        backend: Backend,
        *,
        config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_templates: dict[str, str] | None = None,
    ) -> None:
        config = config or {}
        self.backend = backend
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.pad_token = _token_content(config.get("pad_token"))
        self.unk_token = _token_content(config.get("unk_token"))
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self._add_missing_tokens(config)
        if backend.post_processor is None:
            # tokenizer.json says nothing about BOS/EOS: the config decides.
            self._set_post_processor(
                bool(config.get("add_bos_token", False)), bool(config.get("add_eos_token", False))
            )
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self.special_token_ids: set[int] = {i for i, tok in added.items() if tok.special}
        self.eos_token_ids: set[int] = set(_eos_ids(generation_config or {}))
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)
        # What encode(text) really does, whichever of tokenizer.json or the config decided it.
        self.add_bos_token = self.encode("")[:1] == [self.bos_token_id]
        decoder = backend.decoder
        self.decoder_types = _decoder_types(json.loads(decoder.__getstate__()) if decoder else None)
        self.token_classes = self._classify_tokens(added)
        self._token_texts: dict[int, str] = {}

    @classmethod
    def from_folder(
        cls, path: Path | str, generation_config: dict[str, Any] | None = None
    ) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json (+ chat templates) from an HF-layout folder.

        `generation_config` defaults to the folder's generation_config.json when it has one.
        """
        folder = Path(path)
        backend = Backend.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        if generation_config is None:
            generation_config = _read_json(folder / "generation_config.json")
        return cls(
            backend,
            config=config,
            generation_config=generation_config,
            chat_templates=_load_chat_templates(folder, config),
        )

    # -- encode / decode -----------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids as transformers' `encode(text, add_special_tokens=...)` gives them."""
        if len(text) > GIL_FREE_ENCODE_CHARS:
            batch = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)
            long_ids: list[int] = batch[0].ids
            return long_ids
        ids: list[int] = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    @cached_property
    def max_token_bytes(self) -> int | None:
        """At most how many UTF-8 input bytes one token stands for; None when unbounded.

        A token's vocabulary string is never shorter, in UTF-8 bytes, than the
        input it matches: byte-level pieces spend one char (1-2 bytes) per input
        byte, Metaspace's "▁" (3 bytes) stands for " " (1 byte). A normalizer
        may shrink the input first (NFC/NFKC fold up to 3 bytes into 1), hence
        NORMALIZER_SHRINK. A model that folds a run of unknown characters into
        one unk token has no bound. Normalizers that delete characters are not
        accounted for: text they would mostly delete is not a prompt.
        """
        model = self.backend.model
        kind = type(model).__name__
        byte_fallback = bool(getattr(model, "byte_fallback", False))
        if kind == "BPE":
            if model.fuse_unk and model.unk_token is not None and not byte_fallback:
                return None
        elif kind != "Unigram" or "ByteFallback" not in self.decoder_types:
            return None  # WordPiece/WordLevel/Unigram map a whole unknown word to one unk
        vocab = self.backend.get_vocab(with_added_tokens=True)
        longest = max((len(t.encode("utf-8")) for t in vocab), default=1)
        longest = max(longest, 4)  # one unk (or byte token) stands for one char at most
        return longest * (NORMALIZER_SHRINK if _may_shrink(self.backend.normalizer) else 1)

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of a chat-template-rendered prompt: its BOS (if any) is already in the text.

        Same as transformers' `apply_chat_template(tokenize=True)`, which encodes the
        rendered string with add_special_tokens=False, so BOS never appears twice.
        """
        return self.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def token_text(self, token: int) -> str:
        """One token's text alone, special tokens included (for logprob entries)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.backend.decode(
                [token], skip_special_tokens=False
            )
        return text

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def chat_template(self) -> str | None:
        """The default chat template source, if the model has one."""
        return self.chat_templates.get("default")

    # -- loading helpers -----------------------------------------------------------------
    def _add_missing_tokens(self, config: dict[str, Any]) -> None:
        """Register tokens named only in tokenizer_config, as transformers does at load time."""
        entries = config.get("added_tokens_decoder") or {}
        wanted: list[AddedToken] = []
        for _, entry in sorted(entries.items(), key=lambda kv: int(kv[0])):
            content = _token_content(entry)
            if content is not None and self.backend.token_to_id(content) is None:
                special = bool(entry.get("special", True))
                wanted.append(AddedToken(content, special=special, normalized=not special))
        for content in (self.bos_token, self.eos_token, self.unk_token, self.pad_token):
            if content is not None and self.backend.token_to_id(content) is None:
                if all(t.content != content for t in wanted):
                    wanted.append(AddedToken(content, special=True, normalized=False))
        if wanted:
            self.backend.add_tokens(wanted)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos = self.bos_token if add_bos and self.token_to_id(self.bos_token) is not None else None
        eos = self.eos_token if add_eos and self.token_to_id(self.eos_token) is not None else None
        single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
        pair = f"{single} {f'{bos}:1 ' if bos else ''}$B:1{f' {eos}:1' if eos else ''}"
        specials = [(t, self.backend.token_to_id(t)) for t in (bos, eos) if t]
        self.backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )

    def _classify_tokens(self, added: dict[int, AddedToken]) -> bytes:
        """One class byte per id: what a token can do to the text around it when decoded."""
        classes = bytearray(self.vocab_size)
        byte_fallback = "ByteFallback" in self.decoder_types
        byte_level = "ByteLevel" in self.decoder_types
        if byte_fallback or byte_level:
            chars = _byte_level_chars()
            for token, i in self.backend.get_vocab(with_added_tokens=False).items():
                if i >= len(classes) or not token:
                    continue
                is_byte = len(token) == 6 and token.startswith("<0x") and token[-1] == ">"
                is_byte = is_byte and all(h in "0123456789abcdefABCDEF" for h in token[3:5])
                if byte_fallback and is_byte:
                    classes[i] = BYTE
                elif byte_level and 0x80 <= chars.get(token[0], 0) <= 0xBF:
                    classes[i] = CONTINUATION
        for i, tok in added.items():
            if i < len(classes):
                classes[i] = SKIPPED if tok.special else NORMAL
        return bytes(classes)


def _may_shrink(normalizer: Any) -> bool:
    """Whether a normalizer can make the text shorter (Prepend and an empty Sequence cannot)."""
    if normalizer is None:
        return False
    state = json.loads(normalizer.__getstate__())
    pending = [state]
    while pending:
        node = pending.pop()
        if node.get("type") == "Sequence":
            pending.extend(node.get("normalizers") or [])
        elif node.get("type") != "Prepend":
            return True
    return False


def _eos_ids(generation_config: dict[str, Any]) -> Iterable[int]:
    value = generation_config.get("eos_token_id")
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


# The decode window is re-anchored once it holds more ids than this: per-token cost stays
# O(window) whatever the sequence length, and a small window keeps tokenizers' call cheap.
MAX_WINDOW = 4
# Past this many ids without a clean cut (text ending in U+FFFD step after step), the
# window is cut anyway, keeping the ids the pending character can come from.
HELD_WINDOW = 32
# Prompt ids decoded as the window's starting context (more when they decode to nothing).
PROMPT_CONTEXT = 4


class StreamingDetokenizer:
    """Text deltas for one sequence, exact with respect to a full decode.

    Contract (D(x) = tokenizer.decode(x), special tokens skipped; P = prompt ids,
    G = generated ids): the concatenation of all `add` deltas and `flush` is
    `D(P + G)[k:]`, where k is the length of the longest common prefix of D(P) and
    D(P + G). When D(P + G) starts with D(P) -- always, unless the prompt's ids end in
    the middle of a character -- that is `D(P + G)[len(D(P)):]`. Otherwise the
    decodes part inside the prompt's last character(s): if the prompt ends in half a
    character, the character the generated bytes complete is emitted whole; with byte
    fallback, a prompt-final run of byte tokens that the generated bytes make invalid
    is emitted as the U+FFFD characters the full decode has there.

    Emitted text is never taken back, so text is held while the next id could still
    change it: a final U+FFFD (possibly an incomplete UTF-8 sequence) and, for
    ByteFallback decoders, a trailing run of "<0xHH>" tokens (tokenizers turns a whole
    run into U+FFFDs when any byte of it is invalid). A delta therefore has U+FFFD
    only where the full decode has it, and never half a character; `flush` emits the
    rest. Exactness is property-tested for ByteLevel and SentencePiece-style
    (Metaspace / Replace + ByteFallback + Fuse + Strip) decoders; other decoders get
    the same algorithm, best effort.

    Cost: each step decodes a window of at most ~MAX_WINDOW ids (ids since a recent
    "clean cut": a boundary where all text was emitted and nothing is pending), plus
    one decode of a short anchor each time the window is re-anchored.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._decode = tokenizer.backend.decode
        self._classes = tokenizer.token_classes
        self._n_classes = len(tokenizer.token_classes)
        self._byte_fallback = "ByteFallback" in tokenizer.decoder_types
        self._done = False
        window, text, stable = self._prompt_window(list(prompt_ids))
        self._ids: list[int] = window  # decode window; its text starts with an emitted anchor
        self._emitted = stable  # chars of decode(self._ids) already emitted (or the prompt's)
        self._tail: str | None = text[stable:] or None  # prompt text the generation may rewrite
        self._cut = len(window) if self._tail is None else 0  # last clean cut in self._ids
        self._in_run = self._byte_fallback and self._run_start(window) < len(window)

    @property
    def window_size(self) -> int:
        """Ids in the decode window (bounded for ordinary text; the tests check it)."""
        return len(self._ids)

    def add(self, token_id: int) -> str:
        """Take one generated id; return the text that can be emitted now (maybe "")."""
        if self._done:
            raise RuntimeError("StreamingDetokenizer.add after flush")
        # _push inlined: this runs for every token of every sequence
        self._ids.append(token_id)
        c = self._classes[token_id] if 0 <= token_id < self._n_classes else SKIPPED
        if c == SKIPPED:
            return ""
        if self._byte_fallback:
            self._in_run = c == BYTE
            if self._in_run:
                return ""
        return self._step()

    def add_many(self, token_ids: Iterable[int]) -> str:
        """Take several ids at once (one decode); same text as calling `add` for each."""
        if self._done:
            raise RuntimeError("StreamingDetokenizer.add_many after flush")
        changed = False
        for t in token_ids:
            changed = self._push(t) or changed
        return self._step() if changed and not self._in_run else ""

    def flush(self) -> str:
        """End of sequence: return everything still held back. Later calls return ""."""
        if self._done:
            return ""
        self._done = True
        text: str = self._decode(self._ids, skip_special_tokens=True)
        if self._tail is not None:
            self._resolve_tail(text, len(text), final=True)
        out = text[self._emitted :]
        self._emitted = len(text)
        return out

    # -- internals -----------------------------------------------------------------------
    def _cls(self, t: int) -> int:
        # ids past the vocabulary (padded embeddings) decode to nothing, like special tokens
        return self._classes[t] if 0 <= t < self._n_classes else SKIPPED

    def _push(self, t: int) -> bool:
        """Append one id; True when the text may have grown and a decode step is due."""
        self._ids.append(t)
        c = self._cls(t)
        if c == SKIPPED:
            return False  # dropped before decoding: the text cannot change
        if self._byte_fallback:
            self._in_run = c == BYTE
            return not self._in_run
        return True

    def _step(self) -> str:
        text: str = self._decode(self._ids, skip_special_tokens=True)
        held = bool(text) and text[-1] == REPLACEMENT
        stable = len(text) - held
        if self._tail is not None and not self._resolve_tail(text, stable, final=False):
            return ""
        start = self._emitted
        if stable > start:
            self._emitted = stable
        if not held:
            self._advance()
        elif len(self._ids) > HELD_WINDOW and self._tail is None:
            self._shrink_held(len(text))
        return text[start:stable] if stable > start else ""

    def _advance(self) -> None:
        """The window's end is a clean cut: maybe drop ids before the previous clean cut."""
        n = len(self._ids)
        if n > MAX_WINDOW and 0 < self._cut < n:
            anchor = self._ids[self._cut :]
            text: str = self._decode(anchor, skip_special_tokens=True)
            # An empty anchor would let a decoder's leading-space strip reach new text.
            if text:
                self._ids = anchor
                self._emitted = len(text)
                self._cut = len(anchor)
                return
        self._cut = n

    def _shrink_held(self, text_len: int) -> None:
        """Bound the window when no clean cut comes (text keeps ending in U+FFFD).

        Only the last character is pending, and an incomplete UTF-8 sequence spans at
        most 3 bytes, so it lies within the last 3 decoded ids: start the window on a
        whole token before those, and carry over the count of chars still pending.
        """
        ids = self._ids
        c, seen = len(ids), 0
        while c > 0 and seen < 3:
            c -= 1
            seen += self._cls(ids[c]) != SKIPPED
        c -= MAX_WINDOW
        while c > 0 and self._cls(ids[c]) != NORMAL:
            c -= 1
        if c <= 0:
            return
        text: str = self._decode(ids[c:], skip_special_tokens=True)
        emitted = len(text) - (text_len - self._emitted)
        if emitted > 0:  # the emitted anchor is not empty
            self._ids = ids[c:]
            self._emitted = emitted
            self._cut = 0

    def _resolve_tail(self, text: str, stable: int, final: bool) -> bool:
        """Settle where the prompt's unstable tail and the new text part; True once known."""
        tail = self._tail
        assert tail is not None
        base = self._emitted
        limit = min(len(tail), max(0, stable - base))
        m = 0
        while m < limit and text[base + m] == tail[m]:
            m += 1
        if m == len(tail) or m < limit or final:
            self._emitted = base + m
            self._tail = None
            return True
        return False

    def _run_start(self, ids: Sequence[int]) -> int:
        """Index where a trailing run of byte tokens starts (specials inside it included)."""
        i = len(ids)
        has_byte = False
        while i > 0 and self._cls(ids[i - 1]) in (SKIPPED, BYTE):
            has_byte = has_byte or self._cls(ids[i - 1]) == BYTE
            i -= 1
        return i if has_byte else len(ids)

    def _stable_len(self, ids: list[int], text: str) -> int:
        """Length of the part of decode(ids) == text that no later id can change."""
        if self._byte_fallback:
            r = self._run_start(ids)
            if r < len(ids):
                text = self._decode(ids[:r], skip_special_tokens=True)
        return len(text) - (bool(text) and text[-1] == REPLACEMENT)

    def _prompt_window(self, prompt: list[int]) -> tuple[list[int], str, int]:
        """The prompt's last ids, from a clean start, whose stable text is not empty."""
        n = len(prompt)
        back = PROMPT_CONTEXT
        while True:
            j = max(0, n - back)
            while j > 0 and self._cls(prompt[j]) != NORMAL:
                j -= 1  # start on a whole character, outside byte runs: the window reads true
            window = prompt[j:]
            text: str = self._decode(window, skip_special_tokens=True)
            stable = self._stable_len(window, text)
            if j == 0 or stable > 0:
                return window, text, stable
            back = max(2 * back, n - j + 1)
