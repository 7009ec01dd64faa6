"""A tiny OTLP/HTTP collector for the tracing-on runs: accepts and counts, keeps nothing.

Run as its own process (``python -m bench.otlp_sink``) so that receiving the
spans is charged to no measured group: the benchmark measures what exporting
costs the sagaflow processes, not what a collector costs. It binds an
ephemeral port on 127.0.0.1, prints ``{"event": "ready", "port": N}``, answers
200 with an empty body to every ``POST`` (``/v1/traces``, ``/v1/metrics``,
``/v1/logs``), and when its standard input closes prints ``{"event":
"stopped", "paths": {path: {"requests": n, "bytes": b}}}``.
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

_counts: dict[str, dict[str, int]] = {}
_spans: dict[str, int] = {}
_lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the OTLP exporter's session expects

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with _lock:
            entry = _counts.setdefault(self.path, {"requests": 0, "bytes": 0})
            entry["requests"] += 1
            entry["bytes"] += len(body)
        if self.path == "/v1/traces":
            _count_spans(body)
        # an empty protobuf Export*ServiceResponse is an empty body
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _count_spans(body: bytes) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except Exception:  # not protobuf (e.g. gzip): counted in bytes only
        return
    with _lock:
        for resource in request.resource_spans:
            for scoped in resource.scope_spans:
                for span in scoped.spans:
                    # query spans are named after the statement: keep the scope only
                    name = span.name if scoped.scope.name.startswith("sagaflow") else "*"
                    key = f"{scoped.scope.name}: {name}"
                    _spans[key] = _spans.get(key, 0) + 1


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(orjson.dumps({"event": event, **fields}).decode() + "\n")
    sys.stdout.flush()


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _emit("ready", port=server.server_address[1])
    while sys.stdin.readline():
        pass
    server.shutdown()
    with _lock:
        _emit("stopped", paths=_counts, spans=_spans)


if __name__ == "__main__":
    main()
