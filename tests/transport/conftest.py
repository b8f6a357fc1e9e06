"""Fixtures for the transport tests; helpers live in transport_helpers.py (on sys.path)."""

from transport_helpers import pki, transport  # noqa: F401  (re-exported fixtures)
