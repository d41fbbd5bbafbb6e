"""Code shared by every Cyberdesk service: configuration, logging, tracing, gRPC bootstrap, status."""
