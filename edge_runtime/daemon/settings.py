"""The daemon's settings in force as GetInfo reports them (Info.settings): what it was started with,
after flags, config file and built-in defaults were merged into its ServerConfig."""

from __future__ import annotations

from typing import Any

from .config import ServerConfig


def settings_msg(cfg: ServerConfig) -> Any:
    from ..api import edgeblock_pb2 as pb
    from .server import KEEPALIVE_TIME_S

    s = pb.Settings(listen=cfg.listen, state_dir=cfg.state_dir, auth=bool(cfg.token), tls=bool(cfg.tls_cert),
                    mtls=bool(cfg.tls_client_ca), allow_insecure_remote=cfg.allow_insecure_remote,
                    trainer=cfg.trainer, train_device=cfg.train_device, threads=int(cfg.threads or 0),
                    workers=int(cfg.workers), prompt_cache_mb=float(cfg.prompt_cache_mb),
                    log_level="info", log_format="text")
    s.keepalive_time.FromNanoseconds(int(KEEPALIVE_TIME_S * 1e9))
    return s
