"""`edgeblock serve`: run the edge daemon on a bundle, with the flags of `python -m edge_runtime.server`
(one argument parser, edge_runtime.daemon.config.add_arguments) and its `--config daemon.toml`.
"""

from __future__ import annotations

import argparse


def cmd_serve(args: argparse.Namespace) -> int:
    from edge_runtime.daemon.config import config_kwargs

    kwargs = config_kwargs(args)  # reads --config and checks it and the flags before the daemon (and grpc) load
    from edge_runtime.server import ServerConfig, serve_forever

    rc = serve_forever(ServerConfig(**kwargs))
    return rc if isinstance(rc, int) else 0


def register(sub) -> None:
    """Add serve to `edgeblock`'s subparsers."""
    sv = sub.add_parser("serve", help="run the edge daemon (gRPC) on a compiled bundle")
    from edge_runtime.daemon.config import add_arguments as add_daemon_arguments

    add_daemon_arguments(sv)  # the flags of `python -m edge_runtime.server`
    sv.set_defaults(func=cmd_serve)
