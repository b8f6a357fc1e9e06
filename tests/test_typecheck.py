"""The type checker's settings stay in step with the layers (issue 16).

``scripts/test`` runs mypy as ``[tool.mypy]`` in ``pyproject.toml`` sets it; this file does not
run mypy again (it takes seconds on a loaded machine), it checks that the settings say what the
README says: the whole package, and mypy's strict flags on exactly the pure core of
``tests/test_layers.py``. A module that joins the core there is made strict here too.
"""

from __future__ import annotations

import tomllib

from test_layers import LAYERS, ROOT

#: the flags ``mypy --strict`` turns on that mypy's config accepts per module (``strict`` itself
#: is global only); ``warn_redundant_casts``/``warn_unused_ignores`` are set for the whole package
STRICT_PER_MODULE = {
    "disallow_any_generics", "disallow_subclassing_any", "disallow_untyped_calls",
    "disallow_untyped_defs", "disallow_incomplete_defs", "check_untyped_defs",
    "disallow_untyped_decorators", "warn_return_any", "no_implicit_reexport", "strict_equality",
    "extra_checks",
}


def _mypy() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]


def test_mypy_checks_the_whole_package():
    config = _mypy()
    assert set(config["packages"]) == {"tunnel", "enroll", "inventory_plugin"}
    assert config["check_untyped_defs"] is True
    assert config["warn_unused_ignores"] is True and config["warn_redundant_casts"] is True
    assert "ignore_missing_imports" not in config, "name the untyped third-party modules instead"


def test_the_pure_core_is_strict():
    core = next(modules for _, layer, _, modules in LAYERS if layer == "core")
    strict = [o for o in _mypy()["overrides"] if all(o.get(flag) is True for flag in STRICT_PER_MODULE)]
    assert len(strict) == 1, "one override holds the strict flags"
    assert set(strict[0]["module"]) == core
