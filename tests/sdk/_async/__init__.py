"""The SDK's tests, written once against the async client; tools/unasync.py makes tests/sdk/_sync from them."""
