"""Task images: resolve a Label Studio image reference, fetch it safely, validate it, prepare it for the engine.

References a task can hold (the value of `<Image value="$field">`):
  * Label Studio-hosted files, relative to Label Studio: `/data/upload/<project>/<file>` and
    `/data/local-files/?d=<path>` (local-files storage). They are fetched from Label Studio with its API
    token (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY, else the `hostname` / `access_token` of `/setup`), or
    read from disk under DATAENGINE_LOCAL_FILES_ROOT when the backend shares Label Studio's
    LOCAL_FILES_DOCUMENT_ROOT.
  * plain `http(s)://` URLs, and `data:image/...;base64,` URIs.

SSRF guard (like Label Studio's own; backend/ssrf.py): a URL whose host resolves to a non-public address
(loopback, private, link-local, reserved, or an IPv6 form embedding one) is refused unless
DATAENGINE_ALLOW_PRIVATE_URLS is set; the host of the configured LABEL_STUDIO_URL is trusted. The guard checks
the host httpx connects to and pins the connection to the address it checked (no DNS rebinding). Redirects
are followed by hand so every hop is checked, and the token is only ever sent to the Label Studio host.

Every problem is a `RequestError` with a 4xx status naming the task and the problem; the predictor reports
it for that task only. The engine gets the image as a PNG data URI (no second fetch, no engine-side SSRF),
scaled down to DATAENGINE_IMAGE_MAX_SIDE.
"""
from __future__ import annotations

import base64
import binascii
import io
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, unquote, urljoin, urlparse, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from .errors import RequestError
from .ssrf import BlockedDestination, GuardedTransport, is_public_address  # noqa: F401 (is_public_address: re-exported)
from .thread_transport import PerThreadTransport

# Formats Pillow decodes that vision-language processors handle; anything else is a 415.
ALLOWED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
NEUTRAL_MIME_TYPES = {"", "application/octet-stream", "binary/octet-stream"}  # say nothing about the content
MAX_REDIRECTS = 3
LABEL_STUDIO_PATH_PREFIXES = ("/data/", "/storage-data/")
LOCAL_FILES_PATH = "/data/local-files"


class ImageError(RequestError):
    """The image of a task cannot be used (unreachable, corrupt ...)."""

    status = 422


class ImageTooLarge(ImageError):
    status = 413


class UnsupportedImageType(ImageError):
    status = 415


class ForbiddenImageUrl(ImageError):
    """The SSRF guard refused the URL."""

    status = 403


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 1024  # longer sides are scaled down before the image goes to the engine
    timeout: float = 10.0
    allow_private: bool = False
    local_files_root: str = ""
    memory_budget: int = 1024 * 1024 * 1024  # bytes of decoded images held at once by one fetcher (process)

    @classmethod
    def from_settings(cls, settings) -> "ImageLimits":
        return cls(
            max_bytes=settings.image_max_bytes,
            max_pixels=settings.image_max_pixels,
            max_side=settings.image_max_side,
            timeout=settings.image_fetch_timeout,
            allow_private=settings.allow_private_urls,
            local_files_root=str(settings.local_files_root or ""),
            memory_budget=settings.image_memory_budget,
        )


@dataclass(frozen=True)
class LabelStudioAccess:
    """Where Label Studio is and the token to read its files with. `trusted`: the URL was configured by the
    operator (LABEL_STUDIO_URL), so its host passes the SSRF guard even on a private network."""

    url: str = ""
    token: str = ""
    trusted: bool = False

    @property
    def netloc(self) -> str:
        """Label Studio's host:port as httpx sends it (IDNA 2008), to compare with image URLs'."""
        try:
            return httpx.URL(self.url).netloc.decode("ascii") if self.url else ""
        except httpx.InvalidURL:
            return ""

    def auth_header(self) -> dict[str, str]:
        if not self.token:
            return {}
        # Personal access tokens (Label Studio >= 1.14) are JWTs sent as Bearer; legacy tokens as Token.
        scheme = "Bearer" if _is_jwt(self.token) else "Token"
        return {"Authorization": f"{scheme} {self.token}"}


@dataclass(frozen=True)
class PreparedImage:
    """A validated image, re-encoded for the engine."""

    reference: str
    width: int
    height: int
    png: bytes

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass(frozen=True)
class RawImage:
    data: bytes
    mime: str  # what the source declared (Content-Type, data URI); "" when unknown


class MemoryBudget:
    """Bytes of decoded images the threads of a process may hold at once: a decode waits for room. Thread-safe."""

    def __init__(self, total: int):
        self.total = total
        self.in_use = 0
        self.peak = 0
        self._room = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int, where: str) -> Iterator[None]:
        if nbytes > self.total:
            raise ImageTooLarge(
                f"{where}: decoding it takes about {nbytes} bytes, more than the whole budget of {self.total} "
                "(DATAENGINE_IMAGE_MEMORY_BUDGET)"
            )
        with self._room:
            self._room.wait_for(lambda: self.in_use + nbytes <= self.total)
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._room:
                self.in_use -= nbytes
                self._room.notify_all()


class ImageFetcher:
    """Thread-safe: one per process, shared by the predictor's threads."""

    def __init__(self, limits: ImageLimits):
        self.limits = limits
        self.budget = MemoryBudget(limits.memory_budget)
        transport = GuardedTransport(PerThreadTransport())  # every hop's host checked and pinned (backend/ssrf.py)
        self._http = httpx.Client(timeout=httpx.Timeout(limits.timeout), follow_redirects=False, transport=transport)

    def prepare(self, reference: str, access: LabelStudioAccess, where: str) -> PreparedImage:
        """Fetch, validate and re-encode the image `reference`; `where` names it in errors ("task 3 image 'img'")."""
        raw = self.fetch(reference, access, where)
        return decode_image(raw, self.limits, where, reference, self.budget)

    # --- fetching ----------------------------------------------------------------------------------
    def fetch(self, reference: str, access: LabelStudioAccess, where: str) -> RawImage:
        ref = reference.strip()
        if ref.startswith("data:"):
            return read_data_uri(ref, self.limits.max_bytes, where)
        if ref.startswith("/"):
            return self._fetch_label_studio_path(ref, access, where)
        scheme = ref.split(":", 1)[0].lower() if ":" in ref else ""
        if scheme in ("http", "https"):
            return self._fetch_url(ref, access, where)
        if scheme in ("s3", "gs", "azure-blob"):
            raise ImageError(f"{where}: cloud storage URI {_short(ref)} is not supported; let Label Studio serve presigned "
                             "http(s) URLs (storage setting 'presign') or use /data/upload or local-files storage")
        raise ImageError(
            f"{where}: {_short(ref)} is not an image URL; expected http(s)://..., data:image/...;base64,..., "
            "/data/upload/... or /data/local-files/?d=..."
        )

    def _fetch_label_studio_path(self, path: str, access: LabelStudioAccess, where: str) -> RawImage:
        if not path.startswith(LABEL_STUDIO_PATH_PREFIXES):
            raise ImageError(f"{where}: {_short(path)} is not a Label Studio file path (/data/upload/..., /data/local-files/?d=...)")
        if path.startswith(LOCAL_FILES_PATH) and self.limits.local_files_root:
            return self._read_local_file(path, where)
        if not access.url:
            raise ImageError(
                f"{where}: {_short(path)} is a Label Studio file, but Label Studio's URL is unknown: set LABEL_STUDIO_URL "
                "and LABEL_STUDIO_API_KEY (or connect the backend so that /setup sends them)"
            )
        return self._fetch_url(access.url.rstrip("/") + path, access, where)

    def _read_local_file(self, path: str, where: str) -> RawImage:
        """`/data/local-files/?d=dir/1.jpg` straight from disk, confined to DATAENGINE_LOCAL_FILES_ROOT."""
        values = parse_qs(urlparse(path).query, keep_blank_values=True).get("d") or [""]
        relative = values[-1].lstrip("/")
        root = Path(self.limits.local_files_root).resolve()
        target = (root / relative).resolve()
        if not relative or not target.is_relative_to(root):
            raise ForbiddenImageUrl(f"{where}: local file {_short(relative)!r} is outside DATAENGINE_LOCAL_FILES_ROOT")
        try:
            size = target.stat().st_size
            if size > self.limits.max_bytes:
                raise ImageTooLarge(f"{where}: {size} bytes; the limit is {self.limits.max_bytes} (DATAENGINE_IMAGE_MAX_BYTES)")
            return RawImage(target.read_bytes(), "")
        except OSError as exc:
            raise ImageError(f"{where}: cannot read local file {relative!r}: {exc.strerror or exc}") from exc

    def _fetch_url(self, url: str, access: LabelStudioAccess, where: str) -> RawImage:
        """DATAENGINE_IMAGE_FETCH_TIMEOUT bounds the whole download, redirects included (httpx's own timeouts are
        per connect/read: a server dripping a byte a second would never hit them)."""
        deadline = time.monotonic() + self.limits.timeout
        for _ in range(MAX_REDIRECTS + 1):
            netloc = parse_http_url(url, where).netloc.decode("ascii")
            to_label_studio = netloc == access.netloc
            headers = access.auth_header() if to_label_studio else {}
            trusted = self.limits.allow_private or (access.trusted and to_label_studio)
            try:
                remaining = self._remaining(deadline, url, where)
                extensions = {GuardedTransport.TRUSTED: trusted}
                with self._http.stream("GET", url, headers=headers, timeout=remaining, extensions=extensions) as response:
                    if response.is_redirect and response.headers.get("location"):
                        url = _redirect_target(url, response.headers["location"], where)
                        continue
                    if response.status_code >= 400:
                        raise ImageError(f"{where}: fetching {_short(url)} answered HTTP {response.status_code}")
                    return RawImage(self._read_capped(response, where, deadline), _mime(response.headers.get("content-type", "")))
            except BlockedDestination as exc:
                raise ForbiddenImageUrl(
                    f"{where}: {_short(url)} resolves to the non-public address {exc.address}; requests to private "
                    "networks are refused (set DATAENGINE_ALLOW_PRIVATE_URLS=true to allow them, or LABEL_STUDIO_URL "
                    "when the image is on Label Studio)"
                ) from exc
            except httpx.HTTPError as exc:
                raise ImageError(f"{where}: cannot fetch {_short(url)}: {exc.__class__.__name__}: {exc}") from exc
        raise ImageError(f"{where}: more than {MAX_REDIRECTS} redirects fetching {_short(url)}")

    def _remaining(self, deadline: float, url: str, where: str) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageError(
                f"{where}: fetching {_short(url)} took longer than {self.limits.timeout:g} s (DATAENGINE_IMAGE_FETCH_TIMEOUT)"
            )
        return remaining

    def _read_capped(self, response: httpx.Response, where: str, deadline: float) -> bytes:
        limit = self.limits.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ImageTooLarge(f"{where}: {declared} bytes; the limit is {limit} (DATAENGINE_IMAGE_MAX_BYTES)")
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > limit:
                raise ImageTooLarge(f"{where}: more than {limit} bytes (DATAENGINE_IMAGE_MAX_BYTES)")
            self._remaining(deadline, str(response.url), where)
        return bytes(body)

    def close(self) -> None:
        self._http.close()


def parse_http_url(url: str, where: str) -> httpx.URL:
    """`url` parsed the way httpx will send it; a 422 naming the problem when it cannot be fetched at all."""
    try:
        urlsplit(url).port  # the standard library's parser must accept it too: it rejects "[x" and bad ports
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ImageError(f"{where}: {_short(url)} is not a valid URL: {exc}") from exc
    if parsed.scheme not in ("http", "https"):
        raise ImageError(f"{where}: {_short(url)} is not an http(s) URL")
    if not parsed.host:
        raise ImageError(f"{where}: {_short(url)} is not a valid URL: it names no host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ImageError(f"{where}: {_short(url)} is not a valid URL: port {parsed.port} is out of range 1-65535")
    return parsed


def _redirect_target(url: str, location: str, where: str) -> str:
    try:
        return urljoin(url, location)
    except ValueError as exc:
        raise ImageError(f"{where}: fetching {_short(url)} redirected to an invalid URL: {exc}") from exc


# --- address checks --------------------------------------------------------------------------------


# --- decoding --------------------------------------------------------------------------------------


def read_data_uri(uri: str, max_bytes: int, where: str) -> RawImage:
    header, comma, payload = uri.partition(",")
    if not comma or ";base64" not in header:
        raise ImageError(f"{where}: data URI must be base64-encoded (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageTooLarge(f"{where}: data URI holds more than {max_bytes} bytes (DATAENGINE_IMAGE_MAX_BYTES)")
    try:
        data = base64.b64decode(unquote(payload), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{where}: data URI is not valid base64: {exc}") from exc
    return RawImage(data, _mime(header[len("data:"):].split(";", 1)[0]))


def decoded_bytes(width: int, height: int) -> int:
    """What decoding and re-encoding an image may hold at once: the decoded pixels and their RGB copy, at up to
    4 bytes a pixel each."""
    return width * height * 8


def decode_image(
    raw: RawImage, limits: ImageLimits, where: str, reference: str = "", budget: MemoryBudget | None = None
) -> PreparedImage:
    """Validate type, dimensions and integrity with Pillow; scale down and re-encode as PNG. The decode waits
    for room in `budget` (the header gives the size before any pixel is decoded)."""
    allowed = sorted(ALLOWED_FORMATS.values())
    if raw.mime not in NEUTRAL_MIME_TYPES and raw.mime not in allowed:
        raise UnsupportedImageType(f"{where}: type {raw.mime!r} is not supported; allowed: {', '.join(allowed)}")
    if not raw.data:
        raise ImageError(f"{where}: the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(raw.data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{where}: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{where}: the bytes are not a readable image (corrupt or not an image): {exc}") from exc
    with image:
        _check_format_and_size(image, limits, where)
        width, height = image.size
        with (budget or MemoryBudget(limits.memory_budget)).reserve(decoded_bytes(width, height), where):
            try:
                image.load()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise ImageError(f"{where}: the {image.format} image is corrupt: {exc}") from exc
            return PreparedImage(reference=reference, width=width, height=height, png=_engine_png(image, limits.max_side))


def _check_format_and_size(image: Image.Image, limits: ImageLimits, where: str) -> None:
    if image.format not in ALLOWED_FORMATS:
        raise UnsupportedImageType(
            f"{where}: {image.format or 'unknown'} images are not supported; allowed: {', '.join(ALLOWED_FORMATS)}"
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{where}: the image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"{where}: {width}x{height} pixels; the limit is {limits.max_pixels} pixels (DATAENGINE_IMAGE_MAX_PIXELS)"
        )


def _engine_png(image: Image.Image, max_side: int) -> bytes:
    rgb = image.convert("RGB")  # first frame of a GIF; alpha and palettes flattened
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side))
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()


# --- helpers ---------------------------------------------------------------------------------------


def _mime(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _short(reference: str, limit: int = 120) -> str:
    return reference if len(reference) <= limit else reference[: limit - 3] + "..."


def _is_jwt(token: str) -> bool:
    import jwt  # PyJWT, a dependency of label-studio-sdk

    try:
        jwt.get_unverified_header(token)
        return True
    except jwt.PyJWTError:
        return False
