"""The engines step on the target: run the build script with the target's edge_runtime Python and read its
EDGEBLOCK-ENGINES report (built, or skipped with the reason: no TensorRT, no frozen groups, no Python).
"""

from __future__ import annotations

from .options import DeployError, DeployResult
from .process import run, tagged
from .scripts import engines_script


def build_on_target(cmd: list[str], engines_python: str, result: DeployResult) -> dict:
    """Run `cmd` (PYTHON - BUNDLE_DIR on the target) with the engines script on stdin; returns its report
    ({"status": "built", ...} or {"status": "skipped", "reason": ...}); DeployError when the build fails."""
    result.commands.append(cmd)
    ran = run(cmd, stdin=engines_script())
    report = tagged(ran.stdout, "EDGEBLOCK-ENGINES")
    if ran.rc == 127 and report is None:
        report = {"status": "skipped", "reason": f"{engines_python} not found on the target (--remote-python)"}
    if report is None or ran.rc != 0:
        raise DeployError(f"engines: the TensorRT build failed (exit {ran.rc}): "
                          f"{ran.stderr_tail[-1200:] or 'no message'}. Fix it, or deploy with --skip-engines "
                          "(the frozen groups then run on ONNX Runtime)")
    return report
