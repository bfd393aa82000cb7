"""The daemon's settings in force as GetInfo reports them (Info.settings): what it was started with,
after flags, config file and built-in defaults were merged into its ServerConfig."""

from __future__ import annotations

import os
from typing import Any

from .config import ServerConfig


def settings_msg(cfg: ServerConfig) -> Any:
    """Info.settings: the values in force (Info.limits, .defaults and .memory carry the rest)."""
    from ..api import edgeblock_pb2 as pb
    from .server import KEEPALIVE_TIME_S

    s = pb.Settings(config_file=cfg.config_file and os.path.abspath(cfg.config_file),
                    listen=cfg.listen, state_dir=cfg.state_dir, auth=bool(cfg.token), tls=bool(cfg.tls_cert),
                    mtls=bool(cfg.tls_client_ca), allow_insecure_remote=cfg.allow_insecure_remote,
                    trainer=cfg.trainer, train_device=cfg.train_device, threads=int(cfg.threads or 0),
                    workers=int(cfg.workers), prompt_cache_mb=float(cfg.prompt_cache_mb),
                    log_level=cfg.log_level, log_format=cfg.log_format)
    s.keepalive_time.FromNanoseconds(int(KEEPALIVE_TIME_S * 1e9))
    return s
