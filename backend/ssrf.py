"""SSRF guard for outgoing requests to hosts a caller chose (task image URLs, a `/setup` hostname).

The guard runs as an httpx transport, so it judges the host httpx really connects to: `request.url.raw_host`,
the IDNA 2008 form httpx sends (`straße.example` is `xn--strae-oqa.example` there, while `socket.getaddrinfo`
would look up the IDNA 2003 form `strasse.example`). It resolves that host once, refuses it when any of its
addresses is not public, and connects to the address it checked (the URL's host is replaced by that address;
the Host header and TLS SNI/certificate check keep the name), so a DNS answer that changes between the check
and the connection (rebinding) cannot reach a private address.
"""
from __future__ import annotations

import ipaddress
import socket

import httpx

NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215


class BlockedDestination(Exception):
    """The host resolves to a non-public address."""

    def __init__(self, host: str, address: str):
        super().__init__(f"{host} resolves to the non-public address {address}")
        self.host = host
        self.address = address


def is_public_address(address: str) -> bool:
    """A globally routable unicast address. IPv6 forms that carry an IPv4 address (IPv4-mapped, NAT64,
    6to4, Teredo) are judged by that IPv4 address too."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if not ip.is_global or ip.is_multicast:
        return False
    return all(is_public_address(str(embedded)) for embedded in embedded_ipv4(ip))


def embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    if isinstance(ip, ipaddress.IPv4Address):
        return []
    found = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in NAT64_WELL_KNOWN or ip in NAT64_LOCAL_USE:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [address for address in found if address is not None]


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` (already in the ASCII form httpx sends) resolves to; raises socket.gaierror."""
    try:
        return [str(ipaddress.ip_address(host))]  # a literal address: no lookup
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def pinned_address(url: httpx.URL) -> str:
    """The public address to connect to for `url`; BlockedDestination when any address of its host is not
    public, httpx.ConnectError when it does not resolve."""
    host = url.raw_host.decode("ascii")
    try:
        addresses = resolve(host, url.port or (443 if url.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError) as exc:
        raise httpx.ConnectError(f"cannot resolve host {host!r}: {exc}") from exc
    for address in addresses:
        if not is_public_address(address):
            raise BlockedDestination(host, address)
    return addresses[0]


class GuardedTransport(httpx.BaseTransport):
    """Wraps a transport: each request goes to a checked, public address of its host. A request whose
    extensions carry TRUSTED (the operator's LABEL_STUDIO_URL) passes unchecked."""

    TRUSTED = "dataengine_trusted_host"

    def __init__(self, inner: httpx.BaseTransport):
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not request.extensions.get(self.TRUSTED):
            address = pinned_address(request.url)
            if request.url.scheme == "https":  # TLS: SNI and the certificate check use the name, not the address
                request.extensions = {**request.extensions, "sni_hostname": request.url.raw_host.decode("ascii")}
            request.url = request.url.copy_with(host=address)  # the Host header was set from the name already
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()
