"""What a deployment is asked to do and what it reports: DeployOptions (the flags of `edgeblock deploy`),
DeployResult (what each step did), DeployError (a step that failed), and the defaults they share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_REMOTE_DIR = "/opt/edgeblock/bundle"
DEFAULT_REMOTE_PYTHON = "/opt/edgeblock/venv/bin/python"
DEFAULT_SERVICE = "edgeblock"
DEFAULT_PORT = 50051
STEPS = ("check", "copy", "verify", "engines", "restart", "health")


class DeployError(RuntimeError):
    """A deployment step that failed (host unreachable, a copy that does not verify, a failed restart or
    health check): the message names the step, the file or the command, and what to do."""

    exit_code = 1


@dataclass
class DeployOptions:
    bundle: str
    host: str  # "[user@]host[:DIR]" (ssh) or "local:DIR" / a path starting with "/", "." or "~" (a local directory)
    remote_dir: str | None = None  # the bundle directory on an ssh host (default DEFAULT_REMOTE_DIR)
    service: str = DEFAULT_SERVICE
    restart_cmd: str | None = None  # replaces `systemctl restart SERVICE`; the only restart of a local target
    no_restart: bool = False
    sudo: bool = True  # ssh: `sudo -n systemctl ...` unless the ssh user is root
    health_addr: str | None = None  # default: HOST:50051 for ssh hosts; none (skipped) for local targets
    health_timeout: float = 120.0
    skip_health: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    skip_engines: bool = False
    require_engines: bool = False
    remote_python: str | None = None  # runs the engines step (needs edge_runtime); default per target
    ssh_port: int | None = None
    ssh_options: list[str] = field(default_factory=list)  # extra `-o KEY=VALUE` for ssh
    connect_timeout: int = 10
    dry_run: bool = False
    progress: bool = True


@dataclass
class DeployResult:
    target: str
    dry_run: bool
    files: int = 0  # files of the bundle, manifest.json included
    bytes_total: int = 0
    copied: list[str] = field(default_factory=list)  # files written on the target (first pass)
    skipped: int = 0  # files already on the target with the right sha256 (local) / unchanged (rsync)
    resumed: dict[str, int] = field(default_factory=dict)  # local copy: file -> bytes kept from a .part
    recopied: list[str] = field(default_factory=list)  # files that failed verification and were copied again
    verified: int = 0
    engines: dict = field(default_factory=dict)  # {"status": built|skipped|..., ...}
    restart: str = ""
    health: str = ""
    commands: list[list[str]] = field(default_factory=list)  # every external command, run or (dry run) printed
