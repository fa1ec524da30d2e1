"""Every test runs under procshare's own leak check (see procshare.testing)."""

pytest_plugins = ["procshare.testing"]
