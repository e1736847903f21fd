"""Shared test configuration.

Four virtual CPU devices for the multi-device tests: XLA reads this flag once,
when jax is first imported, so it is set here before anything imports jax.
"""

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count=4"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES_FLAG).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Silent broadcasting bugs fail loudly (equinox does the same).
jax.config.update("jax_numpy_rank_promotion", "raise")

# Profiles: "default" explores 20 new random cases a run; CI (CI=true) runs a
# fixed derandomized set, so a red CI is never a coin toss; "thorough"
# (HYPOTHESIS_PROFILE=thorough) explores 300.
_BASE = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=20, **_BASE)
settings.register_profile("ci", max_examples=20, derandomize=True, **_BASE)
settings.register_profile("thorough", max_examples=300, **_BASE)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)


@pytest.fixture(scope="session")
def four_devices():
    """Four devices for the multi-device tests to shard over.

    The default backend's when it has four (the virtual CPU devices above), else
    the CPU's: on a machine with one GPU these tests still run, on the CPU.
    """
    devices = jax.devices()
    if len(devices) < 4:
        devices = jax.devices("cpu")
    if len(devices) < 4:
        pytest.fail(
            "multi-device tests need 4 devices: run them with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=4 set before jax is imported"
        )
    return devices[:4]


@pytest.fixture
def no_mnist_anywhere(tmp_path, monkeypatch):
    """No MNIST in any searched directory, and mirrors that cannot be reached (the demo's tests).

    The repository's own copy (``data/mnist``) is hidden as if it had been deleted.
    """
    from mnist_demo import mnist

    monkeypatch.setattr(mnist, "SHIPPED_DIR", tmp_path / "clone" / "data" / "mnist")
    monkeypatch.delenv("JBN_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # Port 9 (discard) on localhost: connection refused at once, no network used.
    monkeypatch.setattr(mnist, "MIRRORS", ("http://127.0.0.1:9/",))
    return tmp_path
