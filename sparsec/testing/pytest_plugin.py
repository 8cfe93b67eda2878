"""pytest plugin (entry point `pytest11`): hypothesis profiles `dev`, `ci` and `nightly`.

Pick one with `HYPOTHESIS_PROFILE=ci pytest` or `pytest --hypothesis-profile=ci`; the default
is `dev`. `ci` is bounded so the whole suite stays within minutes on two cores; `nightly`
draws many more examples for the stress runs.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["PROFILES", "examples"]

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
PROFILES = {
    "dev": dict(max_examples=20, deadline=None, suppress_health_check=_SLOW_OK),
    "ci": dict(max_examples=12, deadline=None, suppress_health_check=_SLOW_OK,
               derandomize=True, print_blob=True),
    "nightly": dict(max_examples=300, deadline=None, suppress_health_check=_SLOW_OK,
                    print_blob=True),
}

for _name, _kw in PROFILES.items():
    settings.register_profile(_name, **_kw)

# How many examples an expensive test draws per profile, relative to the `n` it asks for.
_SCALE = {"dev": 1, "ci": 1, "nightly": 10}


def examples(n: int) -> settings:
    """Settings for a test whose examples are expensive (each compiles a graph): `n` examples
    under `dev`/`ci`, ten times as many under `nightly`."""
    profile = os.environ.get("HYPOTHESIS_PROFILE", "dev")
    return settings(max_examples=n * _SCALE.get(profile, 1))


def pytest_configure(config) -> None:
    if not config.getoption("hypothesis_profile", default=None):
        settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
