"""Who may call the daemon: beyond loopback a bearer token is required (or the operator's explicit
`allow_insecure_remote`), checked by a server interceptor in constant time; TLS, and mTLS with a
client CA, from PEM files. Tokens never reach the logs."""

from __future__ import annotations

import hmac
import ipaddress

from .config import ConfigError, ServerConfig


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]") if ":" in listen else listen
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_security(cfg: ServerConfig) -> None:
    if not is_loopback(cfg.listen) and not cfg.token and not cfg.allow_insecure_remote:
        raise ConfigError(
            f"refusing to listen on {cfg.listen} (beyond loopback) without a bearer token: pass --token-file "
            "(or EDGEBLOCK_TOKEN), or --allow-insecure-remote to accept unauthenticated clients"
        )


def auth_interceptor(token: str, service: str):
    """Calls to `service` need metadata 'authorization: Bearer <token>' (compared in constant time);
    health and reflection stay open."""
    import grpc

    expected = f"Bearer {token}".encode()

    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")

    class Auth(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            if not details.method.startswith(f"/{service}/"):
                return continuation(details)  # health and reflection stay open
            got = b""
            for k, v in details.invocation_metadata or ():
                if k == "authorization":
                    got = v.encode() if isinstance(v, str) else bytes(v)
            if hmac.compare_digest(got, expected):
                return continuation(details)
            handler = continuation(details)
            if handler is None:
                return None
            if handler.response_streaming:
                def deny_stream(request, context):
                    deny(request, context)
                    yield from ()

                return grpc.unary_stream_rpc_method_handler(deny_stream, request_deserializer=handler.request_deserializer,
                                                            response_serializer=handler.response_serializer)
            return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)

    return Auth()


def server_credentials(cfg: ServerConfig):
    """grpc server credentials from cfg's PEM files (mTLS when it names a client CA); None without TLS."""
    import grpc

    if not cfg.tls_cert:
        return None
    with open(cfg.tls_key, "rb") as f:
        key = f.read()
    with open(cfg.tls_cert, "rb") as f:
        cert = f.read()
    ca = None
    if cfg.tls_client_ca:
        with open(cfg.tls_client_ca, "rb") as f:
            ca = f.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
