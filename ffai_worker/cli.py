"""`ffai-worker`: serve a model over ZeroMQ, or generate in-process."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click

from ffai_client.cli_options import SAMPLING_KEYS, parameters_from_options, sampling_options
from ffai_client.endpoints import ENDPOINT_ENV, default_endpoint, ipc_path
from ffai_worker.serving import service_install as si

MODEL_HELP = "Local Hugging Face-layout folder or hub id (default: the built-in tinystories-260k)."
ENDPOINT_HELP = f"ZeroMQ endpoint to bind [default: ${ENDPOINT_ENV}, else {default_endpoint()}]"
DTYPE_CHOICES = click.Choice(["float32", "float16", "bfloat16", "q8", "q4"])
DTYPE_HELP = (
    "Weights dtype. Default: the fastest for this device. q8/q4 quantize a float "
    "checkpoint to 8/4 bits at load (MLX's affine format, group size 64)."
)
REVISION_HELP = "Hub revision (branch, tag or commit)."
LOG_LEVELS = click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False)


def _load_engine(model: str | None, dtype: str | None, revision: str | None, **config: Any) -> Any:
    """Load the engine, printing what runs (BLAS, dtype, notes) to stderr."""
    from ffai_worker.engine import Engine, EngineConfig
    from ffai_worker.models.builtin import BUILTIN_MODEL_DIR, BUILTIN_MODEL_NOTE
    from ffai_worker.models.loading import ModelLoadError
    from ffai_worker.native.blas import blas_info

    if model is None:
        click.echo(f"ffai-worker: {BUILTIN_MODEL_NOTE}", err=True)
        model = str(BUILTIN_MODEL_DIR)
    elif Path(model).expanduser().is_dir():
        # `info` reports this path: absolute, so it means the same to every client.
        # (abspath, not resolve: a path through a symlink stays the one the user gave.)
        model = os.path.abspath(Path(model).expanduser())
    try:
        engine = Engine.load(model, dtype=dtype, revision=revision, config=EngineConfig(**config))
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from None
    mi = engine.model_info
    click.echo(
        f"ffai-worker: model {model} ({mi.architecture}, {mi.dtype}, "
        f"context {engine.context_length}, {mi.weights_bytes / 2**20:.1f} MiB weights)",
        err=True,
    )
    off = "FFAI_BLAS=off, FFAI_SMALL_GEMM=0 turn them off"
    click.echo(f"ffai-worker: BLAS: {blas_info()} ({off})", err=True)
    for note in mi.notes:
        click.echo(f"ffai-worker: {note}", err=True)
    cache = engine.prefix.capacity_bytes
    state = f"up to {cache / 2**20:.0f} MiB of KV" if engine.prefix.enabled else "off"
    click.echo(f"ffai-worker: prompt cache {state} (--prompt-cache-bytes)", err=True)
    if engine.config.prompt_cache_dir is not None and engine.prefix.enabled:
        click.echo(
            f"ffai-worker: prompt cache: {engine.restored_prompt_tokens} tokens restored from"
            f" {engine.config.prompt_cache_dir}",
            err=True,
        )
    return engine


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _byte_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """`0`, `1048576`, `512M`, `2GiB`, `1.5g`: a byte count (binary units)."""
    if value is None:
        return None
    text = value.strip().lower().removesuffix("b").removesuffix("i")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    try:
        size = float(text[: len(text) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size like 0, 512M or 2GiB") from None
    if not 0 <= size < 2**63:
        raise click.BadParameter(f"{value!r} is out of range")
    return int(size)


def _check_endpoint(endpoint: str, insecure: bool, curve: bool = False) -> None:
    """A non-loopback tcp endpoint needs CurveZMQ, or an explicit --insecure."""
    if not endpoint.startswith("tcp://") or insecure or curve:
        return
    host = urlparse(endpoint).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise click.BadParameter(
        f"{endpoint} is not a loopback address: serve it with CurveZMQ (--curve-secret, "
        "see `ffai-worker keygen`) or, on a network you trust, pass --insecure",
        param_hint="--endpoint",
    )


def _preflight_endpoint(endpoint: str) -> None:
    """Refuse an endpoint another worker serves before the model loads, not after."""
    try:
        if ipc_path(endpoint) is not None:
            from ffai_worker.serving.server import prepare_endpoint

            prepare_endpoint(endpoint)  # a safe 0700 directory; a stale socket file removed
        elif endpoint.startswith("tcp://"):
            _refuse_if_port_taken(endpoint)
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(f"cannot bind {endpoint}: {exc}") from None


def _refuse_if_port_taken(endpoint: str) -> None:
    """Raise if a listener holds the tcp port; anything this probe cannot judge (an
    interface name, a wildcard port) is left to the real bind."""
    url = urlparse(endpoint)
    try:
        host, port = url.hostname or "", url.port
    except ValueError:
        return
    if not port:
        return
    host = "" if host == "*" else host
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    # Linux refuses SO_REUSEADDR binds only while a socket listens: a port left in
    # TIME_WAIT by a stopped worker passes, as it does for zmq's own bind.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise RuntimeError("the address is in use (another worker?)") from None
    finally:
        probe.close()


def _curve_server(secret: str | None, clients: str | None) -> Any:
    if secret is None:
        return None
    from ffai_client.curve import CurveKeyError
    from ffai_worker.serving.curve_auth import CurveServer

    try:
        return CurveServer(secret, clients)
    except CurveKeyError as exc:
        raise click.BadParameter(str(exc), param_hint="--curve-secret") from None


def _plain_security(endpoint: str) -> str:
    if not endpoint.startswith("tcp://"):
        return "plain ZMTP; the socket file is this user's only"
    try:
        _check_endpoint(endpoint, insecure=False)
    except click.BadParameter:
        return "INSECURE: no authentication, no encryption, reachable beyond this machine"
    return "plain ZMTP on loopback"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ffai")
def main() -> None:
    """FFAI worker: one language model, many clients, streamed over ZeroMQ."""


@main.command()
@click.option("--model", "-m", default=None, help=MODEL_HELP)
@click.option("--endpoint", default=None, envvar=ENDPOINT_ENV, help=ENDPOINT_HELP)
@click.option(
    "--curve-secret",
    type=click.Path(exists=True, dir_okay=False),
    envvar="FFAI_CURVE_SECRET",
    default=None,
    help="This worker's CurveZMQ key pair (*.key_secret from `ffai-worker keygen`): "
    "clients must speak CurveZMQ [env FFAI_CURVE_SECRET].",
)
@click.option(
    "--curve-clients",
    type=click.Path(exists=True, file_okay=False),
    envvar="FFAI_CURVE_CLIENTS",
    default=None,
    help="Folder of allowed client public keys (*.key); without it any Curve client "
    "key is accepted [env FFAI_CURVE_CLIENTS].",
)
@click.option(
    "--insecure",
    "--allow-remote",
    is_flag=True,
    help="Serve a non-loopback tcp endpoint without CurveZMQ (no authentication, no encryption).",
)
@click.option("--dtype", type=DTYPE_CHOICES, default=None, help=DTYPE_HELP)
@click.option("--revision", default=None, help=REVISION_HELP)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    help="Sequences decoded together in one step.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(0, 100_000),
    default=64,
    show_default=True,
    help="Requests waiting beyond the batch; one more is answered `busy`.",
)
@click.option("--max-tokens-limit", type=click.IntRange(1), default=None, help="Cap on max_tokens.")
@click.option(
    "--max-prompt-tokens",
    type=click.IntRange(1),
    default=None,
    help="Longest prompt accepted, in tokens. Default: the context length.",
)
@click.option(
    "--prefill-step-size",
    type=click.IntRange(1),
    default=512,
    show_default=True,
    help="Prompt tokens prefilled per step, so a long prompt never freezes other streams.",
)
@click.option(
    "--prompt-cache-bytes",
    default=None,
    callback=_byte_size,
    help="KV bytes the prefix cache keeps for prompts seen before (e.g. 2GiB; 0: off). "
    "Default: 1/8 of memory, at most 8 GiB (printed at start-up).",
)
@click.option(
    "--prompt-cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Save the prompt cache here at shutdown and read it back at start (same model and "
    "dtype only; unreadable files are skipped with a warning).",
)
@click.option(
    "--max-message-bytes",
    type=click.IntRange(1024),
    default=16 << 20,
    show_default=True,
    help="Largest request frame accepted.",
)
@click.option(
    "--stream-interval-ms",
    type=click.FloatRange(0),
    default=None,
    help="Least time between two frames of one stream (0: every token). "
    "Default: every token; while more than 4 streams run, 5 ms x streams (at most 50).",
)
@click.option(
    "--log-level", type=LOG_LEVELS, default="warning", show_default=True, help="Logging threshold."
)
@click.option(
    "--http",
    default=None,
    metavar="HOST:PORT",
    help="Also serve the OpenAI/Ollama HTTP API here (ffai-gateway as a child process).",
)
def serve(
    model: str | None,
    endpoint: str | None,
    curve_secret: str | None,
    curve_clients: str | None,
    insecure: bool,
    dtype: str | None,
    revision: str | None,
    max_batch: int,
    max_queue: int,
    max_tokens_limit: int | None,
    max_prompt_tokens: int | None,
    prefill_step_size: int,
    prompt_cache_bytes: int | None,
    prompt_cache_dir: str | None,
    max_message_bytes: int,
    stream_interval_ms: float | None,
    log_level: str,
    http: str | None,
) -> None:
    """Load a model and serve it on a ZeroMQ ROUTER socket until SIGTERM/SIGINT."""
    from ffai_worker.serving.server import ServerConfig, Worker

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    endpoint = endpoint or default_endpoint()
    if curve_clients and not curve_secret:
        raise click.BadParameter("needs --curve-secret", param_hint="--curve-clients")
    _check_endpoint(endpoint, insecure, curve=curve_secret is not None)
    _preflight_endpoint(endpoint)
    curve = _curve_server(curve_secret, curve_clients)
    engine = _load_engine(
        model,
        dtype,
        revision,
        max_batch=max_batch,
        max_queue=max_queue,
        max_tokens_limit=max_tokens_limit,
        max_prompt_tokens=max_prompt_tokens,
        prefill_step_size=prefill_step_size,
        prompt_cache_bytes=prompt_cache_bytes,
        prompt_cache_dir=prompt_cache_dir,
    )
    interval = None if stream_interval_ms is None else stream_interval_ms / 1000.0
    config = ServerConfig(
        endpoint=endpoint,
        max_message_bytes=max_message_bytes,
        stream_interval_s=interval,
        curve=curve,
    )
    worker = Worker(engine, config)
    worker.install_signal_handlers()
    try:
        worker.bind()
    except Exception as exc:
        raise click.ClickException(f"cannot bind {endpoint}: {exc}") from None
    security = curve.describe() if curve is not None else _plain_security(endpoint)
    click.echo(f"ffai-worker: serving on {endpoint} ({security})", err=True)
    gateway = None
    if http is not None:
        from ffai_worker.serving.gateway_child import start_gateway, stop_gateway

        gateway = start_gateway(http, endpoint, allow_remote=insecure, curve=curve)
    try:
        worker.serve_forever()
    finally:
        if gateway is not None:
            stop_gateway(gateway)
    _save_prompt_cache(engine)
    click.echo("ffai-worker: stopped", err=True)


def _save_prompt_cache(engine: Any) -> None:
    """On the way out: a failure to write the cache is reported, never fatal."""
    if engine.config.prompt_cache_dir is None:
        return
    try:
        tokens = engine.save_prompt_cache()
    except Exception as exc:
        click.echo(f"ffai-worker: prompt cache not saved: {exc}", err=True)
        return
    click.echo(
        f"ffai-worker: prompt cache: {tokens} tokens saved to {engine.config.prompt_cache_dir}",
        err=True,
    )


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=".",
    show_default=True,
    help="Folder to write the key files into.",
)
@click.option("--name", default="worker", show_default=True, help="Base name of the key files.")
def keygen(directory: str, name: str) -> None:
    """Write a CurveZMQ key pair: NAME.key (public, share it) and NAME.key_secret (0600)."""
    from ffai_worker.serving.curve_auth import write_key_pair

    public, secret = write_key_pair(Path(directory), name)
    click.echo(f"public key: {public}  (give it to clients, or to a worker's --curve-clients)")
    click.echo(f"secret key: {secret}  (mode 0600; --curve-secret / --curve-key)")


@main.command()
@click.option("--model", "-m", default=None, help=MODEL_HELP)
@click.option("--dtype", type=DTYPE_CHOICES, default=None, help=DTYPE_HELP)
@click.option("--revision", default=None, help=REVISION_HELP)
@sampling_options
@click.option("--stats", is_flag=True, help="Print the [STATS] block to stderr.")
@click.argument("prompt")
def generate(
    model: str | None,
    dtype: str | None,
    revision: str | None,
    stats: bool,
    prompt: str,
    **options: Any,
) -> None:
    """Generate in-process (no worker) and stream the text to stdout."""
    params = parameters_from_options({k: options[k] for k in SAMPLING_KEYS})
    engine = _load_engine(model, dtype, revision)
    final = None
    for chunk in engine.generate_stream(prompt, parameters=params):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        if chunk.is_final:
            final = chunk
    sys.stdout.write("\n")
    if stats and final is not None and final.stats is not None:
        click.echo(final.stats.formatted(), err=True)


# -- ffai-worker service ----------------------------------------------------------------
KIND_HELP = "systemd user unit (Linux) or launchd agent (macOS). Default: this platform's."
_KIND = click.option(
    "--kind", type=click.Choice(si.KINDS), default=si.default_kind(), help=KIND_HELP
)
_RESERVED = ("--model", "-m", "--endpoint")


@main.group()
def service() -> None:
    """Run the worker as a per-user service that starts at login."""


@service.command(context_settings={"ignore_unknown_options": True})
@click.option("--model", "-m", default=None, help=MODEL_HELP + " A local folder is made absolute.")
@click.option(
    "--endpoint",
    default=None,
    envvar=ENDPOINT_ENV,
    help=f"Endpoint the service binds [default: ${ENDPOINT_ENV}, else the worker's default].",
)
@_KIND
@click.option(
    "--dry-run", "--print", "dry_run", is_flag=True, help="Print the unit; write nothing."
)
@click.argument("serve_options", nargs=-1, type=click.UNPROCESSED)
def install(
    model: str | None,
    endpoint: str | None,
    kind: str,
    dry_run: bool,
    serve_options: tuple[str, ...],
) -> None:
    """Write the service file; it runs this Python with `ffai_worker.cli serve`.

    SERVE_OPTIONS after `--` go to `serve` as given, e.g.
    `ffai-worker service install -m ./model -- --max-batch 8`.
    """
    for word in serve_options:
        if word.split("=", 1)[0] in _RESERVED:
            raise click.UsageError(
                f"give {word.split('=', 1)[0]} before `--`, not among the serve options"
            )
    try:
        model = None if model is None else si.absolute_model(model)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    argv = si.serve_argv(sys.executable, model, endpoint, serve_options)
    try:
        # Parse exactly what the service will run, so a typo fails here, not at login.
        ctx = serve.make_context("serve", argv[4:])
    except click.UsageError as exc:
        raise click.UsageError(f"serve options: {exc.format_message()}") from None
    if endpoint is not None:
        _check_endpoint(endpoint, bool(ctx.params["insecure"]), bool(ctx.params["curve_secret"]))
    try:
        content = si.render(kind, argv)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if dry_run:
        click.echo(content.decode(), nl=False)
        return
    for line in si.install(kind, content).lines:
        click.echo(line)


@service.command()
@_KIND
def uninstall(kind: str) -> None:
    """Stop and disable the service (when its manager is reachable) and remove its file."""
    for line in si.uninstall(kind).lines:
        click.echo(line)


@service.command()
@_KIND
def status(kind: str) -> None:
    """Say whether the service is installed, where, and its state. Exit 1: not installed."""
    outcome = si.status(kind)
    for line in outcome.lines:
        click.echo(line)
    if not outcome.ok:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
