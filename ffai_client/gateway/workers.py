"""The workers behind the gateway: one `AsyncClient` each, their models, and routing.

Each worker serves one model; its public id is the last part of the path or
hub id the worker reports (`/models/tinystories-260k` → `tinystories-260k`).
Requests are routed by their `model`; with one worker, a request without a
model goes to it. What the gateway learns about a model's tokenizer (its tool
call format, its fill-in-the-middle tokens) is asked of the worker once and kept.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ffai_client.client import AsyncClient
from ffai_client.errors import FFAIError
from ffai_client.gateway.errors import ApiError, from_worker
from ffai_client.messages import InfoReply

INFO_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes tool calls: the parser family, and its special marker tokens.

    The worker's text skips special tokens, so the gateway puts back the text
    of those the parser needs (`<tool_call>`, `[TOOL_CALLS]`, ...), by token id.
    """

    family: str
    special_markers: dict[int, str] = field(default_factory=dict)


# family → its markers; the first family whose opening marker is one token wins.
_TOOL_MARKERS = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "mistral": ("[TOOL_CALLS]", "[ARGS]"),
    "llama3": ("<|python_tag|>",),
}

# Fill-in-the-middle layouts: marker tokens and the holes, in the model's order.
FIM_LAYOUTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qwen", ("<|fim_prefix|>", "{prefix}", "<|fim_suffix|>", "{suffix}", "<|fim_middle|>")),
    ("starcoder", ("<fim_prefix>", "{prefix}", "<fim_suffix>", "{suffix}", "<fim_middle>")),
    ("deepseek", ("<｜fim▁begin｜>", "{prefix}", "<｜fim▁hole｜>", "{suffix}", "<｜fim▁end｜>")),
    ("codestral", ("[SUFFIX]", "{suffix}", "[PREFIX]", "{prefix}")),
)


@dataclass(frozen=True)
class FimFormat:
    name: str
    layout: tuple[str, ...]
    marker_ids: dict[str, int]
    bos: tuple[int, ...]  # what the tokenizer puts before any text


def public_id(model: str) -> str:
    """The name clients use: the last path component of the worker's model."""
    return model.rstrip("/").rsplit("/", 1)[-1] or model


class WorkerHandle:
    """One worker: its client, and what it told us about its model."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.client = AsyncClient(endpoint, timeout=timeout)
        self.info: InfoReply | None = None
        self._tool_format: ToolFormat | None = None
        self._fim: FimFormat | bool | None = False  # False: not asked yet
        self._lock = asyncio.Lock()

    @property
    def model_id(self) -> str:
        return public_id(self.info.model) if self.info else self.endpoint

    def answers_to(self, name: str) -> bool:
        if self.info is None:
            return False
        name = name.removesuffix(":latest")
        return name in (self.model_id, self.info.model, self.info.model.rstrip("/"))

    async def refresh(self) -> InfoReply:
        """Ask the worker for `info` (its model, context, load); raises ApiError 503."""
        try:
            self.info = await asyncio.wait_for(self.client.info(), INFO_TIMEOUT_S)
        except TimeoutError:
            raise ApiError(
                503,
                f"the worker at {self.endpoint} did not answer info in time",
                type="server_error",
                code="worker_unavailable",
            ) from None
        except FFAIError as exc:
            raise from_worker(exc) from None
        return self.info

    async def single_token(self, text: str) -> int | None:
        """The id of `text` if the tokenizer has it as one token, else None."""
        ids = await self.client.tokenize(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    async def tool_format(self) -> ToolFormat:
        async with self._lock:
            if self._tool_format is None:
                self._tool_format = await self._find_tool_format()
            return self._tool_format

    async def _find_tool_format(self) -> ToolFormat:
        for family, markers in _TOOL_MARKERS.items():
            if await self.single_token(markers[0]) is None:
                continue
            special: dict[int, str] = {}
            for marker in markers:
                token = await self.single_token(marker)
                if token is not None and not await self.client.detokenize([token]):
                    special[token] = marker
            return ToolFormat(family, special)
        return ToolFormat("hermes")  # plain-text <tool_call>: what most fine-tunes write

    async def restore_markers(self, fmt: ToolFormat, text: str, tokens: list[int]) -> str:
        """A chunk's text with the special marker tokens' text put back where they were."""
        markers = fmt.special_markers
        if not markers or not any(t in markers for t in tokens):
            return text
        if len(tokens) == 1:
            return markers[tokens[0]] + text
        # Several tokens in one chunk (the worker coalesced them): rebuild around the markers.
        parts: list[str] = []
        run: list[int] = []
        for token in tokens:
            if token in markers:
                if run:
                    parts.append(await self.client.detokenize(run))
                    run = []
                parts.append(markers[token])
            else:
                run.append(token)
        if run:
            parts.append(await self.client.detokenize(run))
        return "".join(parts)

    async def fim_format(self) -> FimFormat | None:
        async with self._lock:
            if self._fim is False:
                self._fim = await self._find_fim()
            assert not isinstance(self._fim, bool)
            return self._fim

    async def _find_fim(self) -> FimFormat | None:
        for name, layout in FIM_LAYOUTS:
            ids: dict[str, int] = {}
            for part in layout:
                if part.startswith("{"):
                    continue
                token = await self.single_token(part)
                if token is None:
                    break
                ids[part] = token
            else:
                bos = await self.client.tokenize("", add_special_tokens=True)
                return FimFormat(name, layout, ids, tuple(bos))
        return None


class WorkerPool:
    """All workers; routes a request's `model` to the worker that serves it."""

    def __init__(self, endpoints: list[str], timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("at least one worker endpoint is needed")
        self._endpoints = endpoints
        self._timeout = timeout
        self.workers: list[WorkerHandle] = []

    async def start(self) -> None:
        """Create the clients (inside the running loop) and learn each worker's model."""
        self.workers = [WorkerHandle(e, self._timeout) for e in self._endpoints]
        await self.refresh_all()

    async def refresh_all(self) -> None:
        """Ask every worker for `info`; a worker that is down stays unknown until it answers."""
        await asyncio.gather(*(w.refresh() for w in self.workers), return_exceptions=True)

    async def close(self) -> None:
        await asyncio.gather(*(w.client.aclose() for w in self.workers), return_exceptions=True)

    async def known(self) -> list[WorkerHandle]:
        """The workers whose model we know (asking again those we do not)."""
        missing = [w for w in self.workers if w.info is None]
        if missing:
            await asyncio.gather(*(w.refresh() for w in missing), return_exceptions=True)
        return [w for w in self.workers if w.info is not None]

    async def route(self, model: str | None) -> WorkerHandle:
        """The worker for `model`; 404 for an unknown model, 503 when none answers."""
        if len(self.workers) == 1 and not model:
            worker = self.workers[0]
            if worker.info is None:
                await worker.refresh()
            return worker
        if not model:
            raise ApiError(
                400,
                "model: required when the gateway serves several models",
                param="model",
                code="missing_required_parameter",
            )
        workers = await self.known()
        for worker in workers:
            if worker.answers_to(model):
                return worker
        if not workers:
            raise ApiError(
                503,
                "no worker is reachable",
                type="server_error",
                code="worker_unavailable",
                headers={"Retry-After": "1"},
            )
        names = ", ".join(w.model_id for w in workers)
        raise ApiError(
            404,
            f"model {model!r} is not served here (models: {names})",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )
