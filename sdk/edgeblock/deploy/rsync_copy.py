"""Copying the bundle to an ssh host with rsync: `mkdir -p` first (which also tells an unreachable host),
then the data files, then manifest.json alone (an interrupted copy never looks complete), with a progress bar.
"""

from __future__ import annotations

import re
import subprocess

from edge_runtime.manifest import MANIFEST

from .options import DeployError, DeployOptions, DeployResult
from .process import run
from .target import Target, on_target, rsync_cmd


def ssh_reachable(target: Target, opts: DeployOptions, result: DeployResult) -> None:
    """`mkdir -p DIR` on the host: DeployError naming the fix when ssh cannot connect or the mkdir fails."""
    cmd = on_target(target, opts, ["mkdir", "-p", target.path])
    result.commands.append(cmd)
    ran = run(cmd, echo_stderr=False)
    if ran.rc == 255:
        raise DeployError(f"copy: cannot reach {target.dest} over ssh (exit 255): {ran.stderr_tail or 'no message'}. "
                          "Check the host name, that key-based login works (`ssh " + target.dest + " true`; "
                          "deploy never asks for a password) and --ssh-port")
    if ran.rc != 0:
        raise DeployError(f"copy: cannot create {target.path} on {target.dest} (exit {ran.rc}): "
                          f"{ran.stderr_tail or 'no message'}")


def _rsync_has_progress2() -> bool:
    try:
        out = subprocess.run(["rsync", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    m = re.search(r"version\s+(\d+)\.(\d+)", out)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (3, 1)


def copy_rsync(bundle: str, target: Target, files: list[str], sizes: dict[str, int], opts: DeployOptions,
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
            cmd = rsync_cmd(target, opts, bundle, manifest_only, again, progress2)
            result.commands.append(cmd)
            ran = run(cmd, stdin=None if manifest_only else "".join(f"{r}\n" for r in listing), on_stdout=on_line)
            if ran.rc != 0:
                hint = " (ssh could not connect)" if ran.rc == 255 else ""
                raise DeployError(f"copy: rsync to {target} failed with exit {ran.rc}{hint}: "
                                  f"{ran.stderr_tail[-800:] or 'no message'}")
        bar.n = total
        bar.refresh()
    return [s.replace("/./", "/") for s in sent]
