"""OpenAI's completion objects built from gateway events: chat.completion, text_completion.

`Shape` collects one request's events (several choices when `n` > 1) and
renders them as streamed chunks or as the whole buffered answer with
`usage`. It imports no HTTP package: the gateway's routes and `ffai batch`
(whose output bodies are these objects) share it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from ffai_client.gateway.generation import Event, Final
from ffai_client.gateway.toolcalls import ToolCall


@dataclass
class Choice:
    """What one choice has collected so far."""

    text: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    final: Final | None = None


class Shape:
    """How one request's events become OpenAI objects (chat or text completion)."""

    def __init__(self, chat: bool, model: str, groups: list[int], include_usage: bool) -> None:
        self.chat = chat
        self.model = model
        self.groups = groups  # choice index → which prompt it samples (usage counts each once)
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.choices = [Choice() for _ in groups]

    def envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        out: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if chunk and self.include_usage:
            out["usage"] = None
        return out

    def take(self, index: int, event: Event) -> dict[str, Any] | None:
        """Record an event; return its streamed choice delta."""
        choice = self.choices[index]
        if isinstance(event, Final):
            choice.final = event
            return self._delta(index, {}, "", event.finish_reason)
        if isinstance(event, ToolCall):
            call = {
                "id": "call_" + os.urandom(12).hex(),
                "type": "function",
                "function": {"name": event.name, "arguments": event.arguments},
            }
            choice.calls.append(call)
            return self._delta(index, {"tool_calls": [{"index": len(choice.calls) - 1, **call}]})
        choice.text.append(event.text)
        return self._delta(index, {"content": event.text}, event.text)

    def _delta(
        self, index: int, delta: dict[str, Any], text: str = "", finish: str | None = None
    ) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def usage(self) -> dict[str, Any]:
        prompt = cached = completion = 0
        seen: set[int] = set()
        for group, choice in zip(self.groups, self.choices, strict=True):
            if choice.final is None:
                continue
            stats = choice.final.stats
            completion += stats.generated_tokens
            if group not in seen:
                seen.add(group)
                prompt += stats.prompt_tokens
                cached += stats.cached_prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def whole(self) -> dict[str, Any]:
        """The buffered answer."""
        out = []
        for i, c in enumerate(self.choices):
            reason = c.final.finish_reason if c.final else "stop"
            text = "".join(c.text)
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text or None}
                if c.calls:
                    message["tool_calls"] = c.calls
                else:
                    message["content"] = text
                out.append(
                    {"index": i, "message": message, "logprobs": None, "finish_reason": reason}
                )
            else:
                out.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
        return {**self.envelope(out, chunk=False), "usage": self.usage()}
