"""Aggregation-port gateway: an HTTP forward proxy (relay and CONNECT tunnelling)."""
