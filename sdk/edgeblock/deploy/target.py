"""Where the bundle goes: `--host` parsed into a Target (a local directory or an ssh host), and the argv of
every command that reaches it (ssh, rsync, the restart), built here and run (or printed) by the pipeline.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass

from edge_runtime.manifest import MANIFEST

from .options import DEFAULT_REMOTE_DIR, DeployOptions

TARGET_MODES = "Du=rwx,Dgo=rx,Fu=rw,Fgo=r"  # files 0644, directories 0755 on the target

_DEST = re.compile(r"^([A-Za-z0-9._-]+@)?[A-Za-z0-9._-]+$")  # [user@]host, an IPv4 address or an ssh alias
_REMOTE_PATH = re.compile(r"^[A-Za-z0-9._/+-]+$")  # no spaces or shell characters: it crosses ssh and rsync


@dataclass(frozen=True)
class Target:
    kind: str  # "local" | "ssh"
    path: str  # the bundle directory on the target
    dest: str = ""  # ssh destination, [user@]host

    @property
    def local(self) -> bool:
        return self.kind == "local"

    @property
    def hostname(self) -> str:
        return self.dest.rsplit("@", 1)[-1]

    @property
    def user(self) -> str | None:
        return self.dest.rsplit("@", 1)[0] if "@" in self.dest else None

    def __str__(self) -> str:
        return f"local:{self.path}" if self.local else f"{self.dest}:{self.path}"


def parse_target(host: str, remote_dir: str | None = None) -> Target:
    """`local:DIR` or a path ("/", ".", "~") -> a local directory; `[user@]host[:DIR]` -> an ssh host."""
    if not host:
        raise ValueError("--host is empty: give [user@]host[:DIR] (ssh) or local:DIR (a directory here)")
    if host.startswith(("local:", "/", ".", "~")):
        path = host.removeprefix("local:")
        if not path:
            raise ValueError("--host local:DIR needs a directory after 'local:'")
        if remote_dir:
            raise ValueError("--remote-dir is for ssh hosts; a local target is the directory given in --host")
        return Target("local", os.path.abspath(os.path.expanduser(path)))
    dest, sep, path = host.partition(":")
    if not _DEST.match(dest):
        raise ValueError(f"--host {host!r}: expected [user@]host[:DIR] (a hostname, IPv4 address or ssh alias; "
                         "use an ssh config alias for IPv6) or local:DIR")
    if sep and remote_dir and remote_dir != path:
        raise ValueError(f"--host names the directory {path!r} and --remote-dir {remote_dir!r}: give one")
    path = (path if sep else remote_dir) or DEFAULT_REMOTE_DIR
    if not _REMOTE_PATH.match(path) or "/../" in f"/{path}/":
        raise ValueError(f"remote bundle directory {path!r}: use letters, digits and . _ / + - only (no spaces, '~' "
                         "or shell characters, no '..'; a relative path is relative to the login's home)")
    return Target("ssh", path, dest)


def ssh_base(opts: DeployOptions) -> list[str]:
    """`ssh` with the options every call shares: never a password prompt, a connect timeout, --ssh-port/-option."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={opts.connect_timeout}"]
    if opts.ssh_port:
        cmd += ["-p", str(opts.ssh_port)]
    for o in opts.ssh_options:
        cmd += ["-o", o]
    return cmd


def on_target(target: Target, opts: DeployOptions, argv: list[str]) -> list[str]:
    """argv as run on the target: itself for a local target, through ssh (quoted for the remote shell) else."""
    if target.local:
        return list(argv)
    return [*ssh_base(opts), target.dest, " ".join(shlex.quote(a) for a in argv)]


def rsync_cmd(target: Target, opts: DeployOptions, bundle: str, manifest_only: bool, again: bool,
              progress2: bool) -> list[str]:
    """rsync of the bundle's data files (listed on stdin, --files-from=-) or, with manifest_only, of
    manifest.json alone; `again` re-sends files whose size and mtime agree (they failed verification)."""
    ssh = " ".join(shlex.quote(a) for a in ssh_base(opts))
    # Readable by the service user whatever the host's modes (compile writes some files 0600).
    cmd = ["rsync", "-rlpt", f"--chmod={TARGET_MODES}", "--partial", "--out-format=EDGEBLOCK-SENT %n", "-e", ssh]
    if again:
        cmd.append("--ignore-times")  # re-send files that failed verification even if size and mtime agree
    if progress2:
        cmd.append("--info=progress2")
    if manifest_only:
        return [*cmd, os.path.join(bundle, MANIFEST), f"{target.dest}:{target.path}/{MANIFEST}"]
    return [*cmd, "--files-from=-", bundle.rstrip("/") + "/", f"{target.dest}:{target.path}/"]


def restart_cmd(target: Target, opts: DeployOptions) -> list[str] | None:
    """The restart's argv: --restart-cmd (over ssh on an ssh host), else `[sudo -n] systemctl restart SERVICE`
    on an ssh host; None for a local target without --restart-cmd (nothing to restart)."""
    if opts.restart_cmd:
        if target.local:
            return shlex.split(opts.restart_cmd)
        return [*ssh_base(opts), target.dest, opts.restart_cmd]
    if target.local:
        return None
    argv = ["systemctl", "restart", opts.service]
    if opts.sudo and target.user != "root":
        argv = ["sudo", "-n", *argv]
    return on_target(target, opts, argv)
