"""The command line of `edgeblock deploy`: its flags (register, called by edgeblock.cli.build_parser) and
cmd_deploy, which turns them into DeployOptions, runs the pipeline and maps errors to messages and exit codes.
"""

from __future__ import annotations

import argparse
import sys

from edge_runtime.manifest import ManifestError

from .options import DEFAULT_REMOTE_DIR, DEFAULT_REMOTE_PYTHON, DEFAULT_SERVICE, DeployError, DeployOptions
from .pipeline import deploy


def cmd_deploy(args: argparse.Namespace) -> int:
    opts = DeployOptions(
        bundle=args.bundle, host=args.host, remote_dir=args.remote_dir, service=args.service,
        restart_cmd=args.restart_cmd, no_restart=args.no_restart, sudo=not args.no_sudo,
        health_addr=args.health_addr, health_timeout=args.health_timeout, skip_health=args.skip_health,
        tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, skip_engines=args.skip_engines,
        require_engines=args.require_engines, remote_python=args.remote_python, ssh_port=args.ssh_port,
        ssh_options=list(args.ssh_option or []), dry_run=args.dry_run, progress=not args.quiet,
    )
    try:
        r = deploy(opts)
    except DeployError as e:
        print(f"edgeblock deploy: error: {e}", file=sys.stderr)
        return e.exit_code
    except (ManifestError, ValueError, FileNotFoundError) as e:
        print(f"edgeblock deploy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeblock deploy: interrupted (run it again: the copy resumes)", file=sys.stderr)
        return 130
    if r.dry_run:
        print(f"dry run: {len(r.commands)} command(s) printed, nothing changed on {r.target}")
    else:
        print(f"deployed {args.bundle} to {r.target}: {len(r.copied)} copied, {r.skipped} unchanged, "
              f"{r.verified} verified; engines {r.engines.get('status')}; restart {r.restart}; health {r.health}")
    return 0


def register(sub) -> argparse.ArgumentParser:
    """Add `edgeblock deploy` to an argparse subparsers object (edgeblock.cli.build_parser calls this)."""
    d = sub.add_parser("deploy", help="copy a bundle to a device (ssh) or a local directory, verify it, build "
                                      "TensorRT engines there, restart the daemon and check its health")
    d.add_argument("--bundle", required=True, help="a bundle written by `edgeblock compile`")
    d.add_argument("--host", required=True,
                   help="[user@]host[:DIR] (ssh; DIR default " + DEFAULT_REMOTE_DIR + ") or local:DIR (a directory "
                        "on this machine; a path starting with /, . or ~ works too)")
    d.add_argument("--remote-dir", default=None, help="the bundle directory on an ssh host (default "
                   + DEFAULT_REMOTE_DIR + ")")
    d.add_argument("--dry-run", action="store_true", help="print every step and command; change nothing")
    d.add_argument("--service", default=DEFAULT_SERVICE, help="systemd unit restarted on an ssh host (default edgeblock)")
    d.add_argument("--restart-cmd", default=None,
                   help="restart command instead of `sudo -n systemctl restart SERVICE` (run on the host over ssh, "
                        "e.g. 'docker restart edgeblock'); the only restart of a local target")
    d.add_argument("--no-restart", action="store_true", help="do not restart anything")
    d.add_argument("--no-sudo", action="store_true", help="run systemctl without `sudo -n`")
    d.add_argument("--health-addr", default=None,
                   help="host:port of the daemon for the health check (default HOST:50051 for ssh hosts; "
                        "local targets check only when given)")
    d.add_argument("--health-timeout", type=float, default=120.0,
                   help="seconds to wait for SERVING (default 120; a first start that builds engines takes longer)")
    d.add_argument("--skip-health", action="store_true", help="no health check")
    d.add_argument("--tls-ca", default=None, help="CA (PEM) of the daemon's certificate, for the health check")
    d.add_argument("--tls-cert", default=None, help="client certificate (PEM) for an mTLS daemon")
    d.add_argument("--tls-key", default=None, help="client private key (PEM) for an mTLS daemon")
    d.add_argument("--skip-engines", action="store_true", help="do not build TensorRT engines on the target")
    d.add_argument("--require-engines", action="store_true",
                   help="fail when the engines cannot be built (default: skipped without TensorRT)")
    d.add_argument("--remote-python", default=None,
                   help="Python with edge_runtime on the target, for the engines step (default "
                        + DEFAULT_REMOTE_PYTHON + " on ssh hosts, this Python for local targets)")
    d.add_argument("--ssh-port", type=int, default=None)
    d.add_argument("--ssh-option", action="append", default=None, metavar="KEY=VALUE",
                   help="extra ssh -o option (repeatable), e.g. IdentityFile=~/.ssh/jetson")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_deploy)
    return d
