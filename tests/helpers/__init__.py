"""Shared builders of the test suite: micro models and data, config tools, the recording attack, the killer callback."""
