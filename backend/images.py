"""Fetch task images the way Label Studio shows them: RGB uint8 (H, W, 3), EXIF orientation applied.

Browsers apply EXIF orientation to <img> by default (CSS `image-orientation: from-image`), so
Label Studio's `original_width`/`original_height` and click coordinates refer to the rotated
image; decoding with the orientation applied keeps masks aligned with what annotators see.

Where an image URL leads (see `ImageFetcher.fetch`):
- `/data/upload/...`, `/storage-data/...` (relative, or absolute on the LABEL_STUDIO_URL origin):
  downloaded from Label Studio with the API key (LABEL_STUDIO_API_KEY first, the /setup token
  as fallback). A legacy key is sent as `Authorization: Token <key>`; a personal access token
  (a JWT refresh token) is exchanged at `POST /api/token/refresh/` for a short-lived access
  token sent as `Authorization: Bearer <access>`, cached until it expires or is refused.
- `/data/local-files/?d=<path>`: read from LOCAL_FILES_DOCUMENT_ROOT when set (the resolved
  path, symlinks included, must stay inside the root), otherwise downloaded from Label Studio.
- `s3://`, `gs://`, `azure-blob://`, `azure-spi://`: resolved by Label Studio's
  `/tasks/<task_id>/presign/?fileuri=<urlsafe base64>` (or `/projects/<id>/presign/`), which
  redirects to a presigned URL or proxies the bytes; the Authorization header never leaves
  the Label Studio origin.
- other http(s) URLs: only from hosts in ALLOWED_IMAGE_HOSTS (SSRF protection), redirects included.

Why requests and not the SDK: `label_studio_sdk`'s `get_local_path` sends a personal access
token itself as `Bearer` (it never exchanges it for an access token), buffers the whole body
without a size limit, caches files on disk and fetches any host; its `TokensClientExt` does
the refresh exchange but raises at construction for an expired token and never refreshes on
a 401. So the exchange (one POST) and the streamed, limited download are done here.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np
import requests
import urllib3
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.util import Retry, parse_url

from backend.errors import ImageAccessError

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
LABEL_STUDIO_MEDIA_PREFIXES = ("/data/upload/", "/storage-data/")
LOCAL_FILES_PREFIX = "/data/local-files"
_PRESIGN_PATH = re.compile(r"^/(tasks|projects)/\d+/(presign|resolve)/?$")
MAX_REDIRECTS = 5
DECODE_SLOTS = 4  # images one ImageFetcher decodes at once (their pixels are the memory peak)
# A refused connection is tried twice more by urllib3 (at once, then 0.5 s later); a 5xx twice more by
# ``_download`` itself, after closing the answer unread (urllib3 would read its body first, unbounded).
# Never a read that failed half-way, and never a POST.
DOWNLOAD_RETRY = Retry(total=2, connect=2, read=False, status=0, other=0, backoff_factor=0.25,
                       allowed_methods=frozenset({"GET"}), raise_on_status=False)
RETRIED_STATUSES = (500, 502, 503, 504)
STATUS_RETRY_DELAYS_S = (0.25, 0.5)  # before the second and third try of a 5xx (a Retry-After is not obeyed)
CONNECT_TIMEOUT_S = 5.0  # per connection attempt (the download's own timeout bounds each read and the body)
POOL_CONNECTIONS = 32  # kept-alive connections per host: more than THREADS' default
ACCESS_TOKEN_MARGIN_S = 30.0  # refresh this long before an access token's `exp`
ACCESS_TOKEN_DEFAULT_TTL_S = 240.0  # when the access token carries no `exp` (Label Studio's live 5 min)
_CHUNK_BYTES = 1 << 16
_B64URL_SEGMENT = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")

_CREDENTIALS_HELP = (
    "Set LABEL_STUDIO_URL to the Label Studio address as this backend reaches it, and "
    "LABEL_STUDIO_API_KEY to an access token of a user who can open the project: either a "
    "Personal Access Token (a JWT from Account & Settings > Personal Access Token; this backend "
    "exchanges it at /api/token/refresh/ and sends 'Authorization: Bearer <access token>') or a "
    "Legacy Token (sent as 'Authorization: Token <key>'). Label Studio 1.23 disables legacy tokens "
    "by default, so a legacy key, including the one Label Studio sends to /setup, is refused unless "
    "an admin enables legacy tokens in Organization > Settings > Access Token Settings."
)


def looks_like_jwt(token: str) -> bool:
    """True for a JWT (personal access token): three base64url segments, the first a JSON header."""
    parts = token.split(".")
    if len(parts) != 3 or not all(_B64URL_SEGMENT.match(part) for part in parts[:2]):
        return False
    header = _decode_jwt_segment(parts[0])
    return isinstance(header, dict) and "alg" in header


def _decode_jwt_segment(segment: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):
        return None


def _jwt_expiry(token: str) -> float | None:
    """The `exp` claim (unix seconds) of a JWT, read without verification; None if absent."""
    parts = token.split(".")
    claims = _decode_jwt_segment(parts[1]) if len(parts) == 3 else None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, (int, float)) else None


_HOST_NAME = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*\.?$")
_IPV6_LITERAL = re.compile(r"^\[[0-9a-f:.]+\]$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split_host_port(netloc: str) -> tuple[str, str]:
    """``(host, port text)`` of ``host[:port]`` (port text "" when absent); an [IPv6] literal keeps its colons."""
    if netloc.endswith("]") or ":" not in netloc:
        return netloc, ""
    host, _, port = netloc.rpartition(":")
    return host, port


def _is_host(host: str) -> bool:
    return bool(_HOST_NAME.match(host) or _IPV6_LITERAL.match(host))


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) < 65536


@dataclass(frozen=True)
class HttpTarget:
    """An unambiguous http(s) URL: the host and port that the allow-list checks are the ones connected to."""

    scheme: str  # "http" or "https"
    host: str  # lower-case host name, IPv4 address or [IPv6] literal
    port: int  # explicit, or the scheme's default
    url: str  # the URL to request (the fragment dropped)

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def netloc(self) -> str:
        return self.host if self.port == _DEFAULT_PORTS[self.scheme] else f"{self.host}:{self.port}"


def parse_http_url(url: str) -> HttpTarget:
    """The one parser of http(s) image URLs; a ValueError names what makes ``url`` unusable.

    Ambiguous URLs are refused rather than interpreted: parsers disagree on backslashes,
    userinfo (``user@host``), control characters, spaces and unusual host characters
    (``http://a\\@b/`` is host ``b`` to urllib but ``a`` to urllib3, which connects). The
    connection library's own reading (urllib3's ``parse_url``) must then agree with this one.
    """
    if not isinstance(url, str):
        raise ValueError(f"expected a URL string, got {type(url).__name__}")
    if any(ord(c) < 0x21 or ord(c) == 0x7F or ord(c) > 0x7E for c in url):
        raise ValueError("the URL contains spaces, control or non-ASCII characters (percent-encode them)")
    if "\\" in url:
        raise ValueError("the URL contains a backslash")
    try:
        parts = urlsplit(url)
        seen = parse_url(url)  # urllib3 is what requests connects with
    except ValueError as exc:
        raise ValueError(f"the URL cannot be parsed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"the URL scheme must be http or https, got {scheme or '(none)'!r}")
    netloc = parts.netloc
    if "@" in netloc:
        raise ValueError("the URL carries user info (user@host); credentials in image URLs are not supported")
    host, port_text = _split_host_port(netloc)
    host = host.lower()
    if not _is_host(host) or len(host) > 253:
        raise ValueError(f"the URL host {host[:80]!r} is not a valid host name or IP address")
    if port_text and not _is_port(port_text):
        raise ValueError(f"the URL port {port_text[:20]!r} is not a number from 1 to 65535")
    port = int(port_text) if port_text else _DEFAULT_PORTS[scheme]
    seen_port = seen.port or _DEFAULT_PORTS[scheme]
    if (seen.scheme, (seen.host or "").lower(), seen_port) != (scheme, host, port):
        raise ValueError("the URL is read differently by the connection library; refusing it")
    return HttpTarget(scheme, host, port, url.split("#", 1)[0])


@dataclass(frozen=True)
class _HostRule:
    host: str  # lower-case hostname, "*" for any, "*.example.com" for subdomains
    port: int | None  # None: any port ("host:*"); a bare host means the scheme's default port

    def matches(self, target: HttpTarget) -> bool:
        port = _DEFAULT_PORTS[target.scheme] if self.port == 0 else self.port
        if port is not None and port != target.port:
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return target.host.endswith(self.host[1:])
        return target.host == self.host


def _parse_host_rule(entry: str) -> _HostRule:
    """``host`` (the scheme's default port: 80 for http, 443 for https), ``host:port``, ``host:*``
    (any port), ``*.domain`` (subdomains, same port forms) or ``*`` (any host, any port)."""
    text = entry.strip().lower()
    if text in ("*", ""):
        return _HostRule("*", None)
    host, port = _split_host_port(text)
    if not _is_host(host[2:] if host.startswith("*.") else host) or (port and port != "*" and not _is_port(port)):
        raise ValueError(f"ALLOWED_IMAGE_HOSTS entry {entry!r} must be a host, host:port or host:* "
                         "(optionally *.domain)")
    return _HostRule(host, None if port == "*" else int(port) if port else 0)


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an unambiguous http(s) URL, with the scheme's default port; None otherwise."""
    try:
        return parse_http_url(url).origin
    except ValueError:
        return None


def _has_dot_segments(path: str) -> bool:
    return any(segment in (".", "..") for segment in unquote(path).split("/"))


def _parse_object_id(value: Any, name: str) -> int | None:
    """A task/project id as int; accepts ints and the '1.1795419391' project form of /predict."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer id, got {value!r}")
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+)(\.\d+)?\s*", str(value))
    if not match:
        raise ValueError(f"{name} must be an integer id, got {value!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class ImageAccessSettings:
    """Where images may come from and how much of them is accepted.

    api_key comes from LABEL_STUDIO_API_KEY; setup_access_token is the key Label Studio sends to
    /setup, used only when the API key is missing or refused.
    """

    label_studio_url: str | None = None
    api_key: str | None = None
    setup_access_token: str | None = None
    local_files_document_root: str | None = None
    allowed_image_hosts: tuple[str, ...] = ()
    max_image_pixels: int = 50_000_000
    max_download_bytes: int = 100 * 1024 * 1024
    timeout: float = 30.0
    _host_rules: tuple[_HostRule, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        url = (self.label_studio_url or "").strip().rstrip("/") or None
        if url is not None and _origin(url) is None:
            raise ValueError(f"LABEL_STUDIO_URL must be a full http:// or https:// URL, got {self.label_studio_url!r}")
        object.__setattr__(self, "label_studio_url", url)
        object.__setattr__(self, "api_key", (self.api_key or "").strip() or None)
        object.__setattr__(self, "setup_access_token", (self.setup_access_token or "").strip() or None)
        root = (self.local_files_document_root or "").strip() or None
        if root is not None and Path(root).resolve() == Path(root).resolve().parent:
            raise ValueError("LOCAL_FILES_DOCUMENT_ROOT must not be the filesystem root: it would expose every file")
        object.__setattr__(self, "local_files_document_root", root)
        entries = self.allowed_image_hosts
        entries = entries.split(",") if isinstance(entries, str) else entries
        hosts = tuple(h.strip() for h in entries if h.strip())
        object.__setattr__(self, "allowed_image_hosts", hosts)
        object.__setattr__(self, "_host_rules", tuple(_parse_host_rule(h) for h in hosts))
        for name in ("max_image_pixels", "max_download_bytes"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ImageAccessSettings:
        """Read LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, LOCAL_FILES_DOCUMENT_ROOT,
        ALLOWED_IMAGE_HOSTS (comma-separated), MAX_IMAGE_PIXELS and MAX_IMAGE_BYTES."""
        env = os.environ if environ is None else environ

        def positive_int(name: str, default: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw.replace("_", ""))
            except ValueError:
                raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
            if value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {raw!r}")
            return value

        return cls(
            label_studio_url=env.get("LABEL_STUDIO_URL"),
            api_key=env.get("LABEL_STUDIO_API_KEY"),
            local_files_document_root=env.get("LOCAL_FILES_DOCUMENT_ROOT"),
            allowed_image_hosts=tuple(env.get("ALLOWED_IMAGE_HOSTS", "").split(",")),
            max_image_pixels=positive_int("MAX_IMAGE_PIXELS", cls.max_image_pixels),
            max_download_bytes=positive_int("MAX_IMAGE_BYTES", cls.max_download_bytes),
        )

    def host_allowed(self, target: HttpTarget) -> bool:
        """True when ``target`` is on the Label Studio origin or on a host of ALLOWED_IMAGE_HOSTS."""
        if self.label_studio_url and target.origin == _origin(self.label_studio_url):
            return True
        return any(rule.matches(target) for rule in self._host_rules)


EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class DecodedImage:
    """An image as RGB uint8 ``pixels`` (h, w, 3), EXIF orientation applied.

    ``height`` and ``width`` are its true size; ``pixels`` is smaller when the image was decoded
    at a reduced scale (``decode_image``'s ``min_side``), and then shows the same field of view.
    """

    pixels: np.ndarray
    height: int
    width: int

    @property
    def reduced(self) -> bool:
        return self.pixels.shape[:2] != (self.height, self.width)


def decode_image(data: bytes, url: str, content_type: str | None, max_pixels: int,
                 min_side: int | None = None) -> DecodedImage:
    """Decode image bytes to RGB uint8, EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded. With ``min_side``, a
    JPEG (or MPO, a JPEG with embedded previews) is decoded at the smallest DCT scale (1/2, 1/4,
    1/8) whose longer side is still at least ``min_side``: 1/4 of the pixels' memory and decode
    time at 1/2. Other formats, and JPEGs below twice ``min_side``, decode at full size.
    Raises ImageAccessError 413 above max_pixels and 422 for bodies that are not images.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageAccessError(url, f"{exc}; raise MAX_IMAGE_PIXELS to accept it", status=413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        hint = ""
        if content_type and content_type.split(";")[0].strip().lower() in (
            "text/html",
            "application/json",
            "text/plain",
        ):
            hint = " (an error or login page? check the URL and the credentials)"
        raise ImageAccessError(
            url,
            f"the response is not an image: Content-Type {content_type or 'unknown'}, {len(data)} bytes{hint}",
            status=422,
        ) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageAccessError(
                url,
                f"image is {width}x{height} = {width * height} pixels, more than MAX_IMAGE_PIXELS={max_pixels}",
                status=413,
            )
        try:
            drafted = (min_side is not None and isinstance(image, JpegImagePlugin.JpegImageFile)  # MPO too
                       and max(width, height) >= 2 * min_side)
            # read before exif_transpose, which drops the tag; only a reduced decode needs it
            transposed = drafted and image.getexif().get(EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS
            if drafted:  # only the long side is asked for: draft keeps it at least min_side
                image.draft("RGB", (min_side, 1) if width >= height else (1, min_side))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place, like the RGB check below: no copies of the pixels
            if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grey: keep the high byte
                gray = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
                pixels = np.repeat(gray[:, :, None], 3, axis=2)
            else:
                pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageAccessError(url, f"image data is truncated or corrupt ({exc})", status=422) from None
    if not drafted:  # the decoded pixels are the true size
        return DecodedImage(pixels, *pixels.shape[:2])
    true_height, true_width = (width, height) if transposed else (height, width)
    return DecodedImage(pixels, true_height, true_width)


class ImageFetcher:
    """Downloads task images with Label Studio auth, storage resolution, SSRF and size limits.

    Thread-safe: one instance serves all requests (it caches PAT access tokens).
    """

    def __init__(self, settings: ImageAccessSettings, session: requests.Session | None = None) -> None:
        self.settings = settings
        if session is None:
            session = requests.Session()
            for scheme in ("http://", "https://"):
                session.mount(scheme, _DownloadAdapter(max_retries=DOWNLOAD_RETRY, pool_maxsize=POOL_CONNECTIONS))
        self._session = session
        self._lock = threading.Lock()
        self._decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        self._setup_access_token = settings.setup_access_token
        self._access_tokens: dict[str, tuple[str, float]] = {}  # PAT -> (access token, refresh after)
        self._preferred_key: str | None = None  # the key that last worked
        # PIL warns above Image.MAX_IMAGE_PIXELS and refuses twice that in Image.open. Our own check
        # (from the header, before decoding) enforces max_image_pixels, so PIL's process-wide bound
        # is only raised to it, never lowered (other code in the process decodes images too).
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < settings.max_image_pixels:
            Image.MAX_IMAGE_PIXELS = settings.max_image_pixels

    @classmethod
    def from_env(cls) -> ImageFetcher:
        return cls(ImageAccessSettings.from_env())

    def set_setup_access_token(self, token: str | None) -> None:
        """Remember the access_token Label Studio sent to /setup (fallback after LABEL_STUDIO_API_KEY)."""
        with self._lock:
            self._setup_access_token = (token or "").strip() or None

    def fetch(self, url: str, task_id: Any = None, project_id: Any = None) -> np.ndarray:
        """The image at a task URL as RGB uint8 (H, W, 3) at full size, EXIF orientation applied.

        task_id / project_id are needed for cloud storage URIs (s3://, gs://, azure-blob://).
        Raises ImageAccessError naming the URL and the reason.
        """
        return self.fetch_decoded(url, task_id, project_id).pixels

    def fetch_decoded(self, url: str, task_id: Any = None, project_id: Any = None,
                      min_side: int | None = None) -> DecodedImage:
        """``fetch``, with its true size; a large JPEG is decoded reduced, to a longer side of at
        least ``min_side`` (see ``decode_image``)."""
        data, content_type = self._fetch(url, task_id, project_id)
        with self._decode_slots:  # downloads overlap freely; decoding (CPU and memory) a few at a time
            return decode_image(data, url, content_type, self.settings.max_image_pixels, min_side)

    # --- routing -------------------------------------------------------------------------

    def _fetch(self, url: str, task_id: Any, project_id: Any) -> tuple[bytes, str | None]:
        if not isinstance(url, str) or not url.strip():
            raise ImageAccessError(str(url), "the task has no image URL (expected a non-empty string)", status=400)
        url = url.strip()
        if "\x00" in url or any(c in url for c in "\r\n"):
            raise ImageAccessError(url, "the URL contains control characters", status=400)
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ImageAccessError(url, f"the URL cannot be parsed ({exc})", status=400) from None
        scheme = parts.scheme.lower()
        if scheme in CLOUD_SCHEMES:
            return self._fetch_cloud(url, task_id, project_id)
        if not scheme and url.startswith("/") and not url.startswith("//"):
            return self._fetch_label_studio_path(url, parts.path, parts.query, http_url=None)
        if scheme in ("http", "https"):
            ls_path = self._label_studio_path(url)
            if ls_path is not None:
                return self._fetch_label_studio_path(url, ls_path, parts.query, url)
            target = self._http_target(url)
            if not self.settings.host_allowed(target):
                raise self._host_error(url, target)
            return self._read(self._download(target.url, url, authorization=None), url)
        raise ImageAccessError(
            url,
            f"unsupported URL scheme {scheme or '(none)'!r}: expected /data/upload/..., /data/local-files/?d=..., "
            f"http(s)://, or {', '.join(s + '://' for s in CLOUD_SCHEMES)}",
            status=400,
        )

    def _fetch_label_studio_path(
        self, url: str, path: str, query: str, http_url: str | None
    ) -> tuple[bytes, str | None]:
        """A path on the Label Studio origin (below LABEL_STUDIO_URL's base path).

        http_url is the absolute URL, or None for a relative task URL (joined to LABEL_STUDIO_URL).
        """
        if _has_dot_segments(path):
            raise ImageAccessError(url, "the URL path contains '.' or '..' segments", status=400)
        if path == LOCAL_FILES_PREFIX or path.startswith(LOCAL_FILES_PREFIX + "/"):
            if self.settings.local_files_document_root:
                return self._read_local_file(url, query)
            if http_url is None and not self.settings.label_studio_url:
                raise ImageAccessError(
                    url,
                    "set LOCAL_FILES_DOCUMENT_ROOT to read Local Storage files from disk, or LABEL_STUDIO_URL "
                    "(and LABEL_STUDIO_API_KEY) to download them from Label Studio",
                    status=500,
                )
            return self._fetch_from_label_studio(url, http_url or self._label_studio_join(url, url))
        if path.startswith(LABEL_STUDIO_MEDIA_PREFIXES) or _PRESIGN_PATH.match(path):
            return self._fetch_from_label_studio(url, http_url or self._label_studio_join(url, url))
        if http_url is not None:  # another page on the Label Studio host: fetched without credentials
            return self._read(self._download(http_url, url, authorization=None), url)
        raise ImageAccessError(
            url,
            "a relative URL must be a Label Studio file path (/data/upload/..., /storage-data/..., "
            "/data/local-files/?d=...)",
            status=400,
        )

    def _fetch_cloud(self, url: str, task_id: Any, project_id: Any) -> tuple[bytes, str | None]:
        try:
            task = _parse_object_id(task_id, "task_id")
            project = _parse_object_id(project_id, "project_id")
        except ValueError as exc:
            raise ImageAccessError(url, str(exc), status=400) from None
        if task is None and project is None:
            raise ImageAccessError(
                url, "a cloud storage URI is resolved through Label Studio and needs the task id", status=400
            )
        fileuri = base64.urlsafe_b64encode(url.encode()).decode()
        scope = f"tasks/{task}" if task is not None else f"projects/{project}"
        return self._fetch_from_label_studio(url, self._label_studio_join(f"/{scope}/presign/?fileuri={fileuri}", url))

    def _label_studio_join(self, path: str, url: str) -> str:
        if not self.settings.label_studio_url:
            raise ImageAccessError(
                url,
                "LABEL_STUDIO_URL is not set: set it to the Label Studio address as this backend reaches it "
                "(e.g. http://label-studio:8080) to download uploaded, Label Studio-served and cloud storage files",
                status=500,
            )
        return self.settings.label_studio_url + path

    def _label_studio_path(self, url: str) -> str | None:
        """Path of an absolute URL below LABEL_STUDIO_URL (base path removed), None when elsewhere."""
        base = self.settings.label_studio_url
        if not base or _origin(url) != _origin(base):
            return None
        base_path = urlsplit(base).path.rstrip("/")
        path = urlsplit(url).path or "/"
        if base_path and not (path == base_path or path.startswith(base_path + "/")):
            return None
        return path[len(base_path) :] or "/"

    @staticmethod
    def _http_target(url: str) -> HttpTarget:
        try:
            return parse_http_url(url)
        except ValueError as exc:
            raise ImageAccessError(url, f"unusable image URL: {exc}", status=400) from None

    @staticmethod
    def _host_error(url: str, target: HttpTarget) -> ImageAccessError:
        return ImageAccessError(
            url,
            f"host {target.netloc!r} is not allowed: add it to ALLOWED_IMAGE_HOSTS (comma-separated host, "
            "host:port or host:*; a bare host allows only port 80/443; the LABEL_STUDIO_URL origin is always allowed)",
            status=403,
        )

    # --- local files -----------------------------------------------------------------------

    def _read_local_file(self, url: str, query: str) -> tuple[bytes, str | None]:
        """`/data/local-files/?d=<path>` below LOCAL_FILES_DOCUMENT_ROOT, like Label Studio's view."""
        values = parse_qs(query, keep_blank_values=True).get("d")
        relative = values[-1] if values else ""
        if not relative:
            raise ImageAccessError(url, "a /data/local-files/ URL needs ?d=<path>", status=400)
        if "\x00" in relative:
            raise ImageAccessError(url, "the local file path contains a NUL byte", status=400)
        root_setting = self.settings.local_files_document_root
        try:
            root = Path(root_setting).resolve(strict=True)
        except OSError:
            log.error("LOCAL_FILES_DOCUMENT_ROOT does not exist", extra={"path": root_setting})
            raise ImageAccessError(url, "LOCAL_FILES_DOCUMENT_ROOT does not exist (the backend log names it)",
                                   status=500) from None
        # Label Studio reads ?d= relative to the root ("/x" is "<root>/x"); resolving follows
        # symlinks, so a link that points outside the root is caught by the containment check.
        candidate = root / posixpath.normpath(relative).lstrip("/")
        outside = ImageAccessError(url, "the local file path leads outside LOCAL_FILES_DOCUMENT_ROOT", status=403)
        if not Path(os.path.abspath(candidate)).is_relative_to(root):  # "../x", even when it does not exist
            raise outside
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            resolved = None
        if resolved is not None and not resolved.is_relative_to(root):  # a symlink out of the root
            raise outside
        if resolved is None or not resolved.is_file():
            raise ImageAccessError(url, "no such file under LOCAL_FILES_DOCUMENT_ROOT", status=404)
        size = resolved.stat().st_size
        if size > self.settings.max_download_bytes:
            raise ImageAccessError(
                url, f"file is {size} bytes, more than MAX_IMAGE_BYTES={self.settings.max_download_bytes}", status=413
            )
        try:
            return resolved.read_bytes(), None
        except OSError as exc:
            raise ImageAccessError(url, f"cannot read the local file ({exc.strerror})", status=500) from None

    # --- Label Studio auth -------------------------------------------------------------------

    def _credentials(self) -> list[tuple[str, str]]:
        """(key, where it came from), the key that last worked first."""
        with self._lock:
            keys = [(self.settings.api_key, "LABEL_STUDIO_API_KEY"), (self._setup_access_token, "/setup access_token")]
            preferred = self._preferred_key
        unique: list[tuple[str, str]] = []
        for key, source in keys:
            if key and key not in (k for k, _ in unique):
                unique.append((key, source))
        return sorted(unique, key=lambda item: item[0] != preferred)  # stable: otherwise env key first

    def _fetch_from_label_studio(self, url: str, http_url: str) -> tuple[bytes, str | None]:
        credentials = self._credentials()
        if not credentials:
            raise ImageAccessError(
                url, f"no Label Studio credentials to download it with. {_CREDENTIALS_HELP}", status=500
            )
        failures = []
        for key, source in credentials:
            is_pat = looks_like_jwt(key)
            kind = "personal access token" if is_pat else "legacy token"
            for attempt in range(2 if is_pat else 1):  # a refused access token is refreshed once
                try:
                    authorization = self._authorization(key, force_refresh=attempt > 0)
                except _TokenRefreshError as exc:
                    failures.append(f"{source} ({kind}): {exc}")
                    break
                response = self._download(http_url, url, authorization)
                if response.status_code in (401, 403) and self._on_label_studio(response.url):
                    failures.append(f"{source} ({kind}) got HTTP {response.status_code}")
                    response.close()
                    continue
                with self._lock:
                    self._preferred_key = key
                return self._read(response, url)
        raise ImageAccessError(
            url,
            f"Label Studio at {self.settings.label_studio_url} refused the credentials "
            f"({'; '.join(failures)}). {_CREDENTIALS_HELP} A 403 also means the token's user cannot access this project.",
            status=502,
        )

    def _authorization(self, key: str, force_refresh: bool) -> str:
        if not looks_like_jwt(key):
            return f"Token {key}"
        with self._lock:  # one refresh at a time; other threads reuse its result
            cached = self._access_tokens.get(key)
            if cached and not force_refresh and time.time() < cached[1]:
                return f"Bearer {cached[0]}"
            access = self._refresh_access_token(key)
            expiry = _jwt_expiry(access)
            refresh_after = expiry - ACCESS_TOKEN_MARGIN_S if expiry else time.time() + ACCESS_TOKEN_DEFAULT_TTL_S
            self._access_tokens[key] = (access, refresh_after)
            return f"Bearer {access}"

    def _refresh_access_token(self, refresh_token: str) -> str:
        endpoint = f"{self.settings.label_studio_url}/api/token/refresh/"
        try:
            response = self._session.post(
                endpoint, json={"refresh": refresh_token}, timeout=self.settings.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise _TokenRefreshError(f"cannot reach {endpoint} ({type(exc).__name__})") from None
        with response:
            if response.status_code in (401, 403):
                raise _TokenRefreshError(
                    f"{endpoint} refused it (HTTP {response.status_code}): the token is expired or revoked, "
                    "or personal access tokens are disabled for the organization"
                )
            if response.status_code != 200:
                raise _TokenRefreshError(f"{endpoint} answered HTTP {response.status_code}")
            try:
                access = response.json().get("access")
            except (ValueError, AttributeError):
                access = None
        if not isinstance(access, str) or not access:
            raise _TokenRefreshError(f"{endpoint} answered without an 'access' token")
        return access

    def _on_label_studio(self, target: HttpTarget | str) -> bool:
        base = self.settings.label_studio_url
        origin = target.origin if isinstance(target, HttpTarget) else _origin(target)
        return bool(base) and origin is not None and origin == _origin(base)

    # --- HTTP ----------------------------------------------------------------------------------

    def _download(self, http_url: str, url: str, authorization: str | None) -> requests.Response:
        """GET with redirects followed by hand: Authorization only on the Label Studio origin;
        redirects leaving a chain that started at Label Studio are trusted (presigned URLs),
        others must stay on allowed hosts. Every hop is parsed by ``parse_http_url``, and the
        URL it checked is the one requested. Returns the final, unread, streamed response."""
        target = self._http_target(http_url)
        trusted = self._on_label_studio(target)
        for _ in range(MAX_REDIRECTS + 1):
            on_label_studio = self._on_label_studio(target)
            headers = {"Authorization": authorization} if authorization and on_label_studio else {}
            response = self._get(target, headers, url, on_label_studio)
            if not response.is_redirect:
                return response
            location = urljoin(target.url, response.headers["Location"])
            response.close()
            try:
                target = parse_http_url(location)
            except ValueError as exc:
                raise ImageAccessError(url, f"redirected to an unusable URL: {exc}", status=502) from None
            if not trusted and not self.settings.host_allowed(target):
                raise self._host_error(url, target)
        raise ImageAccessError(url, f"more than {MAX_REDIRECTS} redirects", status=502)

    def _get(self, target: HttpTarget, headers: Mapping[str, str], url: str, on_label_studio: bool) -> requests.Response:
        """One hop: the streamed, unread response; a 5xx is closed unread and tried again (RETRIED_STATUSES)."""
        for delay in (*STATUS_RETRY_DELAYS_S, None):
            try:
                response = self._session.get(
                    target.url, headers=headers, stream=True, allow_redirects=False,
                    timeout=(min(CONNECT_TIMEOUT_S, self.settings.timeout), self.settings.timeout))
            except requests.Timeout:
                raise ImageAccessError(
                    url, f"{target.netloc} did not answer within {self.settings.timeout} s", status=504
                ) from None
            except requests.RequestException as exc:
                hint = " (is LABEL_STUDIO_URL right?)" if on_label_studio else ""
                raise ImageAccessError(
                    url, f"cannot connect to {target.netloc}{hint}: {type(exc).__name__}", status=502
                ) from None
            if response.status_code not in RETRIED_STATUSES or delay is None:
                return response
            response.close()  # unread: its body may be endless
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _read(self, response: requests.Response, url: str) -> tuple[bytes, str | None]:
        """Body of a final response, at most max_download_bytes, or an ImageAccessError."""
        limit = self.settings.max_download_bytes
        with response:
            status = response.status_code
            if status == 404:
                raise ImageAccessError(url, f"{urlsplit(response.url).netloc} has no such file (HTTP 404)", status=404)
            if not 200 <= status < 300:
                raise ImageAccessError(url, f"{urlsplit(response.url).netloc} answered HTTP {status}", status=502)
            declared = response.headers.get("Content-Length", "")
            if declared.isascii() and declared.isdigit() and int(declared) > limit:
                raise ImageAccessError(
                    url, f"download is {declared} bytes, more than MAX_IMAGE_BYTES={limit}", status=413
                )
            body = bytearray()
            guard = DownloadDeadline(response, self.settings.timeout)  # the timeout per read is not per download
            try:
                for chunk in response.iter_content(_CHUNK_BYTES):
                    body += chunk
                    if len(body) > limit:
                        raise ImageAccessError(url, f"download exceeds MAX_IMAGE_BYTES={limit}", status=413)
            except (requests.RequestException, OSError) as exc:
                if guard.expired:
                    raise ImageAccessError(url, f"the download took more than {self.settings.timeout:g} s",
                                           status=504) from None
                if isinstance(exc, requests.Timeout):
                    raise ImageAccessError(url, "the download stalled (timeout)", status=504) from None
                raise ImageAccessError(url, f"the download broke off ({type(exc).__name__})", status=502) from None
            finally:
                guard.cancel()
            if guard.expired:  # the cut-off read ended like a short body
                raise ImageAccessError(url, f"the download took more than {self.settings.timeout:g} s", status=504)
            return bytes(body), response.headers.get("Content-Type")


def _response_socket(response: requests.Response) -> socket.socket | None:
    """The socket a streamed response reads from: the connection's, or (``Connection: close``,
    where http.client lets the connection go) the one behind the body's file object."""
    connection_socket = getattr(getattr(response.raw, "connection", None), "sock", None)
    if connection_socket is not None:
        return connection_socket
    body_file = getattr(getattr(response.raw, "_fp", None), "fp", None)
    return getattr(getattr(body_file, "raw", None), "_sock", None)


class _HeadersDeadline:
    """For urllib3 connections: the status line and headers must arrive within the read timeout in
    all, not per read, so a source that trickles its headers cannot hold a thread (the body has
    ``DownloadDeadline``). Past it the socket is shut and the request ends as a read timeout."""

    def getresponse(self):
        seconds = self.timeout if isinstance(self.timeout, (int, float)) and self.sock is not None else None
        if not seconds:
            return super().getresponse()
        expired = threading.Event()

        def cut() -> None:
            expired.set()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        timer = threading.Timer(seconds, cut)
        timer.daemon = True
        timer.start()
        try:
            response = super().getresponse()
        except Exception:
            if expired.is_set():
                raise socket.timeout(f"no response headers within {seconds:g} s") from None
            raise
        finally:
            timer.cancel()
        if expired.is_set():  # the cut ended the headers early (http.client reads EOF as their end)
            response.close()
            raise socket.timeout(f"no response headers within {seconds:g} s")
        return response


class _HTTPConnection(_HeadersDeadline, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_HeadersDeadline, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _DownloadAdapter(HTTPAdapter):
    """requests' adapter whose connections bound the wait for response headers (``_HeadersDeadline``)."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def proxy_manager_for(self, proxy, **proxy_kwargs):  # behind an HTTP(S)_PROXY too (SOCKS keeps its own pools)
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, urllib3.ProxyManager):
            manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        return manager


class DownloadDeadline:
    """Shuts a streamed response's socket down ``seconds`` after it starts, so a source that trickles
    bytes (each read within the read timeout) cannot hold a request thread for longer."""

    def __init__(self, response: requests.Response, seconds: float):
        self.expired = False
        self._socket = _response_socket(response)
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def _cut(self) -> None:
        self.expired = True
        if self._socket is not None:
            try:
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()


class _TokenRefreshError(Exception):
    """The personal access token could not be exchanged for an access token."""
