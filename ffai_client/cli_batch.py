"""`ffai batch`: the options, and the run mapped onto messages and exit codes.

Exit codes: 0 every input request has a result, 1 some have error lines
(`--retry-failed` reruns them), 2 the input file is unusable (nothing sent),
3 the worker is unavailable (the output is resumable), 130 interrupted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ffai_client.batch import run_batch
from ffai_client.batch_io import BatchInputError
from ffai_client.batch_progress import BatchProgress
from ffai_client.errors import ClientClosed, FFAIError, ShuttingDown, WorkerUnavailable

EXIT_FAILED_LINES = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130
F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS = [
    click.argument(
        "input_path", metavar="INPUT.jsonl", type=click.Path(dir_okay=False, path_type=Path)
    ),
    click.option(
        "-o",
        "--output",
        required=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="Results, appended as they finish; an existing file is resumed.",
    ),
    click.option(
        "--retry-failed", is_flag=True, help="Also rerun requests whose last result is an error."
    ),
    click.option(
        "--sort",
        is_flag=True,
        help="At the end, rewrite the output in input order, one line per custom_id.",
    ),
    click.option(
        "--max-in-flight",
        type=click.IntRange(min=1),
        default=None,
        help="Sequences in flight at once [default: the worker's max_batch plus a small queue].",
    ),
    click.option("-q", "--quiet", is_flag=True, help="No progress and no summary."),
]


def batch_options(command: F) -> F:
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def run_batch_cli(
    endpoint: str | None,
    timeout: float,
    input_path: Path,
    output: Path,
    retry_failed: bool,
    sort: bool,
    max_in_flight: int | None,
    quiet: bool,
) -> int:
    """Run the batch; report on stderr; return the exit code."""
    progress = BatchProgress("quiet" if quiet else "auto")
    resume = f"every finished result is in {output}; run the same command again to resume"
    try:
        summary = run_batch(
            input_path,
            output,
            endpoint=endpoint,
            timeout=timeout,
            retry_failed=retry_failed,
            sort=sort,
            max_in_flight=max_in_flight,
            progress=progress,
        )
    except BatchInputError as exc:
        _say(f"{exc} (nothing was sent)")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _report(progress, quiet)
        _say(f"interrupted; {resume}")
        return EXIT_INTERRUPTED
    except (WorkerUnavailable, ShuttingDown, ClientClosed) as exc:
        _report(progress, quiet)
        _say(f"worker unavailable: {exc}; {resume}")
        return EXIT_UNAVAILABLE
    except FFAIError as exc:
        _report(progress, quiet)
        _say(f"{exc}; {resume}")
        return EXIT_FAILED_LINES
    _report(progress, quiet)
    if summary.failed or summary.previous_errors:
        _say(f"{summary.failed + summary.previous_errors} requests failed: see the error lines")
        return EXIT_FAILED_LINES
    return 0


def _report(progress: BatchProgress, quiet: bool) -> None:
    summary = progress.close()
    if not quiet:
        click.echo(summary.formatted(), err=True)


def _say(message: str) -> None:
    click.echo(f"ffai batch: {message}", err=True)
