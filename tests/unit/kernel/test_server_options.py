"""Port sharing is off unless a server is one of a supervisor's workers."""

from __future__ import annotations

from modelplane.kernel.server import grpc_options
from modelplane.kernel.settings import ServiceSettings


def test_servers_never_share_a_port_by_default():
    assert dict(grpc_options(ServiceSettings()))["grpc.so_reuseport"] == 0


def test_workers_of_one_supervisor_share_theirs():
    assert dict(grpc_options(ServiceSettings(), reuse_port=True))["grpc.so_reuseport"] == 1
