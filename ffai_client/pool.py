"""Many workers, one client: the connections of an `AsyncClient` and how requests pick one.

Endpoints come as a list (or a comma-separated string); a `tcp://NAME:PORT`
whose NAME is not an IP literal is resolved to all its addresses (a
Kubernetes headless Service lists one per ready pod) and re-resolved every
`resolve_interval` seconds and whenever a worker is lost. Each address gets
its own `Connection`.

A generation goes to its prefix-affinity worker (rendezvous hashing of the
prompt's start over the connected workers, so adding or losing a worker moves
only the keys it held) unless that worker carries more than 1.25 × the mean
load (bounded-load consistent hashing; at least two); other requests go to the least
loaded. Load is our own requests in flight plus the others' the worker last
reported in a `pong` (probed every `LOAD_PROBE_S` while requests run).

A lost worker leaves rotation until libzmq's reconnect (with backoff) shakes
hands again. Requests that had no answer yet go to another connected worker;
those that had part of one fail with `WorkerUnavailable` (text is never
repeated or lost).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import itertools
import math
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ffai_client import protocol as p
from ffai_client.connection import Connection, Pending, Settings
from ffai_client.endpoints import resolve_endpoint
from ffai_client.errors import ClientClosed, FFAIError, WorkerUnavailable

# (host, port) → the addresses it stands for; raises OSError when it cannot tell.
Resolver = Callable[[str, int], Sequence[str]]

DEFAULT_RESOLVE_INTERVAL = 5.0  # seconds between re-resolutions of a DNS name
LOAD_PROBE_S = 0.5  # ping period per worker while this client has requests in flight
MOVE_AFTER_S = 0.5  # a request queued for a worker that never answered moves after this
LOAD_BOUND = 1.25  # a worker at this × the mean load turns away affinity requests...
LOAD_FLOOR = 2  # ...but always takes two (a second stream is nearly free in a batched decode)
RECONNECT_MAX_MS = 2000  # libzmq's reconnect backoff ceiling with several workers
PROMPT_KEY_CHARS = 256  # the prompt's start that picks its worker
MESSAGES_KEY_CHARS = 2048  # the conversation's start (through its first user turn)
TOKENS_KEY = 64  # token prompts: their first tokens


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every IPv4 and IPv6 address `host` resolves to, in the resolver's order."""
    found: list[str] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in found:
            found.append(str(sockaddr[0]))
    return found


def split_endpoints(endpoint: str | Sequence[str] | None) -> list[str]:
    """A list of endpoints from a comma-separated string or a list (the default when empty)."""
    items = [endpoint] if endpoint is None or isinstance(endpoint, str) else list(endpoint)
    parts = [part.strip() for item in items if item for part in item.split(",")]
    if not any(parts):
        parts = [part.strip() for part in resolve_endpoint(None).split(",")]
    return list(dict.fromkeys(part for part in parts if part))


def dns_target(endpoint: str) -> tuple[str, int] | None:
    """(name, port) of a `tcp://NAME:PORT` endpoint whose NAME needs resolving, else None."""
    if not endpoint.startswith("tcp://") or ";" in endpoint:
        return None  # other transports, and libzmq's source-address syntax
    host, sep, port = endpoint[len("tcp://") :].rpartition(":")
    if not sep or not port.isdigit() or not host or host == "*" or host.startswith("["):
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host, int(port)
    return None


def tcp_endpoint(address: str, port: int) -> str:
    return f"tcp://[{address}]:{port}" if ":" in address else f"tcp://{address}:{port}"


def affinity_key(msg: p.Generate) -> bytes:
    """What decides a generation's worker: the start of its prompt or conversation."""
    if msg.tokens is not None:
        return b"t" + ",".join(map(str, msg.tokens[:TOKENS_KEY])).encode()
    if msg.messages is not None:
        parts: list[str] = []
        for message in msg.messages:
            role = getattr(message, "role", None)
            content = getattr(message, "content", None)
            if isinstance(message, dict):
                role, content = message.get("role"), message.get("content")
            parts.append(f"{role}\0{content if isinstance(content, str) else repr(content)}")
            if role == "user":
                break  # the conversation's later turns keep the same worker
        return b"m" + "\0".join(parts)[:MESSAGES_KEY_CHARS].encode()
    return b"p" + (msg.prompt or "")[:PROMPT_KEY_CHARS].encode()


def _score(key: bytes, endpoint: str) -> bytes:
    return hashlib.blake2b(key + b"\0" + endpoint.encode(), digest_size=8).digest()


def rank(key: bytes, endpoints: Iterable[str]) -> list[str]:
    """Rendezvous order of `endpoints` for `key`: the first is its affinity worker."""
    return sorted(endpoints, key=lambda e: _score(key, e), reverse=True)


@dataclass
class RouterStats:
    """Counters for tests and benchmarks (private to the package)."""

    sent: Counter[str] = field(default_factory=Counter)  # requests per endpoint
    keyed: int = 0  # generations routed with an affinity key
    affinity_hits: int = 0  # ... that went to their key's first choice among healthy workers
    retried: int = 0  # requests moved to another worker before any answer
    lost: int = 0  # times a connected worker went away


class Router:
    """The connections of one client, and the choice of one per request."""

    def __init__(
        self,
        targets: list[str],
        settings: Settings,
        resolver: Resolver,
        resolve_interval: float,
        on_welcome: Callable[[p.Welcome], None],
    ) -> None:
        self.targets = targets
        self.settings = settings
        self._resolver = resolver
        self._resolve_interval = resolve_interval
        self._on_welcome = on_welcome
        self._dns = any(dns_target(t) is not None for t in targets)
        self._resolved: dict[str, list[str]] = {}
        self.conns: dict[str, Connection] = {}
        self._retiring: list[Connection] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rr = itertools.count()
        self._next_resolve = 0.0
        self._resolving: asyncio.Task[None] | None = None
        self._probe_id = ""
        self._probes = itertools.count(1)
        self._closed = False
        self.stats = RouterStats()

    @property
    def started(self) -> bool:
        return self._loop is not None

    def start(self, loop: asyncio.AbstractEventLoop, probe_id: str) -> None:
        self._loop = loop
        self._probe_id = probe_id
        self._resolved = self._resolve_all(self._resolved)  # blocks once, at the first request
        self._next_resolve = time.monotonic() + self._resolve_interval
        self._sync()

    # -- membership ------------------------------------------------------------
    def _resolve_all(self, previous: dict[str, list[str]]) -> dict[str, list[str]]:
        """Each DNS target's endpoints; a failed or empty answer keeps the last known ones."""
        resolved: dict[str, list[str]] = {}
        for target in self.targets:
            dns = dns_target(target)
            if dns is None:
                continue
            try:
                addresses = list(self._resolver(*dns))
            except OSError:
                addresses = []
            endpoints = [tcp_endpoint(a, dns[1]) for a in addresses]
            # Nothing known yet: let libzmq resolve the name itself meanwhile.
            resolved[target] = endpoints or previous.get(target) or [target]
        return resolved

    def _sync(self) -> None:
        """Open connections for new endpoints; retire those that are gone."""
        assert self._loop is not None
        wanted: list[str] = []
        for target in self.targets:
            wanted.extend(self._resolved.get(target, [target]))
        for endpoint in dict.fromkeys(wanted):
            if endpoint not in self.conns:
                conn = Connection(endpoint, self.settings, self, self._loop)
                conn.open()
                self.conns[endpoint] = conn
        for endpoint in [e for e in self.conns if e not in wanted]:
            self._retiring.append(self.conns.pop(endpoint))  # finishes what it runs

    async def _refresh(self) -> None:
        previous = self._resolved
        resolved = await asyncio.to_thread(self._resolve_all, previous)
        if not self._closed:
            self._resolved = resolved
            self._sync()

    # -- choosing --------------------------------------------------------------
    def _order(self, pending: Pending, exclude: Iterable[str], up_only: bool) -> list[Connection]:
        """Where `pending` may go, best first."""
        now = time.monotonic()
        pool = [c for c in self.conns.values() if c.endpoint not in exclude]
        ready = [c for c in pool if c.ready(now, MOVE_AFTER_S)]
        pool = ready if ready or up_only else pool
        if len(pool) <= 1:
            return pool
        if pending.key is None:
            turn = next(self._rr) % len(pool)  # equal loads take turns
            return sorted(pool[turn:] + pool[:turn], key=lambda c: c.load())
        by_endpoint = {c.endpoint: c for c in pool}
        ranked = [by_endpoint[e] for e in rank(pending.key, by_endpoint)]
        mean = (sum(c.load() for c in pool) + 1) / len(pool)
        cap = max(LOAD_FLOOR, math.ceil(LOAD_BOUND * mean))
        return [c for c in ranked if c.load() < cap] + [c for c in ranked if c.load() >= cap]

    def _affinity_choice(self, key: bytes) -> str | None:
        now = time.monotonic()
        healthy = [e for e, c in self.conns.items() if c.ready(now, MOVE_AFTER_S)]
        healthy = healthy or list(self.conns)
        return rank(key, healthy)[0] if healthy else None

    def _send(self, pending: Pending, exclude: Iterable[str], up_only: bool) -> FFAIError | None:
        """Give `pending` to the best connection that takes it; else the reason none did."""
        last: FFAIError | None = None
        for conn in self._order(pending, exclude, up_only):
            try:
                conn.register(pending)
            except FFAIError as exc:  # e.g. no socket file there: try the next one
                last = exc
                continue
            self.stats.sent[conn.endpoint] += 1
            return None
        return last or WorkerUnavailable("no other worker is connected")

    def submit(self, pending: Pending) -> None:
        """Send a new request; raises at once where no worker can take it."""
        error = self._send(pending, (), up_only=False)
        if error is not None:
            raise error
        if pending.key is not None and len(self.conns) > 1:
            self.stats.keyed += 1
            if pending.conn is not None and pending.conn.endpoint == self._affinity_choice(
                pending.key
            ):
                self.stats.affinity_hits += 1

    # -- Owner of the connections ----------------------------------------------
    def orphaned(self, conn: Connection, pendings: list[Pending], error: FFAIError) -> None:
        """Requests `conn` cannot answer: unanswered ones try another worker, others fail."""
        if isinstance(error, WorkerUnavailable):
            self.stats.lost += 1
            self._next_resolve = 0.0  # a pod may have moved: look again now
        for pending in pendings:
            if pending.started or self._closed:
                pending.deliver(error)
            elif self._send(pending, pending.tried, up_only=True) is None:
                self.stats.retried += 1
            else:
                pending.deliver(error)

    def pong(self, conn: Connection, pong: p.Pong) -> None:
        ours = sum(1 for w in conn.pending.values() if w.queue is not None)
        conn.others = max(0, pong.running + pong.waiting - ours)

    def welcome(self, conn: Connection, welcome: p.Welcome) -> None:
        self._on_welcome(welcome)

    # -- requests by id --------------------------------------------------------
    def _all(self) -> list[Connection]:
        return [*self.conns.values(), *self._retiring]

    def find(self, request_id: str) -> Pending | None:
        for conn in self._all():
            if request_id in conn.pending:
                return conn.pending[request_id]
        return None

    def forget(self, request_id: str) -> None:
        for conn in self._all():
            conn.pending.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        """Send a cancel where the request runs (unknown: to every worker; it is a no-op)."""
        pending = self.find(request_id)
        targets = [pending.conn] if pending is not None and pending.conn else self._all()
        for conn in targets:
            conn.send(p.Cancel(id=request_id))

    # -- clocks ----------------------------------------------------------------
    def tick(self, now: float) -> None:
        """The watchdog's round: clocks per connection, probes, moves, re-resolution."""
        busy = False
        for conn in self._all():
            busy = busy or bool(conn.pending)
            conn.tick(now)
        for conn in [c for c in self._retiring if not c.pending]:
            self._retiring.remove(conn)
            conn.closed = True
            conn.close(linger=0)
        if len(self.conns) > 1:
            self._move_stuck(now)
            if busy:
                self._probe(now)
        if self._dns and now >= self._next_resolve and self._resolving is None:
            self._next_resolve = now + self._resolve_interval
            self._resolving = asyncio.create_task(self._refresh(), name="ffai-resolve")
            self._resolving.add_done_callback(self._resolved_done)

    def _resolved_done(self, task: asyncio.Task[None]) -> None:
        self._resolving = None
        if not task.cancelled():
            task.exception()  # retrieved: a failed look-up only waits for the next round

    def _probe(self, now: float) -> None:
        for conn in self.conns.values():
            if conn.connected and now - conn.last_ping >= LOAD_PROBE_S:
                conn.last_ping = now
                # Unique ids: a probe may still be unanswered when the next one leaves.
                conn.send(p.Ping(id=f"{self._probe_id}-{next(self._probes)}"))

    def _move_stuck(self, now: float) -> None:
        """Requests queued for a worker that never answered go to one that is connected."""
        if not any(c.connected for c in self.conns.values()):
            return
        for conn in list(self.conns.values()):
            if conn.connected or not conn.pending or now - conn.unconnected_since < MOVE_AFTER_S:
                continue
            pendings = conn.take_all()
            conn.reset()  # what it queued never leaves
            for pending in pendings:
                error = self._send(pending, pending.tried, up_only=True)
                if error is None:
                    self.stats.retried += 1
                else:
                    pending.deliver(error)

    async def close(self) -> None:
        self._closed = True
        if self._resolving is not None:
            self._resolving.cancel()
        for conn in self._all():
            conn.closed = True
            conn.fail_all(ClientClosed("the client was closed"))
        for conn in self._all():
            # A short linger lets a just-queued cancel reach the worker.
            conn.close(linger=250)
