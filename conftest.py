"""Root conftest: settings shared by every test run from this repository, and the crossval plugin for
runs where the package is not installed (installed, its pytest11 entry point loads it)."""

import os
from importlib.metadata import entry_points

from hypothesis import HealthCheck, settings

# Property tests stay short by default; `nox -s fuzz` raises the count through BITNET_FUZZ_EXAMPLES.
settings.register_profile(
    "project",
    max_examples=int(os.environ.get("BITNET_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("project")

_entry_point_loads_it = not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") and any(
    ep.value == "harness.pytest_plugin" for ep in entry_points(group="pytest11")
)
pytest_plugins = [] if _entry_point_loads_it else ["harness.pytest_plugin"]
