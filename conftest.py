"""Root conftest: settings shared by every test run from this repository."""

import os

from hypothesis import HealthCheck, settings

# Property tests stay short by default; `nox -s fuzz` raises the count through BITNET_FUZZ_EXAMPLES.
settings.register_profile(
    "project",
    max_examples=int(os.environ.get("BITNET_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("project")
