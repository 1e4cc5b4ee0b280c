"""Fetching an image over http(s) without letting a client reach this machine's private networks.

Only ``http``/``https``; no proxies. The host name must be a valid DNS name or a canonical IP literal (checked
before any lookup: no percent-escapes, no ``127.1`` or ``2130706433`` forms). It is resolved once per hop and
every resolved address must be public: no loopback, private, link-local, site-local, multicast, reserved,
unspecified, shared or otherwise non-global address, IPv4 or IPv6, and no IPv6 address that embeds a
refused IPv4 address (IPv4-mapped and -compatible, 6to4, Teredo, NAT64), unless ``allow_private=True``. The
connection is made to the very address that was checked (the TCP socket is opened to that IP; the ``Host``
header and the TLS SNI / certificate check still use the host name), so a DNS answer that changes between
the check and the connect (DNS rebinding) cannot reach a private address. Redirects are not followed by
urllib: they are followed here, at most :data:`MAX_REDIRECTS`, and each hop is checked again. The response
must be ``200`` with a ``Content-Type`` of ``image/*``; at most ``max_bytes`` are read.

Known limits: name resolution uses the system resolver (``getaddrinfo``), which has no timeout of its own;
``timeout`` bounds the connect and every socket read, and the whole fetch (redirects included) is also
stopped after ``3 * timeout`` seconds, checked between reads of the body.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from visualglm.image.errors import ImageError

MAX_REDIRECTS = 5

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_TOTAL_TIMEOUT_FACTOR = 3
_USER_AGENT = "visualglm-image-loader"
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_NUMERIC_LABEL_RE = re.compile(r"^(0[xX][0-9A-Fa-f]*|[0-9]+)$")
# NAT64 prefixes whose last 32 bits are an IPv4 address (RFC 6052 well-known, RFC 8215 local use).
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 "IPv4-translated" ::ffff:0:a.b.c.d
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d


def host_of(url: str) -> str:
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
    """Why a URL may not reach ``address`` (None: a public address). An IPv6 address that carries an IPv4
    address (mapped, compatible, translated, 6to4, Teredo, NAT64) is refused when that IPv4 address is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    inner = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
    if not inner:
        return _own_reason(ip)
    # The IPv6 wrapper itself is often "reserved" or "private" (::ffff:0:0/96, Teredo's 2001::/32): what
    # decides is where it leads.
    return next((reason for reason in map(_own_reason, inner) if reason is not None), None)


def _own_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    for name in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:  # fec0::/10, deprecated, still routable
        return "site-local"
    if not ip.is_global:
        return "non-global"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to (empty for a plain IPv6 address)."""
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)  # (server, client)
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in net for net in _NAT64) or ip in _IPV4_TRANSLATED:
        found.append(low32)
    elif ip in _IPV4_COMPATIBLE and int(ip) > 1:  # not :: or ::1, which are checked as IPv6
        found.append(low32)
    return found


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
    """(scheme, host, port) of an acceptable http(s) URL; the host is checked before any name lookup."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ImageError(f"URL {host_of(url)}: malformed URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"URL {host_of(url)}: scheme {scheme!r} is not allowed (only http and https)")
    host = parts.hostname
    if not host:
        raise ImageError("URL <no host>: the URL has no host name")
    if parts.username is not None or parts.password is not None:
        raise ImageError(f"URL {host}: credentials in URLs are not supported")
    _check_host(host)
    return scheme, host, port or (443 if scheme == "https" else 80)


def _check_host(host: str) -> None:
    """Refuse a host that is neither a canonical IP literal nor a valid DNS name, before any lookup: the
    system resolver would accept ``127.1``, ``2130706433`` or ``0x7f.0.0.1`` (all 127.0.0.1), and some
    resolvers undo percent-escapes."""
    if _is_ip_literal(host):
        return
    shown = host if len(host) <= 80 else host[:80] + "..."
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ImageError(f"URL {shown!r}: not a valid host name") from None
    labels = ascii_host.rstrip(".").split(".")
    if len(ascii_host) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        raise ImageError(f"URL {shown!r}: not a valid host name")
    if _NUMERIC_LABEL_RE.match(labels[-1]):
        raise ImageError(f"URL {shown!r}: a numeric host must be a plain IP address (like 93.184.216.34)")


def fetch(url: str, *, allow_private: bool, max_bytes: int, timeout: float) -> bytes:
    """GET ``url`` with the checks described in the module docstring; returns the body. Raises
    :class:`ImageError`."""
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
    raise ImageError(f"URL {host_of(url)}: more than {MAX_REDIRECTS} redirects")


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
