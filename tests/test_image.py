"""visualglm.image: safe loading from every kind of source, and parity of the preprocessing with the goldens.

No test reaches the network: URL tests use an ``http.server`` on 127.0.0.1 (in a thread), and the tests
that need a "public" host monkeypatch the module's resolver and socket opener.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import socket
import struct
import threading
import time
import tracemalloc
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from visualglm.image import CLIP_MEAN, CLIP_STD, ImageError, load_image, preprocess
from visualglm.image import remote as vimage
from visualglm.image import sources as vimage_sources

from .conftest import GOLDEN_DIR

PUBLIC_IP = "93.184.216.34"  # a global address; never contacted (the socket opener is patched)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _png_bytes(size: tuple[int, int] = (12, 9), mode: str = "RGB", noise: bool = False, fmt: str = "PNG") -> bytes:
    if noise:
        rng = random.Random(0)
        image = Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * len(mode)))
    else:
        image = Image.new(mode, size, (10, 200, 30) if mode == "RGB" else None)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose IHDR claims ``width x height`` RGB pixels (the IDAT holds only 2 rows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


PNG = _png_bytes()


# --------------------------------------------------------------------------------------------------
# Local HTTP server
# --------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    hosts_seen: list[str] = []

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str | None = "image/png", length: int | None = None,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).hosts_seen.append(self.headers.get("Host", ""))
        port = self.server.server_address[1]
        path = self.path
        if path == "/img.png":
            self._send(200, PNG, length=len(PNG))
        elif path == "/img-no-length":
            self._send(200, PNG)  # HTTP/1.0: the body ends when the connection closes
        elif path == "/text":
            self._send(200, b"<html></html>", content_type="text/html", length=13)
        elif path == "/no-type":
            self._send(200, PNG, content_type=None, length=len(PNG))
        elif path == "/big-length":
            self._send(200, PNG, length=10_000_000)
        elif path == "/endless":
            self._send(200, b"", content_type="image/png")
            block = b"\x00" * 65536
            try:
                for _ in range(320):  # 20 MiB at most, should the client fail to stop reading
                    self.wfile.write(block)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif path == "/redirect-loopback":
            self._send(302, headers={"Location": f"http://127.0.0.1:{port}/img.png"}, content_type=None, length=0)
        elif path == "/redirect-relative":
            self._send(301, headers={"Location": "/img.png"}, content_type=None, length=0)
        elif path == "/redirect-ftp":
            self._send(302, headers={"Location": "ftp://example.org/x.png"}, content_type=None, length=0)
        elif path == "/loop":
            self._send(307, headers={"Location": "/loop"}, content_type=None, length=0)
        elif path == "/slow":
            time.sleep(1.0)
            self._send(200, PNG, length=len(PNG))
        else:
            self._send(404, b"missing", content_type="text/plain", length=7)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


@pytest.fixture(scope="module")
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture()
def public_host(monkeypatch):
    """``images.example`` resolves to a public address, and connections to it reach the local server.

    Returns (resolver calls, connected addresses) for the test to inspect.
    """
    real_resolve = vimage._resolve
    calls: list[str] = []
    connected: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host == "images.example":
            # DNS rebinding: the first answer is public, every later one would be loopback.
            return [PUBLIC_IP] if calls.count(host) == 1 else ["127.0.0.1"]
        return real_resolve(host, port)

    def open_socket(address: str, port: int, timeout: float) -> socket.socket:
        connected.append(address)
        return socket.create_connection(("127.0.0.1", port), timeout)

    monkeypatch.setattr(vimage, "_resolve", resolve)
    monkeypatch.setattr(vimage, "_open_socket", open_socket)
    return calls, connected


def _url(port: int, path: str, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}{path}"


# --------------------------------------------------------------------------------------------------
# URL tests
# --------------------------------------------------------------------------------------------------


def test_url_needs_allow_remote(server) -> None:
    with pytest.raises(ImageError, match="allow_remote"):
        load_image(_url(server, "/img.png"))


def test_loopback_refused_by_default_and_allowed_with_allow_private(server) -> None:
    with pytest.raises(ImageError, match=r"URL 127\.0\.0\.1: refused.*loopback"):
        load_image(_url(server, "/img.png"), allow_remote=True)
    image = load_image(_url(server, "/img.png"), allow_remote=True, allow_private=True)
    assert image.mode == "RGB" and image.size == (12, 9)
    assert image.getpixel((0, 0)) == (10, 200, 30)


def test_url_without_content_length_and_relative_redirect(server) -> None:
    assert load_image(_url(server, "/img-no-length"), allow_remote=True, allow_private=True).size == (12, 9)
    assert load_image(_url(server, "/redirect-relative"), allow_remote=True, allow_private=True).size == (12, 9)


def test_public_host_is_fetched_from_the_checked_address(server, public_host) -> None:
    calls, connected = public_host
    _Handler.hosts_seen.clear()
    image = load_image(_url(server, "/img.png", host="images.example"), allow_remote=True)
    assert image.size == (12, 9)
    assert calls == ["images.example"]  # resolved once ...
    assert connected == [PUBLIC_IP]  # ... and the connection went to that very address
    assert _Handler.hosts_seen == [f"images.example:{server}"]  # the Host header keeps the name


def test_redirect_to_loopback_is_refused(server, public_host) -> None:
    calls, connected = public_host
    with pytest.raises(ImageError, match=r"URL 127\.0\.0\.1: refused.*loopback address 127\.0\.0\.1"):
        load_image(_url(server, "/redirect-loopback", host="images.example"), allow_remote=True)
    assert connected == [PUBLIC_IP]  # the redirect target was never contacted
    assert calls == ["images.example", "127.0.0.1"]


def test_redirect_to_other_scheme_and_redirect_loop(server, public_host) -> None:
    with pytest.raises(ImageError, match="scheme 'ftp' is not allowed"):
        load_image(_url(server, "/redirect-ftp", host="images.example"), allow_remote=True)
    with pytest.raises(ImageError, match="more than 5 redirects"):
        load_image(_url(server, "/loop"), allow_remote=True, allow_private=True)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/text", r"Content-Type 'text/html' is not image/\*"),
        ("/no-type", r"Content-Type '' is not image/\*"),
        ("/missing", "HTTP 404"),
        ("/big-length", "Content-Length 10000000 is more than max_bytes=5000"),
        ("/endless", "response body is more than max_bytes=5000"),
    ],
)
def test_bad_responses(server, path: str, message: str) -> None:
    start = time.monotonic()
    with pytest.raises(ImageError, match=message) as info:
        load_image(_url(server, path), allow_remote=True, allow_private=True, max_bytes=5000)
    assert str(info.value).startswith("URL 127.0.0.1:")
    assert time.monotonic() - start < 2.0  # the endless body is not read to its end


def test_timeout(server) -> None:
    start = time.monotonic()
    with pytest.raises(ImageError, match="timed out"):
        load_image(_url(server, "/slow"), allow_remote=True, allow_private=True, timeout=0.2)
    assert time.monotonic() - start < 0.9


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.org/a.png", "unsupported URL scheme 'ftp'"),
        ("file:///etc/passwd", "unsupported URL scheme 'file'"),
        ("http://user:secret@images.example/a.png", "credentials in URLs"),
        ("http:///nohost.png", "no host"),
        ("http://[::1]:8080/a.png", r"refused.*loopback address ::1"),
        ("http://[::ffff:127.0.0.1]/a.png", "refused.*loopback"),
        ("http://169.254.169.254/latest/meta-data", "refused.*link-local"),
        ("http://10.1.2.3/a.png", "refused.*private"),
        ("http://0.0.0.0/a.png", "refused.*unspecified"),
    ],
)
def test_refused_urls_never_connect(monkeypatch, url: str, message: str) -> None:
    def no_socket(*args):
        raise AssertionError("no connection may be attempted")

    monkeypatch.setattr(vimage, "_open_socket", no_socket)
    with pytest.raises(ImageError, match=message) as info:
        load_image(url, allow_remote=True)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
        ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"),
        ("169.254.169.254", "link-local"), ("fe80::1%eth0", "link-local"),
        ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"), ("::", "unspecified"),
        ("240.0.0.1", "reserved"), ("100.64.0.1", "non-global"),
        ("::ffff:10.0.0.1", "private"), ("::ffff:127.0.0.1", "loopback"),
        ("8.8.8.8", None), ("2001:4860:4860::8888", None), ("::ffff:8.8.8.8", None),
    ],
)
def test_blocked_reason(address: str, reason: str | None) -> None:
    assert vimage._blocked_reason(address) == reason


# --------------------------------------------------------------------------------------------------
# Other sources
# --------------------------------------------------------------------------------------------------


def test_sources_give_the_same_image(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    b64 = base64.b64encode(PNG).decode()
    wrapped = "\n".join(b64[i : i + 20] for i in range(0, len(b64), 20))
    sources = [path, str(path), PNG, bytearray(PNG), io.BytesIO(PNG), b64, wrapped,
               "data:image/png;base64," + b64, base64.urlsafe_b64encode(PNG).decode().rstrip("=")]
    expected = Image.open(io.BytesIO(PNG)).convert("RGB").tobytes()
    for source in sources:
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (12, 9)
        assert image.tobytes() == expected


def test_pil_image_is_converted_to_rgb() -> None:
    rgba = Image.new("RGBA", (5, 4), (1, 2, 3, 0))
    out = load_image(rgba)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (1, 2, 3)
    assert load_image(Image.new("L", (3, 3), 77)).getpixel((1, 1)) == (77, 77, 77)
    with pytest.raises(ImageError, match="more than max_pixels=10"):
        load_image(rgba, max_pixels=10)


def test_decompression_bomb_fails_fast_without_decoding(monkeypatch) -> None:
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    bomb = _png_header_claiming(30000, 30000)
    assert len(bomb) < 200
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(ImageError, match="30000x30000|too many pixels"):
            load_image(bomb)
        # Below PIL's own global limit, so only our max_pixels check stands in the way.
        with pytest.raises(ImageError, match=r"8000x8000 = 64000000 pixels, more than max_pixels=50000000"):
            load_image(_png_header_claiming(8000, 8000))
        with pytest.raises(ImageError, match=r"100x100 = 10000 pixels, more than max_pixels=9999"):
            load_image(_png_header_claiming(100, 100), max_pixels=9999)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 1.0
    assert peak < 4 * 2**20  # (PIL's pixel buffers are C allocations; the load() spy above is the real proof)


def test_global_pil_limit_untouched() -> None:
    before = Image.MAX_IMAGE_PIXELS
    load_image(PNG, max_pixels=10**12)
    with pytest.raises(ImageError):
        load_image(_png_header_claiming(8000, 8000), max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == before


def test_truncated_png() -> None:
    data = _png_bytes((64, 64), noise=True)
    with pytest.raises(ImageError, match="image bytes: cannot decode the image, truncated"):
        load_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"", r"image bytes: empty \(0 bytes\)"),
        (random.Random(1).randbytes(1000), "image bytes: not an image, or an unrecognised format"),
        (b"GIF89a", "image bytes: "),
        ("", "empty string"),
        ("data:image/png;base64,!!!!not*base64", r"data URL \(image/png\): invalid base64"),
        ("data:image/png;base64,QUJD=Q", "data URL.*invalid base64"),
        ("data:text/plain;base64,QUJD", "media type 'text/plain' is not image/"),
        ("data:image/png,%89PNG", "only base64 data URLs"),
        ("data:image/png;base64", "missing ','"),
        ("/no/such/dir/img.png", r"file '/no/such/dir/img.png': no such file"),
        ("QUJDREVGR0g=", "base64 string: not an image"),
        (12345, "unsupported image source type int"),
    ],
)
def test_bad_sources(source, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(source)


def test_error_messages_do_not_dump_base64() -> None:
    blob = base64.b64encode(random.Random(2).randbytes(3000)).decode()
    for source in (blob, "data:image/png;base64," + blob, "data:image/png;base64," + blob + "*"):
        with pytest.raises(ImageError) as info:
            load_image(source)
        assert blob[:40] not in str(info.value) and len(str(info.value)) < 300


def test_unsupported_format_is_named() -> None:
    with pytest.raises(ImageError, match="unsupported image format PCX"):
        load_image(_png_bytes(fmt="PCX"))
    # A supported non-PNG format for comparison.
    assert load_image(_png_bytes(fmt="BMP")).getpixel((0, 0)) == (10, 200, 30)


def test_files(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    big = tmp_path / "big.png"
    big.write_bytes(_png_bytes((64, 64), noise=True))
    with pytest.raises(ImageError, match=r"big\.png'.*bytes, more than max_bytes=100"):
        load_image(big, max_bytes=100)
    with pytest.raises(ImageError, match="more than max_bytes=100"):
        load_image(big.read_bytes(), max_bytes=100)
    with pytest.raises(ImageError, match="more than max_bytes=100"):
        load_image("data:image/png;base64," + base64.b64encode(big.read_bytes()).decode(), max_bytes=100)
    with pytest.raises(ImageError, match="file paths are not allowed"):
        load_image(big, allow_files=False)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ImageError, match="notes.txt'.*not an image"):
        load_image(str(text))


def test_side_and_aspect_limits_are_checked_from_the_header(monkeypatch) -> None:
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    # 25 million pixels in one row: within max_pixels, but millions of rows cost far more than their pixels.
    strip = _png_header_claiming(1, 25_000_000)
    with pytest.raises(ImageError, match=r"1x25000000, a side longer than max_side=20000"):
        load_image(strip, max_pixels=25_000_000)
    with pytest.raises(ImageError, match=r"300x100, a side longer than max_side=200"):
        load_image(_png_header_claiming(300, 100), max_side=200)
    with pytest.raises(ImageError, match=r"1000x10, longer side / shorter side more than max_aspect=20"):
        load_image(_png_header_claiming(1000, 10), max_aspect=20)
    with pytest.raises(ImageError, match="max_aspect"):
        load_image(_png_header_claiming(10, 1000), max_aspect=20)


def test_side_and_aspect_limits_let_ordinary_images_through() -> None:
    assert load_image(_png_bytes((200, 10)), max_side=200, max_aspect=20).size == (200, 10)


def test_without_allow_files_a_string_never_touches_the_filesystem(tmp_path: Path, monkeypatch) -> None:
    existing = tmp_path / "real.png"
    existing.write_bytes(PNG)
    looked_at: list[str] = []
    real_stat = os.stat

    def spy(path, *args, **kwargs):
        looked_at.append(os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", spy)

    def message(source: str) -> str:
        with pytest.raises(ImageError) as info:
            load_image(source, allow_files=False)
        return str(info.value)

    # What exists on disk changes nothing: each existing path gets the message of a missing one of its shape.
    assert message(str(existing)) == message(str(tmp_path / "gone.png"))
    assert message("/etc/hosts") == message("/etc/hostz")  # (these two even read as base64)
    for source in (str(existing), "file:///etc/hosts", "ftp://example.com/a.png", "relative/path.png"):
        assert message(source) == f"string source: {vimage_sources.NOT_A_SOURCE}"
    assert looked_at == []
    # With files allowed, the same path is read.
    assert load_image(str(existing)).size == (12, 9)


def test_long_base64_is_decoded_in_slices_to_the_same_bytes() -> None:
    payload = random.Random(3).randbytes(3 * 2**20 + 7)  # several 1 MiB slices and an odd tail
    encoded = base64.b64encode(payload).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    urlsafe = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    for text in (encoded, wrapped, urlsafe):
        assert vimage_sources._b64decode(text, "x", 2**23) == payload
    for bad in (encoded[:2**20] + "*" + encoded[2**20:], encoded[:-4] + "=" + encoded[-3:], encoded + "===",
                encoded[:2**20] + "\u00e9" + encoded[2**20:]):
        with pytest.raises(ImageError, match="invalid base64"):
            vimage_sources._b64decode(bad, "x", 2**23)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("2002:7f00:1::", "loopback"), ("2002:a9fe:a9fe::", "link-local"), ("2002:0a00:0001::", "private"),
        ("fec0::1", "site-local"), ("64:ff9b::7f00:1", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local"),
        ("64:ff9b:1::a00:1", "private"), ("::127.0.0.1", "loopback"), ("::ffff:0:7f00:1", "loopback"),
        # Teredo 2001::/32: the client address is stored inverted (here 192.168.1.1).
        ("2001:0:808:808:0:0:3f57:fefe", "private"),
        ("2002:0808:0808::", None), ("64:ff9b::808:808", None), ("2001:0:808:808:0:0:f7f7:f7f7", None),
    ],
)
def test_embedded_ipv4_addresses_are_checked(address: str, reason: str | None) -> None:
    assert vimage._blocked_reason(address) == reason


@pytest.mark.parametrize("host", ["%31%32%37.0.0.1", "127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1",
                                  "a..b", "-bad-.example", "under_score.example", "x" * 64 + ".example"])
def test_bad_host_names_are_refused_before_any_lookup(monkeypatch, host: str) -> None:
    def no_lookup(*args):
        raise AssertionError("the name was looked up")

    monkeypatch.setattr(vimage, "_resolve", no_lookup)
    with pytest.raises(ImageError, match="not a valid host name|numeric host must be a plain IP"):
        load_image(f"http://{host}/a.png", allow_remote=True)


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


def test_preprocess_shapes_dtype_and_values() -> None:
    image = Image.new("RGB", (30, 20), (255, 0, 128))
    out = preprocess(image, 16)
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.float32 and out.is_contiguous()
    expected = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.equal(out[0, :, 3, 5], expected.float())
    assert preprocess(image, (8, 12)).shape == (1, 3, 8, 12)  # (height, width)
    assert preprocess(image, 16, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(preprocess(image.convert("RGBA"), 16), out)
    assert torch.equal(preprocess(_png_bytes((30, 20)), 4), preprocess(Image.new("RGB", (30, 20), (10, 200, 30)), 4))


def _golden_dirs() -> list:
    dirs = []
    if GOLDEN_DIR.is_dir():
        dirs = [p for p in sorted(GOLDEN_DIR.iterdir())
                if (p / "image.png").is_file() and (p / "pixel_values.safetensors").is_file()]
    if not dirs:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no image.png + pixel_values under {GOLDEN_DIR}"))]
    return [pytest.param(p, id=p.name) for p in dirs]


def _configured_size(directory: Path) -> int | None:
    """The image size the folder's config.json asks for (VisualGLM eva_config, GLM-4V vision_config)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("vision_config", "eva_config"):
        size = (config.get(key) or {}).get("image_size")
        if size is not None:
            return int(size[0] if isinstance(size, list) else size)
    return None


@pytest.mark.parametrize("directory", _golden_dirs())
def test_golden_pixel_values(directory: Path) -> None:
    from safetensors.torch import load_file

    golden = load_file(directory / "pixel_values.safetensors")["pixel_values"]
    size = _configured_size(directory) or golden.shape[-1]
    assert tuple(golden.shape) == (1, 3, size, size)
    ours = preprocess(load_image(directory / "image.png"), size)
    assert ours.dtype == golden.dtype
    diff = (ours - golden).abs().max().item()
    assert diff <= 1e-5, f"{directory.name}: max |diff| {diff}"


def test_a_callers_pil_image_stays_usable() -> None:
    from PIL import Image as PILImage

    from visualglm.image import load_image

    image = PILImage.new("RGBA", (4, 3), (1, 2, 3, 4))
    load_image(image)
    assert load_image(image).size == (4, 3)  # not closed by the first call
