"""The guest agent: runs inside every instance and serves processes, files and the desktop over gRPC.

It depends on nothing but grpcio and protobuf (plus the desktop helpers at run time), so that it
can be baked into a VM image as it is.
"""

__version__ = "0.1.0"
