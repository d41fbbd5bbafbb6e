"""The local stack: Redis and every service on one machine, sandboxes as instances (`cyberdesk up`).

Part of the server distribution: the SDK's `cyberdesk up` imports it only when it is installed.
"""
