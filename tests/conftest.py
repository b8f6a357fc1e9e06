"""Shared pytest configuration.

The network lab fixtures (``lab_env``, ``lab``, ``module_lab``) live in tests/lab/fixtures.py.
``tests/`` has no ``__init__.py``, so pytest puts it on sys.path and the lab package imports
as ``lab`` (``from lab import Lab``; ``from lab.echo import UdpEcho``).
"""

pytest_plugins = ["lab.fixtures"]
