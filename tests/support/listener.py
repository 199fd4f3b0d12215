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
import socket
import threading


def stop_listener(sock: socket.socket, thread: threading.Thread | None,
                  timeout: float = 5.0) -> None:
    """Wake and join ``thread`` (blocked in ``sock.accept()``, or in ``recvfrom`` on a
    UDP socket: shutdown wakes both), then close ``sock``."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout)
    sock.close()
