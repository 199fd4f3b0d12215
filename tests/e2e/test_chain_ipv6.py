"""The proxy chain on IPv6 loopback: three ``chain proxy`` processes and ``chain forward``
all on ``::1``, a UDP echo server on ``::1``, datagrams with payload checks through the
chain in both modes, plaintext and encrypted.

An IPv6 socket reports a source as a 4-tuple (host, port, flowinfo, scope_id), and the port
record once compared whole tuples, so every IPv6 session died after its first datagram on
every path (bb0b3b9); nothing end to end ran on IPv6. Runs with the default fast path
(auto: as root the kernel path, which is IPv4 only and must leave an IPv6 session in user
space), with ``--fast-path on`` and with it off.
"""

from __future__ import annotations

import re
import socket

import pytest

from kakehashi.core.kernelpath import KernelPath
from tests.e2e.test_chain import MODES, Chain, ended, exchange, running
from tests.support.wait import wait_until


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1)")


class Ipv6Chain(Chain):
    loopback = "::1"
    server_host = "::1"
    server_net = "::1/128"
    acl = 'acl = [ { user = "alice", from = "::1/128", ports = "any" } ]'


@pytest.fixture(scope="module", params=[None, "on", "off"],
                ids=["auto", "fast-path", "protocol-path"])
def chain(tmp_path_factory, request):
    cls = type("Ipv6ChainFastPath", (Ipv6Chain,), {"fast_path": request.param})
    yield from running(cls, tmp_path_factory.mktemp("chain-ipv6"))


@pytest.mark.parametrize(("mode", "encrypt"), MODES)
def test_datagrams_cross_three_proxies_on_ipv6_intact(chain, mode, encrypt):
    fwd = chain.forward(mode=mode, encrypt=encrypt)
    port = fwd.bound_port()
    p5 = re.search(r"sees the chain at \[(::1)\]:(\d+) \(P5\)", fwd.output())
    assert p5 and "fw1 -> fw2 -> fw3" in fwd.output()
    assert exchange(port, 500, 512, host="::1") >= 495
    assert exchange(port, 20, 1400, host="::1") == 20
    # the server saw the last proxy's P5, the endpoint the port exchange reported
    assert (p5.group(1), int(p5.group(2))) in chain.echo.sources
    before = {h: ended(chain, h) for h in chain.procs}
    fwd.stop()
    for h, p in chain.procs.items():  # every hop relayed the session to its end
        wait_until(lambda h=h: ended(chain, h) > before[h], 15, what=f"{h} ending the session")
        m = re.findall(rf"{h}: session of alice ended: \d+ bytes relayed \((\d+) datagrams "
                       r"in user space, (\d+) packets in the kernel\)", p.output())
        user, kernel = map(int, m[-1])
        assert user >= 2 * 515 and kernel == 0, (h, user, kernel)
        if chain.fast_path is None and KernelPath.unavailable() is None:
            # auto as root: the kernel path is IPv4 only and says it left this one alone
            assert "kernel fast path on (--fast-path auto" in p.output()
            assert "(::1 is not an IPv4 address of this host): relayed in user space" \
                in p.output()
