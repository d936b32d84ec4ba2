"""Container healthcheck: exit 0 when the gRPC server at HOST:PORT reports SERVING.

The image carries it at /opt/modelplane/healthcheck.py; compose's healthchecks and the
Kubernetes probes (exec probes: the kubelet's own `grpc:` probes speak plaintext only and
cannot check a TLS port) run

    python /opt/modelplane/healthcheck.py 127.0.0.1:50051 [SERVICE] [--server-name NAME]

It is `modelplane health` (modelplane.cli.health) without loading every other command:
the standard grpc.health.v1 service, over TLS when MODELPLANE_TLS_CA is set, checking
the certificate for --server-name. Exit codes: 0 SERVING, 1 anything else, 2 bad usage.
"""

from __future__ import annotations

import sys

from modelplane.cli.health import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
