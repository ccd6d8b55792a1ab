"""Shared test set-up: the real local cluster's fixtures (kubetune.local.testing) for the
integration and e2e suites; each suite's own fixtures live in its folder's conftest."""

pytest_plugins = ["kubetune.local.testing"]
