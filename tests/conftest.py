"""Shared pytest configuration.

The network lab fixtures (``lab_env``, ``lab``, ``module_lab``) live in tests/lab/fixtures.py.
``tests/`` has no ``__init__.py``, so pytest puts it on sys.path and the lab package imports
as ``lab`` (``from lab import Lab``; ``from lab.echo import UdpEcho``).
"""

pytest_plugins = ["lab.fixtures"]


import pytest  # noqa: E402
from fleet import EchoServer, Fleet  # noqa: E402


@pytest.fixture
def fleet(tmp_path):
    """A fleet state directory on loopback; its proxy/agent processes stop on teardown."""
    f = Fleet(tmp_path)
    yield f
    f.close()


@pytest.fixture
def echo():
    """A TCP echo service on loopback, standing in for a device service."""
    server = EchoServer()
    yield server
    server.close()
