"""The proxy chain (spec 004): UDP across several firewalls with hop-by-hop port exchange."""
