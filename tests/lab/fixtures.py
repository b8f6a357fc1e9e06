"""Pytest fixtures for the network lab (loaded from tests/conftest.py via ``pytest_plugins``).

``lab_env`` decides once per session whether a lab can be built: without root / ``ip netns``
lab tests SKIP, but with ``CI=true`` they FAIL, so CI can never go green by skipping the lab.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading

import pytest

from . import netns, plan
from .lab import Lab

TOOLS = ("ip", "nft", "tc", "conntrack", "sshd", "ssh", "ssh-keygen")


def _unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "network lab needs root (ip netns, nftables)"
    missing = [t for t in TOOLS if not shutil.which(t) and not os.path.exists(f"/usr/sbin/{t}")]
    if missing:
        return f"network lab needs these tools: {', '.join(missing)}"
    try:
        with Lab() as lab:  # smallest real build: proves netns, veth and nftables work
            lab.add_device("probe", uplinks=("wifi",))
    except (OSError, netns.LabError, subprocess.SubprocessError) as e:
        return f"cannot build network namespaces here: {e}"
    return None


def _terminate_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt so fixture finalizers still tear the lab down."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def handler(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, handler)


@pytest.fixture(scope="session")
def lab_env():
    """Session gate: sweep stale lab namespaces, then check a lab can be built (skip or fail)."""
    swept = netns.sweep_stale() if os.geteuid() == 0 else []
    reason = _unavailable_reason()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the network lab cannot be built: {reason}", pytrace=False)
        pytest.skip(reason)
    _terminate_as_interrupt()
    return {"swept": swept, "prefix": plan.PREFIX}


@pytest.fixture
def lab(lab_env):
    """A fresh lab (internet namespace only; add devices with ``lab.add_device``) per test."""
    with Lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def module_lab(lab_env):
    """One lab shared by a module's tests, for suites where per-test isolation is not needed."""
    with Lab() as lab:
        yield lab
