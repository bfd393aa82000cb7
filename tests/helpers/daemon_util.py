"""Start the real edge daemon (`python -m edge_runtime.server`) as a subprocess for tests."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import numpy as np


class DaemonProc:
    def __init__(self, bundle: str, state: str, *extra: str, token: str | None = None, listen: str = "127.0.0.1:0",
                 env: dict | None = None, preexec_fn=None):
        """env: variables set (over this process's) in the daemon's; preexec_fn: run in the child before the daemon
        starts (e.g. resource limits)."""
        cmd = [sys.executable, "-m", "edge_runtime.server", "--bundle", bundle, "--listen", listen, "--state", state,
               "--threads", "1", *extra]
        e = {**os.environ, **(env or {})}
        if token:
            e["EDGEBLOCK_TOKEN"] = token
        self.log_path = str(state).rstrip("/") + ".daemon.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=e, preexec_fn=preexec_fn)
        self.port = None
        deadline = time.time() + 60
        while time.time() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                if self.proc.poll() is not None:
                    break
                continue
            m = re.search(r"\(port (\d+)\)", line)
            if m:
                self.port = int(m.group(1))
                break
        if self.port is None:
            self.proc.kill()
            raise RuntimeError(f"daemon did not start: {self.logs()[-3000:]}")
        self.address = f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def subject_pngs(n: int = 3, side: int = 64, seed: int = 0) -> list[bytes]:
    """Distinct PNGs of one made-up subject: a two-colour ring-with-dot on varied backgrounds."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        bg = tuple(int(c) for c in rng.integers(0, 255, 3))
        im = Image.new("RGB", (side, side), bg)
        d = ImageDraw.Draw(im)
        r = int(side * (0.2 + 0.1 * i))
        cx, cy = int(rng.integers(r, side - r)), int(rng.integers(r, side - r))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(250, 40, 40), width=max(2, r // 4))
        d.ellipse([cx - r // 4, cy - r // 4, cx + r // 4, cy + r // 4], fill=(40, 40, 250))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def wait_job(client, job_id: str, states=("DONE", "FAILED", "CANCELLED"), timeout: float = 120):
    from edge_runtime.api import state_name

    deadline = time.time() + timeout
    while time.time() < deadline:
        j = client.get_job(job_id)
        if state_name(j.state) in states:
            return j
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} not in {states} after {timeout} s")
