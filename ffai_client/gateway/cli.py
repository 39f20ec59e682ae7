"""`ffai-gateway`: OpenAI- and Ollama-compatible HTTP in front of one or more workers."""

from __future__ import annotations

import ipaddress
import logging

import click

from ffai_client.endpoints import ENDPOINT_ENV, resolve_endpoint
from ffai_client.gateway.app import DEFAULT_MAX_BODY, GatewayConfig, create_app

DEFAULT_LISTEN = "127.0.0.1:11435"  # next to Ollama's 11434, so both can run
API_KEY_ENV = "FFAI_GATEWAY_API_KEY"
LOG_LEVELS = click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False)


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` → (host, port); BadParameter otherwise."""
    host, sep, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {listen!r}", param_hint="--listen")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, allow_remote: bool, api_key: str | None) -> None:
    """Beyond loopback only when asked for, and never without an API key."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise click.BadParameter(
            f"{host} is not a loopback address; pass --allow-remote (and --api-key) "
            "to serve beyond this machine",
            param_hint="--listen",
        )
    if not api_key:
        raise click.BadParameter(
            f"serving on {host} needs --api-key (or ${API_KEY_ENV}): anyone who reaches "
            "the port could use the model",
            param_hint="--api-key",
        )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    help="HOST:PORT to serve HTTP on (loopback unless --allow-remote).",
)
@click.option(
    "--worker",
    "workers",
    multiple=True,
    help=f"Worker endpoint; repeat for several models. Replicas of one model: a "
    "comma-separated list, or tcp://NAME:PORT resolving to several addresses "
    f"[default: ${ENDPOINT_ENV}, else the local worker's default endpoint].",
)
@click.option(
    "--allow-remote", is_flag=True, help="Allow a non-loopback --listen address (needs --api-key)."
)
@click.option(
    "--api-key",
    envvar=API_KEY_ENV,
    default=None,
    help=f"Require `Authorization: Bearer KEY` on every request [env: ${API_KEY_ENV}].",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Allow browser pages from this origin (repeatable); CORS is off without it.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(1024),
    default=DEFAULT_MAX_BODY,
    show_default=True,
    help="Largest request body accepted (413 beyond).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1),
    default=5.0,
    show_default=True,
    help="Seconds a request waits for a connection to a worker (then 503).",
)
@click.option(
    "--log-level", type=LOG_LEVELS, default="warning", show_default=True, help="Logging threshold."
)
def main(
    listen: str,
    workers: tuple[str, ...],
    allow_remote: bool,
    api_key: str | None,
    cors_origins: tuple[str, ...],
    max_body_bytes: int,
    timeout: float,
    log_level: str,
) -> None:
    """Serve the OpenAI (/v1) and Ollama (/api) HTTP APIs from FFAI workers."""
    import uvicorn

    host, port = parse_listen(listen)
    check_exposure(host, allow_remote, api_key)
    endpoints = [resolve_endpoint(w) for w in workers] or [resolve_endpoint(None)]
    config = GatewayConfig(
        workers=endpoints,
        api_key=api_key,
        cors_origins=list(cors_origins),
        max_body_bytes=max_body_bytes,
        connect_timeout=timeout,
    )
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    click.echo(f"ffai-gateway: workers {', '.join(endpoints)}", err=True)
    click.echo(f"ffai-gateway: listening on http://{listen}", err=True)
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=log_level.lower() in ("debug", "info"),
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
