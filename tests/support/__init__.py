"""Helpers for tests that run real processes: free ports, service subprocesses, health waits."""
