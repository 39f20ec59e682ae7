"""`ffai`: talk to a running worker from the shell.

Exit codes: 0 ok, 1 the worker refused or failed the request, 2 usage error,
3 the worker is unavailable, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass, replace
from typing import Any, NoReturn, TypeVar

import click

from ffai_client.cli_batch import batch_options, run_batch_cli
from ffai_client.cli_chat import TextOut, run_chat
from ffai_client.cli_options import SAMPLING_KEYS, parameters_from_options, sampling_options
from ffai_client.client import AsyncClient
from ffai_client.curve import CLIENT_KEY_ENV, SERVER_KEY_ENV
from ffai_client.errors import FFAIError, RequestError, WorkerUnavailable
from ffai_client.types import GenerationChunk, GenerationParameters, TokenLogprob

EXIT_REQUEST_ERROR = 1
EXIT_UNAVAILABLE = 3
T = TypeVar("T")

_endpoint = click.option(
    "--endpoint",
    envvar="FFAI_ENDPOINT",
    default=None,
    help="Worker endpoint, or several comma-separated (or tcp://NAME:PORT with several "
    "addresses) to spread requests over [env FFAI_ENDPOINT; default: the local daemon's "
    "ipc socket].",
)


def _into_env(name: str) -> Callable[[click.Context, click.Parameter, str | None], None]:
    """A click callback handing an option to AsyncClient through its environment variable."""

    def store(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value:
            os.environ[name] = value

    return store


_curve_server_key = click.option(
    "--curve-server-key",
    envvar=SERVER_KEY_ENV,
    expose_value=False,
    callback=_into_env(SERVER_KEY_ENV),
    help=f"The worker's CurveZMQ public key: a *.key file or its Z85 text [env {SERVER_KEY_ENV}].",
)
_curve_key = click.option(
    "--curve-key",
    envvar=CLIENT_KEY_ENV,
    expose_value=False,
    callback=_into_env(CLIENT_KEY_ENV),
    help=f"This client's CurveZMQ key pair: a *.key_secret file [env {CLIENT_KEY_ENV}].",
)


def endpoint_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """Where the worker is and, for CurveZMQ, the keys to reach it with."""
    return _endpoint(_curve_server_key(_curve_key(command)))


timeout_option = click.option(
    "--timeout",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds to wait for the worker before giving up on it.",
)


def _run(
    make: Callable[[AsyncClient], Awaitable[T]],
    endpoint: str | None,
    timeout: float,
    out: TextOut | None = None,
) -> T:
    """Run one client coroutine, mapping failures to the documented exit codes."""

    async def main() -> T:
        async with AsyncClient(endpoint, timeout=timeout) as client:
            return await make(client)

    with _exit_codes(out):
        return asyncio.run(main())


@contextmanager
def _exit_codes(out: TextOut | None) -> Iterator[None]:
    """Print a failure on one line of its own (after any partial text) and exit with its code."""
    try:
        yield
    except WorkerUnavailable as exc:
        _fail(out, f"worker unavailable: {exc}", EXIT_UNAVAILABLE)
    except RequestError as exc:
        _fail(out, f"error {exc.code}: {exc.message}", EXIT_REQUEST_ERROR)
    except FFAIError as exc:
        _fail(out, str(exc), EXIT_REQUEST_ERROR)


def _fail(out: TextOut | None, message: str, code: int) -> NoReturn:
    if out is not None:
        out.end_line()
    click.echo(f"ffai: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ffai")
def main() -> None:
    """Client for an FFAI worker (start one with `ffai-worker serve`)."""


@main.command()
@endpoint_option
@timeout_option
@sampling_options
@click.option("--stats", is_flag=True, help="Print the [STATS] block to stderr.")
@click.option(
    "--logprobs",
    type=click.IntRange(0, 20),
    default=None,
    help="Print each token's log-probability and its N likeliest alternatives to stderr.",
)
@click.option(
    "--response-format",
    default=None,
    metavar="JSON",
    help='Constrain the output, e.g. \'{"type": "regex", "pattern": "[0-9]+"}\' (SPEC 6.7).',
)
@click.option(
    "--warm",
    is_flag=True,
    help="Prefill only: put the prompt in the worker's prefix cache, generate nothing.",
)
@click.argument("prompt")
def generate(
    endpoint: str | None,
    timeout: float,
    stats: bool,
    logprobs: int | None,
    response_format: str | None,
    warm: bool,
    prompt: str,
    **options: Any,
) -> None:
    """Stream a generation to stdout (Ctrl-C cancels it cleanly)."""
    params = parameters_from_options({k: options[k] for k in SAMPLING_KEYS})
    params = _with_extras(params, logprobs, response_format)
    out = TextOut()
    entries: list[TokenLogprob] = []

    async def stream(client: AsyncClient) -> GenerationChunk | None:
        async with client.generate_stream(prompt, parameters=params, warm=warm) as chunks:
            async for chunk in chunks:
                out.write(chunk.text)
                entries.extend(chunk.logprobs or ())
        return chunks.final

    try:
        final = _run(stream, endpoint, timeout, out)
    except KeyboardInterrupt:
        # asyncio.run cancelled the task, which sent the cancel to the worker.
        click.echo("\nffai: cancelled", err=True)
        sys.exit(130)
    if warm:
        _warm_note(final)
    else:
        sys.stdout.write("\n")
    for entry in entries:
        click.echo(_logprob_line(entry), err=True)
    if stats and final is not None and final.stats is not None:
        click.echo(final.stats.formatted(), err=True)


def _warm_note(final: GenerationChunk | None) -> None:
    if final is not None and final.stats is not None:
        s = final.stats
        click.echo(
            f"ffai: warmed {s.prompt_tokens} prompt tokens ({s.cached_prompt_tokens} were"
            f" cached) in {s.time_to_first_token_ms:.0f} ms",
            err=True,
        )


def _with_extras(
    params: GenerationParameters, logprobs: int | None, response_format: str | None
) -> GenerationParameters:
    """The generate-only flags added to the sampling parameters."""
    fmt = None
    if response_format is not None:
        try:
            fmt = json.loads(response_format)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--response-format") from None
    try:
        return replace(params, logprobs=logprobs, response_format=fmt)
    except (ValueError, AttributeError) as exc:
        raise click.BadParameter(str(exc)) from None


def _logprob_line(entry: TokenLogprob) -> str:
    """`  -0.0123 'text' (id) | 'alt' -1.50, …` for one generated token."""
    alts = ", ".join(f"{t.text!r} {t.logprob:.2f}" for t in entry.top)
    line = f"{entry.logprob:9.4f} {entry.text!r} ({entry.token})"
    return f"{line} | {alts}" if alts else line


@main.command()
@endpoint_option
@timeout_option
@sampling_options
@click.option("--system", default=None, help="A system message to start the conversation.")
def chat(endpoint: str | None, timeout: float, system: str | None, **options: Any) -> None:
    """Interactive chat through the model's chat template. /reset, /stats, /quit.

    Ctrl-C stops a reply (what was printed stays in the conversation); Ctrl-C or
    Ctrl-D at the prompt leaves. When the conversation outgrows the worker's
    prompt limit, its oldest exchanges are dropped, with a notice on stderr.
    """
    params = parameters_from_options({k: options[k] for k in SAMPLING_KEYS})
    out = TextOut()
    try:
        with _exit_codes(out):
            run_chat(endpoint, timeout, params, system, out)
    except KeyboardInterrupt:
        click.echo(err=True)  # after the terminal's ^C
        sys.exit(130)


@main.command()
@endpoint_option
@timeout_option
@batch_options
def batch(endpoint: str | None, timeout: float, **options: Any) -> None:
    """Run an OpenAI Batch API file (JSONL) through the worker: resumable, with progress.

    Each line: {"custom_id", "method": "POST", "url": "/v1/chat/completions" or
    "/v1/completions", "body": {...}}, the body as the gateway takes it. Results
    are appended to the output in completion order as they finish; rerunning
    resumes. Exit codes: 0 all ok, 1 some error lines, 2 bad input file, 3 worker
    unavailable, 130 interrupted.
    """
    sys.exit(run_batch_cli(endpoint, timeout, **options))


@main.command()
@endpoint_option
@timeout_option
def info(endpoint: str | None, timeout: float) -> None:
    """Print the worker's model, limits and load as JSON."""
    reply = _run(lambda client: client.info(), endpoint, timeout)
    click.echo(json.dumps(_plain(reply), indent=2, ensure_ascii=False))


@main.command()
@endpoint_option
@timeout_option
def ping(endpoint: str | None, timeout: float) -> None:
    """Check that the worker answers; print its load and the round trip."""

    async def go(client: AsyncClient) -> tuple[Any, float]:
        t0 = loop_time()
        pong = await client.ping()
        return pong, loop_time() - t0

    pong, rtt = _run(go, endpoint, timeout)
    click.echo(f"pong in {rtt * 1000:.2f} ms: running {pong.running}, waiting {pong.waiting}")


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    return value


if __name__ == "__main__":  # pragma: no cover
    main()
