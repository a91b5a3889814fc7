"""Version, route prefix and headers of the HTTP protocol the QuPath scripts speak."""

__all__ = ["API_PREFIX", "HEALTH_PATH", "PROTOCOL_HEADER", "PROTOCOL_VERSION", "SUMMARY", "TITLE"]

#: Version of the HTTP protocol; bumped on any incompatible change of routes or shapes.
PROTOCOL_VERSION = 1
#: Prefix of every route.
API_PREFIX = f"/api/v{PROTOCOL_VERSION}"
#: Header a client sends with the protocol version it speaks.
PROTOCOL_HEADER = "X-SimSearch-Protocol"
#: The one route that never needs a token.
HEALTH_PATH = f"{API_PREFIX}/health"

#: Title and one-line description of the OpenAPI document.
TITLE = "simsearch_wsi server"
SUMMARY = (
    "The local HTTP server QuPath scripts talk to: warm model and feature caches, JSON in and out."
)
