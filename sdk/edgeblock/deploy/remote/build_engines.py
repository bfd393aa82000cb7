"""edgeblock deploy, engines step: build (or reuse) the bundle's TensorRT engines with edge_runtime.engines.

Not imported: the host sends this text to the target's Python (the one with edge_runtime, --remote-python)
as `PYTHON - BUNDLE_DIR` over ssh stdin (or runs it locally). It prints one line the host parses:
EDGEBLOCK-ENGINES {"status": "built" | "skipped", ...}.
"""
import json
import os
import sys


def report(status, **fields):
    fields["status"] = status
    print("EDGEBLOCK-ENGINES " + json.dumps(fields), flush=True)


def main(bundle):
    try:
        from edge_runtime import engines
    except Exception as e:
        return report("skipped", reason="edge_runtime is not importable by %s (%s)" % (sys.executable, e))
    ok, why = engines.tensorrt_available()
    if not ok:
        return report("skipped", reason="TensorRT not available (%s)" % why)
    if not engines.load_plan(bundle)["groups"]:
        return report("skipped", reason="the bundle has no frozen groups")
    built = engines.build_engines(bundle, progress=lambda m: print(m, file=sys.stderr, flush=True))
    # Engines are written 0600 (temp file + rename): make them readable by the service user.
    for root, dirs, files in os.walk(os.path.join(bundle, "engines")):
        for name, mode in [(d, 0o755) for d in dirs] + [(f, 0o644) for f in files]:
            try:
                os.chmod(os.path.join(root, name), mode)
            except OSError:
                pass
    report("built", tensorrt=built["tensorrt_version"], gpu=built["gpu_name"], groups=len(built["groups"]),
           cached=sum(1 for g in built["groups"] if g["cached"]))


if __name__ == "__main__":  # `python -` runs as __main__
    main(sys.argv[1])
