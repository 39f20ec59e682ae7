"""The prefix cache on disk (`--prompt-cache-dir`): written at shutdown, read back at start.

Per model, two files named after a hash of its identity: `<id>.safetensors`
(every tree node's keys and values, `n<i>.k` / `n<i>.v`) and `<id>.json` (the
identity, and per node its parent, its tokens and its tensors' names). The
identity is what makes a KV prefix valid: the model (its path or hub id, the
bytes of its config.json, its weight files' names and sizes), the KV dtype
and shape. A file for another identity, a corrupt or truncated one, or
tensors of the wrong shape are skipped with a warning, never a crash; what is
read back obeys the cache's byte bound (most recently used prefixes first).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import mlx.core as mx

from ffai_worker.engine.kv_cache import KVSegment, SlotCache
from ffai_worker.engine.prefix_cache import PrefixCache, Segment

log = logging.getLogger("ffai_worker")

FORMAT = 1


def model_identity(model_id: str, folder: Path, cache: SlotCache) -> dict[str, Any]:
    """What a saved prefix must match to be reused: model files, KV dtype and shape."""
    config = folder / "config.json"
    config_hash = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else ""
    weights = sorted(
        (p.name, p.stat().st_size) for p in folder.glob("*.safetensors") if p.is_file()
    )
    return {
        "format": FORMAT,
        "model": model_id,
        "config_sha256": config_hash,
        "weights": [list(w) for w in weights],
        "dtype": str(cache.dtype),
        "layers": cache.num_layers,
        "kv_heads": cache.n_kv_heads,
        "head_dim": cache.head_dim,
    }


def _stem(identity: dict[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True)
    return "prefix-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def save(prefix: PrefixCache, folder: Path, identity: dict[str, Any]) -> int:
    """Write the cache's nodes (atomically, replacing an older save); return tokens written."""
    nodes = prefix.export()
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / _stem(identity)
    tensors: dict[str, mx.array] = {}
    index = []
    for i, (parent, tokens, seg) in enumerate(nodes):
        assert isinstance(seg, KVSegment)
        tensors[f"n{i}.k"], tensors[f"n{i}.v"] = seg.keys, seg.values
        index.append({"parent": parent, "tokens": list(tokens)})
    tmp = stem.with_name(stem.name + ".tmp")
    if tensors:
        mx.save_safetensors(str(tmp) + ".safetensors", tensors)
        os.replace(str(tmp) + ".safetensors", str(stem) + ".safetensors")
    text = json.dumps({"identity": identity, "nodes": index})
    Path(str(tmp) + ".json").write_text(text, encoding="utf-8")
    os.replace(str(tmp) + ".json", str(stem) + ".json")  # the index last: it names the tensors
    return sum(len(t) for _, t, _ in nodes)


def load(prefix: PrefixCache, folder: Path, identity: dict[str, Any]) -> int:
    """Read a save of this identity back into the (empty) cache; return the tokens restored."""
    stem = folder / _stem(identity)
    index_path = Path(str(stem) + ".json")
    if not index_path.is_file():
        return 0
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("identity") != identity:
            log.warning("prompt cache %s is for another model or dtype; skipped", index_path)
            return 0
        nodes = _read_nodes(index["nodes"], Path(str(stem) + ".safetensors"), identity)
    except Exception as exc:  # corrupt, truncated, hand-edited: never fatal
        log.warning("prompt cache %s is unreadable (%s); skipped", index_path, exc)
        return 0
    return prefix.restore(nodes)


def _read_nodes(
    entries: list[dict[str, Any]], path: Path, identity: dict[str, Any]
) -> list[tuple[int, tuple[int, ...], Segment]]:
    if not entries:
        return []
    tensors = mx.load(str(path))
    assert isinstance(tensors, dict)
    nodes: list[tuple[int, tuple[int, ...], Segment]] = []
    for i, entry in enumerate(entries):
        parent, tokens = entry["parent"], tuple(entry["tokens"])
        if not (isinstance(parent, int) and -1 <= parent < i):
            raise ValueError(f"node {i} has a bad parent {parent!r}")
        if not tokens or not all(isinstance(t, int) and t >= 0 for t in tokens):
            raise ValueError(f"node {i} has bad tokens")
        keys, values = tensors[f"n{i}.k"], tensors[f"n{i}.v"]
        shape = (identity["layers"], identity["kv_heads"], len(tokens), identity["head_dim"])
        for t in (keys, values):
            if tuple(t.shape) != shape or str(t.dtype) != identity["dtype"]:
                raise ValueError(f"node {i}: {t.shape} {t.dtype}, expected {shape}")
        nodes.append((parent, tokens, KVSegment(keys, values)))
    mx.eval(*[(s.keys, s.values) for _, _, s in nodes if isinstance(s, KVSegment)])
    return nodes
