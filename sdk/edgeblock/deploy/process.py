"""Running the deployment's external commands (ssh, rsync, the target's Python): no shell, stdout captured
line by line, stderr echoed live with its tail kept for error messages, and the tagged JSON lines read back.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("edgeblock.deploy")


def show(argv: list[str], stdin_note: str | None = None) -> str:
    """argv as a shell line (for messages and the dry run), with what goes to its stdin noted."""
    line = " ".join(shlex.quote(a) for a in argv)
    return f"{line} < {stdin_note}" if stdin_note else line


@dataclass
class Ran:
    rc: int
    stdout: str
    stderr_tail: str


def run(argv: list[str], stdin: str | None = None, echo_stderr: bool = True,
        on_stdout: Callable[[str], None] | None = None) -> Ran:
    """Run argv (no shell): stdout captured (and fed line by line to on_stdout, with '\\r' as a line end too,
    for rsync's progress), stderr echoed live and its tail kept for error messages."""
    log.debug("run: %s", show(argv))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        return Ran(127, "", f"{argv[0]}: command not found")
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
    return Ran(rc, "\n".join(out), "\n".join(tail))


def tagged(stdout: str, tag: str) -> dict | None:
    """The JSON of the last stdout line `TAG {...}` (a remote script's report), None when there is none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    return None
