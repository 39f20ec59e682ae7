"""`ffai-gateway`: the OpenAI and Ollama HTTP APIs in front of FFAI workers.

Needs the `gateway` extra (`pip install 'ffai[gateway]'`: Starlette, uvicorn,
sse-starlette, prometheus-client). It is a client of the workers (through
`AsyncClient`) and never imports MLX.

The request translation (`openai_params`, `fields`, `errors`, `generation`,
`workers`, `toolcalls`) and the response shaping (`openai_shape`) import no
HTTP package, so `ffai batch` uses them without the extra; the app itself is
imported only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ffai_client.gateway.app import GatewayConfig, create_app

__all__ = ["GatewayConfig", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy: importing a submodule must not pull in Starlette (the batch runner has none).
    if name in __all__:
        from ffai_client.gateway import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
