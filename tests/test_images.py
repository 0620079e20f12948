"""ImageFetcher against a fake Label Studio (and a fake bucket) served on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image
from support import TricklingServer, free_port

from backend.errors import BackendError, ImageAccessError
from backend.images import ImageAccessSettings, ImageFetcher, decode_image, looks_like_jwt, parse_http_url

LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex chars, like Label Studio's


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def make_jwt(claims: dict) -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}.{b64url(os.urandom(16))}"


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_image(height=12, width=20) -> np.ndarray:
    rng = np.random.default_rng(height * 1000 + width)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


class FakeServer:
    """A threading HTTP server; `routes[path] = handler(request) -> (status, headers, body)`."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.routes: dict = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                request = {
                    "method": self.command,
                    "path": parts.path,
                    "query": parse_qs(parts.query),
                    "auth": self.headers.get("Authorization"),
                    "body": self.rfile.read(length) if length else b"",
                }
                outer.requests.append(request)
                handler = outer.routes.get(parts.path)
                status, headers, body = handler(request) if handler else (404, {}, b'{"detail": "Not found"}')
                self.send_response(status)
                for name, value in headers.items():
                    if not name.startswith("_"):
                        self.send_header(name, value)
                if "Content-Length" not in headers and not headers.get("_no_length"):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if isinstance(body, bytes):
                    self.wfile.write(body)
                else:  # an iterable of chunks, streamed without Content-Length
                    try:
                        for chunk in body:
                            self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client stopped reading

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def paths(self, method="GET"):
        return [r["path"] for r in self.requests if r["method"] == method]


class FakeLabelStudio(FakeServer):
    """Label Studio 1.23 auth: legacy tokens (when enabled) and PAT refresh -> 5-minute access tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.legacy_enabled = True
        self.pat = make_jwt({"token_type": "refresh", "exp": time.time() + 10**8, "jti": "pat"})
        self.access_ttl_s = 300
        self.valid_access: set[str] = set()
        self.files: dict[str, tuple[str, bytes]] = {}
        self.routes["/api/token/refresh/"] = self._refresh

    def _refresh(self, request):
        try:
            refresh = json.loads(request["body"]).get("refresh")
        except ValueError:
            refresh = None
        if refresh != self.pat:
            return 401, {"Content-Type": "application/json"}, b'{"detail": "Token is invalid or expired"}'
        access = make_jwt({"token_type": "access", "exp": time.time() + self.access_ttl_s, "jti": os.urandom(4).hex()})
        self.valid_access.add(access)
        return 200, {"Content-Type": "application/json"}, json.dumps({"access": access}).encode()

    def authorized(self, request) -> bool:
        auth = request["auth"] or ""
        if auth.startswith("Token "):
            return self.legacy_enabled and auth[6:] == LEGACY_KEY
        return auth.startswith("Bearer ") and auth[7:] in self.valid_access

    def add_file(self, path: str, body: bytes, content_type: str = "image/png") -> str:
        def serve(request):
            if not self.authorized(request):
                return (
                    401,
                    {"Content-Type": "application/json"},
                    b'{"detail": "Authentication credentials were not provided."}',
                )
            return 200, {"Content-Type": content_type}, body

        self.routes[path] = serve
        return path

    @property
    def refresh_calls(self) -> int:
        return self.paths("POST").count("/api/token/refresh/")


@pytest.fixture
def ls():
    server = FakeLabelStudio()
    yield server
    server.close()


@pytest.fixture
def other():
    """A second origin: an image host or a bucket."""
    server = FakeServer()
    yield server
    server.close()


def fetcher_for(ls_url=None, **overrides) -> ImageFetcher:
    return ImageFetcher(ImageAccessSettings(label_studio_url=ls_url, **{"timeout": 5, **overrides}))


# --- Label Studio uploads and auth --------------------------------------------------------


def test_legacy_token_fetches_upload_and_never_calls_refresh(ls):
    image = sample_image()
    path = ls.add_file("/data/upload/1/a.png", png_bytes(image))
    fetcher = fetcher_for(ls.url, api_key=LEGACY_KEY)
    assert np.array_equal(fetcher.fetch(path), image)
    assert np.array_equal(fetcher.fetch(ls.url + path), image)  # absolute URL on the LS origin
    assert ls.refresh_calls == 0
    assert [r["auth"] for r in ls.requests] == [f"Token {LEGACY_KEY}"] * 2


def test_pat_is_exchanged_for_cached_bearer_access_token(ls):
    image = sample_image()
    path = ls.add_file("/data/upload/1/a.png", png_bytes(image))
    fetcher = fetcher_for(ls.url, api_key=ls.pat)
    for _ in range(3):
        assert np.array_equal(fetcher.fetch(path), image)
    assert ls.refresh_calls == 1  # the access token is reused until it expires
    refresh = next(r for r in ls.requests if r["method"] == "POST")
    assert json.loads(refresh["body"]) == {"refresh": ls.pat}
    gets = [r for r in ls.requests if r["method"] == "GET"]
    assert all(r["auth"].startswith("Bearer ") and r["auth"][7:] in ls.valid_access for r in gets)
    assert all(ls.pat not in r["auth"] for r in gets)  # the refresh token itself is never sent as Bearer


def test_access_token_refreshed_when_expired_or_refused(ls):
    path = ls.add_file("/data/upload/1/a.png", png_bytes(sample_image()))
    fetcher = fetcher_for(ls.url, api_key=ls.pat)
    ls.access_ttl_s = 10  # expires within the refresh margin: every use refreshes first
    fetcher.fetch(path)
    fetcher.fetch(path)
    assert ls.refresh_calls == 2

    ls.access_ttl_s = 300
    fetcher.fetch(path)
    assert ls.refresh_calls == 3
    ls.valid_access.clear()  # Label Studio refuses the cached (unexpired) access token
    fetcher.fetch(path)
    assert ls.refresh_calls == 4
    statuses = [r["path"] for r in ls.requests[-3:]]
    assert statuses == [path, "/api/token/refresh/", path]  # 401, refresh, retry


def test_concurrent_fetches_share_one_refresh(ls):
    image = sample_image()
    path = ls.add_file("/data/upload/1/a.png", png_bytes(image))
    fetcher = fetcher_for(ls.url, api_key=ls.pat)
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetcher.fetch(path))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6 and all(np.array_equal(r, image) for r in results)
    assert ls.refresh_calls == 1


def test_api_key_first_then_setup_token_fallback(ls):
    image = sample_image()
    path = ls.add_file("/data/upload/1/a.png", png_bytes(image))
    bad_pat = make_jwt({"token_type": "refresh", "exp": time.time() + 1000})
    fetcher = fetcher_for(ls.url, api_key=bad_pat, setup_access_token=LEGACY_KEY)
    assert np.array_equal(fetcher.fetch(path), image)
    assert ls.paths("POST") == ["/api/token/refresh/"]  # the API key was tried first
    assert ls.requests[-1]["auth"] == f"Token {LEGACY_KEY}"
    # The key that worked is tried first from then on.
    fetcher.fetch(path)
    assert ls.refresh_calls == 1 and ls.requests[-1]["auth"] == f"Token {LEGACY_KEY}"


def test_setup_token_set_at_runtime(ls):
    path = ls.add_file("/data/upload/1/a.png", png_bytes(sample_image()))
    fetcher = fetcher_for(ls.url)
    with pytest.raises(ImageAccessError, match="LABEL_STUDIO_API_KEY") as error:
        fetcher.fetch(path)
    assert error.value.status == 500
    fetcher.set_setup_access_token(LEGACY_KEY)
    assert fetcher.fetch(path).shape == (12, 20, 3)


def test_refused_legacy_key_explains_what_to_set(ls):
    path = ls.add_file("/data/upload/1/a.png", png_bytes(sample_image()))
    ls.legacy_enabled = False  # Label Studio 1.23 default
    fetcher = fetcher_for(ls.url, api_key=LEGACY_KEY)
    with pytest.raises(ImageAccessError) as error:
        fetcher.fetch(path)
    err = error.value
    assert err.status == 502 and err.url == path
    for needle in (
        "HTTP 401",
        "LABEL_STUDIO_URL",
        "LABEL_STUDIO_API_KEY",
        "Personal Access Token",
        "Legacy Token",
        "1.23 disables legacy tokens",
        "legacy token",
    ):
        assert needle in err.message
    assert ls.refresh_calls == 0
    body = err.to_json()
    assert body["error"] == err.message and body["url"] == path and "Traceback" not in json.dumps(body)


def test_revoked_pat_reports_refresh_failure(ls):
    path = ls.add_file("/data/upload/1/a.png", png_bytes(sample_image()))
    revoked = make_jwt({"token_type": "refresh", "exp": time.time() + 1000})
    with pytest.raises(ImageAccessError, match=r"/api/token/refresh/ refused it \(HTTP 401\)") as error:
        fetcher_for(ls.url, api_key=revoked).fetch(path)
    assert "expired or revoked" in error.value.message


def test_missing_label_studio_url_is_explained():
    with pytest.raises(ImageAccessError, match="LABEL_STUDIO_URL is not set") as error:
        fetcher_for(None, api_key=LEGACY_KEY).fetch("/data/upload/1/a.png")
    assert error.value.status == 500


def test_missing_upload_is_404(ls):
    with pytest.raises(ImageAccessError, match="HTTP 404") as error:
        fetcher_for(ls.url, api_key=LEGACY_KEY).fetch("/data/upload/1/missing.png")
    assert error.value.status == 404


def test_label_studio_url_with_base_path(ls):
    image = sample_image()
    ls.add_file("/ls/data/upload/1/a.png", png_bytes(image))
    fetcher = fetcher_for(ls.url + "/ls/", api_key=LEGACY_KEY)
    assert np.array_equal(fetcher.fetch("/data/upload/1/a.png"), image)
    assert np.array_equal(fetcher.fetch(ls.url + "/ls/data/upload/1/a.png"), image)


@pytest.mark.parametrize(
    "url", ["/data/upload/../../api/projects", "/data/upload/%2e%2e/%2E%2E/api/users", "/api/projects/", "relative.png"]
)
def test_relative_urls_outside_media_paths_are_rejected(ls, url):
    with pytest.raises(ImageAccessError) as error:
        fetcher_for(ls.url, api_key=LEGACY_KEY).fetch(url)
    assert error.value.status == 400
    assert ls.requests == []  # nothing was sent with the key


# --- cloud storage through the presign endpoint --------------------------------------------


def test_s3_uri_resolved_by_presign_redirect_without_leaking_auth(ls, other):
    image = sample_image(30, 18)
    uri = "s3://bucket/dir/img 1.png"
    other.routes["/bucket/dir/img%201.png"] = lambda r: (200, {"Content-Type": "binary/octet-stream"}, png_bytes(image))

    def presign(request):
        if not ls.authorized(request):
            return 401, {}, b""
        assert base64.urlsafe_b64decode(request["query"]["fileuri"][0]).decode() == uri
        return 303, {"Location": f"{other.url}/bucket/dir/img%201.png?X-Amz-Signature=abc"}, b""

    ls.routes["/tasks/7/presign/"] = presign
    fetcher = fetcher_for(ls.url, api_key=LEGACY_KEY)  # the bucket host is not in ALLOWED_IMAGE_HOSTS
    assert np.array_equal(fetcher.fetch(uri, task_id=7), image)
    assert other.requests[0]["auth"] is None  # the Label Studio key stays on the Label Studio origin
    assert other.requests[0]["query"] == {"X-Amz-Signature": ["abc"]}


def test_gs_uri_proxied_by_project_presign(ls):
    image = sample_image()
    ls.add_file("/projects/3/presign/", png_bytes(image))
    fetcher = fetcher_for(ls.url, api_key=LEGACY_KEY)
    assert np.array_equal(fetcher.fetch("gs://bucket/a.png", project_id="3.1795419391"), image)
    assert ls.requests[-1]["query"]["fileuri"] == [base64.urlsafe_b64encode(b"gs://bucket/a.png").decode()]


def test_cloud_uri_needs_task_or_project(ls):
    with pytest.raises(ImageAccessError, match="needs the task id") as error:
        fetcher_for(ls.url, api_key=LEGACY_KEY).fetch("azure-blob://container/a.png")
    assert error.value.status == 400
    with pytest.raises(ImageAccessError, match="task_id must be an integer"):
        fetcher_for(ls.url, api_key=LEGACY_KEY).fetch("s3://b/a.png", task_id="7; DROP")


# --- plain URLs and the allow-list -----------------------------------------------------------


def test_plain_url_needs_allowed_host(ls, other):
    image = sample_image()
    other.routes["/img.png"] = lambda r: (200, {"Content-Type": "image/png"}, png_bytes(image))
    url = other.url + "/img.png"
    host = urlsplit(other.url).netloc
    with pytest.raises(ImageAccessError, match="ALLOWED_IMAGE_HOSTS") as error:
        fetcher_for(ls.url, api_key=LEGACY_KEY).fetch(url)
    assert error.value.status == 403 and host in error.value.reason
    assert other.requests == []

    fetcher = fetcher_for(ls.url, api_key=LEGACY_KEY, allowed_image_hosts=["images.example.com", host])
    assert np.array_equal(fetcher.fetch(url), image)
    assert other.requests[0]["auth"] is None  # credentials are only for Label Studio
    assert np.array_equal(fetcher_for(None, allowed_image_hosts=["127.0.0.1:*"]).fetch(url), image)  # any port
    with pytest.raises(ImageAccessError, match="is not allowed"):  # a bare host is port 80/443 only
        fetcher_for(None, allowed_image_hosts=["127.0.0.1"]).fetch(url)


@pytest.mark.parametrize("template", [
    "http://{forbidden}\\@{allowed}/img.png",   # urllib reads the host after '@', urllib3 before the backslash
    "http://{forbidden}\\{allowed}/img.png",
    "http://{allowed}@{forbidden}/img.png",      # userinfo
    "http://x@{allowed}/img.png",
    "http://{allowed}\t/img.png",
    "http://{allowed} /img.png",
    "http://{allowed}%2f@{forbidden}/img.png",
    "http://{allowed}:0/img.png",
    "http://{allowed}:99999/img.png",
    "http://[{allowed}]/img.png",
])
def test_ambiguous_urls_are_refused_before_any_connection(other, template):
    """One parser decides the allow-list check and the connection; what parsers read differently is refused."""
    forbidden = FakeServer()
    try:
        forbidden.routes["/img.png"] = lambda r: (200, {"Content-Type": "image/png"}, png_bytes(sample_image()))
        other.routes["/img.png"] = forbidden.routes["/img.png"]
        allowed = urlsplit(other.url).netloc
        url = template.format(allowed=allowed, forbidden=urlsplit(forbidden.url).netloc)
        with pytest.raises(ImageAccessError) as error:
            fetcher_for(None, allowed_image_hosts=[allowed]).fetch(url)
        assert error.value.status in (400, 403)
        assert forbidden.requests == [] and other.requests == []
    finally:
        forbidden.close()


def test_the_metadata_address_behind_a_backslash_is_refused_offline():
    fetcher = fetcher_for(None, allowed_image_hosts=["127.0.0.1:8000"])
    with pytest.raises(ImageAccessError, match="backslash") as error:
        fetcher.fetch("http://169.254.169.254\\@127.0.0.1:8000/")
    assert error.value.status == 400


def test_a_redirect_to_an_ambiguous_url_is_refused(other):
    forbidden = FakeServer()
    try:
        forbidden.routes["/img.png"] = lambda r: (200, {"Content-Type": "image/png"}, png_bytes(sample_image()))
        allowed = urlsplit(other.url).netloc
        other.routes["/hop"] = lambda r: (302, {"Location": f"http://{urlsplit(forbidden.url).netloc}\\@{allowed}/img.png"}, b"")
        with pytest.raises(ImageAccessError, match="redirected to an unusable URL") as error:
            fetcher_for(None, allowed_image_hosts=[allowed]).fetch(other.url + "/hop")
        assert error.value.status == 502 and forbidden.requests == []
    finally:
        forbidden.close()


@pytest.mark.parametrize("entry, url, allowed", [
    ("cdn.example.com", "http://cdn.example.com/a.png", True),
    ("cdn.example.com", "https://cdn.example.com/a.png", True),
    ("cdn.example.com", "http://cdn.example.com:8080/a.png", False),
    ("cdn.example.com:8080", "http://cdn.example.com:8080/a.png", True),
    ("cdn.example.com:*", "http://cdn.example.com:8080/a.png", True),
    ("*.example.com", "https://a.b.example.com/a.png", True),
    ("*.example.com", "https://a.example.com:444/a.png", False),
    ("*.example.com:*", "https://a.example.com:444/a.png", True),
    ("*.example.com", "https://evilexample.com/a.png", False),
    ("*", "http://anything:1234/a.png", True),
])
def test_allow_list_ports_are_explicit(entry, url, allowed):
    assert ImageAccessSettings(allowed_image_hosts=(entry,)).host_allowed(parse_http_url(url)) is allowed


def test_redirect_from_allowed_host_to_other_host_is_blocked(ls, other):
    other.routes["/hop"] = lambda r: (302, {"Location": ls.url + "/internal.png"}, b"")
    host = urlsplit(other.url).netloc
    with pytest.raises(ImageAccessError, match="is not allowed") as error:
        fetcher_for(None, allowed_image_hosts=[host]).fetch(other.url + "/hop")
    assert error.value.status == 403
    assert ls.requests == []


def test_unsupported_scheme(ls):
    for url in ("file:///etc/passwd", "ftp://host/a.png", "//evil.example/a.png"):
        with pytest.raises(ImageAccessError, match="unsupported URL scheme") as error:
            fetcher_for(ls.url).fetch(url)
        assert error.value.status == 400


# --- local files ----------------------------------------------------------------------------


@pytest.fixture
def local_root(tmp_path):
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "a.png").write_bytes(png_bytes(sample_image()))
    (tmp_path / "secret.png").write_bytes(png_bytes(sample_image(5, 5)))
    return root


def test_local_files_read_from_document_root(local_root):
    fetcher = fetcher_for(None, local_files_document_root=str(local_root))
    assert np.array_equal(fetcher.fetch("/data/local-files/?d=dir/a.png"), sample_image())
    assert np.array_equal(fetcher.fetch("/data/local-files/?d=dir%2Fa.png"), sample_image())
    assert np.array_equal(fetcher.fetch("/data/local-files/?d=/dir/./a.png"), sample_image())


@pytest.mark.parametrize(
    "d, status",
    [
        ("../secret.png", 403),
        ("dir/../../secret.png", 403),
        ("%2e%2e/secret.png", 403),
        ("/../secret.png", 404),  # Label Studio reads "/x" as "<root>/x": here root/secret.png, absent
        ("/etc/passwd", 404),
        ("dir", 404),
        ("dir/missing.png", 404),
        ("", 400),
        ("dir/a.png%00.txt", 400),
    ],
)
def test_local_files_traversal_and_missing(local_root, d, status):
    fetcher = fetcher_for(None, local_files_document_root=str(local_root))
    with pytest.raises(ImageAccessError) as error:
        fetcher.fetch(f"/data/local-files/?d={d}")
    assert error.value.status == status
    assert str(local_root) not in error.value.reason and "root" not in error.value.reason.replace("_ROOT", "")


def test_local_files_symlink_escape_rejected(local_root, tmp_path):
    (local_root / "link.png").symlink_to(tmp_path / "secret.png")
    (local_root / "linkdir").symlink_to(tmp_path)
    (local_root / "inner.png").symlink_to(local_root / "dir" / "a.png")
    fetcher = fetcher_for(None, local_files_document_root=str(local_root))
    for d in ("link.png", "linkdir/secret.png"):
        with pytest.raises(ImageAccessError, match="outside LOCAL_FILES_DOCUMENT_ROOT") as error:
            fetcher.fetch(f"/data/local-files/?d={d}")
        assert error.value.status == 403
    assert np.array_equal(fetcher.fetch("/data/local-files/?d=inner.png"), sample_image())  # links inside are fine


def test_local_files_without_root_come_from_label_studio(ls):
    image = sample_image()
    ls.add_file("/data/local-files/", png_bytes(image))
    fetcher = fetcher_for(ls.url, api_key=LEGACY_KEY)
    assert np.array_equal(fetcher.fetch("/data/local-files/?d=dir/a.png"), image)
    assert ls.requests[-1]["query"] == {"d": ["dir/a.png"]}


def test_local_file_size_limit(local_root):
    fetcher = fetcher_for(None, local_files_document_root=str(local_root), max_download_bytes=100)
    with pytest.raises(ImageAccessError, match="MAX_IMAGE_BYTES=100") as error:
        fetcher.fetch("/data/local-files/?d=dir/a.png")
    assert error.value.status == 413


# --- limits and decoding -------------------------------------------------------------------


def test_oversized_download_stops_early(ls):
    chunks_sent = []

    def endless(request):
        def chunks():
            for _ in range(1000):  # 64 MB if read to the end
                chunks_sent.append(1)
                yield b"\0" * 65536

        return 200, {"Content-Type": "image/png", "_no_length": "1", "Connection": "close"}, chunks()

    ls.routes["/data/upload/1/huge.png"] = endless
    ls.add_file("/data/upload/1/declared.png", b"\0" * 5000)
    fetcher = fetcher_for(ls.url, api_key=LEGACY_KEY, max_download_bytes=200_000)
    with pytest.raises(ImageAccessError, match="exceeds MAX_IMAGE_BYTES=200000") as error:
        fetcher.fetch("/data/upload/1/huge.png")
    assert error.value.status == 413
    small = fetcher_for(ls.url, api_key=LEGACY_KEY, max_download_bytes=4000)
    with pytest.raises(ImageAccessError, match="5000 bytes, more than MAX_IMAGE_BYTES=4000"):
        small.fetch("/data/upload/1/declared.png")  # refused from Content-Length
    assert len(chunks_sent) < 1000


def test_too_many_pixels_rejected_before_decoding(ls):
    ls.add_file("/data/upload/1/big.png", png_bytes(np.zeros((1100, 1000, 3), dtype=np.uint8)))
    fetcher = fetcher_for(ls.url, api_key=LEGACY_KEY, max_image_pixels=1_000_000)
    with pytest.raises(ImageAccessError, match=r"1000x1100 = 1100000 pixels, more than MAX_IMAGE_PIXELS=1000000") as e:
        fetcher.fetch("/data/upload/1/big.png")
    assert e.value.status == 413
    roomy = fetcher_for(ls.url, api_key=LEGACY_KEY, max_image_pixels=1_100_000)
    assert roomy.fetch("/data/upload/1/big.png").shape == (1100, 1000, 3)  # the limit, not the file, refused it


def test_non_image_body_names_content_type(ls):
    ls.add_file("/data/upload/1/page.png", b"<html>Sign in</html>", content_type="text/html; charset=utf-8")
    with pytest.raises(ImageAccessError) as error:
        fetcher_for(ls.url, api_key=LEGACY_KEY).fetch("/data/upload/1/page.png")
    err = error.value
    assert err.status == 422 and err.url == "/data/upload/1/page.png"
    assert "not an image" in err.reason and "text/html" in err.reason


def test_truncated_image_is_422(ls):
    ls.add_file("/data/upload/1/cut.png", png_bytes(sample_image(64, 64))[:300])
    with pytest.raises(ImageAccessError, match="truncated or corrupt") as error:
        fetcher_for(ls.url, api_key=LEGACY_KEY).fetch("/data/upload/1/cut.png")
    assert error.value.status == 422


def test_exif_orientation_applied_like_browsers(ls):
    # Stored 20 high x 40 wide, left half red, right half blue, EXIF orientation 6: browsers show it
    # rotated 90 degrees clockwise, 40 high x 20 wide, with the (former) left half on top.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif)
    ls.add_file("/data/upload/1/rotated.jpg", buffer.getvalue(), content_type="image/jpeg")
    shown = fetcher_for(ls.url, api_key=LEGACY_KEY).fetch("/data/upload/1/rotated.jpg")
    assert shown.shape == (40, 20, 3) and shown.dtype == np.uint8
    expected = np.rot90(stored, k=-1)  # clockwise
    assert np.abs(shown.astype(int) - expected.astype(int)).mean() < 8
    assert shown[:15, :, 0].mean() > 200 and shown[25:, :, 2].mean() > 200


def _jpeg(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def _gradient(height: int, width: int) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    return np.dstack([rows * 255 // height, cols * 255 // width, np.full((height, width), 90)]).astype(np.uint8)


@pytest.mark.parametrize("min_side, expected_side", [(1000, 1000), (700, 1000), (400, 500), (300, 500), (2001, 2000)])
def test_a_large_jpeg_is_decoded_at_the_smallest_dct_scale_that_keeps_min_side(min_side, expected_side):
    image = _gradient(1000, 2000)
    decoded = decode_image(_jpeg(image), "x.jpg", "image/jpeg", 10**8, min_side=min_side)
    assert (decoded.height, decoded.width) == (1000, 2000)
    assert decoded.pixels.shape == (expected_side // 2, expected_side, 3) and decoded.pixels.dtype == np.uint8
    assert decoded.reduced == (expected_side < 2000)
    # the same field of view: the reduced pixels are the full image scaled down
    full = np.asarray(Image.fromarray(image).resize((expected_side, expected_side // 2), Image.BILINEAR), dtype=int)
    assert np.abs(decoded.pixels.astype(int) - full).mean() < 3


def test_reduced_decoding_keeps_the_exif_true_size_and_leaves_png_and_unset_min_side_at_full_size():
    stored = _gradient(1200, 3000)  # shown rotated: 3000 high x 1200 wide
    rotated = decode_image(_jpeg(stored, orientation=6), "r.jpg", None, 10**8, min_side=750)
    assert (rotated.height, rotated.width) == (3000, 1200)
    assert rotated.pixels.shape == (750, 300, 3)  # 1/4: the longer side 750 is still min_side
    assert decode_image(_jpeg(stored, orientation=6), "r.jpg", None, 10**8).pixels.shape == (3000, 1200, 3)
    png = decode_image(png_bytes(stored), "p.png", None, 10**8, min_side=750)
    assert png.pixels.shape == (1200, 3000, 3) and not png.reduced


@pytest.mark.parametrize("height, width, expected", [(1921, 2560, (961, 1280)), (3841, 5120, (961, 1280)),
                                                      (2560, 1921, (1280, 961))])
def test_an_odd_short_side_does_not_stop_the_reduction(height, width, expected):
    decoded = decode_image(_jpeg(_gradient(height, width)), "x.jpg", None, 10**8, min_side=1280)
    assert decoded.pixels.shape[:2] == expected and (decoded.height, decoded.width) == (height, width)


def test_a_jpeg_with_embedded_previews_mpo_is_reduced_too():
    buffer = io.BytesIO()
    Image.fromarray(_gradient(1000, 3000)).save(buffer, format="MPO", save_all=True,
                                                append_images=[Image.new("RGB", (30, 10))])
    assert Image.open(io.BytesIO(buffer.getvalue())).format == "MPO"
    decoded = decode_image(buffer.getvalue(), "phone.jpg", "image/jpeg", 10**8, min_side=1280)
    assert decoded.pixels.shape == (500, 1500, 3) and (decoded.height, decoded.width) == (1000, 3000)


def test_modes_convert_to_rgb(ls):
    gray16 = (np.arange(6 * 7, dtype=np.uint16).reshape(6, 7) * 1500).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(gray16).save(buffer, format="PNG")
    ls.add_file("/data/upload/1/g16.png", buffer.getvalue())
    rgba = np.dstack([sample_image(), np.full((12, 20), 128, np.uint8)])
    ls.add_file("/data/upload/1/rgba.png", png_bytes(rgba))
    fetcher = fetcher_for(ls.url, api_key=LEGACY_KEY)
    shown = fetcher.fetch("/data/upload/1/g16.png")
    assert shown.shape == (6, 7, 3) and np.array_equal(shown[:, :, 1], (gray16 >> 8).astype(np.uint8))
    assert np.array_equal(fetcher.fetch("/data/upload/1/rgba.png"), sample_image())


def test_connection_error_names_host():
    fetcher = fetcher_for("http://127.0.0.1:9", api_key=LEGACY_KEY, timeout=2)
    with pytest.raises(ImageAccessError, match=r"cannot connect to 127.0.0.1:9 \(is LABEL_STUDIO_URL right\?\)") as e:
        fetcher.fetch("/data/upload/1/a.png")
    assert e.value.status == 502


# --- settings, errors and token shape -------------------------------------------------------


def test_settings_from_env():
    settings = ImageAccessSettings.from_env(
        {
            "LABEL_STUDIO_URL": "http://ls:8080/",
            "LABEL_STUDIO_API_KEY": " key ",
            "LOCAL_FILES_DOCUMENT_ROOT": "/data",
            "ALLOWED_IMAGE_HOSTS": "cdn.example.com, *.images.example.com,,10.0.0.5:8000",
            "MAX_IMAGE_PIXELS": "1_000_000",
            "MAX_IMAGE_BYTES": "2048",
        }
    )
    assert settings.label_studio_url == "http://ls:8080" and settings.api_key == "key"
    assert settings.allowed_image_hosts == ("cdn.example.com", "*.images.example.com", "10.0.0.5:8000")
    assert (settings.max_image_pixels, settings.max_download_bytes) == (1_000_000, 2048)
    assert settings.host_allowed(parse_http_url("http://ls:8080/x.png")) and not settings.host_allowed(parse_http_url("https://ls:8080/x.png"))
    assert settings.host_allowed(parse_http_url("https://cdn.example.com/a.png"))
    assert settings.host_allowed(parse_http_url("https://a.images.example.com/a.png"))
    assert not settings.host_allowed(parse_http_url("https://images.example.com.evil.net/a.png"))
    assert settings.host_allowed(parse_http_url("http://10.0.0.5:8000/a")) and not settings.host_allowed(parse_http_url("http://10.0.0.5/a"))
    defaults = ImageAccessSettings.from_env({})
    assert defaults.label_studio_url is None and defaults.max_image_pixels == 50_000_000
    assert defaults.allowed_image_hosts == ()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LABEL_STUDIO_URL": "ls:8080"}, "LABEL_STUDIO_URL must be a full http"),
        ({"MAX_IMAGE_PIXELS": "lots"}, "MAX_IMAGE_PIXELS must be a positive integer"),
        ({"MAX_IMAGE_BYTES": "0"}, "MAX_IMAGE_BYTES must be a positive integer"),
        ({"LOCAL_FILES_DOCUMENT_ROOT": "/"}, "must not be the filesystem root"),
        ({"ALLOWED_IMAGE_HOSTS": "cdn.example.com/images"}, "must be a host, host:port or host:\\*"),
        ({"ALLOWED_IMAGE_HOSTS": "a@cdn.example.com"}, "must be a host, host:port or host:\\*"),
        ({"ALLOWED_IMAGE_HOSTS": "cdn.example.com:70000"}, "must be a host, host:port or host:\\*"),
    ],
)
def test_settings_reject_bad_values(env, message):
    with pytest.raises(ValueError, match=message):
        ImageAccessSettings.from_env(env)


def test_jwt_shape_detection(ls):
    assert looks_like_jwt(ls.pat)
    assert not looks_like_jwt(LEGACY_KEY)
    assert not looks_like_jwt("a.b.c")  # three segments but no JSON header
    assert not looks_like_jwt("")


def test_errors_to_json():
    error = BackendError("model not loaded", status=503, hint="retry")
    assert error.status == 503 and error.to_json() == {"error": "model not loaded", "hint": "retry"}
    access = ImageAccessError("/data/upload/1/a.png", "gone", status=404)
    assert isinstance(access, BackendError)
    assert access.to_json() == {
        "error": "Cannot load image '/data/upload/1/a.png': gone",
        "url": "/data/upload/1/a.png",
        "reason": "gone",
    }
    assert ImageAccessError("u", "r").status == 502
    with pytest.raises(ValueError, match="400..599"):
        BackendError("x", status=200)


def _assert_a_504_within_3_s(port: int, path: str, fragment: str) -> None:
    """A fetch from the loopback source on ``port`` with a 1 s timeout is a 504 naming ``fragment``, in under 3 s."""
    fetcher = fetcher_for(None, allowed_image_hosts=[f"127.0.0.1:{port}"], timeout=1.0)
    started = time.monotonic()
    with pytest.raises(ImageAccessError, match=fragment) as error:
        fetcher.fetch(f"http://127.0.0.1:{port}{path}")
    assert error.value.status == 504 and time.monotonic() - started < 3


def test_a_trickling_source_is_cut_off_at_the_timeout_for_the_whole_download():
    """One byte every 0.2 s never trips a per-read timeout; the download as a whole stops at `timeout`."""

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _assert_a_504_within_3_s(server.server_port, "/slow.png", "took more than 1 s")
    finally:
        server.shutdown()
        server.server_close()


def test_connection_errors_and_5xx_are_retried_twice_with_backoff(other):
    """A source that fails twice with 503 then answers is fetched; one that always fails is tried 3
    times (at once, then 0.5 s later) and reported with its status; a 404 is not retried."""
    image = sample_image()
    answers = iter([(503, {}, b"busy"), (502, {}, b"bad gateway"), (200, {"Content-Type": "image/png"}, png_bytes(image))])
    other.routes["/flaky.png"] = lambda request: next(answers)
    other.routes["/down.png"] = lambda request: (503, {"Retry-After": "3600"}, b"busy")
    fetcher = fetcher_for(None, allowed_image_hosts=[other.url.split("//")[1]])
    assert np.array_equal(fetcher.fetch(f"{other.url}/flaky.png"), image)
    assert [r["path"] for r in other.requests].count("/flaky.png") == 3
    started = time.monotonic()
    with pytest.raises(ImageAccessError, match="503") as error:
        fetcher.fetch(f"{other.url}/down.png")
    assert error.value.status == 502 and 0.4 <= time.monotonic() - started < 5  # Retry-After: 3600 is not obeyed
    assert [r["path"] for r in other.requests].count("/down.png") == 3
    with pytest.raises(ImageAccessError):
        fetcher.fetch(f"{other.url}/missing.png")
    assert [r["path"] for r in other.requests].count("/missing.png") == 1
    closed = free_port()  # nothing listens there: refused three times
    started = time.monotonic()
    with pytest.raises(ImageAccessError, match="cannot connect"):
        fetcher_for(None, allowed_image_hosts=[f"127.0.0.1:{closed}"]).fetch(f"http://127.0.0.1:{closed}/x.png")
    assert time.monotonic() - started < 5


def test_a_source_trickling_its_headers_is_cut_off_at_the_timeout():
    """Headers sent a byte every 0.2 s never trip a per-read timeout; the wait for them stops at `timeout`."""
    source = TricklingServer(b"", b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Slow: " + b"x" * 1000, interval=0.2)
    try:
        _assert_a_504_within_3_s(source.port, "/slow-headers.png", "did not answer within 1")
    finally:
        source.close()


def test_a_5xx_with_an_endless_body_is_retried_without_reading_it(other):
    """The retries close a 5xx answer unread: a 503 whose body trickles forever cannot hold the thread."""
    def endless_503(request):
        def chunks():
            for _ in range(10_000):
                time.sleep(0.3)
                yield b"x"
        return 503, {"Content-Length": "1000000000"}, chunks()

    other.routes["/busy.png"] = endless_503
    fetcher = fetcher_for(None, allowed_image_hosts=[other.url.split("//")[1]], timeout=1.0)
    started = time.monotonic()
    with pytest.raises(ImageAccessError, match="503"):
        fetcher.fetch(f"{other.url}/busy.png")
    assert time.monotonic() - started < 4
    assert [r["path"] for r in other.requests].count("/busy.png") == 3
