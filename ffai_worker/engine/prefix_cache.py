"""The prefix cache: KV of token prefixes computed before, so a prompt seen before skips prefill.

Structure: a radix tree over token ids (as SGLang's RadixAttention). Each node
holds a run of tokens and an opaque `Segment` with their keys and values for
every layer (`kv_cache.KVSegment`); a path from the root spells a token prefix
whose KV is the concatenation of the path's segments. Token granularity: a hit
is the whole longest common prefix, not rounded to blocks, and sequences that
share a prefix (a system prompt, the earlier turns of a chat) store it once.

Why copies, not shared blocks: the engine's `SlotCache` keeps each running
sequence contiguous (its batched decode reads the leading rows with no
gather), so a hit is copied into the sequence's slot once, at admission. A
running sequence therefore never reads the tree, and eviction can never touch
KV a running sequence uses: what it uses lives in its slot.

Hits shorter than `min_hit` tokens (16, vLLM's block size) count as misses: a
copy saves little there, and a prompt that is not a hit can still be prefilled
in one forward with other fresh prompts (every prompt shares BOS, at least).

Bounded: the tree holds at most `capacity_bytes` of KV. Eviction drops the
least recently used leaf (a hit refreshes every node on its path) until a new
segment fits; a segment larger than the whole cache is cut to fit.

No MLX here (segments are opaque), so the scheduler can plan hits without a
model and this module is unit-tested on its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

MIN_HIT = 16  # shorter common prefixes are prefilled anyway


class Segment(Protocol):
    """KV of consecutive positions; the tree only ever splits one in two."""

    def split(self, at: int) -> tuple[Segment, Segment]:
        """(positions [0, at), positions [at, end)) as two independent segments."""
        ...


class _Node:
    __slots__ = ("children", "kv", "parent", "tokens")

    def __init__(self, tokens: tuple[int, ...], kv: Segment | None, parent: _Node | None) -> None:
        self.tokens = tokens
        self.kv = kv
        self.parent = parent
        self.children: dict[int, _Node] = {}


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """The first `length` tokens of a prompt are cached: `parts` in order, each (segment, used)."""

    length: int
    parts: tuple[tuple[Segment, int], ...]


@dataclass
class PrefixCacheStats:
    """Counters reported by `info` (and kept across clears)."""

    hits: int = 0  # admissions that found a cached prefix
    hit_tokens: int = 0  # prompt tokens those hits did not prefill
    misses: int = 0  # admissions that found none
    evictions: int = 0  # segments dropped to make room


@dataclass
class PrefixCache:
    """A radix tree of cached token prefixes, LRU by bytes."""

    capacity_bytes: int
    bytes_per_token: int
    min_hit: int = MIN_HIT
    counters: PrefixCacheStats = field(default_factory=PrefixCacheStats)

    def __post_init__(self) -> None:
        self._root = _Node((), None, None)
        # Every node but the root, least recently used first. A path is touched leaf
        # first, so a parent is always later than its children: the first node is a leaf.
        self._order: OrderedDict[_Node, None] = OrderedDict()
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes >= self.bytes_per_token > 0

    @property
    def entries(self) -> int:
        """Token runs stored (tree nodes)."""
        return len(self._order)

    def info(self) -> dict[str, int]:
        c = self.counters
        return {
            "prompt_cache_capacity_bytes": self.capacity_bytes,
            "prompt_cache_entries": self.entries,
            "prompt_cache_bytes": self.bytes,
            "prompt_cache_hits": c.hits,
            "prompt_cache_hit_tokens": c.hit_tokens,
            "prompt_cache_misses": c.misses,
            "prompt_cache_evictions": c.evictions,
        }

    # -- lookup ----------------------------------------------------------------
    def match(self, tokens: Sequence[int], limit: int) -> PrefixHit | None:
        """The longest cached prefix of `tokens[:limit]` (counted as a hit or a miss)."""
        if not self.enabled:
            return None
        path, length = self._walk(tokens, limit)
        if length < max(1, self.min_hit):
            self.counters.misses += 1
            return None
        parts: list[tuple[Segment, int]] = []
        left = length
        for node in path:
            used = min(len(node.tokens), left)
            assert node.kv is not None
            parts.append((node.kv, used))
            left -= used
        self._touch(path)
        self.counters.hits += 1
        self.counters.hit_tokens += length
        return PrefixHit(length, tuple(parts))

    def _walk(self, tokens: Sequence[int], limit: int) -> tuple[list[_Node], int]:
        """Nodes along the longest common prefix (the last one maybe partly), and its length."""
        node, m, path = self._root, 0, []
        limit = min(limit, len(tokens))
        while m < limit:
            child = node.children.get(tokens[m])
            if child is None:
                break
            n = _common(child.tokens, tokens, m, limit)
            path.append(child)
            m += n
            if n < len(child.tokens):
                break
            node = child
        return path, m

    # -- insertion -------------------------------------------------------------
    def insert(self, tokens: Sequence[int], take: Callable[[int, int], Segment]) -> int:
        """Remember the KV of `tokens`; `take(start, end)` copies positions [start, end) of it.

        Only the part not cached yet is taken. Returns the tokens newly stored.
        """
        if not self.enabled or not tokens:
            return 0
        path, m = self._walk(tokens, len(tokens))
        if m == len(tokens):
            self._touch(path)
            return 0
        parent = self._root
        if path:
            last = path[-1]
            consumed = m - sum(len(n.tokens) for n in path[:-1])
            if consumed < len(last.tokens):
                last = self._split(last, consumed)
                path[-1] = last
            parent = last
        self._touch(path)
        size = len(tokens) - m
        self._evict(size * self.bytes_per_token, protect=set(path))
        size = min(size, (self.capacity_bytes - self.bytes) // self.bytes_per_token)
        if size <= 0:
            return 0
        leaf = _Node(tuple(tokens[m : m + size]), take(m, m + size), parent)
        parent.children[leaf.tokens[0]] = leaf
        self._order[leaf] = None
        self.bytes += size * self.bytes_per_token
        return size

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node` after `at` tokens; return the new head (the node keeps the tail)."""
        assert node.kv is not None and node.parent is not None and 0 < at < len(node.tokens)
        head_kv, tail_kv = node.kv.split(at)
        head = _Node(node.tokens[:at], head_kv, node.parent)
        node.parent.children[head.tokens[0]] = head
        node.tokens, node.kv, node.parent = node.tokens[at:], tail_kv, head
        head.children[node.tokens[0]] = node
        self._order[head] = None  # after its child, as the order requires
        return head

    def _touch(self, path: list[_Node]) -> None:
        for node in reversed(path):
            self._order.move_to_end(node)

    def _evict(self, needed: int, protect: set[_Node]) -> None:
        """Drop least recently used leaves outside `protect` until `needed` bytes fit."""
        for node in list(self._order):
            if self.bytes + needed <= self.capacity_bytes:
                return
            if node.children or node in protect:
                continue
            self._remove(node)
            self.counters.evictions += 1

    def _remove(self, node: _Node) -> None:
        assert node.parent is not None
        del node.parent.children[node.tokens[0]]
        del self._order[node]
        self.bytes -= len(node.tokens) * self.bytes_per_token
        node.kv = None

    def clear(self) -> None:
        """Forget every segment (counters stay)."""
        self._root = _Node((), None, None)
        self._order.clear()
        self.bytes = 0

    def export(self) -> list[tuple[int, tuple[int, ...], Segment]]:
        """Every node as (parent's index in this list or -1, tokens, segment), to save it.

        Most recently used first, so a parent always precedes its children.
        """
        index: dict[_Node, int] = {}
        out: list[tuple[int, tuple[int, ...], Segment]] = []
        for node in reversed(self._order):
            assert node.parent is not None and node.kv is not None
            index[node] = len(out)
            out.append((index.get(node.parent, -1), node.tokens, node.kv))
        return out

    def restore(self, nodes: Sequence[tuple[int, tuple[int, ...], Segment]]) -> int:
        """Rebuild from `export()`'s list into an empty cache, most recent first, while it fits.

        A node whose parent was left out (or that clashes with a sibling) is left out
        too. Returns the tokens restored.
        """
        assert not self._order, "restore into an empty cache"
        added: list[_Node | None] = []
        for parent_at, tokens, kv in nodes:
            parent = self._root if parent_at < 0 else _at(added, parent_at)
            size = len(tokens) * self.bytes_per_token
            if parent is None or not tokens or tokens[0] in parent.children:
                added.append(None)
                continue
            if self.bytes + size > self.capacity_bytes:
                added.append(None)
                continue
            node = _Node(tuple(tokens), kv, parent)
            parent.children[node.tokens[0]] = node
            self.bytes += size
            added.append(node)
        for node in reversed(added):  # least recently used first
            if node is not None:
                self._order[node] = None
        return self.bytes // self.bytes_per_token


def _at(nodes: list[_Node | None], i: int) -> _Node | None:
    return nodes[i] if 0 <= i < len(nodes) else None


def _common(run: tuple[int, ...], tokens: Sequence[int], start: int, limit: int) -> int:
    """How many leading tokens of `run` equal tokens[start:limit]."""
    n = min(len(run), limit - start)
    if tuple(tokens[start : start + n]) == run[:n]:
        return n
    i = 0
    while i < n and run[i] == tokens[start + i]:
        i += 1
    return i
