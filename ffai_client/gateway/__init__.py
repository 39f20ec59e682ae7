"""`ffai-gateway`: the OpenAI and Ollama HTTP APIs in front of FFAI workers.

Needs the `gateway` extra (`pip install 'ffai[gateway]'`: Starlette, uvicorn,
sse-starlette, prometheus-client). It is a client of the workers (through
`AsyncClient`) and never imports MLX.
"""

from ffai_client.gateway.app import GatewayConfig, create_app

__all__ = ["GatewayConfig", "create_app"]
