"""Source and sink URIs: ``SCHEME:TARGET`` with an optional query naming the wire format.

``zmq:tcp://127.0.0.1:5556?format=openephys`` and ``lsl:NAME?format=string``
(ARCHITECTURE.md, "Contract extensions"). Without a query each transport keeps
its own format. Unknown keys and values are refused with the allowed ones named.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from ..errors import StreamFormatError

# the formats each transport reads (source) or writes (sink); the first is the default
FORMATS = {
    ("source", "zmq"): ("rtsort", "openephys"),
    ("source", "lsl"): ("numeric",),
    ("sink", "zmq"): ("rtsort", "openephys"),
    ("sink", "lsl"): ("numeric", "string"),
}


def split_uri(uri: str, role: str) -> tuple[str, str, str]:
    """``(scheme, target, format)`` of a ``zmq:`` or ``lsl:`` URI used as a ``role`` ("source" or "sink").

    A ``file:`` URI is returned whole (a path may hold a ``?``) with format "".
    """
    scheme, _, rest = uri.partition(":")
    if scheme == "file" or ":" not in uri:
        return scheme, rest, ""
    target, sep, query = rest.partition("?")
    allowed = FORMATS.get((role, scheme))
    if allowed is None:
        return scheme, rest, ""
    fmt = allowed[0]
    if sep:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise StreamFormatError(f"{uri}: malformed query {query!r}; use ?format=NAME") from None
        for key, value in pairs:
            if key != "format":
                raise StreamFormatError(f"{uri}: unknown query key {key!r}; the only key is 'format'")
            if value not in allowed:
                raise StreamFormatError(f"{uri}: unknown {scheme} {role} format {value!r}; allowed: "
                                        f"{', '.join(allowed)}")
            fmt = value
    if not target:
        raise StreamFormatError(f"{uri}: no address or stream name after '{scheme}:'")
    return scheme, target, fmt
