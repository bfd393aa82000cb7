"""`edgeblock deploy`: push a compiled bundle to a device and bring the edge daemon up on it.

Six steps: check the bundle (manifest, sha256 of every file) -> copy (rsync over ssh, or a resumable
Python copy into a local directory) -> verify every file's sha256 on the target -> build TensorRT
engines on the target (skipped where TensorRT is absent) -> restart the service -> gRPC health check.
`--dry-run` prints every step's command and changes nothing. Guide: docs/jetson.md.

Modules: options (DeployOptions, DeployResult, DeployError), target (--host, ssh/rsync/restart argv),
process (running commands), scripts + remote/ (the scripts run on the target), verify, local_copy,
rsync_copy, engines, health, pipeline (the six steps), command (the CLI: cmd_deploy, register).
"""

from .command import cmd_deploy, register
from .health import check_health
from .local_copy import CHUNK
from .options import (DEFAULT_PORT, DEFAULT_REMOTE_DIR, DEFAULT_REMOTE_PYTHON, DEFAULT_SERVICE, STEPS, DeployError,
                      DeployOptions, DeployResult)
from .pipeline import deploy
from .scripts import engines_script, remote_script, verify_script
from .target import TARGET_MODES, Target, parse_target
from .verify import check_bundle

__all__ = [
    "CHUNK", "DEFAULT_PORT", "DEFAULT_REMOTE_DIR", "DEFAULT_REMOTE_PYTHON", "DEFAULT_SERVICE", "STEPS",
    "TARGET_MODES", "DeployError", "DeployOptions", "DeployResult", "Target", "check_bundle", "check_health",
    "cmd_deploy", "deploy", "engines_script", "parse_target", "register", "remote_script", "verify_script",
]
