"""The socket switch (spec 003): a catalog of services, pseudo sockets in two gateways,
and tunnels between them carried over outbound HTTP(S) only."""
