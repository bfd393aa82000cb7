"""`edgeblock deploy`: push a compiled bundle to a device and bring the edge daemon up on it.

Six steps: check the bundle (manifest, sha256 of every file) -> copy (rsync over ssh, or a resumable
Python copy into a local directory) -> verify every file's sha256 on the target -> build TensorRT
engines on the target (skipped where TensorRT is absent) -> restart the service -> gRPC health check.
`--dry-run` prints every step's command and changes nothing. Guide: docs/jetson.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_runtime.fileio import fsync_dir, sha256_file
from edge_runtime.manifest import MANIFEST, ManifestError, load_manifest

log = logging.getLogger("edgeblock.deploy")

DEFAULT_REMOTE_DIR = "/opt/edgeblock/bundle"
DEFAULT_REMOTE_PYTHON = "/opt/edgeblock/venv/bin/python"
DEFAULT_SERVICE = "edgeblock"
DEFAULT_PORT = 50051
STEPS = ("check", "copy", "verify", "engines", "restart", "health")
CHUNK = 4 << 20
TARGET_MODES = "Du=rwx,Dgo=rx,Fu=rw,Fgo=r"  # files 0644, directories 0755 on the target

_DEST = re.compile(r"^([A-Za-z0-9._-]+@)?[A-Za-z0-9._-]+$")  # [user@]host, an IPv4 address or an ssh alias
_REMOTE_PATH = re.compile(r"^[A-Za-z0-9._/+-]+$")  # no spaces or shell characters: it crosses ssh and rsync


class DeployError(RuntimeError):
    """A deployment step that failed (host unreachable, a copy that does not verify, a failed restart or
    health check): the message names the step, the file or the command, and what to do."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------
# Scripts run on the target with `python3 -` (stdin); the same text runs locally for a local target.
# ---------------------------------------------------------------------------------------------
VERIFY_SCRIPT = '''\
# edgeblock deploy, verify step: sha256 of the bundle's files on the target (Python 3 standard library).
import hashlib, json, os, sys

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def main(root, expected):
    bad = {}
    for rel, want in sorted(expected.items()):
        path = os.path.join(root, *rel.split("/"))
        if not os.path.isfile(path):
            bad[rel] = "missing"
            continue
        got = sha256(path)
        if got != want:
            bad[rel] = "sha256 %s... differs from the manifest's %s..." % (got[:12], want[:12])
    print("EDGEBLOCK-VERIFY " + json.dumps({"checked": len(expected), "bad": bad}), flush=True)
'''

ENGINES_SCRIPT = '''\
# edgeblock deploy, engines step: build (or reuse) the bundle's TensorRT engines with edge_runtime.engines.
import json, os, sys

def report(status, **fields):
    fields["status"] = status
    print("EDGEBLOCK-ENGINES " + json.dumps(fields), flush=True)

def main(bundle):
    try:
        from edge_runtime import engines
    except Exception as e:
        return report("skipped", reason="edge_runtime is not importable by %s (%s)" % (sys.executable, e))
    ok, why = engines.tensorrt_available()
    if not ok:
        return report("skipped", reason="TensorRT not available (%s)" % why)
    if not engines.load_plan(bundle)["groups"]:
        return report("skipped", reason="the bundle has no frozen groups")
    built = engines.build_engines(bundle, progress=lambda m: print(m, file=sys.stderr, flush=True))
    # Engines are written 0600 (temp file + rename): make them readable by the service user.
    for root, dirs, files in os.walk(os.path.join(bundle, "engines")):
        for name, mode in [(d, 0o755) for d in dirs] + [(f, 0o644) for f in files]:
            try:
                os.chmod(os.path.join(root, name), mode)
            except OSError:
                pass
    report("built", tensorrt=built["tensorrt_version"], gpu=built["gpu_name"], groups=len(built["groups"]),
           cached=sum(1 for g in built["groups"] if g["cached"]))

main(sys.argv[1])
'''


def verify_script(expected: dict[str, str]) -> str:
    """VERIFY_SCRIPT with the expected {relative path: sha256} baked in (argv carries only the directory)."""
    return VERIFY_SCRIPT + f"\nmain(sys.argv[1], json.loads({json.dumps(expected, sort_keys=True)!r}))\n"


# ---------------------------------------------------------------------------------------------
# Options and the target
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Running commands
# ---------------------------------------------------------------------------------------------
def _ssh_base(opts: DeployOptions) -> list[str]:
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={opts.connect_timeout}"]
    if opts.ssh_port:
        cmd += ["-p", str(opts.ssh_port)]
    for o in opts.ssh_options:
        cmd += ["-o", o]
    return cmd


def _on_target(target: Target, opts: DeployOptions, argv: list[str]) -> list[str]:
    """argv as run on the target: itself for a local target, through ssh (quoted for the remote shell) else."""
    if target.local:
        return list(argv)
    return [*_ssh_base(opts), target.dest, " ".join(shlex.quote(a) for a in argv)]


def _show(argv: list[str], stdin_note: str | None = None) -> str:
    line = " ".join(shlex.quote(a) for a in argv)
    return f"{line} < {stdin_note}" if stdin_note else line


@dataclass
class _Ran:
    rc: int
    stdout: str
    stderr_tail: str


def _run(argv: list[str], stdin: str | None = None, echo_stderr: bool = True,
         on_stdout: Callable[[str], None] | None = None) -> _Ran:
    """Run argv (no shell): stdout captured (and fed line by line to on_stdout, with '\\r' as a line end too,
    for rsync's progress), stderr echoed live and its tail kept for error messages."""
    log.debug("run: %s", _show(argv))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        return _Ran(127, "", f"{argv[0]}: command not found")
    tail: deque[str] = deque(maxlen=20)

    def pump_err() -> None:
        for raw in iter(proc.stderr.readline, b""):
            text = raw.decode(errors="replace")
            tail.append(text.rstrip("\n"))
            if echo_stderr:
                sys.stderr.write(text)
                sys.stderr.flush()

    t = threading.Thread(target=pump_err, daemon=True)
    t.start()
    if stdin is not None:
        def feed() -> None:
            try:
                proc.stdin.write(stdin.encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass

        threading.Thread(target=feed, daemon=True).start()
    out, buf = [], b""
    while True:
        chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(65536)
        if not chunk:
            break
        buf += chunk
        while True:
            m = re.search(rb"[\r\n]", buf)
            if not m:
                break
            line, buf = buf[: m.start()].decode(errors="replace"), buf[m.end():]
            out.append(line)
            if on_stdout is not None:
                on_stdout(line)
    if buf:
        out.append(buf.decode(errors="replace"))
        if on_stdout is not None:
            on_stdout(out[-1])
    rc = proc.wait()
    t.join(5)
    return _Ran(rc, "\n".join(out), "\n".join(tail))


def _tagged(stdout: str, tag: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    return None


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------
def check_bundle(bundle: str) -> tuple[dict[str, str], dict[str, int], object]:
    """Validate the bundle (schema, every file's sha256). Returns ({rel: sha256} with manifest.json last,
    {rel: size}, the Manifest). Raises FileNotFoundError / ManifestError."""
    if not os.path.isdir(bundle):
        raise FileNotFoundError(f"--bundle {bundle}: no such directory")
    manifest = load_manifest(bundle, verify_files=True)
    expected = dict(sorted(manifest.files.items()))
    expected[MANIFEST] = sha256_file(os.path.join(bundle, MANIFEST))
    sizes = {rel: os.path.getsize(os.path.join(bundle, *rel.split("/"))) for rel in expected}
    return expected, sizes, manifest


def _check_local_dest(bundle: str, target: Target, expected: dict[str, str]) -> None:
    src, dst = os.path.realpath(bundle), os.path.realpath(target.path)
    if src == dst or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
        raise ValueError(f"--host {target}: the target and the bundle {bundle} overlap; give another directory")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"--host {target}: {dst} exists and is not a directory")
    if os.path.isdir(dst):
        # An empty directory, an earlier bundle or an interrupted copy of this one; never someone's home.
        ours = {rel.split("/", 1)[0] for rel in expected} | {"engines"}
        other = sorted(n for n in os.listdir(dst) if n.split(".part")[0] not in ours)
        if other and not os.path.exists(os.path.join(dst, MANIFEST)):
            raise ValueError(f"--host {target}: {dst} holds files that are not part of a bundle "
                             f"({', '.join(other[:5])}); give an empty directory or an earlier bundle's")


def _copy_file_local(src: str, dst: str, want: str, bar) -> int:
    """Copy src to dst through dst.part (resumed when a shorter .part is there), checked against `want`,
    fsynced and renamed. Returns the bytes kept from an earlier .part."""
    part = dst + ".part"
    size = os.path.getsize(src)
    for attempt in (0, 1):
        kept = os.path.getsize(part) if attempt == 0 and os.path.isfile(part) else 0
        if kept > size:
            kept = 0
        bar.update(kept)
        with open(src, "rb") as fi, open(part, "r+b" if kept else "wb") as fo:
            fi.seek(kept)
            fo.seek(kept)
            fo.truncate()
            while block := fi.read(CHUNK):
                fo.write(block)
                bar.update(len(block))
            fo.flush()
            os.fsync(fo.fileno())
        if sha256_file(part) == want:
            os.chmod(part, 0o644)  # as rsync's TARGET_MODES: readable by the service user
            os.replace(part, dst)
            return kept
        bar.update(-size)  # the kept part was not a prefix of this file: copy it whole once more
    os.unlink(part)
    raise DeployError(f"copy: {dst} does not match the manifest's sha256 after copying: the source changed "
                      "while copying, or the target's storage is failing")


def _copy_local(bundle: str, target: Target, files: list[str], expected: dict[str, str], sizes: dict[str, int],
                result: DeployResult, force: bool, progress: bool) -> list[str]:
    """Copy `files` (manifest.json last) into the local target; without force, a file whose sha256 already
    matches is skipped. Returns the files written."""
    from tqdm import tqdm

    todo = []
    for rel in files:
        dst = os.path.join(target.path, *rel.split("/"))
        if not force and os.path.isfile(dst) and os.path.getsize(dst) == sizes[rel] and sha256_file(dst) == expected[rel]:
            continue
        todo.append(rel)
    todo.sort(key=lambda r: r == MANIFEST)  # the manifest last: an interrupted copy never looks complete
    written = []
    with tqdm(total=sum(sizes[r] for r in todo), desc="copy", unit="B", unit_scale=True, unit_divisor=1024,
              disable=not progress or not todo, dynamic_ncols=True) as bar:
        for rel in todo:
            dst = os.path.join(target.path, *rel.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            kept = _copy_file_local(os.path.join(bundle, *rel.split("/")), dst, expected[rel], bar)
            if kept:
                result.resumed[rel] = kept
            written.append(rel)
    for d in {os.path.dirname(os.path.join(target.path, *r.split("/"))) for r in written}:
        fsync_dir(d)  # the renames survive a power cut
    return written


def _rsync_cmd(target: Target, opts: DeployOptions, bundle: str, manifest_only: bool, again: bool,
               progress2: bool) -> list[str]:
    ssh = " ".join(shlex.quote(a) for a in _ssh_base(opts))
    # Readable by the service user whatever the host's modes (compile writes some files 0600).
    cmd = ["rsync", "-rlpt", f"--chmod={TARGET_MODES}", "--partial", "--out-format=EDGEBLOCK-SENT %n", "-e", ssh]
    if again:
        cmd.append("--ignore-times")  # re-send files that failed verification even if size and mtime agree
    if progress2:
        cmd.append("--info=progress2")
    if manifest_only:
        return [*cmd, os.path.join(bundle, MANIFEST), f"{target.dest}:{target.path}/{MANIFEST}"]
    return [*cmd, "--files-from=-", bundle.rstrip("/") + "/", f"{target.dest}:{target.path}/"]


def _rsync_has_progress2() -> bool:
    try:
        out = subprocess.run(["rsync", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    m = re.search(r"version\s+(\d+)\.(\d+)", out)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (3, 1)


def _copy_rsync(bundle: str, target: Target, files: list[str], sizes: dict[str, int], opts: DeployOptions,
                result: DeployResult, again: bool) -> list[str]:
    """rsync `files` (manifest.json, if among them, in a second transfer after the rest). Returns the files
    rsync reported sent."""
    from tqdm import tqdm

    progress2 = _rsync_has_progress2()
    data = [r for r in files if r != MANIFEST]
    sent: list[str] = []
    total = sum(sizes[r] for r in files)
    with tqdm(total=total, desc="copy", unit="B", unit_scale=True, unit_divisor=1024, disable=not opts.progress,
              dynamic_ncols=True) as bar:
        def on_line(line: str) -> None:
            if line.startswith("EDGEBLOCK-SENT "):
                name = line[len("EDGEBLOCK-SENT "):]
                if not name.endswith("/"):
                    sent.append(name)
                    if not progress2:
                        bar.update(sizes.get(name, 0))
            elif progress2:
                m = re.match(r"^\s*[\d,.]+\s+(\d+)%", line)
                if m:
                    bar.n = min(total, int(total * int(m.group(1)) / 100))
                    bar.refresh()

        for manifest_only, listing in ((False, data), (True, [MANIFEST] if MANIFEST in files else [])):
            if not listing:
                continue
            cmd = _rsync_cmd(target, opts, bundle, manifest_only, again, progress2)
            result.commands.append(cmd)
            ran = _run(cmd, stdin=None if manifest_only else "".join(f"{r}\n" for r in listing), on_stdout=on_line)
            if ran.rc != 0:
                hint = " (ssh could not connect)" if ran.rc == 255 else ""
                raise DeployError(f"copy: rsync to {target} failed with exit {ran.rc}{hint}: "
                                  f"{ran.stderr_tail[-800:] or 'no message'}")
        bar.n = total
        bar.refresh()
    return [s.replace("/./", "/") for s in sent]


def _verify(target: Target, opts: DeployOptions, expected: dict[str, str], python: str,
            result: DeployResult) -> dict[str, str]:
    """Run the verify script on the target; returns {file: reason} of the files that do not match."""
    cmd = _on_target(target, opts, [python, "-", target.path])
    result.commands.append(cmd)
    ran = _run(cmd, stdin=verify_script(expected))
    report = _tagged(ran.stdout, "EDGEBLOCK-VERIFY")
    if ran.rc != 0 or report is None:
        raise DeployError(f"verify: `{_show(cmd)}` failed with exit {ran.rc}: "
                          f"{ran.stderr_tail[-800:] or ran.stdout[-800:] or 'no output'}")
    return report["bad"]


def _ssh_reachable(target: Target, opts: DeployOptions, result: DeployResult) -> None:
    cmd = _on_target(target, opts, ["mkdir", "-p", target.path])
    result.commands.append(cmd)
    ran = _run(cmd, echo_stderr=False)
    if ran.rc == 255:
        raise DeployError(f"copy: cannot reach {target.dest} over ssh (exit 255): {ran.stderr_tail or 'no message'}. "
                          "Check the host name, that key-based login works (`ssh " + target.dest + " true`; "
                          "deploy never asks for a password) and --ssh-port")
    if ran.rc != 0:
        raise DeployError(f"copy: cannot create {target.path} on {target.dest} (exit {ran.rc}): "
                          f"{ran.stderr_tail or 'no message'}")


def _restart_cmd(target: Target, opts: DeployOptions) -> list[str] | None:
    if opts.restart_cmd:
        if target.local:
            return shlex.split(opts.restart_cmd)
        return [*_ssh_base(opts), target.dest, opts.restart_cmd]
    if target.local:
        return None
    argv = ["systemctl", "restart", opts.service]
    if opts.sudo and target.user != "root":
        argv = ["sudo", "-n", *argv]
    return _on_target(target, opts, argv)


def check_health(address: str, timeout: float, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None) -> str:
    """Poll grpc.health.v1 on `address` until it answers SERVING; DeployError after `timeout` seconds."""
    try:
        from .client import ClientError, EdgeClient
    except ImportError as e:
        raise DeployError(f"health: the check needs grpcio ({e}); pip install 'edgeblock[device]' or --skip-health")
    deadline = time.monotonic() + timeout
    last = "no answer"
    with EdgeClient(address, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, timeout=min(5.0, timeout)) as client:
        while time.monotonic() < deadline:
            try:
                last = client.health()
                if last == "SERVING":
                    return last
            except ClientError as e:
                last = str(e)
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise DeployError(f"health: {address} did not answer SERVING within {timeout:g} s (last: {last})")


# ---------------------------------------------------------------------------------------------
# The whole deployment
# ---------------------------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def deploy(opts: DeployOptions, say: Callable[[str], None] = print) -> DeployResult:
    """Run (or, with dry_run, print) the six steps. Raises ValueError / FileNotFoundError / ManifestError for
    bad input (before anything is copied) and DeployError when a step fails."""
    target = parse_target(opts.host, opts.remote_dir)
    if opts.health_timeout <= 0:
        raise ValueError(f"--health-timeout must be positive, got {opts.health_timeout}")
    if opts.skip_engines and opts.require_engines:
        raise ValueError("--skip-engines and --require-engines contradict each other")
    if opts.no_restart and opts.restart_cmd:
        raise ValueError("--no-restart and --restart-cmd contradict each other")
    for flag in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(opts, flag)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file")
    result = DeployResult(target=str(target), dry_run=opts.dry_run)
    n = len(STEPS)
    step = {name: f"[deploy] {i}/{n} {name}" for i, name in enumerate(STEPS, 1)}
    dry = opts.dry_run

    def would(cmd: list[str], note: str | None = None) -> None:
        result.commands.append(cmd)
        say(f"    $ {_show(cmd, note)}")

    # 1. check --------------------------------------------------------------------------------
    expected, sizes, manifest = check_bundle(opts.bundle)
    result.files, result.bytes_total = len(expected), sum(sizes.values())
    say(f"{step['check']}: {opts.bundle}: {manifest.family}, {len(expected)} files, {_mib(result.bytes_total)}; "
        "every sha256 matches the manifest")
    if target.local:
        _check_local_dest(opts.bundle, target, expected)
    if dry:
        say("[deploy] dry run: the commands below are printed, not run; nothing is copied, built or restarted")
    files = list(expected)
    python = sys.executable if target.local else "python3"
    engines_python = opts.remote_python or (sys.executable if target.local else DEFAULT_REMOTE_PYTHON)

    # 2. copy ---------------------------------------------------------------------------------
    if target.local:
        say(f"{step['copy']}: {len(files)} files to {target.path} (Python copy: a file whose sha256 already "
            "matches is skipped, others are written to FILE.part (resumed if one is there) and renamed; "
            "manifest.json last)")
        if dry:
            have = [r for r in files if os.path.isfile(os.path.join(target.path, *r.split("/")))
                    and sha256_file(os.path.join(target.path, *r.split("/"))) == expected[r]]
            say(f"    would copy {len(files) - len(have)} files, skip {len(have)} already there")
        else:
            os.makedirs(target.path, exist_ok=True)
            result.copied = _copy_local(opts.bundle, target, files, expected, sizes, result, force=False,
                                        progress=opts.progress)
            result.skipped = len(files) - len(result.copied)
            resumed = f", {len(result.resumed)} resumed from .part" if result.resumed else ""
            say(f"    copied {len(result.copied)} files ({_mib(sum(sizes[r] for r in result.copied))}), "
                f"{result.skipped} already there{resumed}")
    else:
        missing = [t for t in ("rsync", "ssh") if shutil.which(t) is None]
        say(f"{step['copy']}: {len(files)} files to {target} with rsync over ssh (--partial: an interrupted "
            "copy resumes; manifest.json last)")
        if missing and not dry:
            raise DeployError(f"copy: {' and '.join(missing)} not found on this machine: deploying to an ssh host "
                              f"needs {' and '.join(missing)} (e.g. apt install {' '.join(missing)}); "
                              "a local directory target (--host local:DIR) needs neither")
        if dry:
            if missing:
                say(f"    note: {' and '.join(missing)} not found on this machine: the real run would stop here")
            would(_on_target(target, opts, ["mkdir", "-p", target.path]))
            would(_rsync_cmd(target, opts, opts.bundle, False, False, True), f"[the {len(files) - 1} data files]")
            would(_rsync_cmd(target, opts, opts.bundle, True, False, True))
        else:
            _ssh_reachable(target, opts, result)
            result.copied = _copy_rsync(opts.bundle, target, files, sizes, opts, result, again=False)
            result.skipped = len(files) - len(result.copied)
            say(f"    rsync sent {len(result.copied)} files, {result.skipped} unchanged")

    # 3. verify -------------------------------------------------------------------------------
    say(f"{step['verify']}: sha256 of every file on the target against the manifest")
    verify_cmd = _on_target(target, opts, [python, "-", target.path])
    if dry:
        would(verify_cmd, f"[verify script: sha256 of {len(files)} files]")
    else:
        bad = _verify(target, opts, expected, python, result)
        if bad:
            say(f"    {len(bad)} file(s) do not match, copying them again: "
                + ", ".join(f"{r} ({why})" for r, why in sorted(bad.items())))
            again = [r for r in files if r in bad]
            if target.local:
                _copy_local(opts.bundle, target, again, expected, sizes, result, force=True, progress=opts.progress)
            else:
                _copy_rsync(opts.bundle, target, again, sizes, opts, result, again=True)
            result.recopied = again
            bad = _verify(target, opts, {r: expected[r] for r in again}, python, result)
            if bad:
                raise DeployError("verify: after copying again, still not matching the manifest on "
                                  f"{target}: " + "; ".join(f"{r}: {why}" for r, why in sorted(bad.items()))
                                  + ". The target's storage may be failing or full")
        result.verified = len(files)
        say(f"    {len(files)} files match")

    # 4. engines ------------------------------------------------------------------------------
    engines_cmd = _on_target(target, opts, [engines_python, "-", target.path])
    if opts.skip_engines:
        result.engines = {"status": "skipped", "reason": "--skip-engines"}
        say(f"{step['engines']}: skipped (--skip-engines)")
    else:
        say(f"{step['engines']}: TensorRT engines for the frozen groups, built on the target with {engines_python}")
        if dry:
            would(engines_cmd, "[engines script: edge_runtime.engines.build_engines]")
        else:
            result.commands.append(engines_cmd)
            ran = _run(engines_cmd, stdin=ENGINES_SCRIPT)
            report = _tagged(ran.stdout, "EDGEBLOCK-ENGINES")
            if ran.rc == 127 and report is None:
                report = {"status": "skipped", "reason": f"{engines_python} not found on the target (--remote-python)"}
            if report is None or ran.rc != 0:
                raise DeployError(f"engines: the TensorRT build failed (exit {ran.rc}): "
                                  f"{ran.stderr_tail[-1200:] or 'no message'}. Fix it, or deploy with --skip-engines "
                                  "(the frozen groups then run on ONNX Runtime)")
            result.engines = report
            if report["status"] == "built":
                say(f"    built: {report['groups']} engine(s) ({report['cached']} from the cache), TensorRT "
                    f"{report['tensorrt']} on {report['gpu']}")
            else:
                say(f"    skipped: {report['reason']}; the frozen groups run on ONNX Runtime")
                if opts.require_engines:
                    raise DeployError(f"engines: required (--require-engines) but skipped: {report['reason']}")

    # 5. restart ------------------------------------------------------------------------------
    restart = None if opts.no_restart else _restart_cmd(target, opts)
    if restart is None:
        why = "--no-restart" if opts.no_restart else "a local target restarts only with --restart-cmd"
        result.restart = f"skipped: {why}"
        say(f"{step['restart']}: skipped ({why})")
    else:
        say(f"{step['restart']}: " + (f"`{opts.restart_cmd}`" if opts.restart_cmd else f"service {opts.service}"))
        if dry:
            would(restart)
        else:
            result.commands.append(restart)
            ran = _run(restart)
            if ran.rc != 0:
                hint = "" if opts.restart_cmd or not opts.sudo else (
                    " (the ssh user needs passwordless sudo for systemctl, or deploy as root, or --restart-cmd)")
                raise DeployError(f"restart: `{_show(restart)}` failed with exit {ran.rc}{hint}: "
                                  f"{ran.stderr_tail[-800:] or 'no message'}")
            result.restart = "restarted"
            say("    done")

    # 6. health -------------------------------------------------------------------------------
    addr = opts.health_addr or (None if target.local else f"{target.hostname}:{DEFAULT_PORT}")
    if opts.skip_health or addr is None:
        why = "--skip-health" if opts.skip_health else "no --health-addr for a local target"
        result.health = f"skipped: {why}"
        say(f"{step['health']}: skipped ({why})")
    else:
        say(f"{step['health']}: grpc.health.v1 Check on {addr} until SERVING (timeout {opts.health_timeout:g} s)")
        if dry:
            say(f"    would poll {addr}")
        else:
            try:
                result.health = check_health(addr, opts.health_timeout, opts.tls_ca, opts.tls_cert, opts.tls_key)
            except DeployError as e:
                if not target.local and opts.restart_cmd is None:
                    raise DeployError(f"{e}. On the device: `journalctl -u {opts.service} -n 50`") from None
                raise
            say(f"    {addr}: {result.health}")
    return result


# ---------------------------------------------------------------------------------------------
# The command line (registered by edgeblock.cli)
# ---------------------------------------------------------------------------------------------
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
