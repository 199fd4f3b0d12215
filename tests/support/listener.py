"""Stopping a test server whose accept loop runs in a thread, without an fd race.

Closing a listening socket while another thread is about to call ``accept`` on it frees
the descriptor number at once; the next socket the test process makes (a new origin's
listener, a device's) can get that number, and the old thread's ``accept`` then takes
that socket's connections. An echo server did exactly that in CI: a gateway read its
own request back from "the origin" and a curl got its request as the reply. So the
listener is shut down first (a blocked ``accept`` returns with an error, the number
stays taken), the thread is joined, and only then is the descriptor closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from collections.abc import Callable


def stop_listener(sock: socket.socket, thread: threading.Thread | None,
                  timeout: float = 5.0) -> None:
    """Wake and join ``thread`` (blocked in ``sock.accept()``, or in ``recvfrom`` on a
    UDP socket: shutdown wakes both), then close ``sock``."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout)
    sock.close()


class ReplyAtEnd:
    """A target (a device, a tunnel's far end) that reads until the client's end (a
    half-close), then sends ``reply(count, sha256 digest)`` of what it read and closes:
    what a request-then-reply protocol does through a relay or tunnel. With
    ``greeting`` it speaks first and ends its own side at once (a TCP half-close),
    then reads. ``total``/``digest`` (hex) and the ``counted`` event tell what came."""

    def __init__(self, reply: Callable[[int, bytes], bytes] | None = None, *,
                 greeting: bytes | None = None) -> None:
        self.reply = reply
        self.greeting = greeting
        self.counted = threading.Event()
        self.total = -1
        self.digest = ""
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.srv.accept()
            with conn:
                if self.greeting is not None:
                    conn.sendall(self.greeting)
                    conn.shutdown(socket.SHUT_WR)
                total, h = 0, hashlib.sha256()
                while piece := conn.recv(1 << 16):
                    total += len(piece)
                    h.update(piece)
                self.total, self.digest = total, h.hexdigest()
                self.counted.set()
                if self.reply is not None:
                    conn.sendall(self.reply(total, h.digest()))

    def close(self) -> None:
        stop_listener(self.srv, self._thread)
