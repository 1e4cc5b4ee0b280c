"""Image loading, safely, from untrusted sources. The only part of the package that decodes images.

``load_image(source)`` accepts a filesystem path, raw bytes, a base64 string (plain or a
``data:image/...;base64,`` URL), an ``http(s)://`` URL (only with ``allow_remote=True``) or a PIL image,
and always returns a fully decoded RGB ``PIL.Image.Image``. ``image_bytes(source)`` returns the encoded
file bytes of a source instead (a server hashes them to recognise an image it has seen). Every failure
is an :class:`ImageError` (a ``ValueError``) whose message names the problem and the source (a file path,
``URL <host>``, ...); base64 payloads and full URLs (which may carry tokens in their query) are never echoed.

Protection, in order:

* **size in bytes**: at most ``max_bytes`` are ever read from a file, a stream or a socket (files are
  also checked with ``stat`` first; a ``Content-Length`` above the limit is refused before the body);
* **shape**: ``Image.open`` parses only the header; width and height are checked against ``max_side``,
  their ratio against ``max_aspect`` and ``width * height`` against ``max_pixels`` *before* any pixel is
  decoded, so a decompression bomb (a few hundred bytes claiming 30000x30000, or a 1 x 25,000,000 strip
  whose millions of rows cost far more memory and time than their pixel count suggests) fails at once.
  Decoding memory is therefore bounded by ``4 * max_pixels`` bytes (plus one RGB copy). PIL's global
  ``Image.MAX_IMAGE_PIXELS`` is neither read nor changed here (PIL still applies its own global check
  inside ``Image.open``; that error is reported as ``ImageError`` too);
* **formats**: only the decoders in :data:`SUPPORTED_FORMATS` are tried;
* **strings from clients**: with ``allow_files=False`` the filesystem is never touched for a string (not
  even ``stat``): anything that is not a data URL, base64 or an http(s) URL gets one and the same message,
  whatever exists on disk;
* **long payloads**: base64 is checked and decoded in slices of 1 MiB, so decoding a 27 MiB payload never
  holds the GIL for long (other threads, a server's event loop among them, keep running);
* **URLs**: see :mod:`visualglm.image.remote` (public addresses only, checked at every hop, pinned).
"""

from __future__ import annotations

import binascii
import functools
import io
import os
import re
import stat
from typing import Any

from PIL import Image, UnidentifiedImageError

from visualglm.image.errors import ImageError
from visualglm.image.remote import fetch, host_of

DEFAULT_MAX_BYTES = 20 * 2**20
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_SIDE = 20_000  # pixels, either side
DEFAULT_MAX_ASPECT = 50.0  # longer side / shorter side
# Decoders tried by Image.open (the JPEG decoder also opens multi-picture camera JPEGs, reported as MPO).
# A format this Pillow build lacks (WEBP without libwebp, say) is skipped.
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
NOT_A_SOURCE = "not a data URL, base64 or an http(s) URL"
"""What a client's string that is none of the accepted forms is told (``allow_files=False``)."""

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_SLICE = 1 << 20  # characters handled per C call (a multiple of 4)
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_WHITESPACE = b" \t\n\r\f\v"


class _Shape:
    """The decoded-size limits of one call."""

    def __init__(self, max_pixels: int, max_side: int, max_aspect: float) -> None:
        if max_pixels <= 0 or max_side <= 0 or not max_aspect >= 1:
            raise ImageError(f"max_pixels and max_side must be positive and max_aspect at least 1 (got "
                             f"{max_pixels}, {max_side}, {max_aspect})")
        self.max_pixels, self.max_side, self.max_aspect = max_pixels, max_side, max_aspect

    def check(self, width: int, height: int, label: str) -> None:
        if width <= 0 or height <= 0:
            raise ImageError(f"{label}: image has an empty size {width}x{height}")
        if max(width, height) > self.max_side:
            raise ImageError(f"{label}: image is {width}x{height}, a side longer than max_side={self.max_side}")
        if max(width, height) / min(width, height) > self.max_aspect:
            raise ImageError(f"{label}: image is {width}x{height}, longer side / shorter side more than "
                             f"max_aspect={self.max_aspect:g}")
        if width * height > self.max_pixels:
            raise ImageError(f"{label}: image is {width}x{height} = {width * height} pixels, more than "
                             f"max_pixels={self.max_pixels}")


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
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    timeout: float = 10.0,
    allow_files: bool = True,
) -> Image.Image:
    """Load ``source`` as a decoded RGB PIL image.

    ``source`` is one of: a ``str`` or ``os.PathLike`` file path; ``bytes``/``bytearray``/``memoryview``
    holding an encoded image; a binary file object (read up to ``max_bytes``); a base64 string, plain or
    as a ``data:image/<type>;base64,`` URL; an ``http://``/``https://`` URL (only with
    ``allow_remote=True``); or a ``PIL.Image.Image`` (returned converted to RGB).

    A ``str`` is read as: a data URL if it starts with ``data:``; a URL if it starts with
    ``<scheme>://``; a file path if such a file exists (only with ``allow_files``); otherwise base64 if it
    is valid base64.

    ``allow_private`` lets URLs reach loopback/private/link-local/... addresses (tests, intranets).
    ``allow_files=False`` refuses file paths without looking at the filesystem (for servers that take the
    source from a client). ``max_side`` bounds each side in pixels, ``max_aspect`` the ratio of the longer
    side to the shorter, ``max_pixels`` their product. ``timeout`` is in seconds, for the connect and each
    read; the whole fetch is capped at 3x that. Raises :class:`ImageError` on any failure.
    """
    shape = _Shape(max_pixels, max_side, max_aspect)
    if isinstance(source, Image.Image):
        return _finish(source, "PIL image", shape, owned=False)
    data, label = _read(source, allow_remote=allow_remote, allow_private=allow_private, max_bytes=max_bytes,
                        timeout=timeout, allow_files=allow_files)
    return _decode(data, label, shape)


def image_bytes(
    source: Any,
    *,
    allow_remote: bool = False,
    allow_private: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 10.0,
    allow_files: bool = True,
) -> bytes:
    """The encoded image file bytes of ``source`` (any source :func:`load_image` takes but a PIL image),
    read under the same rules; not decoded, not checked to be an image."""
    return _read(source, allow_remote=allow_remote, allow_private=allow_private, max_bytes=max_bytes,
                 timeout=timeout, allow_files=allow_files)[0]


def _read(source: Any, *, allow_remote: bool, allow_private: bool, max_bytes: int, timeout: float,
          allow_files: bool) -> tuple[bytes, str]:
    """(encoded bytes, label naming the source for messages)."""
    if max_bytes <= 0:
        raise ImageError(f"max_bytes must be positive (got {max_bytes})")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise ImageError(f"image bytes: {len(data)} bytes, more than max_bytes={max_bytes}")
        return data, "image bytes"
    if isinstance(source, os.PathLike):
        return _read_path(source, max_bytes, allow_files)
    if isinstance(source, str):
        return _read_str(source, allow_remote, allow_private, max_bytes, timeout, allow_files)
    if hasattr(source, "read"):
        try:
            data = source.read(max_bytes + 1)
        except Exception as exc:
            raise ImageError(f"file object: cannot read ({type(exc).__name__}: {exc})") from None
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError("file object: not opened in binary mode")
        if len(data) > max_bytes:
            raise ImageError(f"file object: more than max_bytes={max_bytes} bytes")
        return bytes(data), "file object"
    raise ImageError(
        f"unsupported image source type {type(source).__name__}: expected a path, bytes, a base64 string, "
        "a data URL, an http(s) URL or a PIL image"
    )


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _decode(data: bytes, label: str, shape: _Shape) -> Image.Image:
    """Open ``data`` lazily, check the size from the header, then decode."""
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
    return _finish(image, label, shape)


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


def _finish(image: Image.Image, label: str, shape: _Shape, owned: bool = True) -> Image.Image:
    """Size checks (header only), then decode and convert to a detached RGB image. An image we opened
    ourselves (``owned``) is closed once converted; a caller's image is left open."""
    width, height = image.size
    shape.check(width, height, label)
    try:
        image.load()
        # An RGB image we opened is used as it is: convert() would copy all of its pixels once more.
        single = getattr(image, "n_frames", 1) == 1
        rgb = image if owned and single and image.mode == "RGB" else image.convert("RGB")
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


def _read_path(path: str | os.PathLike, max_bytes: int, allow_files: bool) -> tuple[bytes, str]:
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
    return data, label


def _read_str(text: str, allow_remote: bool, allow_private: bool, max_bytes: int, timeout: float,
              allow_files: bool) -> tuple[bytes, str]:
    head = text[:64].lstrip()[:16].lower()
    if head.startswith("data:"):
        return _decode_data_url(text.strip(), max_bytes), "data URL"
    match = _SCHEME_RE.match(text[:64].strip())
    if match:
        scheme = match.group(1).lower()
        if scheme not in ("http", "https"):
            if not allow_files:
                raise ImageError(f"string source: {NOT_A_SOURCE}")
            raise ImageError(f"unsupported URL scheme {scheme!r}: only http and https URLs are accepted")
        url = text.strip()
        if not allow_remote:
            raise ImageError(f"URL {host_of(url)}: remote images are disabled (pass allow_remote=True)")
        return fetch(url, allow_private=allow_private, max_bytes=max_bytes, timeout=timeout), f"URL {host_of(url)}"
    if not text:
        raise ImageError("empty string is not an image source")
    if allow_files and len(text) <= 4096 and "\x00" not in text:
        try:
            exists = os.stat(text) is not None
        except (OSError, ValueError):
            exists = False
        if exists:
            return _read_path(text, max_bytes, allow_files)
    if _looks_like_base64(text):
        return _b64decode(text, "base64 string", max_bytes), "base64 string"
    if allow_files:
        raise ImageError(f"file {_show(text)}: no such file (and the string is not valid base64 either)")
    raise ImageError(f"string source: {NOT_A_SOURCE}")


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
    return _b64decode(payload, f"data URL ({media[:40]})", max_bytes)


def _ascii_slices(text: str) -> list[bytes] | None:
    """``text`` without whitespace, URL-safe letters mapped to the standard ones, as ASCII slices of about
    1 MiB (None: it has non-ASCII characters)."""
    try:
        return [text[i:i + _SLICE].encode("ascii").translate(_URLSAFE_TO_STANDARD, _WHITESPACE)
                for i in range(0, len(text), _SLICE)]
    except UnicodeEncodeError:
        return None


def _looks_like_base64(text: str) -> bool:
    """At least 8 characters of the (standard or URL-safe) base64 alphabet, whitespace and end padding."""
    slices = _ascii_slices(text)
    if slices is None:
        return False
    compact = b"".join(slices)
    body = compact.rstrip(b"=")
    return len(compact) >= 8 and len(compact) - len(body) <= 2 and all(
        not body[i:i + _SLICE].translate(None, _B64_ALPHABET) for i in range(0, len(body), _SLICE))


def _b64decode(text: str, label: str, max_bytes: int) -> bytes:
    """Decode base64 (standard or URL-safe, whitespace ignored, padding optional), slice by slice."""
    slices = _ascii_slices(text)
    if slices is None:
        raise ImageError(f"{label}: invalid base64 (characters outside the base64 alphabet)")
    compact = b"".join(slices)
    if len(compact) > (max_bytes + 2) // 3 * 4 + 4:
        raise ImageError(f"{label}: decodes to more than max_bytes={max_bytes} bytes")
    body = compact.rstrip(b"=")
    if len(compact) - len(body) > 2 or any(body[i:i + _SLICE].translate(None, _B64_ALPHABET)
                                           for i in range(0, len(body), _SLICE)):
        raise ImageError(f"{label}: invalid base64 (characters outside the base64 alphabet)")
    if len(body) % 4 == 1:
        raise ImageError(f"{label}: invalid base64 (bad length)")
    body += b"=" * (-len(body) % 4)
    try:
        data = b"".join(binascii.a2b_base64(body[i:i + _SLICE]) for i in range(0, len(body), _SLICE))
    except binascii.Error as exc:
        raise ImageError(f"{label}: invalid base64 ({exc})") from None
    if len(data) > max_bytes:
        raise ImageError(f"{label}: {len(data)} bytes, more than max_bytes={max_bytes}")
    return data
