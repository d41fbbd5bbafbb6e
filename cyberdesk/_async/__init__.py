"""The async SDK: the one hand-maintained source of the client.

tools/unasync.py generates cyberdesk/_sync/ from the public modules here (async functions become
plain ones, `AsyncX` becomes `X`, ...). What has no mechanical sync equivalent (grpc.aio against
blocking channels, asyncio tasks and queues against threads) lives in the `_`-prefixed modules,
written by hand for each side behind the same names. Users import from `cyberdesk`, not from here.
"""
