"""Request preparation off the actor thread, so no request's template or prompt stalls streams.

Preparing a request means rendering its chat template (untrusted code, bounded
by template_budget.py to `template_budget_s`, 1 s by default) and tokenizing its
text (a 16 MiB prompt takes seconds). On the actor thread either would freeze
every stream for that long. So the worker hands such requests to `Preparer`:
two daemon threads that run the preparation and queue the result, then write a
byte to a pipe that the actor polls beside its ROUTER socket, so an idle actor
wakes at once (no added latency) and a busy one picks results up between steps.
Only the actor thread touches MLX: the threads run tokenizers and jinja2 only,
and the actor admits each prepared request (`engine.submit`) itself.

Tokenizing holds no lock other threads wait for: long texts go through
`encode_batch`, which releases the GIL, where `encode` holds it for the whole
call (figures: benchmarks/NOTES.md).
A template render is Python: it shares the GIL with the actor, which gets it
back at least every 5 ms (the interpreter's switch interval) and releases it in
MLX kernels, so streams slow down a little during a hostile render but flow.

Cheap requests skip the threads: `tokens` lists and prompts or tokenize texts
of at most INLINE_TEXT_CHARS (well under a millisecond to tokenize) keep their
old path and latency. Messages and `render` always go to the threads: their
template is code.

Measured on a loaded 2-core machine (tests/test_request_limits.py scenarios),
the longest wait of another client's stream: during a hostile 1 s template
render, 1.01 s when rendered on the actor (frozen throughout) and 0.02-0.16 s
off it; while a 1 MB prompt was tokenized (llama3 tokenizer), 1.6 s on the
actor and 0.21 s off it. The alternative, a subprocess per render, could kill
runaway C calls, but costs a process hop per chat request and still needs the
size checks that template_budget.py does, so the sandbox budget plus threads
won.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

INLINE_TEXT_CHARS = 2048  # prompts up to this long are tokenized on the actor thread
INLINE_TOKENS = 8192  # token lists up to this long are checked or decoded on the actor thread
PREPARE_THREADS = 2  # one hostile template (<= its budget) never holds up everyone's preparation

Done = Callable[[Any, BaseException | None], None]


class Preparer:
    """Runs jobs on worker threads; `run_finished()` (on the actor) calls each job's `done`."""

    def __init__(self, threads: int = PREPARE_THREADS) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Done] | None] = queue.SimpleQueue()
        self._finished: deque[tuple[Done, Any, BaseException | None]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.in_flight = 0  # jobs submitted and not yet finished (actor thread only)
        self._threads = [
            threading.Thread(target=self._serve, name=f"ffai-prepare-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def wake_fd(self) -> int:
        """Readable whenever a job has finished: poll it with the ROUTER socket."""
        return self._wake_r

    def submit(self, work: Callable[[], Any], done: Done) -> None:
        """Run `work()` on a preparation thread; later, `done(result, error)` on the actor."""
        self.in_flight += 1
        self._jobs.put((work, done))

    def has_finished(self) -> bool:
        return bool(self._finished)

    def run_finished(self) -> None:
        """Call `done` for every finished job, in the order they finished."""
        # Drain the wake-ups before the queue: a result appended later wakes us again.
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._finished:
            done, result, error = self._finished.popleft()
            self.in_flight -= 1
            done(result, error)

    def close(self) -> None:
        """Let the threads exit after their current job (they are daemons: exit never waits)."""
        for _ in self._threads:
            self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, done = job
            try:
                result, error = work(), None
            except Exception as exc:
                result, error = None, exc
            self._finished.append((done, result, error))
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already: the actor will look
