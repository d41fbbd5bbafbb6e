"""The SDK's tests for the sync client, generated from tests/sdk/_async by tools/unasync.py."""
