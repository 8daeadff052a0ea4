"""Prometheus metrics of the node and hub roles (prometheus-client).

Label values are bounded: reasons are this program's own UPPER_SNAKE codes, never an
agency code or anything a peer chooses freely.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, start_http_server

__all__ = ["REJECTIONS", "count_rejection", "serve_metrics"]

REJECTIONS = Counter(
    "chapar_rejections",
    "Calls, letters, evidence and frames refused, by canonical code and reason.",
    ["code", "reason"],
)


def count_rejection(code: str, reason: str) -> None:
    REJECTIONS.labels(code=code, reason=reason or "UNSPECIFIED").inc()


def serve_metrics(listen: str) -> tuple[WSGIServer, threading.Thread, str]:
    """Serves /metrics on ``HOST:PORT`` (port 0 picks one); returns the bound address."""
    host, _, port = listen.rpartition(":")
    server, thread = start_http_server(int(port), addr=host)
    return server, thread, f"{host}:{server.server_port}"
