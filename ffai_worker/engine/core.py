"""The socket-free engine: load a model, turn requests into sequences, run the loop.

`Engine` is usable in-process (`generate_stream`, `generate`) and is what the
worker's actor thread drives (`new_request` → `submit` → `step`). Both paths
go through the same `step`: the scheduler plans it (scheduler.py, no model),
the model runner executes it (runner.py), and the engine turns what changed
into immutable `StepOutput`s, so in-process and served output agree.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from ffai_client.types import (
    ChatMessage,
    ChatTemplateOptions,
    GenerationChunk,
    GenerationParameters,
    GenerationResult,
    ResultBuilder,
    check_prompt_input,
)
from ffai_worker.engine.constraints import ConstraintCompiler, ConstraintError
from ffai_worker.engine.kv_cache import SlotCache
from ffai_worker.engine.prefix_cache import PrefixCache
from ffai_worker.engine.runner import ModelRunner
from ffai_worker.engine.scheduler import Completion, Scheduler, SchedulerConfig, StepPlan
from ffai_worker.engine.sequence import EngineRequest, Phase, RequestRejected, new_sequence
from ffai_worker.engine.timings import Footprint
from ffai_worker.engine.types import LOCAL_CLIENT, EngineLoad, RequestKey, StepOutput
from ffai_worker.models.loading import LoadedModelInfo, load_model, resolve_model_path
from ffai_worker.text.tokenizer import Tokenizer

DEFAULT_TEMPERATURE = 0.6


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16
    max_queue: int = 64
    prefill_step_size: int = 512
    max_tokens_limit: int | None = None  # cap on a request's max_tokens
    max_prompt_tokens: int | None = None  # cap below the context length
    template_budget_s: float = 1.0  # wall time one chat-template render may take
    # Bytes of KV the prefix cache may hold; None: default_prompt_cache_bytes(); 0: off.
    prompt_cache_bytes: int | None = None
    prompt_cache_dir: str | None = None  # where the prefix cache is saved at exit, read at start


class StepFailed(RuntimeError):
    """An engine step raised; `keys` are the requests it dropped (all that were live)."""

    def __init__(self, keys: list[RequestKey], cause: BaseException) -> None:
        super().__init__(f"engine step failed: {type(cause).__name__}: {cause}")
        self.keys = keys


class Engine:
    """One loaded model and the loop that generates from it."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        info: LoadedModelInfo,
        config: EngineConfig | None = None,
        *,
        model_id: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_info = info
        self.config = config or EngineConfig()
        self.model_id = model_id or str(info.path)
        self.context_length = int(info.context_length)
        gen = info.generation_config or {}
        self.default_temperature = float(gen.get("temperature", DEFAULT_TEMPERATURE))
        self.cache = SlotCache(
            model.num_layers,
            model.n_kv_heads,
            model.head_dim,
            _model_dtype(model),
            max_slots=self.config.max_batch,
        )
        cache_bytes = self.config.prompt_cache_bytes
        if cache_bytes is None:
            cache_bytes = default_prompt_cache_bytes()
        self.prefix = PrefixCache(cache_bytes, self.cache.bytes_per_token)
        self.restored_prompt_tokens = self._load_prompt_cache()
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_batch=self.config.max_batch,
                max_queue=self.config.max_queue,
                prefill_step_size=self.config.prefill_step_size,
            ),
            self.prefix,
        )
        self.runner = ModelRunner(
            model, self.cache, context_length=self.context_length, prefix=self.prefix
        )
        self.constraints = ConstraintCompiler(tokenizer, _logits_width(model, tokenizer))
        self._local_ids = itertools.count()
        self._local: dict[RequestKey, deque[GenerationChunk]] = {}  # in-process streams' chunks

    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        dtype: str | None = None,
        revision: str | None = None,
        config: EngineConfig | None = None,
    ) -> Engine:
        """Load a local Hugging Face-layout folder or a hub id."""
        path = resolve_model_path(str(model), revision=revision)
        loaded, info = load_model(path, dtype=dtype)
        tokenizer = Tokenizer.from_folder(path, info.generation_config)
        return cls(loaded, tokenizer, info, config, model_id=str(model))

    # -- the prefix cache on disk ------------------------------------------------
    def _prompt_cache_identity(self) -> dict[str, Any]:
        from ffai_worker.engine.prefix_store import model_identity

        return model_identity(self.model_id, Path(self.model_info.path), self.cache)

    def _load_prompt_cache(self) -> int:
        folder = self.config.prompt_cache_dir
        if folder is None or not self.prefix.enabled:
            return 0
        from ffai_worker.engine.prefix_store import load

        return load(self.prefix, Path(folder), self._prompt_cache_identity())

    def save_prompt_cache(self) -> int:
        """Write the prefix cache to `prompt_cache_dir` (if set); return the tokens written."""
        folder = self.config.prompt_cache_dir
        if folder is None or not self.prefix.enabled:
            return 0
        from ffai_worker.engine.prefix_store import save

        return save(self.prefix, Path(folder), self._prompt_cache_identity())

    # -- requests --------------------------------------------------------------
    def new_request(
        self,
        key: RequestKey,
        *,
        prompt: str | None = None,
        tokens: Seq[int] | None = None,
        messages: Seq[ChatMessage | dict[str, Any]] | None = None,
        options: ChatTemplateOptions | None = None,
        parameters: GenerationParameters | None = None,
        add_special_tokens: bool = True,
        warm: bool = False,
    ) -> EngineRequest:
        """Validate and tokenize one request; raises RequestRejected with a protocol code."""
        params = parameters or GenerationParameters()
        try:
            check_prompt_input(prompt, tokens, messages)
        except ValueError as exc:
            raise RequestRejected("invalid_request", str(exc)) from None
        if prompt is not None:
            self._check_text_bytes(prompt, "prompt")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        elif tokens is not None:
            ids = self._checked_tokens(tokens)
        else:
            assert messages is not None
            ids = self.render(messages, options)[1]
        self._check_limits(ids, params)
        constraint = None
        if params.response_format is not None:
            try:  # cached by content; the worker calls this on a preparation thread
                constraint = self.constraints.compile(params.response_format)
            except ConstraintError as exc:
                raise RequestRejected("invalid_parameters", str(exc)) from None
        return EngineRequest(
            key=key, prompt_ids=ids, params=params, constraint=constraint, warm=warm
        )

    def _checked_tokens(self, tokens: Seq[int]) -> list[int]:
        vocab = self.tokenizer.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise RequestRejected(
                "invalid_request", f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})"
            )
        return list(tokens)

    @property
    def max_prompt_tokens(self) -> int:
        limit = self.context_length - 1
        if self.config.max_prompt_tokens is not None:
            limit = min(limit, self.config.max_prompt_tokens)
        return limit

    def prompt_byte_limit(self) -> int | None:
        """Bytes of text that certainly tokenize to more than max_prompt_tokens (None: no bound)."""
        per_token = self.tokenizer.max_token_bytes
        return None if per_token is None else self.max_prompt_tokens * per_token

    def _check_text_bytes(self, text: str, what: str) -> None:
        """Refuse, before tokenizing, text too long to fit whatever it tokenizes to."""
        if len(text) <= self.max_prompt_tokens:
            return  # short: the tokenizer counts (and no bound is below 4 bytes a token)
        size = len(text.encode("utf-8", "surrogatepass"))
        if size <= self.max_prompt_tokens * 4:
            return  # no bound is below 4 bytes a token: spare the vocabulary scan
        limit = self.prompt_byte_limit()
        if limit is not None and size > limit:
            raise RequestRejected(
                "prompt_too_long",
                f"the {what} has {size} UTF-8 bytes; at most {self.max_prompt_tokens} tokens fit"
                f" and no token of this model covers more than {limit // self.max_prompt_tokens}"
                " bytes",
            )

    def _check_limits(self, ids: list[int], params: GenerationParameters) -> None:
        if not ids:
            raise RequestRejected("invalid_request", "the prompt is empty (no tokens)")
        limit = self.max_prompt_tokens
        if len(ids) > limit:
            raise RequestRejected(
                "prompt_too_long",
                f"the prompt has {len(ids)} tokens; at most {limit} fit"
                f" (context length {self.context_length})",
            )
        cap = self.config.max_tokens_limit
        if cap is not None and params.max_tokens > cap:
            raise RequestRejected(
                "invalid_parameters", f"max_tokens {params.max_tokens} exceeds this worker's {cap}"
            )
        try:
            params.check_vocabulary(self.tokenizer.vocab_size)
        except ValueError as exc:
            raise RequestRejected("invalid_parameters", str(exc)) from None

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; raises RequestRejected('busy') when the queue is full."""
        seq = new_sequence(request, self.tokenizer, default_temperature=self.default_temperature)
        self.scheduler.add(seq)
        seq.timings.baseline_memory = mx.get_active_memory()

    def cancel(self, key: RequestKey) -> bool:
        """Cancel a live request at the next step; unknown or finished keys: no-op (False)."""
        return self.scheduler.cancel(key)

    def step(self) -> list[StepOutput]:
        """Advance every live request by at most one token; return what each one produced.

        If the step fails, every live request is dropped (StepFailed names them).
        """
        try:
            plan = self.scheduler.schedule()
            self.runner.execute(plan)
            done = self.scheduler.complete()
            self.runner.release(done.releases, len(self.scheduler.running))
            outputs = self._outputs(plan, done)
        except Exception as exc:
            self.runner.reset()
            raise StepFailed(self.scheduler.abort_all(), exc) from exc
        if self._local:
            for out in outputs:
                inbox = self._local.get(out.key)
                if inbox is not None:
                    inbox.extend(out.chunks)
        return outputs

    def _outputs(self, plan: StepPlan, done: Completion) -> list[StepOutput]:
        """Final chunks for the requests that ended, then every request's new chunks."""
        ended = (*plan.ended, *done.finished)
        if ended:
            footprint = Footprint(
                context_length=self.context_length,
                weights_bytes=self.model_info.weights_bytes,
                kv_bytes_per_token=self.cache.bytes_per_token,
                active_memory=mx.get_active_memory(),
            )
            for seq in ended:
                t = seq.timings
                stats = t.stats(
                    len(seq.prompt_ids), len(seq.generated), seq.position, footprint, seq.cached
                )
                seq.outbox.append(seq.final_chunk(stats))
        outputs = []
        for seq in (*plan.ended, *plan.running):
            if seq.outbox:
                finished = seq.phase is Phase.FINISHED  # its final chunk is among these
                outputs.append(StepOutput(seq.key, seq.take_chunks(), finished))
        return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def workload(self) -> EngineLoad:
        """Requests running (holding a KV slot) and waiting for one, right now."""
        return self.scheduler.load()

    # -- in-process generation -------------------------------------------------
    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        tokens: Seq[int] | None = None,
        messages: Seq[ChatMessage | dict[str, Any]] | None = None,
        parameters: GenerationParameters | None = None,
        options: ChatTemplateOptions | None = None,
        add_special_tokens: bool = True,
        warm: bool = False,
    ) -> Iterator[GenerationChunk]:
        """Stream chunks for one request, stepping the shared loop as needed.

        Closing the iterator early cancels the request at the next token boundary.
        `warm`: prefill only, leaving the prompt's KV in the prefix cache (one final chunk).
        """
        key = RequestKey(LOCAL_CLIENT, str(next(self._local_ids)))
        request = self.new_request(
            key,
            prompt=prompt,
            tokens=tokens,
            messages=messages,
            options=options,
            parameters=parameters,
            add_special_tokens=add_special_tokens,
            warm=warm,
        )
        self.submit(request)
        inbox = self._local[key] = deque()
        finished = False
        try:
            while True:
                while inbox:
                    chunk = inbox.popleft()
                    finished = chunk.is_final
                    yield chunk
                    if finished:
                        return
                self.step()
        finally:
            if not finished:
                self._abandon(key)
            self._local.pop(key, None)

    def _abandon(self, key: RequestKey) -> None:
        """Cancel and step until the request's slot is free again."""
        self.cancel(key)
        while self.scheduler.get(key) is not None:
            self.step()

    def generate(self, prompt: str | None = None, **kwargs: Any) -> GenerationResult:
        """Collect `generate_stream` into one result."""
        builder = ResultBuilder()
        for chunk in self.generate_stream(prompt, **kwargs):
            builder.add(chunk)
        result = builder.result()
        assert result is not None
        return result

    # -- tokenizer and template services --------------------------------------
    def warm_up(self) -> None:
        """Pay up front (the worker does it off the actor thread) what first requests would.

        Scanning a large vocabulary for its longest token takes ~0.3 s; compiling a
        chat template calls Python's compile(), which holds the GIL throughout.
        """
        from ffai_worker.text.chat_template import precompile

        _ = self.tokenizer.max_token_bytes
        for source in self.tokenizer.chat_templates.values():
            precompile(source)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, tokens: Seq[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(
            self._checked_tokens(tokens), skip_special_tokens=skip_special_tokens
        )

    def render(
        self,
        messages: Seq[ChatMessage | dict[str, Any]],
        options: ChatTemplateOptions | None = None,
    ) -> tuple[str, list[int]]:
        """Render messages through the model's chat template; return text and ids."""
        from ffai_worker.text.chat_template import ChatTemplateError, render, select_template
        from ffai_worker.text.template_budget import RenderBudget

        opts = options or ChatTemplateOptions()
        tok = self.tokenizer
        context: dict[str, Any] = {
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "unk_token": tok.unk_token,
            "pad_token": tok.pad_token,
        }
        context = {k: v for k, v in context.items() if v is not None}
        context.update(opts.extra)  # the caller's keywords win, as in transformers
        if opts.enable_thinking is not None:
            context["enable_thinking"] = opts.enable_thinking
        # Continuing the last message and opening a new turn contradict each other;
        # asking to continue implies no generation prompt.
        generation_prompt = opts.add_generation_prompt and not opts.continue_final_message
        for message in messages:
            self._check_text_bytes(_content_text(message), "content of a message")
        try:
            template = select_template(tok.chat_templates, opts.tools)
            text = render(
                template,
                list(messages),
                RenderBudget(time_s=self.config.template_budget_s),
                add_generation_prompt=generation_prompt,
                continue_final_message=opts.continue_final_message,
                tools=opts.tools,
                documents=opts.documents,
                **context,
            )
        except ChatTemplateError as exc:
            raise RequestRejected(exc.code, str(exc)) from None
        self._check_text_bytes(text, "rendered conversation")
        return text, self.tokenizer.encode_rendered(text)

    def info(self) -> dict[str, Any]:
        """What `info` reports: the model, limits and current load."""
        from ffai_worker.native.blas import blas_info

        mi = self.model_info
        load = self.workload()
        return {
            "model": self.model_id,
            "architecture": mi.architecture,
            "context_length": self.context_length,
            "dtype": mi.dtype,
            "quantization": mi.quantization if not mi.dequantized else None,
            "has_chat_template": bool(self.tokenizer.chat_templates),
            "running": load.running,
            "waiting": load.waiting,
            "kv_cache_bytes": self.cache.allocated_bytes,
            "blas": blas_info(),
            **self.prefix.info(),
        }


DEFAULT_CACHE_SHARE = 8  # the prefix cache may hold 1/8 of the machine's memory
DEFAULT_CACHE_CAP = 8 << 30  # and at most 8 GiB


def default_prompt_cache_bytes() -> int:
    """The prefix cache's default bound: 1/8 of physical (or Metal) memory, at most 8 GiB."""
    import os

    total = 0
    try:
        if mx.metal.is_available():
            total = int(mx.metal.device_info()["memory_size"])
    except Exception:  # an MLX build without Metal
        total = 0
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 << 30
    return min(total // DEFAULT_CACHE_SHARE, DEFAULT_CACHE_CAP)


def _content_text(message: ChatMessage | dict[str, Any]) -> str:
    """A message's content as one text: a str, or the text of its parts."""
    content = message.content if isinstance(message, ChatMessage) else message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = (p.get("text") for p in content if isinstance(p, dict))
        return "".join(t for t in parts if isinstance(t, str))
    return ""


def _logits_width(model: Any, tokenizer: Tokenizer) -> int:
    """How many logits a step produces: the model's (maybe padded) vocabulary."""
    args = getattr(model, "args", None)
    return int(getattr(args, "vocab_size", 0) or tokenizer.vocab_size)


def _model_dtype(model: Any) -> mx.Dtype:
    """The dtype the KV cache should use (the model contract's cache_dtype)."""
    dtype: mx.Dtype = model.cache_dtype
    return dtype
