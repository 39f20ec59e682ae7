"""The files of `ffai batch`: reading the input, and the append-only, resumable output.

Input: JSONL in the OpenAI Batch API shape, one request a line,
`{"custom_id", "method": "POST", "url", "body"}`. `parse_input` checks each
line's envelope without a worker; a bad line becomes an `InputLine` carrying
its error (reported as an error line, the run goes on). Duplicate custom_ids
refuse the whole file (`BatchInputError`): which of two results would be the
answer?

Output: one JSON object a line, `{"id", "custom_id", "response", "error"}`,
appended as each request finishes; the file is never rewritten except by
`sort_output`. Several lines may carry one custom_id (a failure, then its
retry): the last one wins. A line that failed validation before it had a
custom_id is keyed by its line number (`error.line`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL)
FSYNC_INTERVAL_S = 1.0  # at most this much finished work is lost to a power cut (none to a kill)


class BatchInputError(ValueError):
    """The input file as a whole is unusable (unreadable, duplicate custom_ids)."""


@dataclass(frozen=True)
class LineError:
    """Why an input line cannot run: an error code and a message naming the line."""

    code: str
    message: str
    status: int = 400  # what the gateway would answer for such a request


@dataclass(frozen=True)
class InputLine:
    """One input line: its number (from 1), its identity and request, or its error."""

    line: int
    custom_id: str | None
    url: str = ""
    body: dict[str, Any] | None = None
    error: LineError | None = None

    @property
    def key(self) -> str:
        """The custom_id; a line without a usable one is known by its number."""
        return self.custom_id if self.custom_id is not None else line_key(self.line)


def line_key(line: int) -> str:
    return f"#line:{line}"


def parse_input(path: Path) -> list[InputLine]:
    """Every non-blank line of the input, checked; duplicates raise BatchInputError."""
    lines: list[InputLine] = []
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    lines.append(parse_line(number, raw))
    except OSError as exc:
        raise BatchInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    _refuse_duplicates(lines)
    return lines


def parse_line(number: int, raw: bytes) -> InputLine:
    """One line's envelope: JSON object, custom_id, method, url, body (not its fields)."""

    def bad(code: str, message: str, cid: str | None = None, status: int = 400) -> InputLine:
        return InputLine(number, cid, error=LineError(code, f"line {number}: {message}", status))

    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return bad("invalid_json", f"not valid JSON: {exc}")
    if not isinstance(data, dict):
        return bad("invalid_json", "must be a JSON object")
    cid = data.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return bad("invalid_custom_id", "custom_id: must be a non-empty string")
    method = data.get("method", "POST")
    if method != "POST":
        return bad("invalid_method", f"method: must be POST, got {method!r}", cid, 405)
    url = data.get("url")
    if url not in URLS:
        return bad("invalid_url", f"url: must be {' or '.join(URLS)}, got {url!r}", cid, 404)
    body = data.get("body")
    if not isinstance(body, dict):
        return bad("invalid_body", "body: must be a JSON object", cid)
    return InputLine(number, cid, url, body)


def _refuse_duplicates(lines: list[InputLine]) -> None:
    first: dict[str, int] = {}
    dups: list[str] = []
    for item in lines:
        if item.custom_id is None:
            continue
        if item.custom_id in first:
            dups.append(f"{item.custom_id!r} (lines {first[item.custom_id]} and {item.line})")
        else:
            first[item.custom_id] = item.line
    if dups:
        shown = "; ".join(dups[:5]) + (f"; and {len(dups) - 5} more" if len(dups) > 5 else "")
        raise BatchInputError(f"duplicate custom_id: {shown}")


# -- output ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def result_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """A finished request, in the Batch API's output shape."""
    return {
        "id": new_id("batch_req_"),
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": new_id("req_"), "body": body},
        "error": None,
    }


def error_line(
    item: InputLine, code: str, message: str, status: int, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A failed request: `error` set, and `response` with the gateway's status and error body."""
    error_body = body or {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    return {
        "id": new_id("batch_req_"),
        "custom_id": item.custom_id,
        "response": {"status_code": status, "request_id": new_id("req_"), "body": error_body},
        "error": {"code": code, "message": message, "line": item.line},
    }


def _records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:
                continue  # a line cut short by a crash: its request runs again
            if isinstance(record, dict):
                yield record


def record_key(record: dict[str, Any]) -> str | None:
    cid = record.get("custom_id")
    if isinstance(cid, str):
        return cid
    error = record.get("error")
    if isinstance(error, dict) and isinstance(error.get("line"), int):
        return line_key(error["line"])
    return None


def read_done(path: Path) -> dict[str, bool]:
    """What an existing output holds: key → whether its last line succeeded."""
    done: dict[str, bool] = {}
    if not path.exists():
        return done
    for record in _records(path):
        key = record_key(record)
        if key is not None:
            done[key] = record.get("error") is None
    return done


def repair_tail(path: Path) -> None:
    """Cut a last line left unfinished by a crash, so the next append starts a line of its own."""
    if not path.exists():
        return
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        block = min(size, 1 << 20)
        end = size
        while end > 0:  # find the last newline, reading backwards a block at a time
            start = max(0, end - block)
            f.seek(start)
            at = f.read(end - start).rfind(b"\n")
            if at >= 0:
                f.truncate(start + at + 1)
                return
            end = start
        f.truncate(0)


class OutputWriter:
    """Appends result lines: one write(2) per line, fsync at most every FSYNC_INTERVAL_S.

    Each line reaches the kernel at once (an unbuffered append of the whole
    line), so a killed process loses nothing it finished. fsync, which only
    matters for a power cut or OS crash, runs per group of lines: at most
    once a second, on a thread of its own, and at close. Per line, on the
    event loop, it would stall every request for milliseconds (tens on a
    busy disk) at each of hundreds of completions a second.
    """

    def __init__(self, path: Path) -> None:
        repair_tail(path)
        self._file = path.open("ab", buffering=0)
        self._synced = time.monotonic()
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="ffai-batch-fsync")
        self._sync: Future[None] | None = None
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        data = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        self._file.write(data.encode())
        self.lines += 1
        now = time.monotonic()
        if now - self._synced >= FSYNC_INTERVAL_S and (self._sync is None or self._sync.done()):
            self._synced = now
            self._sync = self._syncer.submit(os.fsync, self._file.fileno())

    def close(self) -> None:
        """Wait for a running fsync, then sync what is left and close."""
        if not self._file.closed:
            self._syncer.shutdown(wait=True)
            os.fsync(self._file.fileno())
            self._file.close()


def sort_output(path: Path, order: list[str]) -> int:
    """Rewrite the output compacted (last line per key) in input order; returns lines written.

    Lines whose key is not in `order` (from another input) keep their order, after the rest.
    Written to a temporary file, fsynced, then renamed over the output: never half-written.
    """
    if not path.exists():
        return 0
    last: dict[str, dict[str, Any]] = {}
    for record in _records(path):
        key = record_key(record)
        if key is not None:
            last.pop(key, None)  # re-insert: the dict keeps the order of last appearance
            last[key] = record
    ordered = [last.pop(k) for k in order if k in last] + list(last.values())
    tmp = path.with_name(path.name + ".sorting")
    with tmp.open("wb") as f:
        for record in ordered:
            f.write((json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return len(ordered)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
