"""Batched prefill: several whole short prompts in one forward pass.

Why: on a memory-bound CPU a forward pass costs about one read of all the
weights whatever its row count, so prefilling N new prompts one by one costs N
weight reads where one suffices. Only
prompts that start at position 0 and fit the step's budget whole are grouped;
longer ones keep the chunked single-sequence path.

The group is right-padded to its longest prompt. A row's real tokens sit at
positions 0..L_i-1 and under the causal mask attend only to each other, so
padding never reaches them; only the real positions are written to the row's
KV slot, and the logits are taken at each row's last real token.
"""

from __future__ import annotations

import mlx.core as mx

from ffai_worker.engine.kv_cache import SlotCache
from ffai_worker.models.contract import CausalLM


class GroupPrefillView:
    """One layer's cache for a group of fresh prompts (all starting at position 0)."""

    offset = 0

    def __init__(self, cache: SlotCache, layer: int, slots: list[int], lengths: list[int]):
        self.cache, self.layer, self.slots, self.lengths = cache, layer, slots, lengths

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        # keys/values: (G, n_kv, L, D); the group's whole context is exactly these.
        c, layer = self.cache, self.layer
        for row, (slot, n) in enumerate(zip(self.slots, self.lengths, strict=True)):
            c.keys[layer][slot : slot + 1, :, :n, :] = keys[row : row + 1, :, :n, :]
            c.values[layer][slot : slot + 1, :, :n, :] = values[row : row + 1, :, :n, :]
        return keys, values


def prefill_group_logits(
    model: CausalLM, cache: SlotCache, slots: list[int], prompts: list[list[int]]
) -> mx.array:
    """Write every prompt's KV into its slot; return each one's last-token logits (G, V)."""
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    cache.ensure_capacity(width)
    for slot, n in zip(slots, lengths, strict=True):
        cache.lengths[slot] = n
    inputs = mx.array([p + [0] * (width - len(p)) for p in prompts], dtype=mx.int32)  # (G, L)
    views = [GroupPrefillView(cache, layer, slots, lengths) for layer in range(cache.num_layers)]
    hidden = model.hidden_states(inputs, views, "causal")  # (G, L, D)
    rows = mx.arange(len(prompts))
    last = hidden[rows, mx.array([n - 1 for n in lengths])]  # (G, D)
    return model.logits(last[:, None, :])[:, 0, :]  # (G, V)
