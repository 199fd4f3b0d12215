"""GZIP response decoding, spec module 219, sans-IO.

The gateway may hand a gzip-encoded response to a client that cannot decode it
(e.g. a small embedded client behind the client communication module). Decoding
is streaming, so a body is never held whole, and guarded against decompression
bombs, because the upstream is not trusted to be small: a few KiB of gzip can
expand to gigabytes.
"""

from __future__ import annotations

import zlib
from typing import Final

from kakehashi.gateway.http import HTTP_11, Headers, HTTPError, ResponseHead

MAX_OUTPUT: Final = 256 * 1024 * 1024
MAX_RATIO: Final = 1000
RATIO_GRACE: Final = 1024 * 1024  # small bodies may expand freely (headers, JSON, HTML)
STEP: Final = 256 * 1024  # output produced per zlib call, so the guard trips early
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS
_GZIP_CODINGS: Final = (b"gzip", b"x-gzip")


class GzipDecoder:
    """Streaming gunzip: ``decode(chunk) -> bytes`` as data arrives, then ``finish()``.

    Handles multi-member streams (concatenated gzip files, which ``gzip -c a b``
    and some servers produce) and NUL padding after the last member. Raises
    ``HTTPError(502)`` for corrupt or truncated data and when the output exceeds
    ``max_output`` bytes or ``max_ratio`` times the input once past ``ratio_grace``.
    """

    __slots__ = (
        "_d",
        "_in",
        "_members",
        "_out",
        "_padding",
        "_started",
        "max_output",
        "max_ratio",
        "ratio_grace",
    )

    def __init__(
        self,
        *,
        max_output: int = MAX_OUTPUT,
        max_ratio: int = MAX_RATIO,
        ratio_grace: int = RATIO_GRACE,
    ) -> None:
        self.max_output = max_output
        self.max_ratio = max_ratio
        self.ratio_grace = ratio_grace
        self._d = zlib.decompressobj(_GZIP_WBITS)
        self._in = 0
        self._out = 0
        self._members = 0  # members completed
        self._padding = False  # past the last member, only NUL bytes allowed
        self._started = False

    @property
    def total_in(self) -> int:
        return self._in

    @property
    def total_out(self) -> int:
        return self._out

    def decode(self, chunk: bytes) -> bytes:
        """Decompressed bytes available after ``chunk`` (possibly b"")."""
        if not chunk:
            return b""
        parts: list[bytes] = []
        data = chunk
        while data:
            if not self._started and self._members and data[:1] == b"\0":
                self._padding = True  # the last member ended exactly at a piece boundary
            if self._padding:
                if data.strip(b"\0"):
                    raise HTTPError(502, "upstream gzip body has trailing garbage")
                self._in += len(data)
                break
            data = self._inflate(data, parts)
        return b"".join(parts)

    def _inflate(self, data: bytes, parts: list[bytes]) -> bytes:
        """Run one member on ``data``; return input left for the next member."""
        d = self._d
        self._started = True
        try:
            while data:
                out = d.decompress(data, STEP)
                tail = d.unconsumed_tail
                self._in += len(data) - len(tail) - len(d.unused_data)
                self._count(len(out))
                if out:
                    parts.append(out)
                data = tail
            while not d.eof and (out := d.decompress(b"", STEP)):
                # output still pending in zlib for input already consumed
                self._count(len(out))
                parts.append(out)
        except zlib.error:
            raise HTTPError(502, "upstream gzip body is corrupt") from None
        if not d.eof:
            return b""
        rest = d.unused_data
        self._d = zlib.decompressobj(_GZIP_WBITS)
        self._started = False
        self._members += 1
        return rest

    def _count(self, n: int) -> None:
        """The bomb guard, checked after every bounded zlib step against the input
        zlib has actually consumed, so a bomb fed in one piece trips just as early."""
        self._out += n
        if self._out > self.max_output or (
            self._out > self.ratio_grace and self._out > self.max_ratio * self._in
        ):
            raise HTTPError(502, "upstream gzip body expands too much")

    def finish(self) -> bytes:
        """End of input: the last bytes, or 502 if the stream stopped mid-member."""
        if self._padding or not self._started:
            return b""
        try:
            out = self._d.flush()
        except zlib.error:
            raise HTTPError(502, "upstream gzip body is corrupt") from None
        self._count(len(out))
        if not self._d.eof:
            raise HTTPError(502, "upstream gzip body is truncated")
        return out


def decoded_response_head(resp: ResponseHead) -> ResponseHead | None:
    """The head to send once the body is gunzipped, or None when it is not gzip.

    Only a sole ``gzip``/``x-gzip`` coding is undone (a stack like ``gzip, br``
    is left alone); 206 responses are left alone too, since a byte range of a gzip
    stream cannot be decoded on its own. Fields describing the encoded bytes go:
    Content-Encoding, Content-Length (the length changes, so an HTTP/1.1 head is
    framed chunked instead), Content-MD5, Accept-Ranges; a strong ETag is
    weakened because the bytes differ from what the origin validated. Vary is
    kept as the origin sent it.
    """
    if resp.status == 206:
        return None
    codings = resp.headers.tokens(b"content-encoding")
    if len(codings) != 1 or codings[0] not in _GZIP_CODINGS:
        return None
    headers: Headers = resp.headers.copy()
    for name in (b"content-encoding", b"content-length", b"content-md5", b"accept-ranges"):
        headers.remove(name)
    etag = headers.get(b"etag")
    if etag is not None and not etag.startswith(b"W/"):
        headers.set(b"ETag", b"W/" + etag)
    if resp.version == HTTP_11:
        headers.remove(b"transfer-encoding")
        headers.add(b"Transfer-Encoding", b"chunked")
    return ResponseHead(resp.version, resp.status, resp.reason, headers)
