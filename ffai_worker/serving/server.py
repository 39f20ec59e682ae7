"""The worker process: a ZeroMQ ROUTER and the actor loop that owns MLX.

One thread does everything, in this order, forever:
drain the mailbox (decode and act on every waiting frame) → one engine step →
send that step's chunks. Sends never block (outbox.py): a client whose pipe is
full keeps its chunks there, coalesced into one, until it reads; a client that
vanished (ROUTER_MANDATORY turns the send into EHOSTUNREACH) has all its
sequences cancelled. The only MLX work happens inside `engine.step()` and the
request handlers, both on this thread.

Requests whose preparation may take long (a chat template, a long prompt) are
prepared on other threads (admission.py) and admitted here when ready; until
then that client's later frames wait, so each client's frames are still
handled in the order it sent them.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from ffai_client import protocol as p
from ffai_client.endpoints import check_socket_dir, check_socket_file, ipc_path, runtime_dir
from ffai_client.errors import UnsafeEndpoint
from ffai_worker.engine import Engine, StepFailed
from ffai_worker.engine.sequence import EngineRequest, RequestRejected
from ffai_worker.engine.types import RequestKey, StepOutput
from ffai_worker.serving.admission import INLINE_TEXT_CHARS, INLINE_TOKENS, Preparer
from ffai_worker.serving.curve_auth import CurveServer
from ffai_worker.serving.outbox import Outbox

log = logging.getLogger("ffai_worker")

SERVER_NAME = "ffai-worker/0.1.0"
MAX_TOKENS_UNCAPPED = 2**31 - 1  # the protocol's own bound on params.max_tokens
MAX_RECV_PER_TICK = 256  # frames drained before the next step, so decoding never starves
SEND_RETRY_POLL_MS = 5  # idle wait while only a full pipe holds output back
SHUTDOWN_FLUSH_S = 2.0  # how long a stopping worker keeps offering queued replies
# Frames of one client held while one of its requests is being prepared, and their bytes.
MAX_DEFERRED_FRAMES = 1024
MAX_DEFERRED_BYTES = 64 << 20


@dataclass(frozen=True)
class ServerConfig:
    endpoint: str
    max_message_bytes: int = 16 << 20
    heartbeat_interval_s: float = 1.0
    idle_poll_ms: int = 100
    # Minimum time between two frames of one stream; None: auto pacing (outbox.py).
    stream_interval_s: float | None = None
    curve: CurveServer | None = None  # CurveZMQ keys and allow-list; None: plain ZMTP


class Worker:
    """Binds the endpoint and runs the actor loop until SIGTERM/SIGINT or `stop()`."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self._stopping = False
        self._live: dict[bytes, set[str]] = {}  # identity → ids of accepted generates
        self.outbox = Outbox(
            self.sock,
            stream_interval_s=config.stream_interval_s,
            streams=lambda: self.engine.workload().running,
            on_gone=self._client_gone,
            on_final=self._ended,
        )
        # Service counter, reported by `info` (beside the outbox's frames sent): CPU
        # seconds of this (actor) thread spent in the loop outside `engine.step()`.
        self.service_cpu_s = 0.0
        self._tick_cpu0 = 0.0  # this thread's CPU clock when the current tick started
        # Preparation off the actor thread; a client's frames wait here while one of
        # its requests is prepared (key present = a preparation is in flight).
        self._preparer = Preparer()
        self._preparer.submit(engine.warm_up, lambda result, error: None)
        self._deferred: dict[bytes, deque[bytes]] = {}
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._preparer.wake_fd, zmq.POLLIN)

    # -- lifecycle -------------------------------------------------------------
    def bind(self) -> None:
        sock, endpoint = self.sock, self.config.endpoint
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:port binds like 127.0.0.1
        if self.config.curve is not None:
            self.config.curve.apply(self.ctx, sock)
        # ZMTP heartbeats on every transport: libzmq's I/O thread answers them
        # while a step runs, and they find half-open or frozen peers.
        ivl = int(self.config.heartbeat_interval_s * 1000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ivl)
        sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * ivl)
        prepare_endpoint(endpoint)
        path = ipc_path(endpoint)
        old_umask = os.umask(0o177)  # the socket file is born 0600, whatever the umask
        try:
            sock.bind(endpoint)
        finally:
            os.umask(old_umask)
        if path is not None:
            os.chmod(path, 0o600)

    def stop(self) -> None:
        self._stopping = True

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def serve_forever(self) -> None:
        self._tick_cpu0 = time.thread_time()
        try:
            while not self._stopping:
                self._tick()
            self._shut_down()
        finally:
            self._preparer.close()
            self.sock.close(linger=500)
            if self.config.curve is not None:
                self.config.curve.stop()
            path = ipc_path(self.config.endpoint)
            if path is not None and path.exists():
                path.unlink()

    def _tick(self) -> None:
        # Everything here but `engine.step()` counts as service CPU; a tick
        # starts where the previous one ended, so three clock reads suffice.
        start = self._tick_cpu0
        step_cpu = 0.0
        if self.engine.has_work():
            # Busy: one cheap getsockopt instead of a zero-timeout poll.
            ready = self.sock.get(zmq.EVENTS) & zmq.POLLIN
        elif self.outbox.has_backlog():
            ready = self._wait_idle(SEND_RETRY_POLL_MS)  # a slow reader: retry sending soon
        else:
            ready = self._wait_idle(self.config.idle_poll_ms)
        if ready:
            self._drain_mailbox()
        if self._preparer.has_finished():
            self._preparer.run_finished()
        if self.engine.has_work():
            before = time.thread_time()
            try:
                touched = self.engine.step()
            except StepFailed as exc:
                log.exception("engine step failed; failing its %d requests", len(exc.keys))
                self._fail_requests(exc.keys, str(exc))
                touched = []
            step_cpu = time.thread_time() - before
            for out in touched:
                self._emit(out)
        if self.outbox.pending:
            self.outbox.flush_pending()
        if self.outbox.replies:
            self.outbox.flush_replies()
        end = self._tick_cpu0 = time.thread_time()
        self.service_cpu_s += end - start - step_cpu

    def _shut_down(self) -> None:
        """Stop admitting; end every accepted request with `shutting_down`."""
        self.outbox.next_send.clear()  # text held back by pacing goes out before the error
        self._drain_mailbox()
        for identity in list(self._deferred):
            self._resume(identity)  # answered now: refused generates, inline everything else
        self.outbox.flush_pending()
        for identity, ids in list(self._live.items()):
            for rid in list(ids):
                key = RequestKey(identity, rid)
                self.engine.cancel(key)
                self.outbox.forget(key)
                self._send(
                    identity,
                    p.Error(id=rid, code="shutting_down", message="the worker is stopping"),
                )
        self._live.clear()
        while self.engine.has_work():
            self.engine.step()
        deadline = time.monotonic() + SHUTDOWN_FLUSH_S
        while self.outbox.replies and time.monotonic() < deadline:
            self.outbox.flush_replies()
            time.sleep(SEND_RETRY_POLL_MS / 1000)

    # -- receiving -------------------------------------------------------------
    def _drain_mailbox(self) -> None:
        for _ in range(MAX_RECV_PER_TICK):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if len(frames) != 2:
                # A DEALER sends exactly one frame after ROUTER's identity frame.
                self._send(
                    frames[0],
                    p.Error(
                        id=None, code="bad_frame", message="expected exactly one frame per message"
                    ),
                )
                continue
            self._handle(frames[0], frames[1])

    def _handle(self, identity: bytes, data: bytes) -> None:
        if identity in self._deferred and not self._stopping:
            self._defer(identity, data)
            return
        try:
            msg = p.decode_client(data, max_message_bytes=self.config.max_message_bytes)
        except p.FrameError as exc:
            self._send(identity, p.Error(id=exc.request_id, code=exc.code, message=exc.message))
            return
        rid = getattr(msg, "id", None)
        try:
            self._dispatch(identity, msg)
        except RequestRejected as exc:
            self._send(identity, p.Error(id=rid, code=exc.code, message=exc.message))
        except Exception as exc:  # one bad request must never take the worker down
            log.exception("internal error handling %s", type(msg).__name__)
            self._send(
                identity, p.Error(id=rid, code="internal", message=f"{type(exc).__name__}: {exc}")
            )

    def _dispatch(self, identity: bytes, msg: Any) -> None:
        if isinstance(msg, p.Generate):
            self._on_generate(identity, msg)
        elif isinstance(msg, p.Cancel):
            self.engine.cancel(RequestKey(identity, msg.id))
        elif isinstance(msg, p.Ping):
            load = self.engine.workload()
            self._send(identity, p.Pong(id=msg.id, running=load.running, waiting=load.waiting))
        elif isinstance(msg, p.Hello):
            self._send(identity, self._welcome())
        elif isinstance(msg, p.InfoRequest):
            # Mailbox work runs before the tick's step, so the counter is exact up to now.
            service_cpu_s = self.service_cpu_s + (time.thread_time() - self._tick_cpu0)
            self._send(
                identity,
                p.InfoReply(
                    id=msg.id,
                    limits=self._limits(),
                    **self.engine.info(),
                    frames_sent=self.outbox.frames_sent,
                    service_cpu_s=service_cpu_s,
                ),
            )
        elif isinstance(msg, p.TokenizeRequest):
            self._answer(identity, msg.id, len(msg.text) > INLINE_TEXT_CHARS, _tokenize(self, msg))
        elif isinstance(msg, p.DetokenizeRequest):
            long = len(msg.tokens) > INLINE_TOKENS
            self._answer(identity, msg.id, long, _detokenize(self, msg))
        elif isinstance(msg, p.RenderRequest):
            self._answer(identity, msg.id, True, _render(self, msg))
        else:  # pragma: no cover - decode_client only returns the closed set above
            raise RequestRejected("unknown_type", f"unexpected message {type(msg).__name__}")

    def _on_generate(self, identity: bytes, msg: p.Generate) -> None:
        if self._stopping:
            raise RequestRejected("shutting_down", "the worker is stopping")
        live = self._live.setdefault(identity, set())
        if msg.id in live:
            raise RequestRejected("duplicate_id", f"request id {msg.id!r} is already active")

        def prepare() -> EngineRequest:
            return self.engine.new_request(
                RequestKey(identity, msg.id),
                prompt=msg.prompt,
                tokens=msg.tokens,
                messages=msg.messages,
                options=msg.options,
                parameters=msg.params,
                add_special_tokens=msg.add_special_tokens,
                warm=msg.warm,
            )

        long = (
            msg.messages is not None
            or msg.params.response_format is not None  # a grammar compile: off the actor
            or len(msg.prompt or "") > INLINE_TEXT_CHARS
            or len(msg.tokens or ()) > INLINE_TOKENS
        )
        if not long:
            self.engine.submit(prepare())
            live.add(msg.id)
            return
        # Active from now on: its id is taken, and cancel, disconnect and shutdown reach it.
        live.add(msg.id)
        self._deferred[identity] = deque()
        self._preparer.submit(
            prepare, lambda request, error: self._admit(identity, msg.id, request, error)
        )

    # -- preparation off the actor thread (admission.py) --------------------------
    def _wait_idle(self, timeout_ms: int) -> bool:
        """Sleep until a frame arrives or a preparation finishes; whether a frame is waiting."""
        events = dict(self._poller.poll(timeout_ms))
        return self.sock in events

    def _admit(
        self, identity: bytes, rid: str, request: EngineRequest | None, error: BaseException | None
    ) -> None:
        """A prepared generate: queue it, or end it with its error (exactly one terminal frame)."""
        try:
            live = self._live.get(identity)
            if live is None or rid not in live:
                return  # its client vanished, or the worker stopped and answered it
            try:
                if error is not None:
                    raise error
                assert request is not None
                self.engine.submit(request)
            except RequestRejected as exc:
                live.discard(rid)
                self._send(identity, p.Error(id=rid, code=exc.code, message=exc.message))
            except Exception as exc:
                log.exception("internal error preparing a generate", exc_info=exc)
                live.discard(rid)
                self._send(
                    identity,
                    p.Error(id=rid, code="internal", message=f"{type(exc).__name__}: {exc}"),
                )
        finally:
            self._resume(identity)

    def _answer(self, identity: bytes, rid: str, long: bool, work: Callable[[], Any]) -> None:
        """Reply with `work()`: here if it is quick, else from a preparation thread."""
        if not long or self._stopping:
            self._send(identity, work())
            return
        self._deferred[identity] = deque()

        def done(reply: Any, error: BaseException | None) -> None:
            try:
                if isinstance(error, RequestRejected):
                    reply = p.Error(id=rid, code=error.code, message=error.message)
                elif error is not None:
                    log.exception("internal error answering a request", exc_info=error)
                    msg = f"{type(error).__name__}: {error}"
                    reply = p.Error(id=rid, code="internal", message=msg)
                self._send(identity, reply)
            finally:
                self._resume(identity)

        self._preparer.submit(work, done)

    def _defer(self, identity: bytes, data: bytes) -> None:
        """Hold a frame until the client's preparation ends; past the bounds, refuse it."""
        held = self._deferred[identity]
        if len(held) < MAX_DEFERRED_FRAMES and sum(map(len, held)) + len(data) <= (
            MAX_DEFERRED_BYTES
        ):
            held.append(data)
            return
        try:
            msg = p.decode_client(data, max_message_bytes=self.config.max_message_bytes)
        except p.FrameError as exc:
            self._send(identity, p.Error(id=exc.request_id, code=exc.code, message=exc.message))
            return
        if isinstance(msg, p.Cancel):
            held.append(p.encode(msg))  # a cancel is never refused (nor answered): keep it, small
            return
        message = "too many frames waiting behind a request being prepared"
        self._send(identity, p.Error(id=getattr(msg, "id", None), code="busy", message=message))

    def _resume(self, identity: bytes) -> None:
        """The client's preparation ended: handle its held frames, in order."""
        held = self._deferred.pop(identity, None)
        while held:
            self._handle(identity, held.popleft())
            if identity in self._deferred:  # that frame started another preparation
                self._deferred[identity].extend(held)
                return

    def _limits(self) -> p.Limits:
        cfg = self.engine.config
        ctx = self.engine.context_length
        return p.Limits(
            max_message_bytes=self.config.max_message_bytes,
            max_prompt_tokens=min(ctx - 1, cfg.max_prompt_tokens or ctx),
            # Uncapped: any protocol-valid max_tokens; the context still ends it (`length`).
            max_tokens=cfg.max_tokens_limit or MAX_TOKENS_UNCAPPED,
            max_batch=cfg.max_batch,
            max_queue=cfg.max_queue,
            context_length=ctx,
        )

    def _welcome(self) -> p.Welcome:
        return p.Welcome(
            protocol=p.PROTOCOL_VERSION,
            server=SERVER_NAME,
            model=self.engine.model_id,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            limits=self._limits(),
        )

    # -- sending (outbox.py) ---------------------------------------------------
    def _emit(self, out: StepOutput) -> None:
        if out.key.request_id in self._live.get(out.key.client, ()):
            self.outbox.emit(out.key, out.chunks)
        # else its client vanished: the output has nowhere to go

    def _send(self, identity: bytes, msg: Any) -> None:
        """Send a reply that must arrive; a full pipe queues it behind earlier ones."""
        self.outbox.send(identity, msg)

    def _ended(self, key: RequestKey) -> None:
        """A request's final chunk went out: its id is free again."""
        self._live.get(key.client, set()).discard(key.request_id)

    def _fail_requests(self, keys: list[RequestKey], message: str) -> None:
        """End each request with an `internal` error (its held output is dropped)."""
        for key in keys:
            live = self._live.get(key.client)
            if live is None or key.request_id not in live:
                continue
            live.discard(key.request_id)
            self.outbox.forget(key)
            self._send(key.client, p.Error(id=key.request_id, code="internal", message=message))

    def _client_gone(self, identity: bytes) -> None:
        """A vanished client: cancel everything it started and drop its output."""
        self.outbox.forget_client(identity)
        for rid in self._live.pop(identity, set()):
            key = RequestKey(identity, rid)
            self.engine.cancel(key)
            self.outbox.forget(key)


def _tokenize(worker: Worker, msg: p.TokenizeRequest) -> Callable[[], p.TokenizeReply]:
    def work() -> p.TokenizeReply:
        ids = worker.engine.tokenize(msg.text, add_special_tokens=msg.add_special_tokens)
        return p.TokenizeReply(id=msg.id, tokens=ids)

    return work


def _detokenize(worker: Worker, msg: p.DetokenizeRequest) -> Callable[[], p.DetokenizeReply]:
    def work() -> p.DetokenizeReply:
        text = worker.engine.detokenize(msg.tokens, skip_special_tokens=msg.skip_special_tokens)
        return p.DetokenizeReply(id=msg.id, text=text)

    return work


def _render(worker: Worker, msg: p.RenderRequest) -> Callable[[], p.RenderReply]:
    def work() -> p.RenderReply:
        text, tokens = worker.engine.render(msg.messages, msg.options)
        return p.RenderReply(id=msg.id, text=text, tokens=tokens)

    return work


def prepare_endpoint(endpoint: str) -> None:
    """Make an ipc endpoint safe to bind, before anything slow (the model) loads.

    Creates the socket's directory 0700 (the default one, or a missing one),
    refuses a directory or socket file another user could control, refuses
    an endpoint a live worker serves, and removes a stale socket file.
    Raises `EndpointUnusable` with the path and the fix.
    """
    path = ipc_path(endpoint)
    if path is None:
        return
    directory = path.parent
    private = directory == runtime_dir()
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    try:
        check_socket_dir(directory, private=private)
        check_socket_file(path)
    except UnsafeEndpoint as exc:
        raise EndpointUnusable(str(exc)) from None
    if path.exists():
        _refuse_if_live(endpoint, path)


class EndpointUnusable(RuntimeError):
    """The endpoint cannot be served: unsafe, or another worker already serves it."""


def _refuse_if_live(endpoint: str, path: Path) -> None:
    """Remove a stale socket file, but never steal the endpoint of a running worker.

    A listener that accepts the connection at all is a live worker, whatever
    security it speaks (a ping would go unanswered by a CurveZMQ worker).
    """
    probe = zmq.Context.instance().socket(zmq.DEALER)
    probe.setsockopt(zmq.LINGER, 0)
    monitor = probe.get_monitor_socket(zmq.EVENT_CONNECTED)
    try:
        probe.connect(endpoint)
        if monitor.poll(300, zmq.POLLIN):
            raise EndpointUnusable(
                f"another worker is already serving {endpoint}; stop it or pick another --endpoint"
            )
    finally:
        probe.disable_monitor()
        monitor.close(linger=0)
        probe.close()
    path.unlink(missing_ok=True)
