"""A real S3 endpoint for tests: moto's server mode on a free 127.0.0.1 port, in a subprocess.

``s3_server`` (module scope) starts ``moto_server`` and stops it afterwards; ``s3_env`` sets
the AWS variables and ``S3_ENDPOINT_URL`` for one test and gives it a fresh bucket name.
Import both into a test module: ``from tests.s3_server import s3_env, s3_server  # noqa: F401``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Fake credentials: moto accepts anything. The secret is distinctive so that tests can assert it
# never shows up in messages or output.
FAKE_KEY_ID = "AKIATESTKEYID0000000"
FAKE_SECRET = "fake-secret-never-print-me-0123456789"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited early with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the server is serving
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout} s")


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on loopback; yield its endpoint URL; stop it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the S3 environment at the moto server, create a fresh bucket, return its name."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server)
    bucket = f"coin-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


def upload_tree(local: Path, bucket: str, prefix: str, endpoint: str) -> None:
    """Copy every file under ``local`` to ``s3://bucket/prefix/<relative path>``."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


class FaultyProxy:
    """An HTTP proxy on loopback in front of the S3 server that fails requests on demand: the
    object store as a flaky network or a failing service shows it to the client.

    ``fail(match, times, mode)``: the next ``times`` requests whose path contains ``match`` (a key)
    fail, ``mode`` "503" (the service answers 503 SlowDown) or "reset" (the connection is closed
    without an answer, as a server that went away); ``times=None``: every one from now on.
    ``seen(match)`` counts the requests for a key; ``url`` is the endpoint to give the client."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        up = urlsplit(upstream)
        proxy = self
        self.rules: list[list] = []  # [match, remaining or None, mode]
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                mode = proxy._verdict(self.path)
                if mode == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if mode == "503":
                    payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _verdict(self, path: str) -> str | None:
        with self._lock:
            for rule in self.rules:
                match, remaining, mode = rule
                if match in path:
                    self.counts[match] = self.counts.get(match, 0) + 1
                    if remaining is None:
                        return mode
                    if remaining > 0:
                        rule[1] -= 1
                        return mode
            return None

    def fail(self, match: str, times: int | None, mode: str = "503") -> None:
        with self._lock:
            self.rules.append([match, times, mode])

    def seen(self, match: str) -> int:
        with self._lock:
            return self.counts.get(match, 0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
