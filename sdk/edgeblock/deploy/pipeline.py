"""The six steps of `edgeblock deploy` in order: check the bundle -> copy -> verify on the target -> build
engines there -> restart -> health check; with dry_run each step prints its commands and changes nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable

from .engines import build_on_target
from .health import check_health
from .local_copy import already_there, check_local_dest, copy_local
from .options import DEFAULT_PORT, DEFAULT_REMOTE_PYTHON, STEPS, DeployError, DeployOptions, DeployResult
from .process import run, show
from .rsync_copy import copy_rsync, ssh_reachable
from .target import on_target, parse_target, restart_cmd, rsync_cmd
from .verify import check_bundle, verify_on_target


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
        say(f"    $ {show(cmd, note)}")

    # 1. check --------------------------------------------------------------------------------
    expected, sizes, manifest = check_bundle(opts.bundle)
    result.files, result.bytes_total = len(expected), sum(sizes.values())
    say(f"{step['check']}: {opts.bundle}: {manifest.family}, {len(expected)} files, {_mib(result.bytes_total)}; "
        "every sha256 matches the manifest")
    if target.local:
        check_local_dest(opts.bundle, target, expected)
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
            have = already_there(target, files, expected)
            say(f"    would copy {len(files) - len(have)} files, skip {len(have)} already there")
        else:
            os.makedirs(target.path, exist_ok=True)
            result.copied = copy_local(opts.bundle, target, files, expected, sizes, result, force=False,
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
            would(on_target(target, opts, ["mkdir", "-p", target.path]))
            would(rsync_cmd(target, opts, opts.bundle, False, False, True), f"[the {len(files) - 1} data files]")
            would(rsync_cmd(target, opts, opts.bundle, True, False, True))
        else:
            ssh_reachable(target, opts, result)
            result.copied = copy_rsync(opts.bundle, target, files, sizes, opts, result, again=False)
            result.skipped = len(files) - len(result.copied)
            say(f"    rsync sent {len(result.copied)} files, {result.skipped} unchanged")

    # 3. verify -------------------------------------------------------------------------------
    say(f"{step['verify']}: sha256 of every file on the target against the manifest")
    verify_cmd = on_target(target, opts, [python, "-", target.path])
    if dry:
        would(verify_cmd, f"[verify script: sha256 of {len(files)} files]")
    else:
        bad = verify_on_target(target, opts, expected, python, result)
        if bad:
            say(f"    {len(bad)} file(s) do not match, copying them again: "
                + ", ".join(f"{r} ({why})" for r, why in sorted(bad.items())))
            again = [r for r in files if r in bad]
            if target.local:
                copy_local(opts.bundle, target, again, expected, sizes, result, force=True, progress=opts.progress)
            else:
                copy_rsync(opts.bundle, target, again, sizes, opts, result, again=True)
            result.recopied = again
            bad = verify_on_target(target, opts, {r: expected[r] for r in again}, python, result)
            if bad:
                raise DeployError("verify: after copying again, still not matching the manifest on "
                                  f"{target}: " + "; ".join(f"{r}: {why}" for r, why in sorted(bad.items()))
                                  + ". The target's storage may be failing or full")
        result.verified = len(files)
        say(f"    {len(files)} files match")

    # 4. engines ------------------------------------------------------------------------------
    engines_cmd = on_target(target, opts, [engines_python, "-", target.path])
    if opts.skip_engines:
        result.engines = {"status": "skipped", "reason": "--skip-engines"}
        say(f"{step['engines']}: skipped (--skip-engines)")
    else:
        say(f"{step['engines']}: TensorRT engines for the frozen groups, built on the target with {engines_python}")
        if dry:
            would(engines_cmd, "[engines script: edge_runtime.engines.build_engines]")
        else:
            report = build_on_target(engines_cmd, engines_python, result)
            result.engines = report
            if report["status"] == "built":
                say(f"    built: {report['groups']} engine(s) ({report['cached']} from the cache), TensorRT "
                    f"{report['tensorrt']} on {report['gpu']}")
            else:
                say(f"    skipped: {report['reason']}; the frozen groups run on ONNX Runtime")
                if opts.require_engines:
                    raise DeployError(f"engines: required (--require-engines) but skipped: {report['reason']}")

    # 5. restart ------------------------------------------------------------------------------
    restart = None if opts.no_restart else restart_cmd(target, opts)
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
            ran = run(restart)
            if ran.rc != 0:
                hint = "" if opts.restart_cmd or not opts.sudo else (
                    " (the ssh user needs passwordless sudo for systemctl, or deploy as root, or --restart-cmd)")
                raise DeployError(f"restart: `{show(restart)}` failed with exit {ran.rc}{hint}: "
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
