"""The socket switch (spec 003): a catalog of services, pseudo sockets in two gateways,
and tunnels between them carried over outbound HTTP(S) only."""

#: per-user caps (0: none; an admin has none): gateway names a user may own, and tunnels
#: (not yet deleted) a user may hold - every one is state in the server's memory and
#: store, and a gateway link's work, so one account must not be able to take unbounded.
#: Here rather than in :mod:`kakehashi.switch.tunnels` so ``switch server --help`` can
#: show them as defaults without importing the tunnel table (and the stream layer).
MAX_GATEWAYS_PER_USER = 100
MAX_TUNNELS_PER_USER = 1000
