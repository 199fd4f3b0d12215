"""The chain under hostile conditions the other chain tests do not cover: hops that
break the control connection in the middle of a frame or reset it, bursts of setups,
and ports a session freed while its datagrams are still in flight.

Proxies run in the test's own process (as in ``test_chain_tamper``) where the test must
steer what the proxy does (which UDP port it picks); the commands run as processes.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading

import pytest

from kakehashi.chain import tables
from kakehashi.chain.forward import ForwardConfig, build_chain
from kakehashi.chain.setup import SetupFailed
from kakehashi.core import crypto, wire
from tests.e2e.framework import Env

SERVER = ("127.0.0.3", 9)


class BrokenHop:
    """A first hop that accepts the control connection, takes the preamble, and then
    resets the connection (``reset``) or sends half a frame and closes (``truncate``).

    A thread, so the hop also serves a command run as a process by a blocking test."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.served = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.settimeout(10)
                with contextlib.suppress(OSError):
                    got = b""
                    while len(got) < len(wire.PREAMBLE):
                        chunk = c.recv(len(wire.PREAMBLE) - len(got))
                        if not chunk:
                            break
                        got += chunk
                    if self.how == "reset":
                        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
                    else:  # a frame header that promises 40 bytes, and 3 of them
                        c.sendall(wire.encode_header(wire.FrameType.CTRL, 40) + b"abc")
                self.served += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)


def _config(port: int, mode: str = "recursive") -> ForwardConfig:
    return ForwardConfig(user="alice", keys={"fw1": crypto.parse_shared_key(
        crypto.new_shared_key())}, first_hop=tables.Hop("fw1", "127.0.0.1", port), to=SERVER,
        udp_listen=("127.0.0.1", 0), mode=mode, setup_timeout=20)  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["reset", "truncate"])
@pytest.mark.parametrize("mode", ["recursive", "iterative"])
async def test_a_hop_that_breaks_the_connection_during_setup_is_named(how, mode):
    """A reset, or a frame cut short, during the setup is a refusal by that hop like
    any other (SetupFailed naming it), not an exception of another kind: ``chain trace``
    printed a traceback, ``chain socks`` kept the destination's half-built route for
    the association's life (its datagrams queued, then dropped), ``chain forward``
    exited with a traceback instead of naming the hop."""
    hop = BrokenHop(how)
    try:
        with pytest.raises(SetupFailed) as err:
            await build_chain(_config(hop.port, mode))
        assert err.value.hop == "fw1" and err.value.reason == "protocol", err.value
    finally:
        hop.close()


@pytest.mark.parametrize("how", ["reset", "truncate"])
def test_trace_names_a_hop_that_breaks_the_connection(tmp_path, how):
    env = Env(tmp_path)
    hop = BrokenHop(how)
    try:
        path = tmp_path / "trace.toml"
        path.write_text("\n".join([
            "[chain.trace]", 'id = "alice"', f'keys = {{ fw1 = "{crypto.new_shared_key()}" }}',
            f'first_hop = "fw1@127.0.0.1:{hop.port}"', f'to = "{SERVER[0]}:{SERVER[1]}"']) + "\n")
        res = env.run("--config", str(path), "chain", "trace", "--json", check=False)
        assert res.returncode == 1, res.stderr.decode(errors="replace")
        out = json.loads(res.stdout)
        assert out["refused"]["hop"] == "fw1" and out["refused"]["reason"] == "protocol", out
        assert b"Traceback" not in res.stderr
    finally:
        hop.close()
        env.close()
