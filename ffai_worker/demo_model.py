"""The built-in demo model: served when `ffai-worker serve` gets no `--model`.

A tiny random-weight Llama with a byte-level tokenizer and a chat template,
built deterministically (fixed seed) into the user's cache on first use, so a
fresh machine can run the whole service offline. Its output is noise: it
exists to prove the plumbing, not to say anything. The vocabulary holds a few
hundred whole English words next to the 256 bytes, and the (untied) output
projection only ever favours the words, so the noise reads as a word salad
rather than as invalid UTF-8.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

DEMO_VERSION = 2
DEMO_NAME = f"ffai-demo-llama-v{DEMO_VERSION}"
SPECIALS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
WORDS = """
the a and to of in it was he she they we you I is on for with as at by from
but not all one had were said there what so up out if about who get which go me
when make can like time no just him know take people into year your good some
could them see other than then now look only come its over think also back after
use two how our work first well way even new want because any these give day most
cat dog bird fish tree sun moon star rain snow river sea hill road house door
window garden park school book story song game ball toy box cake apple bread milk
red blue green yellow big small happy sad little old young fast slow warm cold
run walk jump play sing read write find help look open close laugh smile sleep
dream friend mother father sister brother girl boy king queen dragon robot ship
morning night today tomorrow always never again together away home very much
""".split()
NOISE_WARNING = (
    "serving the built-in demo model (tiny, random weights): its output is noise. "
    "Pass --model <folder or hub id> for a real model."
)


def demo_model_dir() -> Path:
    """Where the demo model lives: the user cache directory."""
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ffai" / DEMO_NAME


def ensure_demo_model(path: Path | None = None) -> Path:
    """Build the demo model once; later calls return the existing folder."""
    path = path or demo_model_dir()
    if (path / "model.safetensors").exists():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_tokenizer(tmp)
    config = _write_config(tmp, vocab_size)
    _write_weights(tmp, config)
    try:
        tmp.rename(path)
    except OSError:  # another process built it first
        if not (path / "model.safetensors").exists():
            raise
    return path


def _write_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for piece in alphabet + ["\u0120" + word for word in dict.fromkeys(WORDS)]:
        vocab.setdefault(piece, len(vocab))  # "\u0120" (Ġ) is byte-level BPE's space
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 2048,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    gen = {"bos_token_id": 0, "eos_token_id": [1, 5], "temperature": 0.8}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return len(vocab)


def _write_config(folder: Path, vocab_size: int) -> dict[str, object]:
    config: dict[str, object] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return config


def _write_weights(folder: Path, config: dict[str, object]) -> None:
    import mlx.core as mx

    rng = np.random.default_rng(20261124)
    d, f = int(config["hidden_size"]), int(config["intermediate_size"])  # type: ignore[call-overload]
    v = int(config["vocab_size"])  # type: ignore[call-overload]
    heads, kv = int(config["num_attention_heads"]), int(config["num_key_value_heads"])  # type: ignore[call-overload]
    hd = d // heads

    def w(*shape: int) -> mx.array:
        return mx.array(rng.normal(0.0, 0.08, size=shape).astype(np.float32))

    # Output rows: zero for specials and bytes, strong for words, so words win every draw.
    first_word = len(SPECIALS) + 256
    head = np.zeros((v, d), dtype=np.float32)
    head[first_word:] = rng.normal(0.0, 0.35, size=(v - first_word, d))
    weights = {
        "model.embed_tokens.weight": w(v, d),
        "model.norm.weight": mx.ones((d,)),
        "lm_head.weight": mx.array(head),
    }
    for i in range(int(config["num_hidden_layers"])):  # type: ignore[call-overload]
        pre = f"model.layers.{i}."
        weights |= {
            pre + "self_attn.q_proj.weight": w(heads * hd, d),
            pre + "self_attn.k_proj.weight": w(kv * hd, d),
            pre + "self_attn.v_proj.weight": w(kv * hd, d),
            pre + "self_attn.o_proj.weight": w(d, heads * hd),
            pre + "mlp.gate_proj.weight": w(f, d),
            pre + "mlp.up_proj.weight": w(f, d),
            pre + "mlp.down_proj.weight": w(d, f),
            pre + "input_layernorm.weight": mx.ones((d,)),
            pre + "post_attention_layernorm.weight": mx.ones((d,)),
        }
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
