"""The serving engine: continuous batching of compressed requests over one pool
(docs/architecture.md, "Serving")."""

from kvjax.engine.engine import Engine, EngineStats, parse_bytes
from kvjax.engine.request import Request, RequestResult

__all__ = ["Engine", "EngineStats", "Request", "RequestResult", "parse_bytes"]
