"""Shared builders of the test suite: micro models and data, the quiet Trainer, config tools, the recording attacker,
the killer callback."""
