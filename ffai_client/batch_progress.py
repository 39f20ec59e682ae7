"""Progress of `ffai batch`: counters, a live bar or periodic lines, and the summary.

On a terminal a tqdm bar (done/total, errors, generated tok/s, ETA); elsewhere
(a log file, CI) one plain line every `interval` seconds; `quiet` shows
neither. The counters are kept in every mode: the summary and the Python API's
`BatchSummary` are built from them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Literal, TextIO

Mode = Literal["auto", "bar", "lines", "quiet"]
LINES_INTERVAL_S = 10.0


@dataclass
class BatchSummary:
    """What one run did. `previous_errors`: error lines left from earlier runs (not retried)."""

    total: int = 0  # requests in the input
    skipped: int = 0  # already in the output from an earlier run
    ok: int = 0  # finished this run
    failed: int = 0  # error lines written this run
    previous_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_retries: int = 0
    wall_s: float = 0.0

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def requests_per_s(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time."""
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def formatted(self) -> str:
        lines = [
            f"requests   {self.total} in the input: {self.ok} ok, {self.failed} failed, "
            f"{self.skipped} already done",
            f"tokens     {self.prompt_tokens} prompt, {self.completion_tokens} generated",
            f"wall time  {self.wall_s:.2f} s: {self.requests_per_s:.1f} requests/s, "
            f"{self.tokens_per_s:.0f} generated tok/s",
        ]
        if self.busy_retries:
            lines.append(f"busy       {self.busy_retries} retries (the worker's queue was full)")
        if self.previous_errors:
            lines.append(
                f"earlier    {self.previous_errors} error lines from earlier runs "
                "(--retry-failed reruns them)"
            )
        return "\n".join(lines)


class BatchProgress:
    """Counts the run's results and shows them as they come."""

    def __init__(
        self, mode: Mode = "auto", stream: TextIO | None = None, interval: float = LINES_INTERVAL_S
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self.interval = interval
        self.summary = BatchSummary()
        self._to_run = 0
        self._start = time.monotonic()
        self._last_line = self._start
        self._bar: Any = None

    def begin(self, total: int, skipped: int, previous_errors: int) -> None:
        """The run starts: `total` input requests, minus those done or failed before."""
        s = self.summary
        s.total, s.skipped, s.previous_errors = total, skipped, previous_errors
        self._to_run = total - skipped - previous_errors
        self._start = self._last_line = time.monotonic()
        if self.mode == "bar":
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(total=self._to_run, file=self.stream, unit="req", dynamic_ncols=True)
        elif self.mode == "lines":
            self._say(f"{self._to_run} requests to run ({skipped + previous_errors} done before)")

    def finished(self, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        s = self.summary
        if ok:
            s.ok += 1
        else:
            s.failed += 1
        s.prompt_tokens += prompt_tokens
        s.completion_tokens += completion_tokens
        s.wall_s = time.monotonic() - self._start
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"errors={s.failed}, {s.tokens_per_s:.0f} tok/s", refresh=False
            )
            self._bar.update(1)
        elif self.mode == "lines" and time.monotonic() - self._last_line >= self.interval:
            self._last_line = time.monotonic()
            self._say(self._status())

    def busy(self) -> None:
        self.summary.busy_retries += 1

    def close(self) -> BatchSummary:
        """Stop the display; the summary, wall time included."""
        self.summary.wall_s = time.monotonic() - self._start
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return self.summary

    def _status(self) -> str:
        s = self.summary
        left = self._to_run - s.done
        eta = f"{left / s.requests_per_s:.0f} s" if s.requests_per_s > 0 else "?"
        return (
            f"{s.done}/{self._to_run} done, {s.failed} errors, "
            f"{s.tokens_per_s:.0f} tok/s, ETA {eta}"
        )

    def _say(self, text: str) -> None:
        print(f"ffai batch: {text}", file=self.stream, flush=True)
