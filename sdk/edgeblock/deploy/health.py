"""The deployment's last step: poll the daemon's grpc.health.v1 service until it answers SERVING
(through edgeblock's gRPC client, so TLS and mTLS work as for every other call).
"""

from __future__ import annotations

import time

from .options import DeployError


def check_health(address: str, timeout: float, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None) -> str:
    """Poll grpc.health.v1 on `address` until it answers SERVING; DeployError after `timeout` seconds."""
    try:
        from ..client import ClientError, EdgeClient
    except ImportError as e:
        raise DeployError(f"health: the check needs grpcio ({e}); pip install 'edgeblock[device]' or --skip-health")
    deadline = time.monotonic() + timeout
    last = "no answer"
    with EdgeClient(address, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, timeout=min(5.0, timeout)) as client:
        while time.monotonic() < deadline:
            try:
                last = client.health()
                if last == "SERVING":
                    return last
            except ClientError as e:
                last = str(e)
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise DeployError(f"health: {address} did not answer SERVING within {timeout:g} s (last: {last})")
