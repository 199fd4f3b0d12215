"""kakehashi: reach services behind NAT and firewalls."""

__version__ = "0.1.0"
