"""Test-wide setup: eight host CPU devices so every sharded code path is exercised on CPU."""

import os

# Must happen before jax is imported anywhere: XLA reads the flag once, at backend start-up.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
