"""One worker connection: a DEALER socket, its monitor, and the requests waiting on it.

The socket is a plain (sync) ZeroMQ socket whose file descriptor is watched by
the event loop (`loop.add_reader`); each wake-up drains every waiting frame
and routes it to the request it answers (half the CPU per chunk of pyzmq's
asyncio socket, which matters when many clients share a small machine).

Liveness (SPEC 8) is libzmq's, not ours: ZMTP heartbeats run in libzmq's I/O
threads on both sides, so a worker busy in a 30 s step still answers them,
and a socket monitor reports the connection's end. A worker that exits or is
killed is noticed at once (the kernel closes its end); one that is frozen
(SIGSTOP, a dead host) after `3 x heartbeat_interval`. The connection then
hands its pending requests to its owner (which fails them with
`WorkerUnavailable` or, for those without an answer yet, tries another worker)
and rebuilds the socket, so nothing queued for the old worker reaches a new one.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from ffai_client import protocol as p
from ffai_client.curve import CurveClientKeys
from ffai_client.endpoints import check_ipc_endpoint, ipc_path
from ffai_client.errors import (
    AuthenticationFailed,
    Busy,
    FFAIError,
    ProtocolError,
    RequestTimeout,
    ShuttingDown,
    WorkerUnavailable,
    error_for_code,
)

_POLLIN = int(zmq.POLLIN)  # a plain int: IntFlag arithmetic is slow on the hot path
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_MONITOR_EVENTS = int(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED)

# What a pending request waits on: a queue of items for streams, a future for replies.
_Item = Any


class Pending:
    """One request awaiting frames from a worker; it may move to another until answered."""

    def __init__(self, msg: Any, streaming: bool, timeout: float | None, key: bytes | None) -> None:
        self.msg = msg  # kept so that a request without an answer can go to another worker
        self.key = key  # prefix-affinity key (None: any worker)
        self.timeout = timeout  # longest silence allowed for this request (None: no limit)
        self.created = self.last_heard = time.monotonic()
        self.queue: asyncio.Queue[_Item] | None = asyncio.Queue() if streaming else None
        self.future: asyncio.Future[Any] | None = (
            None if streaming else asyncio.get_running_loop().create_future()
        )
        self.started = False  # part of the answer arrived: it must never be sent again
        self.tried: set[str] = set()  # endpoints this request was sent to
        self.conn: Connection | None = None

    def deliver(self, item: _Item) -> None:
        if not isinstance(item, BaseException):
            self.started = True
        if self.queue is not None:
            self.queue.put_nowait(item)
        elif self.future is not None and not self.future.done():
            if isinstance(item, BaseException):
                self.future.set_exception(item)
            else:
                self.future.set_result(item)


@dataclass(frozen=True)
class Settings:
    """What every connection of one client shares."""

    timeout: float
    heartbeat_interval: float
    curve: CurveClientKeys | None
    reconnect_max_ms: int = 0  # libzmq's reconnect backoff ceiling (0: a fixed 100 ms)


class Owner(Protocol):
    """Who decides what becomes of requests a connection can no longer answer."""

    def orphaned(self, conn: Connection, pendings: list[Pending], error: FFAIError) -> None: ...

    def pong(self, conn: Connection, pong: p.Pong) -> None: ...

    def welcome(self, conn: Connection, welcome: p.Welcome) -> None: ...


class Connection:
    """One DEALER socket to one worker endpoint, with the requests sent on it."""

    def __init__(
        self, endpoint: str, settings: Settings, owner: Owner, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self._owner = owner
        self._loop = loop
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self.pending: dict[str, Pending] = {}
        self.connected = False
        self._refused = False  # the last handshake was refused (libzmq will not retry it)
        self.unconnected_since = time.monotonic()  # start of the current wait for a worker
        self.others = 0  # running + waiting at the worker that are not ours (from its pong)
        self.last_ping = 0.0
        self.opened_at = 0.0
        self.hopeful = True  # never failed: worth a request while its first handshake runs
        self.closed = False

    # -- socket ----------------------------------------------------------------
    def open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.IPV6, 1)
        if self.settings.reconnect_max_ms:
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, self.settings.reconnect_max_ms)
        ivl = max(1, int(self.settings.heartbeat_interval * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        # A ping goes out at most one interval after the peer froze, then has two
        # intervals to be answered: a frozen worker is dropped within 3 intervals.
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 2 * ivl)
        sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * ivl)
        if self.settings.curve is not None:
            self.settings.curve.apply(sock)
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        sock.connect(self.endpoint)
        self._sock, self._monitor = sock, monitor
        self.connected = False
        self._refused = False
        self.unconnected_since = self.opened_at = time.monotonic()
        self._loop.add_reader(sock.fileno(), self.drain)
        self._loop.add_reader(monitor.fileno(), self.drain_monitor)
        # Monitor events may already be queued (the descriptor is edge-triggered).
        self._loop.call_soon(self.drain_monitor)
        self.send(p.Hello(client=f"ffai_client/{os.getpid()}"))

    def close(self, linger: int) -> None:
        sock, self._sock = self._sock, None
        monitor, self._monitor = self._monitor, None
        self.connected = False
        live_loop = not self._loop.is_closed()
        if monitor is not None:
            if live_loop:
                self._loop.remove_reader(monitor.fileno())
            if sock is not None:
                sock.disable_monitor()
            monitor.close(linger=0)
        if sock is None:
            return
        if live_loop:
            self._loop.remove_reader(sock.fileno())
        sock.close(linger=linger)

    def reset(self) -> None:
        """A fresh socket: whatever was queued on the old one never reaches a worker."""
        self.close(linger=0)
        if not self.closed:
            self.open()

    # -- requests --------------------------------------------------------------
    def register(self, pending: Pending) -> None:
        """Take `pending` and send its request; raises where waiting cannot help."""
        self.drain_monitor()  # a worker that went away while we were idle is news now
        if not self.connected:
            self._check_reachable()
            if self._refused:
                self.reset()  # one fresh handshake per request after a refusal
        self.pending[pending.msg.id] = pending
        pending.conn = self
        pending.tried.add(self.endpoint)
        self.send(pending.msg)

    def take_all(self) -> list[Pending]:
        pendings = list(self.pending.values())
        self.pending.clear()
        return pendings

    def _check_reachable(self) -> None:
        """Fail at once where waiting cannot help: no socket file, or an unsafe one."""
        path = ipc_path(self.endpoint)
        if path is None:
            return
        check_ipc_endpoint(self.endpoint)
        if not path.exists():
            raise WorkerUnavailable(
                f"no worker at {self.endpoint}; start one with `ffai-worker serve`"
            )

    def send(self, msg: Any) -> None:
        """Queue a frame without waiting (the DEALER queues until the worker is there)."""
        sock = self._sock
        if sock is None:
            return
        try:
            sock.send(p.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            return  # dropped: the watchdog reports an unreachable worker
        # The descriptor is edge-triggered and a send can consume the edge of a
        # frame that just arrived: look again once this callback is done.
        if int(sock.getsockopt(zmq.EVENTS)) & _POLLIN:
            self._loop.call_soon(self.drain)

    def drain(self) -> None:
        """Route every frame waiting on the socket (called when its descriptor is readable)."""
        sock = self._sock
        while sock is not None and sock is self._sock:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return  # closed under us: the watchdog rebuilds it if needed
            self._route(data)

    def drain_monitor(self) -> None:
        """Track the connection: a handshake means a worker; a disconnect means it is gone."""
        monitor = self._monitor
        while monitor is not None and monitor is self._monitor:
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):
                return
            event = int.from_bytes(frames[0][:2], "little")  # ZMTP monitor frame: u16 event
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = self.hopeful = True
            elif event == zmq.EVENT_DISCONNECTED and self.connected:
                self.lost(f"the worker at {self.endpoint} went away")
                return  # the monitor was replaced with the socket
            elif event & _HANDSHAKE_FAILED or event == zmq.EVENT_DISCONNECTED:
                # Closed before the handshake finished: the security settings disagree.
                # libzmq does not retry such a peer; the next request opens a fresh socket.
                self._refused = True
                self.hopeful = False
                self._owner.orphaned(self, self.take_all(), AuthenticationFailed(self._refusal()))

    def _refusal(self) -> str:
        if self.settings.curve is None:
            how = "this client speaks plain ZMTP; the worker may require CurveZMQ keys"
        else:
            how = "wrong worker key, a client key the worker does not allow, or no Curve there"
        return f"the worker at {self.endpoint} refused the connection handshake ({how})"

    def lost(self, reason: str) -> None:
        """Hand every pending request to the owner and rebuild the socket for the next worker."""
        pendings = self.take_all()
        self.hopeful = False
        self.reset()
        self._owner.orphaned(self, pendings, WorkerUnavailable(reason))

    def _route(self, data: bytes) -> None:
        try:
            msg = p.decode_worker(data)
        except p.FrameError as exc:
            if exc.request_id in self.pending:
                self.pending[exc.request_id].deliver(ProtocolError(str(exc)))
            return
        if isinstance(msg, p.Welcome):
            self._owner.welcome(self, msg)
            return
        rid: str | None = getattr(msg, "id", None)
        pending = self.pending.get(rid) if rid is not None else None
        if pending is None or rid is None:
            if isinstance(msg, p.Pong):
                self._owner.pong(self, msg)  # a load probe of the router's
            return  # or a frame for a request we abandoned
        pending.last_heard = time.monotonic()
        if isinstance(msg, p.Error):
            error = error_for_code(msg.code, msg.message, msg.id)
            del self.pending[rid]  # terminal: the waiter holds its queue or future
            if not pending.started and isinstance(error, Busy | ShuttingDown):
                self._owner.orphaned(self, [pending], error)  # another worker may take it
            else:
                pending.deliver(error)
        elif isinstance(msg, p.Chunk):
            chunk = msg.to_generation_chunk()
            pending.deliver(chunk)
            if chunk.is_final:
                self.pending.pop(rid, None)
        else:
            if isinstance(msg, p.Pong):
                self._owner.pong(self, msg)
            pending.deliver(msg)

    # -- clocks ----------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Enforce the two clocks liveness leaves to us: connecting, and per-request silence."""
        if not self.pending:
            return
        self.drain_monitor()  # a safety net for an edge the descriptor did not report
        if not self.connected:
            self._fail_unconnected(now)
            return
        for request_id, pending in list(self.pending.items()):
            limit = pending.timeout
            if limit is not None and now - pending.last_heard > limit:
                self.pending.pop(request_id, None)
                self.send(p.Cancel(id=request_id))  # harmless if it was not a generate
                pending.deliver(RequestTimeout(f"no frame for request {request_id} in {limit} s"))

    def _fail_unconnected(self, now: float) -> None:
        """Fail the requests that waited `timeout` for a connection (each from its own start)."""
        started = self.unconnected_since
        timeout = self.settings.timeout
        for request_id, pending in list(self.pending.items()):
            if now - max(pending.created, started) > timeout:
                self.pending.pop(request_id, None)
                pending.deliver(
                    WorkerUnavailable(f"could not reach a worker at {self.endpoint} in {timeout} s")
                )
        if not self.pending:
            self.hopeful = False
            self.reset()  # drop what was queued for nobody; reconnect afresh

    def fail_all(self, error: BaseException) -> None:
        for waiter in self.take_all():
            waiter.deliver(error)

    def ready(self, now: float, grace: float) -> bool:
        """Connected, or just opened and never failed (its handshake is likely under way)."""
        return self.connected or (self.hopeful and now - self.opened_at < grace)

    def load(self) -> int:
        """Generations at this worker: ours in flight plus others' from its last pong."""
        return len(self.pending) + self.others
