"""Stands in for torch in the job subprocesses the tests start (tests/conftest.py: one_device_env): the job
runs without torch, as on a machine that installed only the project."""

raise ImportError("torch is a test-only reference: the job must run without it")
