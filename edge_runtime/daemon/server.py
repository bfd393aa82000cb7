"""The running daemon: a grpc server with the EdgeBlock service, health checking and reflection;
start, graceful stop (the running job checkpoints and resumes on the next start), SIGTERM/SIGINT
handling, and `main`, the device entrypoint (`python -m edge_runtime.server`)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from concurrent import futures
from dataclasses import replace

from ..isolation import block_host_frameworks
from .auth import auth_interceptor, check_security, server_credentials
from .config import ConfigError, ServerConfig, add_arguments, config_from_args
from .logs import configure_logging
from .state import Daemon, pick_trainer

log = logging.getLogger("edgeblock.daemon")


# keepalive: the daemon pings an idle connection every 60 s and drops it after 20 s without an answer (a client
# that went away mid-stream is noticed), and lets clients ping every 20 s or more (edgeblock.client pings every 30 s)
KEEPALIVE_TIME_S = 60.0
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", int(KEEPALIVE_TIME_S * 1000)),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
]


def _max_message(cfg: ServerConfig) -> int:
    """Large enough for a Personalize request at the image limits, so the daemon's own checks answer."""
    return max(256 * 2**20, cfg.limits.max_images * cfg.limits.max_image_bytes + 4 * 2**20)


class Server:
    """A running daemon: gRPC server + Daemon. `port` is the bound port (listen ':0' picks one)."""

    def __init__(self, cfg: ServerConfig):
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from ..api import SERVICE_NAME
        from ..api import edgeblock_pb2_grpc as pb_grpc
        from .service import Servicer, decode_interceptor

        check_security(cfg)
        self.cfg = cfg
        interceptors = [auth_interceptor(cfg.token, SERVICE_NAME)] if cfg.token else []
        interceptors.append(decode_interceptor(SERVICE_NAME))
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="edgeblock-rpc"),
                                  interceptors=interceptors,
                                  options=[("grpc.max_receive_message_length", _max_message(cfg)),
                                           ("grpc.max_send_message_length", _max_message(cfg)),
                                           ("grpc.so_reuseport", 0),  # a second daemon on the port fails
                                           *KEEPALIVE_OPTIONS])
        creds = server_credentials(cfg)
        try:
            if creds is not None:
                self.port = self.server.add_secure_port(cfg.listen, creds)
            else:
                self.port = self.server.add_insecure_port(cfg.listen)
        except RuntimeError as e:  # grpcio raises when the address cannot be bound
            self.port = 0
            why = str(e)
        else:
            why = ""
        if not self.port:
            raise ConfigError(f"cannot listen on {cfg.listen} ({why or 'bind failed'}): is another process "
                              "using that port?")
        # the service state only once the port is ours: a failed start resumes no job
        self.daemon = Daemon(cfg)
        pb_grpc.add_EdgeBlockServicer_to_server(Servicer(self.daemon), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self._health_pb2 = health_pb2
        self._service = SERVICE_NAME

    def start(self) -> Server:
        self.server.start()
        for name in ("", self._service):
            self.health.set(name, self._health_pb2.HealthCheckResponse.SERVING)
        log.info("edgeblock daemon on %s (port %d), bundle %s, trainer %s on %s, executor %s", self.cfg.listen,
                 self.port, self.cfg.bundle, self.daemon.trainer, self.daemon.train_device, self.daemon.bundle.executor)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Graceful: health NOT_SERVING, no new RPCs, the running job checkpoints, then the server stops."""
        self.health.enter_graceful_shutdown()
        self.daemon.shutting_down.set()
        ev = self.server.stop(grace)
        self.daemon.shutdown()
        ev.wait(grace + 1)


def serve_forever(cfg: ServerConfig | None = None, **kwargs) -> int:
    """Run until SIGTERM/SIGINT; exit status 0 after a graceful stop."""
    cfg = cfg or ServerConfig(**kwargs)
    configure_logging(cfg.log_level, cfg.log_format)  # INFO text lines unless configured
    if cfg.config_file:
        log.info("settings from %s (flags given override it)", cfg.config_file)
    names = ("transformers", "diffusers", "peft") if cfg.trainer == "torch" else ("torch", "transformers", "diffusers", "peft")
    already = block_host_frameworks(names, strict=False)
    if already:
        log.warning("host frameworks already imported in this process: %s (the device runtime does not use them)", already)
    from ..memstat import pin_mmap_threshold

    if not pin_mmap_threshold():
        log.info("glibc's mallopt is not available: the mmap threshold keeps its dynamic adjustment")
    if cfg.trainer == "auto":
        cfg = replace(cfg, trainer=pick_trainer("auto"))  # with torch blocked: the ORT check must not load it
        if cfg.trainer == "torch" and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]  # the torch backend trains: let it import torch
    srv = Server(cfg).start()
    print(f"edgeblock daemon listening on {cfg.listen} (port {srv.port})", flush=True)
    stop = threading.Event()

    def handle(signum, _frame):
        log.info("signal %d: stopping (the running job checkpoints and resumes on the next start)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    while not stop.is_set():
        stop.wait(0.5)
    srv.stop()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m edge_runtime.server --bundle B --listen ADDR --state DIR [...]` or `--config daemon.toml [...]`
    (the device entrypoint)."""
    import argparse

    a = add_arguments(argparse.ArgumentParser(prog="edgeblock-daemon")).parse_args(argv)
    try:
        return serve_forever(config_from_args(a))
    except (ConfigError, ValueError, OSError) as e:
        print(f"edgeblock-daemon: error: {e}", file=sys.stderr)
        return 2
