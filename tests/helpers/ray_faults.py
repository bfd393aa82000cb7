"""Fault injection for the Ray tests: a worker setup hook (ray.init's worker_process_setup_hook) that kills the
worker process the first time it runs a unit of work while the test has armed it (the file EDGEBLOCK_FAULTS/armed;
the file `killed` marks that it happened, so the retry runs normally), or makes every unit whose arguments include
the word in the file EDGEBLOCK_FAULTS/fail raise.
"""

from __future__ import annotations

import functools
import os
import signal

ENV = "EDGEBLOCK_FAULTS"


def _kill_once(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        d = os.environ.get(ENV, "")
        if d and os.path.exists(os.path.join(d, "armed")):
            try:
                open(os.path.join(d, "killed"), "x").close()  # exclusive: one kill per arming, across workers
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        fail = os.path.join(d, "fail") if d else ""
        if fail and os.path.exists(fail):
            with open(fail) as f:
                word = f.read()
            if word in args:
                raise RuntimeError(f"injected failure of {word}")
        return fn(*args, **kwargs)

    return wrapped


def install() -> None:
    """Wrap the units of work the Ray runs call: one masked pass of selection, one eval unit."""
    if not os.environ.get(ENV):
        return
    from edgeblock.eval.run import Runner
    from edgeblock.method.selection import BlockScorer

    for cls, name in ((BlockScorer, "masked"), (Runner, "run_unit")):
        if hasattr(cls, name):  # a hook that raised would stop every worker from starting
            setattr(cls, name, _kill_once(getattr(cls, name)))


def arm(d: str) -> None:
    """The next unit of work run on the cluster kills its worker (once)."""
    for name in ("armed", "killed"):
        if os.path.exists(os.path.join(d, name)):
            os.unlink(os.path.join(d, name))
    open(os.path.join(d, "armed"), "w").close()


def disarm(d: str) -> bool:
    """Disarm; True when a worker was killed since arm()."""
    killed = os.path.exists(os.path.join(d, "killed"))
    for name in ("armed", "killed"):
        if os.path.exists(os.path.join(d, name)):
            os.unlink(os.path.join(d, name))
    return killed


def start_cluster(ray, faults_dir: str) -> None:
    """A real two-CPU Ray cluster on loopback with the hook installed in every worker."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, ENV: faults_dir, "HF_HUB_OFFLINE": "1"},
                          "worker_process_setup_hook": "ray_faults.install"})
