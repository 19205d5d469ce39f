"""A real S3-compatible server for the test suite: moto in server mode on 127.0.0.1, an ephemeral port,
in a daemon thread. Clients reach it over HTTP exactly as they reach AWS (boto3 for the sensor, s3fs
for every s3:// path), configured by the standard AWS variables (:meth:`S3Server.environ`).

The server records each request it receives (method, path, query), so a test can count what a
listing costs::

    with S3Server() as s3:
        ...
        assert [r.query.get("start-after") for r in s3.listings("inbox", "drops/")] == ["drops/b.csv"]
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl

from moto.server import ThreadedMotoServer

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class S3Request:
    method: str
    path: str  # /<bucket>/<key>: clients address a server on an IP address path-style
    query: dict[str, str]


class S3Server:
    def __init__(self) -> None:
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._lock = threading.Lock()
        self.requests: list[S3Request] = []

    @property
    def endpoint(self) -> str:
        host, port = self._moto.get_host_and_port()
        return f"http://{host}:{port}"

    def environ(self) -> dict[str, str]:
        """The variables that point boto3 and s3fs at this server (any credentials do)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def listings(self, bucket: str, prefix: str) -> list[S3Request]:
        """The ListObjectsV2 requests received for exactly this bucket and prefix, in order."""
        with self._lock:
            return [
                r
                for r in self.requests
                if r.method == "GET"
                and r.path.rstrip("/") == f"/{bucket}"
                and r.query.get("list-type") == "2"
                and r.query.get("prefix", "") == prefix
            ]

    def _recording(self, app: WsgiApp) -> WsgiApp:
        def record(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            query = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
            with self._lock:
                self.requests.append(S3Request(environ["REQUEST_METHOD"], environ["PATH_INFO"], query))
            return app(environ, start_response)

        return record

    def __enter__(self) -> Self:
        # werkzeug logs every request to stderr; the records above say the same, quietly.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._moto.start()
        # ThreadedMotoServer has no hook for middleware: wrap the app its werkzeug server calls per
        # request (moto's internals, hence the moto<6 pin in pyproject.toml).
        server = self._moto._server
        assert server is not None
        server.app = self._recording(server.app)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._moto.stop()
