"""Conversations for the chat-template parity tests: plain transformers-style dicts."""

from __future__ import annotations

from typing import Any

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a location, in °C or °F — «quoted»",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {
                    "type": "string",
                    "description": "The city and country, e.g. Zürich, Switzerland",
                },
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}

SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in one sentence."}
USER = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT = {"role": "assistant", "content": "The capital of France is Paris."}
USER_2 = {"role": "user", "content": "And of Japan? 日本語でも 🌸"}
WEATHER_ASK = {"role": "user", "content": "What's the weather in Paris right now?"}

# Mistral requires tool call ids of exactly 9 alphanumeric characters.
TOOL_CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {
            "id": "call12345",
            "type": "function",
            "function": {
                "name": "get_current_weather",
                "arguments": {"location": "Paris, France", "unit": "celsius"},
            },
        }
    ],
}
TOOL_CALL_STRING_ARGS = {
    "role": "assistant",
    "content": None,  # OpenAI-style; transformers drops None-valued keys
    "tool_calls": [
        {
            "id": "call12345",
            "type": "function",
            "function": {
                "name": "get_current_weather",
                "arguments": '{"location": "Paris, France"}',
            },
        }
    ],
}
TOOL_RESULT = {
    "role": "tool",
    "tool_call_id": "call12345",
    "name": "get_current_weather",
    "content": '{"temperature": 22, "unit": "celsius"}',
}
TWO_TOOL_CALLS = {
    **TOOL_CALL,
    "tool_calls": [*TOOL_CALL["tool_calls"], {**TOOL_CALL["tool_calls"][0], "id": "call67890"}],
}
REASONED = {
    "role": "assistant",
    "content": "Paris.",
    "reasoning_content": "The user asks about France; its capital is Paris.",
}
DOCUMENTS = [
    {"doc_id": "1", "title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"doc_id": "2", "title": "Tokyo", "text": "Tokyo is the capital of Japan."},
]


def _case(messages: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    options.setdefault("add_generation_prompt", True)
    return {"messages": messages, "options": options}


# name -> {"messages": [...], "options": {add_generation_prompt, continue_final_message,
# tools, documents, and template variables}}. Many templates reject some of these; the
# tests then require the same error as transformers.
CASES: dict[str, dict[str, Any]] = {
    "user": _case([USER]),
    "system_user": _case([SYSTEM, USER]),
    "multi_turn": _case([SYSTEM, USER, ASSISTANT, USER_2]),
    "no_generation_prompt": _case([USER, ASSISTANT], add_generation_prompt=False),
    "continue_final": _case(
        [USER, {"role": "assistant", "content": "The capital is"}],
        add_generation_prompt=False,
        continue_final_message=True,
    ),
    "continue_trailing_space": _case(
        [SYSTEM, USER, {"role": "assistant", "content": "Well, the answer is "}],
        add_generation_prompt=False,
        continue_final_message=True,
    ),
    "continue_with_generation_prompt": _case(
        [USER, {"role": "assistant", "content": "The capital is"}], continue_final_message=True
    ),
    "continue_reasoning": _case(
        [USER, {"role": "assistant", "content": "", "reasoning_content": "France... its capital"}],
        add_generation_prompt=False,
        continue_final_message="reasoning_content",
    ),
    "continue_list_parts": _case(
        [
            USER,
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "The capital"},
                    {"type": "image"},
                    {"type": "text", "text": "is"},
                    {"type": "image"},
                ],
            },
        ],
        add_generation_prompt=False,
        continue_final_message=True,
    ),
    "tools": _case([SYSTEM, WEATHER_ASK], tools=[WEATHER_TOOL]),
    "tools_no_system": _case([WEATHER_ASK], tools=[WEATHER_TOOL]),
    "tool_call_roundtrip": _case([WEATHER_ASK, TOOL_CALL, TOOL_RESULT], tools=[WEATHER_TOOL]),
    "tool_call_string_args": _case([WEATHER_ASK, TOOL_CALL_STRING_ARGS, TOOL_RESULT]),
    "two_tool_calls": _case(
        [WEATHER_ASK, TWO_TOOL_CALLS, TOOL_RESULT, {**TOOL_RESULT, "tool_call_id": "call67890"}],
        tools=[WEATHER_TOOL],
    ),
    "thinking_disabled": _case([USER], enable_thinking=False),
    "thinking_enabled": _case([SYSTEM, USER], enable_thinking=True),
    "reasoning_history": _case([USER, REASONED, USER_2]),
    "think_tags_in_content": _case(
        [USER, {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nParis."}, USER_2]
    ),
    "date_string": _case([SYSTEM, USER], date_string="03 Mar 2025"),
    "reasoning_effort": _case([SYSTEM, USER], reasoning_effort="high"),
    "list_parts": _case(
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe "},
                    {"type": "text", "text": "Paris."},
                ],
            },
        ]
    ),
    "documents": _case([USER], documents=DOCUMENTS),
    "non_alternating": _case([USER, USER_2]),
    "assistant_first": _case([ASSISTANT, USER]),
    "unknown_role": _case([{"role": "narrator", "content": "Once upon a time"}, USER]),
    "empty": _case([]),
}

# The tokens each template is rendered with (as its tokenizer would supply them).
SPECIAL_TOKENS: dict[str, tuple[str | None, str | None]] = {
    "llama": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen": (None, "<|im_end|>"),
    "smollm3": (None, "<|im_end|>"),
    "mistral": ("<s>", "</s>"),
    "gemma": ("<bos>", "<eos>"),
    "phi-3.5": ("<s>", "<|endoftext|>"),
    "phi-4": ("<|endoftext|>", "<|im_end|>"),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "granite": ("<|end_of_text|>", "<|end_of_text|>"),
}


def special_tokens(template_id: str) -> tuple[str | None, str | None]:
    """The BOS / EOS a template id's model uses; "<s>" / "</s>" otherwise."""
    for prefix, tokens in SPECIAL_TOKENS.items():
        if prefix in template_id:
            return tokens
    return ("<s>", "</s>")
