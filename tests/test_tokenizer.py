"""Tokenizer: encode / decode parity with transformers' AutoTokenizer on the shared tokenizers."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

import ffai_worker  # noqa: F401  (preloads BLAS before anything imports mlx)
from ffai_worker.text.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINYSTORIES = SHARED / "models" / "tinystories-260k"
FOLDERS = {
    "tinystories": TINYSTORIES,
    "llama3": SHARED / "tokenizers" / "llama3",
    "qwen2.5": SHARED / "tokenizers" / "qwen2.5",
    "deepseek-v4": SHARED / "tokenizers" / "deepseek-v4",
}

TEXTS = [
    "",
    " ",
    "Lily and Ben",
    " leading space",
    "trailing space ",
    "double  space   and\tthree\t\ttabs",
    "\n\nnewlines\r\nand CRLF\n",
    "def add(a, b):\n\treturn a + b  # sum\n\n    indented = [1, 2, 3]\n",
    "café, cafe\u0301, naïve, Ångström",  # precomposed and combining (Qwen normalizes NFC)
    "你好，世界！今日は良い天気ですね。안녕하세요",
    "👩‍👩‍👧‍👦 family, 🇫🇷🇯🇵 flags, 👍🏽 thumbs",
    "مرحبا بالعالم — नमस्ते दुनिया",
    "1234567890 3.14159 1e-9 x² ½ Ω ﬁ",
    "<s>Hi</s>",
    "<|begin_of_text|>Hi<|eot_id|>",
    "<|im_start|>user\nhello<|im_end|>\n",
    "<｜begin▁of▁sentence｜>x<｜User｜>y",
    "literal \ufffd replacement and \u00a0nbsp and \x07 bell",
]


def _token_strings(path: Path) -> dict[str, int]:
    data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    return {t["content"]: t["id"] for t in data["added_tokens"]}


@pytest.fixture(scope="module", params=list(FOLDERS))
def pair(request: pytest.FixtureRequest) -> tuple[str, Tokenizer, Any]:
    path = FOLDERS[request.param]
    return request.param, Tokenizer.from_folder(path), AutoTokenizer.from_pretrained(path)


def test_encode_matches_transformers(pair: tuple[str, Tokenizer, Any]) -> None:
    name, ours, theirs = pair
    for text in TEXTS:
        for add in (True, False):
            expected = theirs.encode(text, add_special_tokens=add)
            assert ours.encode(text, add_special_tokens=add) == expected, (name, text, add)
    # BOS comes from exactly one place, whichever of tokenizer.json or the config holds it
    ids = ours.encode("Lily and Ben")
    if ours.add_bos_token:
        assert ids[0] == ours.bos_token_id and ids[1] != ours.bos_token_id
    else:
        assert ours.bos_token_id not in ids


def test_decode_matches_transformers(pair: tuple[str, Tokenizer, Any]) -> None:
    name, ours, theirs = pair
    rng = random.Random(1234)
    specials = sorted(ours.special_token_ids)
    cases = [theirs.encode(t) for t in TEXTS]
    for _ in range(200):
        n = rng.randrange(1, 30)
        cases.append(
            [
                rng.choice(specials) if rng.random() < 0.15 else rng.randrange(len(theirs))
                for _ in range(n)
            ]
        )
    for ids in cases:
        for skip in (True, False):
            expected = theirs.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, (name, ids, skip)
    assert ours.decode(theirs.encode("Lily and Ben")) == "Lily and Ben"


def test_vocabulary_and_special_tokens(pair: tuple[str, Tokenizer, Any]) -> None:
    _, ours, theirs = pair
    assert ours.vocab_size == len(theirs)
    assert ours.bos_token == theirs.bos_token and ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token == theirs.eos_token and ours.eos_token_id == theirs.eos_token_id
    special = {i for i, t in theirs.added_tokens_decoder.items() if t.special}
    assert ours.special_token_ids == special
    assert ours.eos_token_id in ours.eos_token_ids


def test_special_token_strings_and_flags() -> None:
    llama3 = Tokenizer.from_folder(FOLDERS["llama3"])
    assert (llama3.bos_token, llama3.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert llama3.add_bos_token and llama3.encode("x")[0] == 128000
    qwen = Tokenizer.from_folder(FOLDERS["qwen2.5"])
    assert qwen.bos_token is None and qwen.bos_token_id is None and not qwen.add_bos_token
    assert qwen.eos_token_ids == {_token_strings(FOLDERS["qwen2.5"])["<|im_end|>"]}
    # DeepSeek's config writes its specials as AddedToken dicts
    deepseek = Tokenizer.from_folder(FOLDERS["deepseek-v4"])
    assert deepseek.bos_token == "<｜begin▁of▁sentence｜>" and deepseek.bos_token_id == 0
    assert deepseek.eos_token == "<｜end▁of▁sentence｜>" and deepseek.eos_token_ids == {1}
    assert not deepseek.add_bos_token and deepseek.chat_templates == {}


def test_eos_ids_merge_generation_config() -> None:
    # tinystories ends stories with <s> (1): its generation_config lists [2, 1]
    assert Tokenizer.from_folder(TINYSTORIES).eos_token_ids == {1, 2}
    given = json.loads((TINYSTORIES / "generation_config.json").read_text())
    assert Tokenizer.from_folder(TINYSTORIES, given).eos_token_ids == {1, 2}
    assert Tokenizer.from_folder(TINYSTORIES, {"eos_token_id": 7}).eos_token_ids == {2, 7}
    assert Tokenizer.from_folder(TINYSTORIES, {}).eos_token_ids == {2}


@pytest.mark.parametrize("name", ["tinystories", "llama3", "qwen2.5"])
def test_encode_rendered_matches_apply_chat_template(name: str) -> None:
    theirs: Any = AutoTokenizer.from_pretrained(FOLDERS[name])
    ours = Tokenizer.from_folder(FOLDERS[name])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about <s> tokens and 👩‍👩‍👧‍👦."},
    ]
    rendered: str = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    encoded = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = list(encoded["input_ids"] if "input_ids" in encoded else encoded)
    ids = ours.encode_rendered(rendered)
    assert ids == expected
    if ours.bos_token_id is not None:
        assert ours.bos_token is not None and rendered.startswith(ours.bos_token)
        assert ids[0] == ours.bos_token_id and ids[1] != ours.bos_token_id  # one BOS, not two
        assert ours.encode(rendered)[:2] == [ours.bos_token_id] * 2  # what encode() would do


def test_chat_templates_from_config_and_files(tmp_path: Path) -> None:
    tiny = Tokenizer.from_folder(TINYSTORIES)
    assert tiny.chat_templates == {
        "default": (TINYSTORIES / "chat_template.jinja").read_text(encoding="utf-8")
    }
    llama3 = Tokenizer.from_folder(FOLDERS["llama3"])
    config = json.loads((FOLDERS["llama3"] / "tokenizer_config.json").read_text())
    assert llama3.chat_templates == {"default": config["chat_template"]}
    assert llama3.chat_template == config["chat_template"]

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(TINYSTORIES / "tokenizer.json", folder / "tokenizer.json")
    listed = [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}]
    config = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": listed}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_folder(folder).chat_templates == {"default": "A", "tool_use": "B"}
    # template files replace the config's entries, as in transformers
    (folder / "chat_template.jinja").write_text("J")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "rag.jinja").write_text("R")
    tok = Tokenizer.from_folder(folder)
    assert tok.chat_templates == {"default": "J", "rag": "R"}
    assert tok.bos_token == "<s>" and tok.eos_token_ids == {2}


@pytest.mark.parametrize(("add_bos", "add_eos"), [(True, False), (False, False), (True, True)])
def test_config_decides_bos_when_tokenizer_json_has_no_post_processor(
    tmp_path: Path, add_bos: bool, add_eos: bool
) -> None:
    data = json.loads((TINYSTORIES / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": add_bos}
    config["add_eos_token"] = add_eos
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_folder(tmp_path)
    body = tok.encode("Lily and Ben", add_special_tokens=False)
    assert body == [317, 269, 368, 302]
    assert tok.encode("Lily and Ben") == [1] * add_bos + body + [2] * add_eos
    assert tok.add_bos_token == add_bos
    rendered = tok.encode_rendered("<s>Lily and Ben")
    assert rendered[0] == 1 and rendered.count(1) == 1


def test_tokenizer_json_post_processor_wins_over_config(tmp_path: Path) -> None:
    # transformers (5.x) drops add_bos_token when tokenizer.json exists: its post-processor rules
    shutil.copy(TINYSTORIES / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_folder(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert ours.encode("Lily") == theirs.encode("Lily") == [1, 317]


def test_tokens_named_only_in_config_are_added(tmp_path: Path) -> None:
    shutil.copy(TINYSTORIES / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {
        "bos_token": "<s>",
        "eos_token": "<|end|>",
        "added_tokens_decoder": {"512": {"content": "<|user|>", "special": True}},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_folder(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert ours.vocab_size == len(theirs) == 514
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours.token_to_id("<|user|>") == theirs.convert_tokens_to_ids("<|user|>")
    text = "Hi<|user|>Lily<|end|>"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.decode(ours.encode(text)) == theirs.decode(
        theirs.encode(text), skip_special_tokens=True
    )
