"""Request builders and model conversions of disks, egress and out-of-memory exits (pure, no server)."""

from __future__ import annotations

import pytest

from cyberdesk import EgressPolicy, InvalidArgument
from cyberdesk._models import InstanceData, ResultCollector, Started, exited_from_proto, result_from_run
from cyberdesk._requests import create_request
from cyberdesk_proto.v1 import instance_pb2, process_pb2


def test_create_request_carries_disk_and_egress() -> None:
    request = create_request(disk_mib=512, internet=True, allow=["198.51.100.7", "pypi.org"], deny=["*.bad.test"])
    assert request.disk_mib == 512
    assert request.network == instance_pb2.NETWORK_MODE_INTERNET
    assert (list(request.egress.allow), list(request.egress.deny)) == (["198.51.100.7", "pypi.org"], ["*.bad.test"])
    plain = create_request()
    assert plain.disk_mib == 0 and not plain.egress.allow and not plain.egress.deny
    # A lone string is one entry, never a list of its characters.
    assert list(create_request(internet=True, allow="203.0.113.0/24").egress.allow) == ["203.0.113.0/24"]


def test_create_request_refuses_what_cannot_work() -> None:
    with pytest.raises(InvalidArgument, match="allow and deny need internet=True"):
        create_request(allow=["198.51.100.7"], deny=["203.0.113.0/24"])
    with pytest.raises(InvalidArgument, match="deny needs internet=True"):
        create_request(deny=["203.0.113.0/24"])
    with pytest.raises(InvalidArgument, match="allow: ''"):
        create_request(internet=True, allow=[""])
    with pytest.raises(InvalidArgument, match="disk_mib"):
        create_request(disk_mib=-1)
    assert not create_request(allow=[], deny=None).egress.allow  # empty lists need no network


def test_instance_data_reads_disk_and_egress() -> None:
    proto = instance_pb2.Instance(
        instance_id="i-1",
        state=instance_pb2.INSTANCE_STATE_RUNNING,
        disk_mib=512,
        network=instance_pb2.NETWORK_MODE_INTERNET,
        egress=instance_pb2.EgressPolicy(allow=["198.51.100.7"], deny=["203.0.113.0/24"]),
    )
    data = InstanceData.from_proto(proto)
    assert (data.disk_mib, data.internet) == (512, True)
    assert data.egress == EgressPolicy(["198.51.100.7"], ["203.0.113.0/24"])
    assert data.to_dict()["egress"] == {"allow": ["198.51.100.7"], "deny": ["203.0.113.0/24"]}
    assert InstanceData.from_proto(instance_pb2.Instance(instance_id="i-2")).internet is False


def test_out_of_memory_reaches_results() -> None:
    exited = process_pb2.ProcessExited(exit_code=-1, signal=9, error="out of memory: ...", out_of_memory=True)
    assert exited_from_proto(exited).out_of_memory
    reply = process_pb2.RunProcessResponse(pid=5, exited=exited)
    assert result_from_run(reply).out_of_memory
    collector = ResultCollector()
    collector.add(Started(5))
    collector.add(exited_from_proto(exited))
    assert collector.result().out_of_memory
    assert not exited_from_proto(process_pb2.ProcessExited(exit_code=0)).out_of_memory
