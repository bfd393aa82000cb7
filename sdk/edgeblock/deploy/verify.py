"""Checking the bundle's files: on this machine before copying (the manifest's schema and every sha256), and
on the target after copying (the verify script run there, its EDGEBLOCK-VERIFY report read back).
"""

from __future__ import annotations

import os

from edge_runtime.fileio import sha256_file
from edge_runtime.manifest import MANIFEST, load_manifest

from .options import DeployError, DeployOptions, DeployResult
from .process import run, show, tagged
from .scripts import verify_script
from .target import Target, on_target


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


def verify_on_target(target: Target, opts: DeployOptions, expected: dict[str, str], python: str,
                     result: DeployResult) -> dict[str, str]:
    """Run the verify script on the target; returns {file: reason} of the files that do not match."""
    cmd = on_target(target, opts, [python, "-", target.path])
    result.commands.append(cmd)
    ran = run(cmd, stdin=verify_script(expected))
    report = tagged(ran.stdout, "EDGEBLOCK-VERIFY")
    if ran.rc != 0 or report is None:
        raise DeployError(f"verify: `{show(cmd)}` failed with exit {ran.rc}: "
                          f"{ran.stderr_tail[-800:] or ran.stdout[-800:] or 'no output'}")
    return report["bad"]
