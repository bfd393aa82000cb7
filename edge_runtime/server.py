"""The edge daemon's entrypoint, `python -m edge_runtime.server --bundle B --listen ADDR --state DIR`
(torch-free): Personalize and Generate over gRPC from a compiled bundle. The daemon lives in the
package edge_runtime.daemon (one idea a module); the names it is used by are re-exported here."""

from __future__ import annotations

import sys

from .daemon.auth import check_security, is_loopback
from .daemon.config import (ConfigError, Defaults, Limits, ServerConfig, add_arguments, config_from_args,
                            config_kwargs)
from .daemon.errors import (DeadlineExceeded, InvalidArgument, NotFoundError, ResourceExhausted, RpcFailure,
                            Unavailable)
from .daemon.jobs import JOB_STATES, TERMINAL, JobQueue, JobRecord
from .daemon.server import Server, main, serve_forever
from .daemon.state import Daemon, lock_state_dir, pick_train_device, pick_trainer

__all__ = [
    "ConfigError", "Daemon", "DeadlineExceeded", "Defaults", "InvalidArgument", "JOB_STATES", "JobQueue", "JobRecord",
    "Limits", "NotFoundError", "ResourceExhausted", "RpcFailure", "Server", "ServerConfig", "TERMINAL", "Unavailable",
    "add_arguments", "check_security", "config_from_args", "config_kwargs", "is_loopback", "lock_state_dir", "main",
    "pick_train_device", "pick_trainer", "serve_forever",
]

if __name__ == "__main__":
    sys.exit(main())
