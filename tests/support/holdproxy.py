"""A TCP forwarder on loopback between a terminal and the relay that can hold what the
terminal sends, cut chosen links, and stop taking new ones: a link lost at an exact
step of a session's setup (say, after the relay notified it and before its accept
arrives), without a network namespace."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.ports import free_port


class _Pair:
    """One proxied connection: the agent's socket, the relay's, and what the agent
    sent while held."""

    def __init__(self, agent: socket.socket, relay: socket.socket) -> None:
        self.agent, self.relay = agent, relay
        self.lock = threading.Lock()
        self.held = bytearray()
        #: relay-to-agent bytes went through while the proxy held (a notification)
        self.notified = False
        self.cut = False


class HoldProxy:
    """Agent-to-relay forwarder that can hold the agent's direction (on the links
    open when :meth:`hold` is called), cut the links the relay wrote to meanwhile,
    and let the rest go on in order (:meth:`release`)."""

    def __init__(self, relay_port: int) -> None:
        self.target = ("127.0.0.1", relay_port)
        self.port = free_port()
        self.pairs: list[_Pair] = []
        self._held: set[_Pair] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                agent, _ = self._listener.accept()
            except OSError:
                return
            relay = socket.create_connection(self.target, 5)
            pair = _Pair(agent, relay)
            with self._lock:
                self.pairs.append(pair)
            threading.Thread(target=self._up, args=(pair,), daemon=True).start()
            threading.Thread(target=self._down, args=(pair,), daemon=True).start()

    def _up(self, pair: _Pair) -> None:
        try:
            while data := pair.agent.recv(65536):
                with pair.lock:
                    if pair in self._held:
                        pair.held += data
                    else:
                        pair.relay.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            pair.relay.shutdown(socket.SHUT_WR)

    def _down(self, pair: _Pair) -> None:
        try:
            while data := pair.relay.recv(65536):
                with pair.lock:
                    if pair in self._held:
                        pair.notified = True
                    pair.agent.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            pair.agent.shutdown(socket.SHUT_WR)

    def hold(self) -> None:
        with self._lock:
            self._held = set(self.pairs)

    def cut_notified_and_release(self, *, cut_notified: bool = True) -> int:
        """Cut the held links the relay wrote to (unless ``cut_notified`` is False);
        the others send what was held and go on. Returns how many were notified."""
        notified = 0
        with self._lock:
            held, self._held = self._held, set()
            for pair in held:
                with pair.lock:
                    notified += pair.notified
                    if pair.notified and cut_notified:
                        self._cut(pair)
                    elif pair.held:
                        pair.relay.sendall(bytes(pair.held))
                        pair.held.clear()
            # (pairs leave _held only after their held bytes are out, under their lock)
        return notified

    def cut_all(self) -> None:
        """Cut every link open now (new ones are forwarded as before)."""
        with self._lock:
            for pair in self.pairs:
                with pair.lock:
                    self._cut(pair)

    @staticmethod
    def _cut(pair: _Pair) -> None:
        pair.cut = True
        for sock in (pair.agent, pair.relay):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def refuse_new(self) -> None:
        """Stop taking new links (a terminal's next one cannot connect); the open ones
        go on. (Closed only, a listening socket whose accept() waits in another thread
        would go on taking connections.)"""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def close(self) -> None:
        self.refuse_new()
        for pair in self.pairs:
            for sock in (pair.agent, pair.relay):
                sock.close()
