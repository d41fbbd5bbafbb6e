"""Which methods the proxy serves, from the descriptors (gateway_svc/proxy.py), in-process."""

from __future__ import annotations

from gateway_svc.proxy import public_methods


def test_public_methods_cover_every_shape() -> None:
    methods = public_methods()
    assert not methods["/cyberdesk.v1.ProcessService/StartProcess"].client_streaming
    assert methods["/cyberdesk.v1.ProcessService/StartProcess"].server_streaming
    assert methods["/cyberdesk.v1.FilesystemService/UploadFile"].client_streaming
    assert methods["/cyberdesk.v1.ProcessService/ConnectPty"].client_streaming
    assert "/cyberdesk.v1.InstanceService/GetInstance" in methods
    assert not any(path.startswith("/cyberdesk.internal") for path in methods)
