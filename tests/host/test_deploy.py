"""`edgeblock deploy` (sdk/edgeblock/deploy/) and deploy/'s start and health scripts it relies on.

Real runs here: the local-directory target end to end (copy, skip, resume, re-copy, verify, engines
skipped without TensorRT, restart command, health check against a real daemon started through
deploy/bin/edgeblock-edge on the deployed bundle), and the ssh path through stand-in `ssh` and `rsync`
programs that run on this machine (no ssh server or rsync here). The rest of the deploy/ folder (systemd
unit, Dockerfiles, build_ort.sh, edge requirements) is tests/device/test_deploy_folder.py.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from edgeblock import deploy as dp
from edgeblock.deploy import local_copy, scripts

from edge_runtime.fileio import sha256_file
from edge_runtime.manifest import Manifest, load_manifest, write_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/host/ -> the repository
DEPLOY = os.path.join(ROOT, "deploy")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def make_bundle(path: str, seed: int = 0) -> str:
    """A small valid bundle (a manifest over a few binary files), enough for every step but the daemon."""
    import numpy as np

    rng = np.random.default_rng(seed)
    files = {"prologue.onnx": 300_000, "frozen/group_00.onnx": 1_500_000, "trainable/checkpoint": 50_000,
             "tokenizer.json": 2_000, "engines/plan.json": 0}
    for rel, n in files.items():
        full = os.path.join(path, *rel.split("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(b'{"version": 1, "groups": []}' if rel == "engines/plan.json" else rng.bytes(n))
    blocks = [{"index": i, "name": f"b{i}", "role": "trainable" if i == 1 else "frozen", "group": 0} for i in range(3)]
    write_manifest(path, Manifest(family="flux", blocks=blocks, trainable=[1], train_res=32, gen_res=64,
                                  scheduler={}, patch_schedule={}, lora={"rank": 4}))
    return path


def tree_hashes(path: str) -> dict[str, str]:
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            full = os.path.join(root, n)
            out[os.path.relpath(full, path).replace(os.sep, "/")] = sha256_file(full)
    return out


def cli(*argv: str) -> int:
    """`edgeblock deploy ...` through a parser built with deploy.register, as cli.build_parser does."""
    p = argparse.ArgumentParser(prog="edgeblock")
    sub = p.add_subparsers(dest="command", required=True)
    dp.register(sub)
    args = p.parse_args(["deploy", *argv])
    return args.func(args)


def opts(bundle: str, host: str, **kw) -> dp.DeployOptions:
    kw.setdefault("progress", False)
    return dp.DeployOptions(bundle=bundle, host=host, **kw)


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(str(tmp_path / "bundle"))


# ---------------------------------------------------------------------------------------------
# dry run
# ---------------------------------------------------------------------------------------------
def test_dry_run_local_prints_steps_and_copies_nothing(bundle, tmp_path, capsys):
    dest = tmp_path / "device"
    assert cli("--bundle", bundle, "--host", f"local:{dest}", "--dry-run", "--health-addr", "127.0.0.1:1",
               "--restart-cmd", f"touch {tmp_path / 'restarted'}") == 0
    out = capsys.readouterr().out
    for n, name in enumerate(dp.STEPS, 1):
        assert f"[deploy] {n}/6 {name}" in out
    assert "would copy 6 files, skip 0 already there" in out
    assert f"$ {sys.executable} - {dest} < [verify script: sha256 of 6 files]" in out
    assert f"$ touch {tmp_path / 'restarted'}" in out
    assert "would poll 127.0.0.1:1" in out
    assert not dest.exists() and not (tmp_path / "restarted").exists()


def test_dry_run_ssh_prints_rsync_ssh_systemctl(bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no rsync, no ssh: a dry run still prints the plan
    assert cli("--bundle", bundle, "--host", "nvidia@jetson", "--dry-run", "--ssh-port", "2222") == 0
    out = capsys.readouterr().out
    ssh = "ssh -o BatchMode=yes -o ConnectTimeout=10 -p 2222"
    assert "note: rsync and ssh not found on this machine" in out
    assert f"$ {ssh} nvidia@jetson 'mkdir -p /opt/edgeblock/bundle'" in out
    assert (f"$ rsync -rlpt --chmod=Du=rwx,Dgo=rx,Fu=rw,Fgo=r --partial '--out-format=EDGEBLOCK-SENT %n' -e '{ssh}' --info=progress2 --files-from=- "
            f"{bundle}/ nvidia@jetson:/opt/edgeblock/bundle/ < [the 5 data files]") in out
    assert f"{bundle}/manifest.json nvidia@jetson:/opt/edgeblock/bundle/manifest.json" in out
    assert f"$ {ssh} nvidia@jetson 'python3 - /opt/edgeblock/bundle' < [verify script: sha256 of 6 files]" in out
    assert f"$ {ssh} nvidia@jetson '/opt/edgeblock/venv/bin/python - /opt/edgeblock/bundle'" in out
    assert f"$ {ssh} nvidia@jetson 'sudo -n systemctl restart edgeblock'" in out
    assert "grpc.health.v1 Check on jetson:50051" in out
    # root needs no sudo; the directory may come with the host, rsync-style
    r = dp.deploy(opts(bundle, "root@jetson:/srv/b", dry_run=True, service="edge"), say=lambda m: None)
    assert ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "root@jetson", "systemctl restart edge"] in r.commands


# ---------------------------------------------------------------------------------------------
# the local target: copy, skip, resume, re-copy, verify
# ---------------------------------------------------------------------------------------------
def test_local_copy_is_identical_and_a_second_deploy_copies_nothing(bundle, tmp_path, capsys):
    dest = str(tmp_path / "device" / "bundle")
    r = dp.deploy(opts(bundle, f"local:{dest}"), say=lambda m: None)
    assert tree_hashes(dest) == tree_hashes(bundle)
    assert sorted(r.copied) == sorted(tree_hashes(bundle)) and r.copied[-1] == "manifest.json"
    assert (r.skipped, r.verified, r.files) == (0, 6, 6)
    assert r.engines["status"] == "skipped" and "TensorRT not available" in r.engines["reason"]
    assert r.restart.startswith("skipped") and r.health.startswith("skipped")
    assert not [n for n in tree_hashes(dest) if n.endswith(".part")]
    assert os.stat(os.path.join(dest, "manifest.json")).st_mode & 0o777 == 0o644  # compile wrote it 0600

    assert cli("--bundle", bundle, "--host", dest, "--quiet") == 0  # a plain path is a local target too
    out = capsys.readouterr().out
    assert "copied 0 files (0.0 MiB), 6 already there" in out
    assert "skipped: TensorRT not available" in out
    assert "0 copied, 6 unchanged, 6 verified" in out
    assert tree_hashes(dest) == tree_hashes(bundle)


def test_corrupted_destination_file_is_detected_and_copied_again(bundle, tmp_path):
    dest = str(tmp_path / "device")
    dp.deploy(opts(bundle, f"local:{dest}"), say=lambda m: None)
    bad = os.path.join(dest, "frozen", "group_00.onnx")
    with open(bad, "r+b") as f:  # same size, one byte changed
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    os.remove(os.path.join(dest, "tokenizer.json"))
    r = dp.deploy(opts(bundle, f"local:{dest}"), say=lambda m: None)
    assert sorted(r.copied) == ["frozen/group_00.onnx", "tokenizer.json"]
    assert r.skipped == 4
    assert tree_hashes(dest) == tree_hashes(bundle)


def test_interrupted_copy_resumes_from_the_part_file(bundle, tmp_path):
    dest = tmp_path / "device"
    (dest / "frozen").mkdir(parents=True)
    src = os.path.join(bundle, "frozen", "group_00.onnx")
    with open(src, "rb") as f:
        data = f.read()
    (dest / "frozen" / "group_00.onnx.part").write_bytes(data[:600_000])
    (dest / "prologue.onnx.part").write_bytes(b"x" * 1000)  # garbage: not a prefix, copied whole again
    r = dp.deploy(opts(bundle, f"local:{dest}"), say=lambda m: None)
    assert r.resumed == {"frozen/group_00.onnx": 600_000}  # the garbage .part was not kept
    assert tree_hashes(str(dest)) == tree_hashes(bundle)  # no .part left, every file right


def test_a_target_whose_storage_corrupts_files_is_reported_by_name(bundle, tmp_path, monkeypatch, capsys):
    real = local_copy._copy_file_local

    def flaky(src, dst, want, bar):  # the copy "succeeds" but the file on the target ends up wrong
        kept = real(src, dst, want, bar)
        if dst.endswith("prologue.onnx"):
            with open(dst, "r+b") as f:
                f.write(b"\0" * 16)
        return kept

    monkeypatch.setattr(local_copy, "_copy_file_local", flaky)
    assert cli("--bundle", bundle, "--host", f"local:{tmp_path / 'device'}", "--quiet") == 1
    cap = capsys.readouterr()
    assert "1 file(s) do not match, copying them again: prologue.onnx (sha256" in cap.out
    assert "edgeblock deploy: error: verify: after copying again, still not matching the manifest" in cap.err
    assert "prologue.onnx: sha256" in cap.err


# ---------------------------------------------------------------------------------------------
# bad input: refused before anything is copied
# ---------------------------------------------------------------------------------------------
def test_tampered_source_bundle_fails_validation(bundle, tmp_path, capsys):
    with open(os.path.join(bundle, "trainable", "checkpoint"), "r+b") as f:
        f.write(b"tampered")
    dest = tmp_path / "device"
    assert cli("--bundle", bundle, "--host", f"local:{dest}") == 2
    err = capsys.readouterr().err
    assert "edgeblock deploy: error: bundle file trainable/checkpoint is corrupt" in err
    assert not dest.exists()


@pytest.mark.parametrize("case", ["no-dir", "no-manifest", "bad-host", "overlap", "foreign-dir", "both-dirs",
                                  "bad-remote-dir", "skip-and-require"])
def test_bad_input_is_refused_with_exit_2(case, bundle, tmp_path, capsys):
    dest = f"local:{tmp_path / 'device'}"
    args = {"no-dir": ["--bundle", str(tmp_path / "nope"), "--host", dest],
            "no-manifest": ["--bundle", str(tmp_path), "--host", dest],
            "bad-host": ["--bundle", bundle, "--host", "user@host name"],
            "overlap": ["--bundle", bundle, "--host", f"local:{bundle}/sub"],
            "foreign-dir": ["--bundle", bundle, "--host", str(tmp_path / "home")],
            "both-dirs": ["--bundle", bundle, "--host", "jetson:/a", "--remote-dir", "/b"],
            "bad-remote-dir": ["--bundle", bundle, "--host", "jetson:/opt/my bundle"],
            "skip-and-require": ["--bundle", bundle, "--host", dest, "--skip-engines", "--require-engines"]}[case]
    if case == "no-manifest":
        os.remove(os.path.join(bundle, "manifest.json"))
        args[1] = bundle
    if case == "foreign-dir":  # someone's directory, not a bundle: nothing is written into it
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / "notes.txt").write_text("mine")
    assert cli(*args) == 2
    err = capsys.readouterr().err
    expect = {"no-dir": "no such directory", "no-manifest": "is not a bundle: no manifest.json",
              "bad-host": "expected [user@]host[:DIR]", "overlap": "overlap", "foreign-dir": "not part of a bundle",
              "both-dirs": "give one", "bad-remote-dir": "no spaces", "skip-and-require": "contradict"}[case]
    assert err.startswith("edgeblock deploy: error: ") and expect in err
    assert not (tmp_path / "device").exists()


def test_ssh_target_without_rsync_names_the_missing_tool(bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cli("--bundle", bundle, "--host", "jetson") == 1
    err = capsys.readouterr().err
    assert "rsync and ssh not found on this machine" in err and "--host local:DIR" in err


# ---------------------------------------------------------------------------------------------
# the ssh path, through stand-in ssh and rsync programs that act on this machine
# ---------------------------------------------------------------------------------------------
FAKE_SSH = r'''
import os, subprocess, sys
args, i = sys.argv[1:], 0
while args[i].startswith("-"):
    i += 2 if args[i] in ("-o", "-p", "-i", "-F", "-l", "-J") else 1
host, command = args[i], " ".join(args[i + 1:])
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write("ssh %s %s\n" % (host, command))
if os.environ.get("FAKE_SSH_DOWN"):
    sys.stderr.write("ssh: connect to host %s port 22: Connection refused\n" % host)
    sys.exit(255)
sys.exit(subprocess.call(["sh", "-c", command]))
'''

FAKE_RSYNC = r'''
import os, shutil, sys
args = sys.argv[1:]
if args == ["--version"]:
    print("rsync  version 3.2.7  protocol version 31")
    sys.exit(0)
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write("rsync %s\n" % " ".join(args))
pos, listing, ignore_times, fmt, i = [], None, False, None, 0
while i < len(args):
    a = args[i]
    if a == "-e":
        i += 1
    elif a == "--files-from=-":
        listing = [l.strip() for l in sys.stdin if l.strip()]
    elif a == "--ignore-times":
        ignore_times = True
    elif a.startswith("--out-format="):
        fmt = a[len("--out-format="):]
    elif not a.startswith("-"):
        pos.append(a)
    i += 1
src, dest = pos
dest = dest.split(":", 1)[1]
pairs = [(src, dest)] if listing is None else [(os.path.join(src, r), os.path.join(dest, r)) for r in listing]
for s, d in pairs:
    same = (os.path.exists(d) and os.path.getsize(d) == os.path.getsize(s)
            and int(os.path.getmtime(d)) == int(os.path.getmtime(s)))  # rsync's quick check
    if same and not ignore_times:
        continue
    os.makedirs(os.path.dirname(d), exist_ok=True)
    if not os.environ.get("FAKE_RSYNC_BROKEN") or not os.path.exists(d):
        shutil.copy2(s, d)
    print(fmt.replace("%n", os.path.relpath(d, dest) if listing is not None else os.path.basename(d)))
    print("      1,000 100%   10.00MB/s    0:00:00 (xfr#1, to-chk=0/1)", end="\r")
'''


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, body in (("ssh", FAKE_SSH), ("rsync", FAKE_RSYNC)):
        p = bin_dir / name
        p.write_text(f"#!{sys.executable}\n{body}")
        p.chmod(0o755)
    os.symlink(sys.executable, bin_dir / "python3")
    log = tmp_path / "fake.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return log


def test_ssh_path_copies_verifies_restarts_and_recopies_a_corrupted_file(bundle, tmp_path, fakes):
    dest = str(tmp_path / "remote" / "bundle")
    mark = tmp_path / "restarted"
    o = opts(bundle, f"nvidia@jetson:{dest}", restart_cmd=f"touch {mark}", remote_python=sys.executable,
             skip_health=True)
    r = dp.deploy(o, say=lambda m: None)
    assert tree_hashes(dest) == tree_hashes(bundle)
    assert sorted(r.copied) == sorted(tree_hashes(bundle)) and r.verified == 6
    assert r.engines["status"] == "skipped" and "TensorRT not available" in r.engines["reason"]
    assert r.restart == "restarted" and mark.exists()
    log = fakes.read_text().splitlines()
    assert log[0] == f"ssh nvidia@jetson mkdir -p {dest}"
    assert log[1].startswith("rsync -rlpt --chmod=Du=rwx,Dgo=rx,Fu=rw,Fgo=r --partial") and "--files-from=-" in log[1]
    assert log[2].endswith(f"{bundle}/manifest.json nvidia@jetson:{dest}/manifest.json")  # the manifest last
    assert log[3] == f"ssh nvidia@jetson python3 - {dest}"
    assert log[4] == f"ssh nvidia@jetson {sys.executable} - {dest}"
    assert log[5] == f"ssh nvidia@jetson touch {mark}"

    # Same size and mtime: rsync's quick check skips it, the verify step catches it, rsync sends it again.
    bad = os.path.join(dest, "prologue.onnx")
    st = os.stat(bad)
    with open(bad, "r+b") as f:
        f.write(b"\0" * 8)
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = dp.deploy(o, say=lambda m: None)
    assert r.copied == [] and r.recopied == ["prologue.onnx"]
    again = [line for line in fakes.read_text().splitlines() if "--ignore-times" in line]
    assert len(again) == 1 and again[0].endswith(f"--files-from=- {bundle}/ nvidia@jetson:{dest}/")
    assert tree_hashes(dest) == tree_hashes(bundle)


def test_ssh_path_reports_a_file_that_stays_wrong(bundle, tmp_path, fakes, monkeypatch, capsys):
    dest = str(tmp_path / "remote")
    assert cli("--bundle", bundle, "--host", f"jetson:{dest}", "--skip-engines", "--no-restart", "--skip-health",
               "--quiet") == 0
    with open(os.path.join(dest, "tokenizer.json"), "r+b") as f:
        f.write(b"\0")
    monkeypatch.setenv("FAKE_RSYNC_BROKEN", "1")  # rsync "succeeds" without fixing the file
    assert cli("--bundle", bundle, "--host", f"jetson:{dest}", "--skip-engines", "--no-restart", "--skip-health",
               "--quiet") == 1
    err = capsys.readouterr().err
    assert "still not matching the manifest on jetson:" in err and "tokenizer.json: sha256" in err


def test_unreachable_host_is_a_clear_error(bundle, fakes, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SSH_DOWN", "1")
    assert cli("--bundle", bundle, "--host", "nvidia@jetson", "--quiet") == 1
    err = capsys.readouterr().err
    assert "cannot reach nvidia@jetson over ssh (exit 255)" in err and "Connection refused" in err


def test_default_restart_is_sudo_systemctl_and_its_failure_is_explained(bundle, tmp_path, fakes, capsys):
    dest = str(tmp_path / "remote")
    rc = cli("--bundle", bundle, "--host", f"jetson:{dest}", "--skip-engines", "--skip-health", "--quiet",
             "--service", "edgeblock-test-unit-that-does-not-exist")
    assert rc == 1
    assert "ssh jetson sudo -n systemctl restart edgeblock-test-unit-that-does-not-exist" in fakes.read_text()
    assert "restart: `ssh" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# engines, restart
# ---------------------------------------------------------------------------------------------
def test_require_engines_fails_without_tensorrt(bundle, tmp_path, capsys):
    from edge_runtime.engines import tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("TensorRT is installed here: the engines would be built")
    assert cli("--bundle", bundle, "--host", f"local:{tmp_path / 'd'}", "--require-engines", "--quiet") == 1
    err = capsys.readouterr().err
    assert "engines: required (--require-engines) but skipped: TensorRT not available" in err


FAKE_ENGINES = r'''
"""Stand-in for edge_runtime.engines on a machine with TensorRT (FAKE_ENGINES: build, current, fail)."""
import os

MODE = os.environ.get("FAKE_ENGINES", "build")


def tensorrt_available():
    return True, "tensorrt 10.3.0 on Orin sm_87 8SM"


def load_plan(bundle):
    return {"version": 1, "groups": [{"onnx": "frozen/group_00.onnx"}]}


def engines_status(bundle):
    if MODE == "current":
        return {"backend": "tensorrt", "reason": "engines built for this machine"}
    return {"backend": "onnxruntime", "reason": "no engines/built.json"}


def build_engines(bundle, progress=print, **kw):
    if MODE == "fail":
        raise ValueError("frozen/group_00.onnx: TensorRT's ONNX parser failed with 1 error(s)")
    os.makedirs(os.path.join(bundle, "engines", "cache"), exist_ok=True)
    fd = os.open(os.path.join(bundle, "engines", "cache", "group_00-0123.engine"), os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"engine")
    os.close(fd)
    progress("[engines] group_00: built")
    return {"tensorrt_version": "10.3.0", "gpu_name": "Orin sm_87 8SM", "groups": [{"cached": False}]}
'''


@pytest.fixture
def fake_tensorrt(tmp_path, monkeypatch):
    """A stand-in `edge_runtime` package (engines + a server that prints its arguments) first on PYTHONPATH of
    the child processes: the engine build and start paths as they run on a board with TensorRT."""
    pkg = tmp_path / "fake_runtime" / "edge_runtime"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "engines.py").write_text(FAKE_ENGINES)
    (pkg / "server.py").write_text("import sys\nprint('fake server', sys.argv[1:])\n")
    monkeypatch.setenv("PYTHONPATH", str(pkg.parent))
    monkeypatch.chdir(tmp_path)  # `python -` puts the working directory first on sys.path: not the repository


def test_engines_built_on_the_target_are_made_readable(bundle, tmp_path, fake_tensorrt, capsys):
    dest = tmp_path / "device"
    assert cli("--bundle", bundle, "--host", f"local:{dest}", "--quiet", "--require-engines") == 0
    assert "built: 1 engine(s) (0 from the cache), TensorRT 10.3.0 on Orin sm_87 8SM" in capsys.readouterr().out
    engine = dest / "engines" / "cache" / "group_00-0123.engine"
    assert engine.read_bytes() == b"engine" and engine.stat().st_mode & 0o777 == 0o644  # the service user reads it


def test_a_failed_engine_build_stops_the_deploy(bundle, tmp_path, fake_tensorrt, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_ENGINES", "fail")
    assert cli("--bundle", bundle, "--host", f"local:{tmp_path / 'device'}", "--quiet") == 1
    err = capsys.readouterr().err
    assert "edgeblock deploy: error: engines: the TensorRT build failed (exit 1)" in err
    assert "ONNX parser failed" in err and "--skip-engines" in err


@pytest.mark.parametrize("mode,build,said", [("build", "auto", "building TensorRT engines (no engines/built.json)"),
                                             ("current", "auto", "TensorRT engines up to date"),
                                             ("fail", "auto", "the engine build failed (above)"),
                                             ("build", "off", None)])
def test_start_script_builds_engines_first_then_execs_the_daemon(mode, build, said, bundle, fake_tensorrt):
    env = {**os.environ, "EDGEBLOCK_PYTHON": sys.executable, "FAKE_ENGINES": mode, "EDGEBLOCK_BUILD_ENGINES": build}
    r = subprocess.run([os.path.join(DEPLOY, "bin", "edgeblock-edge"), "--bundle", bundle, "--listen", "0.0.0.0:50051"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"fake server ['--bundle', '{bundle}', '--listen', '0.0.0.0:50051']"
    if said:
        assert said in r.stderr
    else:
        assert "engine" not in r.stderr.lower()
    assert (mode == "build" and build == "auto") == os.path.exists(os.path.join(bundle, "engines", "cache"))


def test_restart_command_of_a_local_target_runs_and_its_failure_stops(bundle, tmp_path, capsys):
    mark = tmp_path / "restarted"
    assert cli("--bundle", bundle, "--host", f"local:{tmp_path / 'd'}", "--quiet", "--restart-cmd",
               f"{sys.executable} -c \"open('{mark}', 'w').write('ok')\"") == 0
    assert mark.read_text() == "ok"
    assert cli("--bundle", bundle, "--host", f"local:{tmp_path / 'd'}", "--quiet", "--restart-cmd",
               f"{sys.executable} -c \"raise SystemExit(3)\"") == 1
    err = capsys.readouterr().err
    assert "edgeblock deploy: error: restart: " in err and "failed with exit 3" in err


# ---------------------------------------------------------------------------------------------
# the scripts run on the target (package files in edgeblock/deploy/remote/, sent to python on stdin)
# ---------------------------------------------------------------------------------------------
REMOTE_SCRIPTS = (scripts.VERIFY, scripts.ENGINES)


def test_remote_scripts_are_package_files_that_compile():
    for name in REMOTE_SCRIPTS:  # a SyntaxError here would otherwise show only on the target
        compile(scripts.remote_script(name), name, "exec")
    # the texts as sent: the verify script with its call and the expected sha256 appended
    compile(scripts.verify_script({"a/b.onnx": "0" * 64, "it's.json": "1" * 64}), "verify (as sent)", "exec")
    compile(scripts.engines_script(), "engines (as sent)", "exec")


def test_verify_script_needs_only_the_standard_library():
    """It runs on the target's system python3, where edgeblock and edge_runtime may not be installed."""
    import ast

    tree = ast.parse(scripts.remote_script(scripts.VERIFY))
    top = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert top and top <= set(sys.stdlib_module_names), top - set(sys.stdlib_module_names)


def test_remote_scripts_are_in_the_wheels_package_data():
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["edgeblock"]
    for name in REMOTE_SCRIPTS:
        assert any(fnmatch.fnmatch(f"deploy/remote/{name}", p) for p in patterns), (name, patterns)


# ---------------------------------------------------------------------------------------------
# the real daemon on the deployed bundle, started the way the containers and the unit start it
# ---------------------------------------------------------------------------------------------
def start_edge(bundle: str, state: str, log) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "EDGEBLOCK_PYTHON": sys.executable}
    proc = subprocess.Popen([os.path.join(DEPLOY, "bin", "edgeblock-edge"), "--bundle", bundle, "--listen",
                             "127.0.0.1:0", "--state", state, "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=log, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline().decode()
        m = re.search(r"\(port (\d+)\)", line)
        if m:
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("daemon did not start (its log is beside the state directory)")


def test_health_check_against_a_daemon_on_the_deployed_bundle(builtin_bundle, tmp_path, capsys):
    src = builtin_bundle[0]
    dest = str(tmp_path / "device" / "bundle")
    assert cli("--bundle", src, "--host", f"local:{dest}", "--quiet") == 0
    listed = set(load_manifest(src, verify_files=False).files) | {"manifest.json"}
    assert tree_hashes(dest) == {k: v for k, v in tree_hashes(src).items() if k in listed}
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        proc, port = start_edge(dest, str(tmp_path / "state"), log)
    try:
        capsys.readouterr()
        assert cli("--bundle", src, "--host", f"local:{dest}", "--quiet", "--health-addr", f"127.0.0.1:{port}",
                   "--health-timeout", "30") == 0
        out = capsys.readouterr().out
        assert f"127.0.0.1:{port}: SERVING" in out and "0 copied" in out and "health SERVING" in out
        probe = subprocess.run([sys.executable, os.path.join(DEPLOY, "bin", "edgeblock-health"), f"127.0.0.1:{port}"],
                               capture_output=True, text=True, timeout=30)
        assert (probe.returncode, probe.stdout.strip()) == (0, f"127.0.0.1:{port}: SERVING")
    finally:
        proc.send_signal(signal.SIGTERM)  # exec'd: the daemon itself gets it and stops cleanly
        rc = proc.wait(60)
    assert rc == 0
    assert "edgeblock-edge: engines skipped: TensorRT not available" in log_path.read_text()
    assert cli("--bundle", src, "--host", f"local:{dest}", "--quiet", "--health-addr", f"127.0.0.1:{port}",
               "--health-timeout", "1") == 1
    assert f"health: 127.0.0.1:{port} did not answer SERVING within 1 s" in capsys.readouterr().err


def test_edgeblock_cli_registers_deploy():
    from edgeblock import cli

    p = cli.build_parser()
    choices = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "deploy" not in choices:
        pytest.skip("edgeblock.cli.build_parser does not register `deploy` yet (deploy.register(sub))")
    r = subprocess.run([sys.executable, "-m", "edgeblock.cli", "deploy", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--dry-run" in r.stdout
