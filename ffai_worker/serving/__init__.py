"""The serving process: the ZeroMQ actor, its outbox and admission threads, CurveZMQ, services."""
