"""The sync SDK, generated from cyberdesk/_async by tools/unasync.py (never edit a generated module).

The `_`-prefixed modules are the exception: `_transport.py` (a blocking channel, reader threads)
and `_io.py` (local file I/O, the helper thread) are written by hand, the twins of the async
side's modules of the same names. Users import from `cyberdesk`, not from here.
"""
