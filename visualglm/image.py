"""Image loading (safely, from untrusted sources) and the reference CLIP-style preprocessing.

The only module of the package that imports PIL. It depends on nothing else in ``visualglm``.

``load_image(source)`` accepts a filesystem path, raw bytes, a base64 string (plain or a
``data:image/...;base64,`` URL), an ``http(s)://`` URL (only with ``allow_remote=True``) or a PIL image,
and always returns a fully decoded RGB ``PIL.Image.Image``. Every failure is an :class:`ImageError`
(a ``ValueError``) whose message names the problem and the source (a file path, ``URL <host>``, ...);
base64 payloads and full URLs (which may carry tokens in their query) are never echoed.

Protection, in order:

* **size in bytes**: at most ``max_bytes`` are ever read from a file, a stream or a socket (files are
  also checked with ``stat`` first; a ``Content-Length`` above the limit is refused before the body);
* **pixels**: ``Image.open`` parses only the header; ``width * height`` is checked against ``max_pixels``
  *before* any pixel is decoded, so a decompression bomb (a few hundred bytes claiming 30000x30000)
  fails at once. PIL's global ``Image.MAX_IMAGE_PIXELS`` is neither read nor changed by this module
  (PIL still applies its own global check inside ``Image.open``; that error is reported as ``ImageError`` too);
* **formats**: only the decoders in :data:`SUPPORTED_FORMATS` are tried;
* **URLs**: only ``http``/``https``; no proxies; the host is resolved once per request and every
  resolved address must be public (no loopback, private, link-local, multicast, reserved, unspecified,
  shared or otherwise non-global address, IPv4 or IPv6, IPv4-mapped included) unless
  ``allow_private=True``. The connection is made to the very address that was checked (the TCP socket
  is opened to that IP; the ``Host`` header and the TLS SNI / certificate check still use the host name),
  so a DNS answer that changes between the check and the connect (DNS rebinding) cannot reach a private
  address. Redirects are not followed by urllib: they are followed here, at most
  :data:`MAX_REDIRECTS`, and each hop is resolved and checked again. The response must be ``200`` with a
  ``Content-Type`` of ``image/*``.

Known limits of the URL fetcher: name resolution uses the system resolver (``getaddrinfo``), which has
no timeout of its own; ``timeout`` bounds the connect and every socket read, and the whole fetch
(redirects included) is also stopped after ``3 * timeout`` seconds, checked between reads of the body.

``preprocess(image, size)`` reproduces ``BlipImageEvalProcessor(224)`` (VisualGLM-6B, spec B6) and the
GLM-4V-9B tokenizer transform (spec C6): RGB -> ``Resize((size, size), BICUBIC)`` -> ``ToTensor`` ->
``Normalize(CLIP_MEAN, CLIP_STD)``, batch dimension added. torchvision's ``Resize`` on a PIL image calls
``PIL.Image.resize`` (its ``antialias`` flag only concerns tensors), so PIL's bicubic resize is the
reference itself; the golden ``pixel_values`` are matched bit for bit.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "GLM4V_IMAGE_SIZE",
    "ImageError",
    "MAX_REDIRECTS",
    "SUPPORTED_FORMATS",
    "VISUALGLM_IMAGE_SIZE",
    "load_image",
    "preprocess",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
VISUALGLM_IMAGE_SIZE = 224  # BlipImageEvalProcessor(224), every VisualGLM-6B caller (spec B6)
GLM4V_IMAGE_SIZE = 1120  # vision_config.image_size of the released GLM-4V-9B (spec C6); read it from config.json

DEFAULT_MAX_BYTES = 20 * 2**20
DEFAULT_MAX_PIXELS = 50_000_000
MAX_REDIRECTS = 5
# Decoders tried by Image.open (the JPEG decoder also opens multi-picture camera JPEGs, reported as MPO).
# A format this Pillow build lacks (WEBP without libwebp, say) is skipped.
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_TOTAL_TIMEOUT_FACTOR = 3
_USER_AGENT = "visualglm-image-loader"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")
_WHITESPACE_RE = re.compile(r"\s+")


class ImageError(ValueError):
    """An image that cannot be loaded: unreadable, too large, not an image, or a refused URL."""


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def load_image(
    source: Any,
    *,
    allow_remote: bool = False,
    allow_private: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float = 10.0,
    allow_files: bool = True,
) -> Image.Image:
    """Load ``source`` as a decoded RGB PIL image.

    ``source`` is one of: a ``str`` or ``os.PathLike`` file path; ``bytes``/``bytearray``/``memoryview``
    holding an encoded image; a binary file object (read up to ``max_bytes``); a base64 string, plain or
    as a ``data:image/<type>;base64,`` URL; an ``http://``/``https://`` URL (only with
    ``allow_remote=True``); or a ``PIL.Image.Image`` (returned converted to RGB).

    A ``str`` is read as: a data URL if it starts with ``data:``; a URL if it starts with
    ``<scheme>://``; a file path if such a file exists; otherwise base64 if it is valid base64.

    ``allow_private`` lets URLs reach loopback/private/link-local/... addresses (tests, intranets).
    ``allow_files=False`` refuses file paths (for servers that take the source from a client).
    ``timeout`` is in seconds, for the connect and each read; the whole fetch is capped at 3x that.
    Raises :class:`ImageError` on any failure.
    """
    if max_bytes <= 0 or max_pixels <= 0:
        raise ImageError(f"max_bytes and max_pixels must be positive (got {max_bytes}, {max_pixels})")
    if isinstance(source, Image.Image):
        return _finish(source, "PIL image", max_pixels, owned=False)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise ImageError(f"image bytes: {len(data)} bytes, more than max_bytes={max_bytes}")
        return _decode(data, "image bytes", max_pixels)
    if isinstance(source, os.PathLike):
        return _load_path(source, max_bytes, max_pixels, allow_files)
    if isinstance(source, str):
        return _load_str(source, allow_remote, allow_private, max_bytes, max_pixels, timeout, allow_files)
    if hasattr(source, "read"):
        try:
            data = source.read(max_bytes + 1)
        except Exception as exc:
            raise ImageError(f"file object: cannot read ({type(exc).__name__}: {exc})") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError("file object: not opened in binary mode")
        if len(data) > max_bytes:
            raise ImageError(f"file object: more than max_bytes={max_bytes} bytes")
        return _decode(bytes(data), "file object", max_pixels)
    raise ImageError(
        f"unsupported image source type {type(source).__name__}: expected a path, bytes, a base64 string, "
        "a data URL, an http(s) URL or a PIL image"
    )


def preprocess(
    image: Any,
    size: int | tuple[int, int],
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference preprocessing: RGB, bicubic resize to exactly ``size``, ``[0, 1]``, normalise.

    ``size`` is an int (square) or ``(height, width)`` as in torchvision's ``Resize``; the aspect ratio
    is not kept and nothing is cropped. Returns a contiguous ``[1, 3, H, W]`` tensor of ``dtype`` (the
    arithmetic is float32, as in the reference, and the cast comes last). ``image`` is a PIL image, or
    anything :func:`load_image` accepts (loaded with its defaults: no remote URLs).
    """
    if isinstance(size, int):
        height = width = size
    else:
        height, width = (int(s) for s in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"preprocess: size must be positive, got {size!r}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("preprocess: mean and std need one value per RGB channel")
    image = image if isinstance(image, Image.Image) else load_image(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = image.resize((width, height), Image.BICUBIC)  # PIL takes (width, height)
    # ToTensor: HWC uint8 -> CHW float32 / 255.
    pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    pixels = pixels.to(torch.float32).div(255)
    # Normalize: (x - mean) / std with float32 mean/std, per channel.
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = pixels.sub(mean_t).div(std_t)
    return pixels.unsqueeze(0).to(dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _decode(data: bytes, label: str, max_pixels: int) -> Image.Image:
    """Open ``data`` lazily, check the pixel count from the header, then decode."""
    if not data:
        raise ImageError(f"{label}: empty (0 bytes), not an image")
    try:
        image = Image.open(io.BytesIO(data), formats=_available_formats())
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label}: image has too many pixels ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: {_unsupported_reason(data)}") from None
    except Exception as exc:  # malformed headers surface as many exception types inside the plugins
        raise ImageError(f"{label}: not a valid image ({type(exc).__name__}: {exc})") from None
    return _finish(image, label, max_pixels)


@functools.cache
def _available_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin; idempotent
    return tuple(name for name in SUPPORTED_FORMATS if name in Image.OPEN)


def _unsupported_reason(data: bytes) -> str:
    """Name the format if PIL knows it but it is not in SUPPORTED_FORMATS (header parse only)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
    except Exception:
        fmt = None
    if fmt:
        return f"unsupported image format {fmt} (supported: {', '.join(SUPPORTED_FORMATS)})"
    return f"not an image, or an unrecognised format (supported: {', '.join(SUPPORTED_FORMATS)})"


def _finish(image: Image.Image, label: str, max_pixels: int, owned: bool = True) -> Image.Image:
    """Pixel-count check (header only), then decode and convert to a detached RGB image. An image we
    opened ourselves (``owned``) is closed once converted; a caller's image is left open."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{label}: image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            f"{label}: image is {width}x{height} = {width * height} pixels, more than max_pixels={max_pixels}"
        )
    try:
        image.load()
        rgb = image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label}: image has too many pixels ({exc})") from None
    except MemoryError:
        raise ImageError(f"{label}: out of memory while decoding a {width}x{height} image") from None
    except Exception as exc:
        kind = "truncated" if "truncated" in str(exc).lower() else "corrupt or truncated"
        raise ImageError(f"{label}: cannot decode the image, {kind} ({type(exc).__name__}: {exc})") from None
    if owned and rgb is not image:
        image.close()
    return rgb


# --------------------------------------------------------------------------------------------------
# Files, strings, base64
# --------------------------------------------------------------------------------------------------


def _show(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _load_path(path: str | os.PathLike, max_bytes: int, max_pixels: int, allow_files: bool) -> Image.Image:
    label = f"file {_show(os.fspath(path))}"
    if not allow_files:
        raise ImageError(f"{label}: file paths are not allowed here (allow_files=False)")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"{label}: cannot access ({exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{label}: is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{label}: not a regular file")
    if info.st_size > max_bytes:
        raise ImageError(f"{label}: {info.st_size} bytes, more than max_bytes={max_bytes}")
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"{label}: cannot read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:  # the file grew after stat
        raise ImageError(f"{label}: more than max_bytes={max_bytes} bytes")
    return _decode(data, label, max_pixels)


def _load_str(
    text: str,
    allow_remote: bool,
    allow_private: bool,
    max_bytes: int,
    max_pixels: int,
    timeout: float,
    allow_files: bool,
) -> Image.Image:
    head = text.lstrip()[:16].lower()
    if head.startswith("data:"):
        data = _decode_data_url(text.strip(), max_bytes)
        return _decode(data, "data URL", max_pixels)
    match = _SCHEME_RE.match(text.strip())
    if match:
        scheme = match.group(1).lower()
        if scheme not in ("http", "https"):
            raise ImageError(f"unsupported URL scheme {scheme!r}: only http and https URLs are accepted")
        url = text.strip()
        if not allow_remote:
            raise ImageError(f"URL {_host_of(url)}: remote images are disabled (pass allow_remote=True)")
        data = _fetch(url, allow_private=allow_private, max_bytes=max_bytes, timeout=timeout)
        return _decode(data, f"URL {_host_of(url)}", max_pixels)
    if not text:
        raise ImageError("empty string is not an image source")
    if len(text) <= 4096 and "\x00" not in text:
        try:
            exists = os.stat(text) is not None
        except (OSError, ValueError):
            exists = False
        if exists:
            return _load_path(text, max_bytes, max_pixels, allow_files)
    compact = _WHITESPACE_RE.sub("", text)
    if len(compact) >= 8 and _BASE64_RE.match(compact):
        data = _b64decode(compact, "base64 string", max_bytes)
        return _decode(data, "base64 string", max_pixels)
    if allow_files:
        raise ImageError(f"file {_show(text)}: no such file (and the string is not valid base64 either)")
    raise ImageError("string source: not a URL, a data URL or valid base64 (file paths are not allowed here)")


def _decode_data_url(text: str, max_bytes: int) -> bytes:
    header, sep, payload = text.partition(",")
    if not sep:
        raise ImageError("data URL: missing ',' between the header and the data")
    params = [p.strip().lower() for p in header[len("data:") :].split(";")]
    media = params[0] if params else ""
    if not media.startswith("image/"):
        raise ImageError(f"data URL: media type {media[:40]!r} is not image/*")
    if "base64" not in params[1:]:
        raise ImageError("data URL: only base64 data URLs (data:image/...;base64,...) are supported")
    return _b64decode(_WHITESPACE_RE.sub("", payload), f"data URL ({media[:40]})", max_bytes)


def _b64decode(compact: str, label: str, max_bytes: int) -> bytes:
    if len(compact) > (max_bytes + 2) // 3 * 4 + 4:
        raise ImageError(f"{label}: decodes to more than max_bytes={max_bytes} bytes")
    if not _BASE64_RE.match(compact):
        raise ImageError(f"{label}: invalid base64 (characters outside the base64 alphabet)")
    compact = compact.replace("-", "+").replace("_", "/")
    body = compact.rstrip("=")
    if len(body) % 4 == 1:
        raise ImageError(f"{label}: invalid base64 (bad length)")
    try:
        data = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{label}: invalid base64 ({exc})") from None
    if len(data) > max_bytes:
        raise ImageError(f"{label}: {len(data)} bytes, more than max_bytes={max_bytes}")
    return data


# --------------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------------


def _host_of(url: str) -> str:
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError:
        host = None
    return host or "<invalid host>"


def _resolve(host: str, port: int) -> list[str]:
    """All addresses of ``host`` (an IP literal resolves to itself). Tests monkeypatch this."""
    if _is_ip_literal(host):
        return [host]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ImageError(f"URL {host}: cannot resolve the host name ({reason})") from None
    return [str(info[4][0]) for info in infos]


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _blocked_reason(address: str) -> str | None:
    """Why a URL may not reach ``address`` (None: a public address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for name in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if not ip.is_global:
        return "non-global"
    return None


def _open_socket(address: str, port: int, timeout: float) -> socket.socket:
    """TCP connection to the checked address itself. Tests monkeypatch this."""
    return socket.create_connection((address, port), timeout)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to ``pinned_address``; the Host header still names the URL's host."""

    def __init__(self, host: str, *, pinned_address: str, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self._pinned_address = pinned_address

    def connect(self) -> None:
        self.sock = _open_socket(self._pinned_address, self.port, self.timeout)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to ``pinned_address``; SNI and the certificate check use the URL's host name."""

    def __init__(self, host: str, *, pinned_address: str, ssl_context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(host, context=ssl_context, **kwargs)
        self._pinned_address = pinned_address
        self._pinned_context = ssl_context

    def connect(self) -> None:
        raw = _open_socket(self._pinned_address, self.port, self.timeout)
        try:
            self.sock = self._pinned_context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class _PinnedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, pinned_address: str) -> None:
        super().__init__()
        self._pinned_address = pinned_address

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_PinnedHTTPConnection, pinned_address=self._pinned_address), req)


class _PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, pinned_address: str) -> None:
        super().__init__()
        self._pinned_address = pinned_address
        self._ssl_context = ssl.create_default_context()

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        factory = functools.partial(
            _PinnedHTTPSConnection, pinned_address=self._pinned_address, ssl_context=self._ssl_context
        )
        return self.do_open(factory, req)


def _opener(pinned_address: str) -> urllib.request.OpenerDirector:
    """A bare opener: no proxies, no redirect following, no HTTP error processing, no other schemes."""
    opener = urllib.request.OpenerDirector()
    opener.addheaders = [("User-Agent", _USER_AGENT), ("Accept", "image/*")]
    opener.add_handler(_PinnedHTTPHandler(pinned_address))
    opener.add_handler(_PinnedHTTPSHandler(pinned_address))
    return opener


def _check_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an acceptable http(s) URL."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ImageError(f"URL {_host_of(url)}: malformed URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"URL {_host_of(url)}: scheme {scheme!r} is not allowed (only http and https)")
    host = parts.hostname
    if not host:
        raise ImageError("URL <no host>: the URL has no host name")
    if parts.username is not None or parts.password is not None:
        raise ImageError(f"URL {host}: credentials in URLs are not supported")
    return scheme, host, port or (443 if scheme == "https" else 80)


def _fetch(url: str, *, allow_private: bool, max_bytes: int, timeout: float) -> bytes:
    """GET ``url`` with the checks described in the module docstring; returns the body."""
    deadline = time.monotonic() + _TOTAL_TIMEOUT_FACTOR * timeout
    for _hop in range(MAX_REDIRECTS + 1):
        _scheme, host, port = _check_url(url)
        label = f"URL {host}"
        addresses = _resolve(host, port)
        if not addresses:
            raise ImageError(f"{label}: the host name resolves to no address")
        if not allow_private:
            for address in addresses:
                reason = _blocked_reason(address)
                if reason is not None:
                    raise ImageError(
                        f"{label}: refused, it resolves to the {reason} address {address} "
                        "(pass allow_private=True to allow private networks)"
                    )
        request = urllib.request.Request(url, method="GET")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _overall_timeout(label, timeout)
        try:
            response = _opener(addresses[0]).open(request, timeout=min(timeout, remaining))
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise ImageError(f"{label}: timed out connecting") from None
            raise ImageError(f"{label}: cannot connect ({reason})") from None
        except TimeoutError:
            raise ImageError(f"{label}: timed out waiting for the response") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ImageError(f"{label}: request failed ({type(exc).__name__}: {exc})") from None
        with response:
            status = response.status
            if status in _REDIRECT_CODES:
                location = response.headers.get("Location")
                if not location:
                    raise ImageError(f"{label}: redirect ({status}) without a Location header")
                url = urllib.parse.urljoin(url, location.strip())
                continue
            if status != 200:
                raise ImageError(f"{label}: HTTP {status} {response.reason}")
            content_type = (response.headers.get("Content-Type") or "").strip()
            if not content_type.lower().startswith("image/"):
                raise ImageError(f"{label}: Content-Type {content_type[:60]!r} is not image/*")
            length = response.headers.get("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > max_bytes:
                raise ImageError(f"{label}: Content-Length {int(length)} is more than max_bytes={max_bytes}")
            return _read_body(response, label, max_bytes, deadline, timeout)
    raise ImageError(f"URL {_host_of(url)}: more than {MAX_REDIRECTS} redirects")


def _overall_timeout(label: str, timeout: float) -> ImageError:
    return ImageError(f"{label}: timed out (the whole fetch took more than {_TOTAL_TIMEOUT_FACTOR * timeout:g}s)")


def _read_body(
    response: http.client.HTTPResponse, label: str, max_bytes: int, deadline: float, timeout: float
) -> bytes:
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            if time.monotonic() > deadline:
                raise _overall_timeout(label, timeout)
            chunk = response.read(min(_CHUNK, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise ImageError(f"{label}: response body is more than max_bytes={max_bytes} bytes")
    except TimeoutError:
        raise ImageError(f"{label}: timed out reading the response") from None
    except (OSError, http.client.HTTPException) as exc:
        raise ImageError(f"{label}: reading the response failed ({type(exc).__name__}: {exc})") from None
    return b"".join(chunks)
