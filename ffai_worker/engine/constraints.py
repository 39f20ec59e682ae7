"""Structured output: a request's `response_format` as an llguidance matcher, and batched masks.

`ConstraintCompiler` turns a `response_format` (JSON schema, any JSON object,
regex, Lark grammar, or a list of choices) into an llguidance grammar and a
matcher in its start state. It runs on a preparation thread (serving/
admission.py), before the request is admitted: a grammar llguidance cannot
compile is refused there with `invalid_parameters` and never reaches a step.
Compiled matchers are cached by the format's content (LRU); each request gets
a `deep_copy` of one (cheap: the lexer and grammar are shared).

In a step, `allowed_mask` fills the token masks of all constrained rows at
once (llguidance's executor computes them in parallel, without the GIL) and
returns a (B, V) bool array; unconstrained rows are all True, so masking
them with `where` leaves their logits bit for bit as they were. The runner
applies it before sampling. The EOS bits are set exactly when the grammar
accepts; after each token the matcher is advanced (`Constraint.advance`),
and a matcher that cannot be extended any more ends the sequence (`stop`).

The llguidance tokenizer costs seconds to build for a 150k vocabulary, so it
is built once per engine, on the first constrained request (on a preparation
thread in the worker), never on the actor thread's hot path.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

if TYPE_CHECKING:
    import llguidance

    from ffai_worker.text.tokenizer import Tokenizer

CACHE_ENTRIES = 64  # compiled formats kept (each a matcher in its start state)
# Compact JSON unless the schema's "x-guidance" says otherwise: free whitespace lets a
# weak model pad forever between tokens and never close the object.
JSON_DEFAULTS: dict[str, Any] = {"whitespace_flexible": False}


class ConstraintError(ValueError):
    """A response_format that cannot be enforced; the message names the problem."""


def grammar_source(fmt: Mapping[str, Any]) -> str | None:
    """The llguidance grammar of a (shape-checked) response_format; None for plain text."""
    import llguidance

    kind = fmt.get("type")
    build = llguidance.LLMatcher
    try:
        if kind == "json_schema":
            inner = fmt.get("json_schema")
            schema = inner.get("schema") if isinstance(inner, Mapping) else fmt.get("schema")
            return build.grammar_from_json_schema(dict(schema or {}), defaults=JSON_DEFAULTS)
        if kind == "json_object":
            return build.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
        if kind == "regex":
            return build.grammar_from_regex(str(fmt["pattern"]))
        if kind == "grammar":
            return build.grammar_from_lark(str(fmt["lark"]))
        if kind == "choice":
            # JSON string literals are valid Lark literals: quotes and escapes survive.
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in fmt["choices"])
            return build.grammar_from_lark(f"start: {alternatives}\n")
    except (ValueError, TypeError, KeyError) as exc:
        raise ConstraintError(f"response_format ({kind}) is invalid: {exc}") from None
    if kind == "text":
        return None
    raise ConstraintError(f"response_format type {kind!r} is not supported")


class Constraint:
    """One sequence's matcher: which tokens may come next, and whether it is complete."""

    __slots__ = ("matcher", "width")

    def __init__(self, matcher: llguidance.LLMatcher, width: int) -> None:
        self.matcher = matcher
        self.width = width  # the vocabulary its masks cover

    def advance(self, token: int) -> bool:
        """Consume a sampled token; True when the sequence must stop (complete or broken)."""
        m = self.matcher
        if m.is_stopped():
            return True  # only EOS was allowed, and it was the token (the caller stops on it)
        if not m.consume_token(token):
            return True  # cannot happen for a masked draw; never run past a broken matcher
        return m.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class ConstraintCompiler:
    """Compiles response formats for one tokenizer; thread-safe, cached by content."""

    def __init__(self, tokenizer: Tokenizer, logits_width: int) -> None:
        self.tokenizer = tokenizer
        self.logits_width = max(logits_width, tokenizer.vocab_size)
        self._lock = threading.Lock()
        self._lltok: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, llguidance.LLMatcher | str] = OrderedDict()

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self._lltok is None:
            import llguidance

            tok = self.tokenizer
            eos = sorted(tok.eos_token_ids) or None
            self._lltok = llguidance.LLTokenizer(
                tok.backend.to_str(), n_vocab=self.logits_width, eos_token=eos
            )
        return self._lltok

    def compile(self, fmt: Mapping[str, Any]) -> Constraint | None:
        """A fresh constraint for `fmt` (None for `text`); raises ConstraintError."""
        key = json.dumps(fmt, sort_keys=True, ensure_ascii=False)
        with self._lock:
            found = self._cache.get(key)
            if found is None:
                found = self._build(fmt)
                self._cache[key] = found
                if len(self._cache) > CACHE_ENTRIES:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
        if isinstance(found, str):
            if not found:
                return None
            raise ConstraintError(found)
        return Constraint(found.deep_copy(), self.logits_width)

    def _build(self, fmt: Mapping[str, Any]) -> llguidance.LLMatcher | str:
        """A start-state matcher, or the error message (cached like a success; "" = no grammar)."""
        import llguidance

        try:
            grammar = grammar_source(fmt)
        except ConstraintError as exc:
            return str(exc)
        if grammar is None:
            return ""
        matcher = llguidance.LLMatcher(self._ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            return f"response_format ({fmt.get('type')}) cannot be compiled: {matcher.get_error()}"
        return matcher


_EXECUTOR: Any = None


def _executor() -> Any:
    global _EXECUTOR
    if _EXECUTOR is None:
        import llguidance

        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR


def allowed_mask(constraints: Sequence[Constraint | None], width: int) -> mx.array | None:
    """(B, width) bool: the tokens each row may sample next; None when no row is constrained."""
    rows = [(c, i) for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return None
    from llguidance.numpy import fill_next_token_bitmask_par

    own = -(-rows[0][0].width // 32)  # words per mask, as the matchers write them
    bits = np.full((len(constraints), max(own, -(-width // 32))), -1, dtype=np.int32)
    target = bits if bits.shape[1] == own else np.zeros((len(constraints), own), np.int32)
    fill_next_token_bitmask_par(_executor(), [(c.matcher, i) for c, i in rows], target)
    if target is not bits:  # logits wider than the matcher's vocabulary: the rest is banned
        for _, i in rows:
            bits[i] = 0
            bits[i, :own] = target[i]
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :width]
    return mx.array(allowed.astype(np.bool_))
