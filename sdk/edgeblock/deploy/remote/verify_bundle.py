"""edgeblock deploy, verify step: sha256 of the bundle's files on the target (Python 3 standard library only).

Not imported: the host sends this text to the target's `python3 -` over ssh stdin (or runs it locally), with
the call `main(sys.argv[1], json.loads(...))` appended, the expected {relative path: sha256} baked in.
It prints one line the host parses: EDGEBLOCK-VERIFY {"checked": N, "bad": {path: reason}}.
"""
import hashlib
import json
import os
import sys  # noqa: F401  (the appended call reads sys.argv)


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
