"""The scripts that run on the target, kept as package files in remote/ and read with importlib.resources:
their text goes to the target's Python on stdin (`PYTHON - BUNDLE_DIR`), over ssh or locally.
"""

from __future__ import annotations

import json
from importlib import resources

VERIFY = "verify_bundle.py"  # sha256 of every file; prints EDGEBLOCK-VERIFY {...}
ENGINES = "build_engines.py"  # edge_runtime.engines.build_engines; prints EDGEBLOCK-ENGINES {...}


def remote_script(name: str) -> str:
    """The text of remote/NAME (a file of this package, in a wheel too: pyproject's package-data)."""
    path = resources.files(__package__).joinpath("remote").joinpath(name)
    if not path.is_file():
        raise FileNotFoundError(f"edgeblock.deploy: remote script {name} is missing from the package "
                                f"({path}); reinstall edgeblock")
    return path.read_text(encoding="utf-8")


def verify_script(expected: dict[str, str]) -> str:
    """The verify script with the expected {relative path: sha256} baked in (argv carries only the directory)."""
    return remote_script(VERIFY) + f"\nmain(sys.argv[1], json.loads({json.dumps(expected, sort_keys=True)!r}))\n"


def engines_script() -> str:
    """The engines script (argv: the bundle directory on the target)."""
    return remote_script(ENGINES)
