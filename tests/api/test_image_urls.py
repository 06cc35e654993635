"""Training images from a URL: fetched by the server, never from internal addresses.

A small HTTP server on 127.0.0.1 serves images, redirects, slow and huge
answers. Tests that need to reach it allow exactly 127.0.0.1 and keep the
rest of the default block list (127.0.0.2 included, to test a redirect to
loopback).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.auth import create_user
from api.main import create_app
from api.settings import DEFAULT_BLOCKED_NETWORKS, Settings
from tests.support.images import image_bytes

IMAGES = "/recognition/v2/training-image"
PNG = image_bytes(123, size=(120, 90))


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/image.png":
            self._send(200, PNG, "image/png")
        elif url.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query["to"])
            self.end_headers()
        elif url.path == "/slow":
            time.sleep(float(query.get("s", "3")))
            self._send(200, PNG, "image/png")
        elif url.path == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif url.path == "/huge-streamed":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"x" * 65536
            try:
                for _ in range(64):  # 4 MiB without a Content-Length
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif url.path == "/text":
            self._send(200, b"<html>not an image</html>", "text/html")
        else:
            self._send(404, b"missing", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _client_for(app: FastAPI) -> TestClient:
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "fetcher")
    return TestClient(app, headers={"Authorization": f"Token {token}"})


@pytest.fixture
def loopback_allowed(settings: Settings) -> Iterator[TestClient]:
    """An app that may fetch from 127.0.0.1 only (everything else internal stays refused)."""
    blocked = [n for n in DEFAULT_BLOCKED_NETWORKS if n != "127.0.0.0/8"] + ["127.0.0.2/31", "127.0.1.0/24"]
    app = create_app(
        settings.model_copy(
            update={
                "url_blocked_networks": blocked,
                "url_fetch_timeout_s": 1.0,
                "max_upload_bytes": 1_000_000,
            }
        )
    )
    yield _client_for(app)
    app.state.services.engine.dispose()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/image.png",
        "http://localhost:9/image.png",
        "http://10.0.0.1/image.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://192.168.1.1/image.png",
        "http://[::1]:9/image.png",
        "http://0.0.0.0:9/image.png",
    ],
)
def test_internal_targets_are_refused_by_default(client: TestClient, url: str) -> None:
    response = client.post(IMAGES, json={"url": url})
    assert response.status_code == 400
    assert response.json()["code"] == "image_fetch_failed"
    assert "Refusing" in response.json()["detail"]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/"])
def test_only_http_urls(client: TestClient, url: str) -> None:
    response = client.post(IMAGES, json={"url": url})
    assert response.status_code == 400 and "http" in response.json()["detail"]


def test_fetches_an_image_url(loopback_allowed: TestClient, image_server: str) -> None:
    response = loopback_allowed.post(IMAGES, json={"url": f"{image_server}/image.png", "test_image": True})
    assert response.status_code == 201, response.text
    assert (response.json()["img_width"], response.json()["img_height"]) == (120, 90)
    assert loopback_allowed.get(response.json()["img_path"]).content == PNG


def test_follows_a_redirect_to_an_allowed_host(loopback_allowed: TestClient, image_server: str) -> None:
    response = loopback_allowed.post(IMAGES, json={"url": f"{image_server}/redirect?to=/image.png"})
    assert response.status_code == 201


@pytest.mark.parametrize(
    "target",
    ["http://127.0.0.2:9/image.png", "http://10.0.0.1/image.png", "http://169.254.169.254/latest/meta-data/"],
)
def test_a_redirect_to_an_internal_target_is_refused(
    loopback_allowed: TestClient, image_server: str, target: str
) -> None:
    response = loopback_allowed.post(IMAGES, json={"url": f"{image_server}/redirect?to={target}"})
    assert response.status_code == 400 and "Refusing" in response.json()["detail"]


def test_a_hanging_url_times_out(loopback_allowed: TestClient, image_server: str) -> None:
    started = time.monotonic()
    response = loopback_allowed.post(IMAGES, json={"url": f"{image_server}/slow?s=3"})
    assert response.status_code == 400 and "timed out" in response.json()["detail"]
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("path", ["/huge-declared", "/huge-streamed"])
def test_a_too_large_answer_is_413(loopback_allowed: TestClient, image_server: str, path: str) -> None:
    response = loopback_allowed.post(IMAGES, json={"url": image_server + path})
    assert response.status_code == 413 and response.json()["code"] == "too_large"


@pytest.mark.parametrize(("path", "fragment"), [("/text", "not an image"), ("/missing", "HTTP 404")])
def test_not_an_image_or_http_error(
    loopback_allowed: TestClient, image_server: str, path: str, fragment: str
) -> None:
    response = loopback_allowed.post(IMAGES, json={"url": image_server + path})
    assert response.status_code == 400 and fragment in response.json()["detail"]
    assert loopback_allowed.get(IMAGES).json()["count"] == 0
