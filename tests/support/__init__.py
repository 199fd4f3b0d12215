"""Code the tests share: process framework helpers, port allocation, waiting, netns labs.

Not shipped: nothing under ``src/`` imports it.
"""
