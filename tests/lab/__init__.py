"""Network lab for integration tests: namespaces for devices, NATs, CGNAT, satellite, proxy.

Public API: ``Lab``, ``Device``, ``SshServer`` (lab.py), the pure planner (plan.py), the echo
helpers (echo.py) and the pytest fixtures ``lab_env``, ``lab``, ``module_lab`` (fixtures.py).
"""

from .lab import Device, Lab, SshServer
from .netns import LabError

__all__ = ["Device", "Lab", "LabError", "SshServer"]
