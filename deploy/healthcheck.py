"""Container healthcheck: exit 0 when the gRPC server at HOST:PORT reports SERVING.

Kubernetes probes gRPC health natively (`grpc:` probes in k8s/); compose cannot, so
its healthchecks run this script, which the image carries at
/opt/modelplane/healthcheck.py:

    python /opt/modelplane/healthcheck.py 127.0.0.1:50051 [SERVICE]

It asks the standard grpc.health.v1 service (SERVICE empty: the whole server), the
same question the kubelet asks. Exit codes: 0 SERVING, 1 anything else, 2 bad usage.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: healthcheck.py HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    address, service = argv[1], argv[2] if len(argv) == 3 else ""
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S
            )
    except grpc.RpcError as exc:
        print(f"{address}: {exc.code().name}", file=sys.stderr)
        return 1
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        print(f"{address}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
