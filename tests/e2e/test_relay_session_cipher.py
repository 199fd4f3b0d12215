"""The relay's session cipher, end to end through the CLI (spec 000 step 23: "with some
ciphers this step is not needed and the data is relayed unchanged").

Both modes run the same checks: ``--session-cipher relay`` (the default: the relay
issues fresh keys inside TLS, both links leave TLS, the terminals seal every frame and
each direction's end, the relay forwards unchanged) and ``--session-cipher tls`` (the
relay decrypts and re-encrypts). Then a man in the middle on the hop between a terminal
(the requester or the agent) and the relay, after the switch: whatever it injects,
flips, replays or cuts, the terminal aborts the session and nothing forged reaches the
application.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from kakehashi.core import wire
from kakehashi.relay import messages as m
from tests.e2e.framework import roundtrip, stream_through
from tests.support.listener import stop_listener
from tests.support.ports import free_port

CIPHER = {"relay": m.CIPHER_SESSION, "tls": "tls"}


class Greeter:
    """A service that speaks first and ends the session itself (the peer ends)."""

    GREETING = b"hello from the service\n" * 1000

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    conn.sendall(self.GREETING)
                    # then its end, and what the client sent is read before the close:
                    # a close with unread bytes is a reset (RFC 2525), not the clean
                    # end this service gives (with optimistic pairing the client's
                    # first bytes reach it before it closes, not after)
                    conn.shutdown(socket.SHUT_WR)
                    conn.settimeout(30)
                    while conn.recv(65536):
                        pass

    def close(self) -> None:
        stop_listener(self.sock, self.thread)


def _read_to_end(port: int, send: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        if send:
            sock.sendall(send)
        got = bytearray()
        while data := sock.recv(65536):  # a reset raises: not a clean end
            got += data
        return bytes(got)


@pytest.mark.parametrize("mode", ["relay", "tls"])
def test_sessions_in_both_modes(env, echo, mode):
    greeter = Greeter()
    try:
        env.add_user("pi")
        env.add_user("laptop")
        _, port = env.relay("--session-cipher", mode)
        env.agent("pi", port, f"echo={echo.addr}", f"greet={greeter.addr}")
        conn, local = env.forward("laptop", port, "pi/echo")
        _, greet = env.forward("laptop", port, "pi/greet")
        # the first bytes go with the request (early data) and arrive first; the
        # client's half-close ends one direction, the echo still comes back
        for i in range(3):
            assert roundtrip(local, f"first bytes {i}".encode()) == f"first bytes {i}".encode()
        sent, got, n = stream_through(local, 64 << 20)
        assert n == 64 << 20 and sent == got
        # the service ends the session: all of its bytes, then a clean end
        assert _read_to_end(greet) == Greeter.GREETING
        assert _read_to_end(greet, b"ignored") == Greeter.GREETING
        conn.wait_for(f"cipher {CIPHER[mode]}")
        pairs = env.pairs()
        assert pairs and {a.get("cipher") for a in pairs} == {CIPHER[mode]}
    finally:
        greeter.close()


def test_an_idle_session_outlives_the_relays_dead_peer_window(env, echo):
    """After the switch the terminals send no holds (TCP keepalive watches the link), so
    the relay must not take a quiet session for a dead peer. The quiet time itself is
    what is tested: the session stays silent for three of the relay's dead-peer windows
    (keepalive 0.2 s x 2 missed), then still carries bytes both ways."""
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay("--keepalive", "0.2", "--dead-after", "2")
    env.agent("pi", port, f"echo={echo.addr}")
    conn, local = env.forward("laptop", port, "pi/echo")
    with socket.create_connection(("127.0.0.1", local), timeout=10) as sock:
        sock.sendall(b"before")
        assert sock.recv(16) == b"before"
        conn.wait_for(f"cipher {m.CIPHER_SESSION}")
        time.sleep(3 * 0.2 * 2)  # the condition under test: no byte on the session
        sock.sendall(b"after the quiet")
        got = b""
        while len(got) < len(b"after the quiet"):
            data = sock.recv(64)
            assert data, "the relay ended a quiet session"
            got += data
        assert got == b"after the quiet"
    assert not [a for a in env.audit() if a.get("event") == "keepalive"]


# -- a man in the middle between the requester and the relay, after the switch --------
class FrameMITM:
    """Forwards a terminal's link to the relay; on the relay-to-terminal side it follows
    the TLS records, notices where plain TCP starts (a byte that opens no TLS record:
    the first kakehashi frame header) and tampers with the first DATA frame there."""

    def __init__(self, relay_port: int, attack: str) -> None:
        self.relay_port = relay_port
        self.attack = attack
        self.port = free_port()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.attacked = threading.Event()
        self.socks: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                term, _ = self.sock.accept()
                relay = socket.create_connection(("127.0.0.1", self.relay_port))
                self.socks += [term, relay]
                threading.Thread(target=self._up, args=(term, relay), daemon=True).start()
                threading.Thread(target=self._down, args=(relay, term), daemon=True).start()

    @staticmethod
    def _up(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            # the terminal reset its link (it aborted with bytes unread): the relay
            # must hear of the end however it came, as it would without this hop
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    def _down(self, src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray()

        def need(n: int) -> bool:
            while len(buf) < n:
                data = src.recv(65536)
                if not data:
                    return False
                buf.extend(data)
            return True

        def take(n: int) -> bytes:
            out = bytes(buf[:n])
            del buf[:n]
            return out

        held: bytes | None = None  # "reorder": the first DATA frame, sent after the next
        with contextlib.suppress(OSError):
            plain = False
            while need(1):
                if not plain and buf[0] in (20, 21, 22, 23):  # a TLS record
                    if not need(5) or not need(5 + int.from_bytes(buf[3:5], "big")):
                        break
                    dst.sendall(take(5 + int.from_bytes(buf[3:5], "big")))
                    continue
                plain = True
                if not need(4):
                    break
                ftype, length = wire.decode_header(buf[:4])
                if not need(4 + length):
                    break
                frame = take(4 + length)
                if held is not None:
                    frame, held = frame + held, None
                elif ftype == wire.FrameType.DATA and self.attack == "reorder" \
                        and not self.attacked.is_set():
                    self.attacked.set()
                    held = frame
                    continue
                if ftype == wire.FrameType.DATA and not self.attacked.is_set():
                    self.attacked.set()
                    frame = self._tamper(frame)
                    if frame is None:
                        dst.shutdown(socket.SHUT_RDWR)  # truncation: a bare end
                        while src.recv(65536):  # (what the relay still sends is dropped)
                            pass
                        return
                dst.sendall(frame)
            dst.shutdown(socket.SHUT_WR)

    def _tamper(self, frame: bytes) -> bytes | None:
        if self.attack == "inject-eof":
            return wire.encode_frame(wire.FrameType.EOF)
        if self.attack == "inject-eof-with-bad-seal":
            return wire.encode_frame(wire.FrameType.EOF, bytes(16))
        if self.attack == "flip":
            return frame[:-1] + bytes([frame[-1] ^ 1])
        if self.attack == "replay":
            return frame + frame
        if self.attack == "inject-control":
            return m.TERMINAL_CODEC.encode(m.End(reason="forged")) + frame
        if self.attack == "truncate":
            return None
        raise AssertionError(self.attack)

    def close(self) -> None:
        stop_listener(self.sock, self.thread)
        for s in self.socks:
            s.close()


@pytest.mark.parametrize("attack", ["inject-eof", "inject-eof-with-bad-seal", "flip",
                                    "replay", "reorder", "inject-control", "truncate"])
@pytest.mark.parametrize("hop", ["requester", "agent"])
def test_a_man_in_the_middle_after_the_switch_aborts_the_session(env, echo, attack, hop):
    """On the requester's hop the attack hits the echo on its way back; on the
    agent's hop it hits the requester's bytes on their way to the service, and the
    agent aborts (its service gets a reset, the requester a bare end: a reset too)."""
    env.add_user("pi")
    env.add_user("laptop")
    _, port = env.relay()
    mitm = FrameMITM(port, attack)
    try:
        agent = env.agent("pi", mitm.port if hop == "agent" else port, f"echo={echo.addr}")
        conn, local = env.forward("laptop", mitm.port if hop == "requester" else port,
                                  "pi/echo")
        payload = bytes(range(256)) * 400
        got = bytearray()
        with socket.create_connection(("127.0.0.1", local), timeout=30) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            with pytest.raises(ConnectionResetError):  # never a clean end
                while data := sock.recv(65536):
                    got += data
        assert mitm.attacked.is_set()
        # nothing forged: at most a prefix of the true echo reached the application
        assert len(got) < len(payload) and payload.startswith(bytes(got))
        (conn if hop == "requester" else agent).wait_for("session aborted")
    finally:
        mitm.close()
