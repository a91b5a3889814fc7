"""Who may talk to the server: loopback ``Host`` names and bearer tokens.

A server without a token answers only requests whose ``Host`` names a loopback address (this
stops DNS rebinding from web pages); with a token, a request must carry it. The checks run in
:class:`~simsearch_wsi.server.gate.Gate`, before routing.
"""

import hmac
import ipaddress

__all__ = ["bearer_token_matches", "host_of", "is_loopback"]


def is_loopback(host: str) -> bool:
    """True when ``host`` names the loopback interface: ``localhost``, ``127.0.0.0/8``, ``::1``.

    Other names are not resolved (a name that resolves to a loopback address today may not
    tomorrow), so they count as not loopback; ``0.0.0.0`` and ``::`` (all interfaces) are not.
    """
    h = host.strip().rstrip(".").lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def host_of(header: str) -> str:
    """The host part of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``)."""
    h = header.strip()
    if h.startswith("["):
        return h[: h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def bearer_token_matches(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>`` (constant-time compare;
    the header arrives decoded as latin-1)."""
    scheme, _, given = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("latin-1"), token.encode("utf-8")
    )
