"""The worker's sending side: chunks and replies on their way out, never blocking the actor.

Sends never block: a client whose pipe is full keeps its chunks here, coalesced
into one, until it reads; replies that must arrive (errors, pongs, info…) queue
behind each other, up to a bound past which the client counts as gone. A
client that vanished (ROUTER_MANDATORY turns the send into EHOSTUNREACH) is
reported to the worker, which cancels its sequences. Streams may also be paced
(coalescing tokens between frames) so many clients do not wake too often.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import zmq

from ffai_client import protocol as p
from ffai_client.types import GenerationChunk
from ffai_worker.engine.types import RequestKey

log = logging.getLogger("ffai_worker")

# Replies that must arrive wait here while a client's pipe is full; a client that
# lets more than this pile up is not reading and is treated as gone (SPEC 3.2).
MAX_QUEUED_REPLIES = 100_000
MAX_QUEUED_REPLY_BYTES = 64 << 20

# Auto pacing: with more than AUTO_PACE_BATCH streams running, each stream gets
# at most one frame per AUTO_PACE_PER_STREAM_S x streams, up to AUTO_PACE_MAX_S
# (tokens in between are coalesced; first and final frames are never held), so
# all clients together wake about 200 times a second however many there are.
# Every frame costs its client process a wake-up, which with many clients on a
# small machine adds up to a large share of the CPU the batched step needs
# (figures: benchmarks/NOTES.md); 20-50 ms is below what a reader notices.
AUTO_PACE_BATCH = 4
AUTO_PACE_PER_STREAM_S = 0.005
AUTO_PACE_MAX_S = 0.050


class Outbox:
    """Per-request chunk queues and per-client reply queues on one ROUTER socket."""

    def __init__(
        self,
        sock: zmq.Socket[Any],
        *,
        stream_interval_s: float | None,
        streams: Callable[[], int],
        on_gone: Callable[[bytes], None],
        on_final: Callable[[RequestKey], None],
    ) -> None:
        self.sock = sock
        self.stream_interval_s = stream_interval_s  # None: auto pacing by `streams()`
        self._streams = streams
        self._on_gone = on_gone  # a client vanished: cancel its work, then `forget_client`
        self._on_final = on_final  # a request's final chunk went out
        # Chunks not yet sent; the deque holds at most one coalesced non-final
        # chunk and the final one.
        self.pending: dict[RequestKey, deque[GenerationChunk]] = {}
        self.next_send: dict[RequestKey, float] = {}  # key → when its next frame may go
        # identity → encoded replies its full pipe refused, and their bytes
        self.replies: dict[bytes, deque[bytes]] = {}
        self.reply_bytes: dict[bytes, int] = {}
        self.frames_sent = 0  # reported by `info`

    def has_backlog(self) -> bool:
        """Whether output waits for a slow reader (or for pacing)."""
        return bool(self.pending or self.replies)

    def forget(self, key: RequestKey) -> None:
        """Drop a request's held output (it ended otherwise, or its client is gone)."""
        self.pending.pop(key, None)
        self.next_send.pop(key, None)

    def forget_client(self, identity: bytes) -> None:
        self.replies.pop(identity, None)
        self.reply_bytes.pop(identity, None)

    # -- chunks --------------------------------------------------------------
    def emit(self, key: RequestKey, chunks: Seq[GenerationChunk]) -> None:
        """Send a step's chunks at once; what a full pipe refuses or pacing holds waits."""
        if key not in self.pending and not self._held(key, chunks):
            sending = deque(chunks)
            self._send_queue(key, sending)  # the common case: nothing older waits
            if not sending:
                return
            chunks = sending
        queue = self.pending.get(key)
        if queue is None:
            queue = self.pending[key] = deque()
        for chunk in chunks:
            if queue and not chunk.is_final and not queue[-1].is_final:
                queue[-1] = _coalesce(queue[-1], chunk)
            else:
                queue.append(chunk)

    def flush_pending(self) -> None:
        for key in list(self.pending):
            queue = self.pending.get(key)
            if queue is None:
                continue  # dropped while flushing: its client vanished
            if not self._held(key, queue):
                self._send_queue(key, queue)
            if not queue:
                self.pending.pop(key, None)

    def _send_queue(self, key: RequestKey, queue: deque[GenerationChunk]) -> None:
        """Send chunks from the front of `queue` until it is empty or the pipe is full."""
        identity, rid = key
        while queue:
            chunk = queue[0]
            outcome = self.send_bytes(identity, p.encode_chunk(rid, chunk))
            if outcome == "full":
                return  # the client is slow: coalesce for it until it reads
            queue.popleft()
            if outcome == "gone":
                queue.clear()
                return
            if chunk.is_final:
                self._on_final(key)
                self.next_send.pop(key, None)
                return
        pace = self._pace_s()
        if pace > 0:
            self.next_send[key] = time.monotonic() + pace

    def _held(self, key: RequestKey, chunks: Seq[GenerationChunk]) -> bool:
        """Whether pacing holds these chunks back for now (never a final chunk)."""
        due = self.next_send.get(key)
        return due is not None and not chunks[-1].is_final and time.monotonic() < due

    def _pace_s(self) -> float:
        if self.stream_interval_s is not None:
            return self.stream_interval_s
        streams = self._streams()
        if streams <= AUTO_PACE_BATCH:
            return 0.0
        return min(AUTO_PACE_MAX_S, AUTO_PACE_PER_STREAM_S * streams)

    # -- replies -------------------------------------------------------------
    def send(self, identity: bytes, msg: Any) -> None:
        """Send a reply that must arrive; a full pipe queues it behind earlier ones."""
        data = p.encode(msg)
        queue = self.replies.get(identity)
        if queue is None:
            if self.send_bytes(identity, data) != "full":
                return  # sent, or its client is gone (and nobody is left to tell)
            queue = self.replies[identity] = deque()
        size = self.reply_bytes.get(identity, 0) + len(data)
        if len(queue) >= MAX_QUEUED_REPLIES or size > MAX_QUEUED_REPLY_BYTES:
            log.warning(
                "client %s reads nothing (%d replies queued): dropped", identity.hex(), len(queue)
            )
            self._on_gone(identity)
            return
        queue.append(data)
        self.reply_bytes[identity] = size

    def flush_replies(self) -> None:
        for identity in list(self.replies):
            queue = self.replies.get(identity)
            while queue:
                outcome = self.send_bytes(identity, queue[0])
                if outcome == "full":
                    break
                if outcome == "gone":
                    break  # on_gone dropped the queue
                self.reply_bytes[identity] -= len(queue.popleft())
            if not queue:
                self.replies.pop(identity, None)
                self.reply_bytes.pop(identity, None)

    def send_bytes(self, identity: bytes, data: bytes) -> str:
        """One frame to one client: "sent", "full" (its pipe) or "gone" (on_gone was called)."""
        try:
            # Two sends are send_multipart without its per-part Python overhead;
            # ROUTER fails (full or gone) on the first part or not at all.
            self.sock.send(identity, zmq.SNDMORE | zmq.NOBLOCK)
            self.sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            return "full"
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            self._on_gone(identity)
            return "gone"
        self.frames_sent += 1
        return "sent"


def _coalesce(a: GenerationChunk, b: GenerationChunk) -> GenerationChunk:
    logprobs = None if a.logprobs is None else a.logprobs + (b.logprobs or [])
    return GenerationChunk(
        text=a.text + b.text,
        tokens=a.tokens + b.tokens,
        position=b.position,
        logprobs=logprobs,
        prompt_logprobs=a.prompt_logprobs,  # only a request's first chunk has them
    )
