"""`ffai chat`: the interactive loop, and the stdout bookkeeping `ffai generate` shares.

The prompt is read on the main thread, outside any event loop (a `select` on
stdin and the SIGINT wake-up pipe: `input()` can miss a Ctrl-C that lands just
before it starts), so Ctrl-C and Ctrl-D there behave as in any shell tool. Each reply runs on
one persistent event loop (the client's socket lives across turns) with SIGINT
turned into cancelling that reply's task, which sends the worker a cancel.

History policy: a reply stopped with Ctrl-C stays in the conversation as far as
it was printed (what is on screen is what the model sees next turn); a reply
stopped before any text drops its question too. When the history outgrows the
worker's prompt limit, the oldest exchanges after the system message are dropped,
each with a one-line notice on stderr.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import sys
import threading

import click

from ffai_client.client import AsyncClient
from ffai_client.errors import Busy, PromptTooLong
from ffai_client.protocol import Limits
from ffai_client.types import ChatMessage, GenerationChunk, GenerationParameters


class TextOut:
    """Streams text to stdout and remembers whether the last line is still open."""

    def __init__(self) -> None:
        self.line_open = False

    def write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.line_open = not text.endswith("\n")

    def newline(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.line_open = False

    def end_line(self) -> None:
        """Close an open line, so a following message starts at the left margin."""
        if self.line_open:
            self.newline()


def notice(text: str) -> None:
    click.echo(f"ffai: {text}", err=True)


def drop_oldest_exchange(history: list[ChatMessage], keep: int) -> bool:
    """Remove the oldest user message (and its reply) after the first `keep` messages.

    The newest message, the one being asked, is never dropped. Returns False when
    there is nothing left to drop.
    """
    if len(history) - keep < 2:
        return False
    del history[keep]
    while len(history) - keep > 1 and history[keep].role != "user":
        del history[keep]  # the reply to the dropped question
    return True


def prompt_budget(limits: Limits, params: GenerationParameters) -> int:
    """Most prompt tokens to send: the worker's limit, leaving room for a reply.

    The room kept is --max-tokens, at most a quarter of the context, so a long
    conversation does not squeeze replies down to a few tokens.
    """
    room = min(params.max_tokens, limits.context_length // 4)
    return max(1, min(limits.max_prompt_tokens, limits.context_length - room))


class ChatSession:
    """One conversation with one worker; `turn` answers one user line."""

    def __init__(
        self, client: AsyncClient, params: GenerationParameters, system: str | None, out: TextOut
    ) -> None:
        self.client = client
        self.params = params
        self.out = out
        self.start = [ChatMessage("system", system)] if system else []
        self.history = list(self.start)
        self.last: GenerationChunk | None = None  # the last reply's final chunk, for /stats
        self._final: GenerationChunk | None = None  # this turn's, once it arrives
        self.limits: Limits | None = None

    async def connect(self) -> None:
        """Ask for the worker's limits (and fail now, not after the first question)."""
        self.limits = (await self.client.info()).limits

    def reset(self) -> None:
        self.history = list(self.start)

    async def turn(self, line: str) -> None:
        """Ask `line`; print the reply. Cancelling this task stops the reply."""
        self.history.append(ChatMessage("user", line))
        self._final = None
        reply: list[str] = []
        try:
            await self._fit()
            await self._stream_fitting(reply)
        except asyncio.CancelledError:
            self._stopped(reply)
            return
        except (PromptTooLong, Busy) as exc:
            # This message alone does not fit, or the worker is full: the chat goes on.
            self.out.end_line()
            notice(f"error {exc.code}: {exc.message} (message not kept)")
            self.history.pop()
            return
        self.out.newline()
        self.history.append(ChatMessage("assistant", "".join(reply)))

    async def _stream_fitting(self, reply: list[str]) -> None:
        # The worker is the judge: if it still finds the prompt too long (no
        # render limits known, or they changed), drop more and ask again.
        while True:
            try:
                await self._stream(reply)
                return
            except PromptTooLong:
                if reply or not self._drop():
                    raise

    async def _stream(self, reply: list[str]) -> None:
        stream = self.client.generate_stream(messages=self.history, parameters=self.params)
        try:
            async with stream as chunks:
                async for chunk in chunks:
                    reply.append(chunk.text)
                    self.out.write(chunk.text)
                    # Chunks already queued never suspend the loop; yield so a Ctrl-C
                    # (seen by the loop's selector) stops the text at once.
                    await asyncio.sleep(0)
        finally:
            if stream.final is not None:
                self.last = self._final = stream.final

    async def _fit(self) -> None:
        """Drop the oldest exchanges until the rendered history fits the budget."""
        if self.limits is None:
            return
        budget = prompt_budget(self.limits, self.params)
        while await self._prompt_tokens() > budget and self._drop():
            pass

    async def _prompt_tokens(self) -> int:
        try:
            return len((await self.client.render(self.history)).tokens)
        except PromptTooLong:
            return sys.maxsize  # refused by size before rendering: surely too long

    def _drop(self) -> bool:
        if not drop_oldest_exchange(self.history, len(self.start)):
            return False
        notice("the conversation outgrew the context: dropped its oldest exchange")
        return True

    def _stopped(self, reply: list[str]) -> None:
        text = "".join(reply)
        self.out.end_line()
        final = self._final
        # Only the worker's `cancelled` final chunk proves it stopped the sequence.
        if final is not None and final.finish_reason == "cancelled" and final.stats:
            notice(f"reply stopped after {final.stats.generated_tokens} tokens")
        else:
            notice("reply stopped")
        if text:
            self.history.append(ChatMessage("assistant", text))
        else:
            self.history.pop()  # nothing was said: forget the question too


def run_cancellable(loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
    """Run `task` to its end; Ctrl-C meanwhile cancels the task instead of raising."""
    try:
        loop.add_signal_handler(signal.SIGINT, task.cancel)
    except (NotImplementedError, RuntimeError, ValueError):
        pass  # no Unix signals here, or not the main thread: Ctrl-C raises as usual
    try:
        loop.run_until_complete(task)
    finally:
        try:
            loop.remove_signal_handler(signal.SIGINT)  # restores default_int_handler
        except (NotImplementedError, RuntimeError, ValueError):
            pass


def read_line(prompt: str = "> ") -> str | None:
    """The next user line; None at end of input (Ctrl-D). Ctrl-C raises KeyboardInterrupt."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    if sys.stdin.isatty():
        _wait_for_line()
    line = sys.stdin.readline()
    if not line:
        if sys.stdin.isatty():
            click.echo(err=True)  # leave the shell's prompt at the left margin
        return None
    return line.removesuffix("\n")


def _wait_for_line() -> None:
    """Block until the terminal has a line, or raise KeyboardInterrupt on Ctrl-C.

    A bare read() misses a SIGINT that lands after the prompt is shown but before
    the read starts (input() hangs then); the signal's wake-up pipe never misses it.
    """
    if os.name != "posix" or threading.current_thread() is not threading.main_thread():
        return
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous = signal.set_wakeup_fd(wake_w)
    try:
        while True:
            ready, _, _ = select.select([sys.stdin, wake_r], [], [])
            if sys.stdin in ready:
                return
            os.read(wake_r, 512)  # a signal: its Python handler runs at the next bytecode
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_r)
        os.close(wake_w)


def chat_loop(loop: asyncio.AbstractEventLoop, session: ChatSession) -> None:
    """Read lines and answer them until /quit or end of input."""
    loop.run_until_complete(session.connect())
    while True:
        line = read_line()
        if line is None:
            return
        command = line.strip()
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            session.reset()
            click.echo("(conversation reset)")
        elif command == "/stats":
            last = session.last
            click.echo(last.stats.formatted() if last and last.stats else "(no stats yet)")
        elif command:
            run_cancellable(loop, loop.create_task(session.turn(line)))


def run_chat(
    endpoint: str | None,
    timeout: float,
    params: GenerationParameters,
    system: str | None,
    out: TextOut,
) -> None:
    """Run the chat; raises the client's errors and KeyboardInterrupt (Ctrl-C at the prompt)."""
    loop = asyncio.new_event_loop()
    client = AsyncClient(endpoint, timeout=timeout)
    try:
        chat_loop(loop, ChatSession(client, params, system, out))
    finally:
        try:
            loop.run_until_complete(client.aclose())
        finally:
            loop.close()
