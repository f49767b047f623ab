"""Kept only for tests/faults/test_lock_properties.py, which still imports from here; the
helpers live in tests/clients.py. Remove once that test imports from there."""

from tests.clients import close_client, make_client

__all__ = ["close_client", "make_client"]
