"""The `edgeblock` command line: the only place errors become exit codes and messages.

build_parser() gathers the subcommands, one module per group (each with register(sub)); main() runs one and
turns the library's errors into a message and an exit code. Subcommands mirror docs/ and ../shared/DESIGN.md.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import bundle, daemon_client, generate, jobs, measure, serve

    p = argparse.ArgumentParser(prog="edgeblock", description="On-device DiT personalization (DiT-BlockSkip)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    # In this order, the order `edgeblock --help` lists them in.
    measure.register(sub)  # select, bench, plan, eval
    generate.register(sub)  # generate (in this process or on a daemon)
    bundle.register(sub)  # compile, build-engines
    serve.register(sub)  # serve
    daemon_client.register(sub)  # personalize, adapters
    jobs.register(sub)  # jobs ls|watch|cancel
    from ..deploy import register as _register_deploy

    _register_deploy(sub)  # deploy
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # The daemon client's errors (edgeblock.client.ClientError) carry exit_code 1; usage errors are 2.
        print(f"edgeblock {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
