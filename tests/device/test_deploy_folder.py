"""The deploy/ folder, what runs on the device: the systemd unit and sysusers entry, the Dockerfiles, the shell
scripts (edgeblock-edge, build_ort.sh) and the edge requirements.

Split from tests/host/test_deploy.py, which runs `edgeblock deploy` itself. `systemd-analyze verify` on the unit;
static only: the Dockerfiles (no Docker engine here) and build_ort.sh's build (its --plan runs).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/device/ -> the repository
DEPLOY = os.path.join(ROOT, "deploy")


# ---------------------------------------------------------------------------------------------
# deploy/: systemd unit, Dockerfiles, scripts
# ---------------------------------------------------------------------------------------------
def read(*parts: str) -> str:
    with open(os.path.join(DEPLOY, *parts)) as f:
        return f.read()


def test_systemd_unit_settings_and_systemd_analyze_verify(tmp_path):
    unit = read("systemd", "edgeblock.service")
    for line in ("User=edgeblock", "StateDirectory=edgeblock", "Restart=on-failure", "RestartSec=5",
                 "StartLimitIntervalSec=600", "StartLimitBurst=5", "LoadCredential=token:/etc/edgeblock/token",
                 "KillSignal=SIGTERM", "EnvironmentFile=-/etc/edgeblock/edgeblock.env", "RestartPreventExitStatus=2"):
        assert re.search(rf"^{re.escape(line)}$", unit, re.MULTILINE), line
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE).group(1))
    assert stop >= 60 + 5 + 10  # the daemon waits up to 60 s for the job's checkpoint, 5 s RPC grace, margin
    start = re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE).group(1).split()
    assert start[0] == "/opt/edgeblock/bin/edgeblock-edge"
    assert start[start.index("--token-file") + 1] == "%d/token" and start[start.index("--state") + 1] == "%S/edgeblock"
    env = read("systemd", "edgeblock.env")
    assert re.search(r"^EDGEBLOCK_LISTEN=0\.0\.0\.0:50051$", env, re.MULTILINE)

    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    # ExecStart's program exists only on a device: point it at a real executable, check everything else.
    (tmp_path / "edgeblock.service").write_text(unit.replace("/opt/edgeblock/bin/edgeblock-edge", shutil.which("true")))
    probe = subprocess.run([tool, "verify", str(tmp_path / "edgeblock.service")], capture_output=True, text=True,
                           timeout=60)
    if probe.returncode != 0 and "edgeblock.service" not in probe.stderr:
        pytest.skip(f"systemd-analyze verify is not usable in this container: {probe.stderr.strip()[:300]}")
    assert probe.returncode == 0, probe.stderr
    assert probe.stderr.strip() == "", probe.stderr  # unknown keys and bad values are only warnings: none allowed
    # ... and it does catch a bad key
    (tmp_path / "bad.service").write_text(unit.replace("Restart=on-failure", "Restart=sometimes"))
    bad = subprocess.run([tool, "verify", str(tmp_path / "bad.service")], capture_output=True, text=True, timeout=60)
    assert "restart specifier" in bad.stderr


def test_sysusers_entry_creates_the_service_user():
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers is not installed here")
    r = subprocess.run([tool, "--dry-run", os.path.join(DEPLOY, "systemd", "edgeblock.sysusers.conf")],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"systemd-sysusers --dry-run is not usable here: {r.stderr.strip()[:300]}")
    try:
        pwd.getpwnam("edgeblock")  # already there: nothing to create
    except KeyError:
        assert "Creating user 'edgeblock' (edgeblock edge daemon)" in r.stdout + r.stderr


def _server_flags() -> set[str]:
    with open(os.path.join(ROOT, "edge_runtime", "daemon", "config.py")) as f:  # the daemon's one parser
        src = f.read()
    main = src[src.index("def add_arguments("):]
    return set(re.findall(r'add_argument\("(--[a-z-]+)"', main))


def _cmd(dockerfile: str) -> list[str]:
    import json

    return json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE).group(1))


def test_dockerfiles_have_the_required_pieces():
    """Static: no Docker engine here (`docker build` cannot run)."""
    jet, cpu = read("jetson", "Dockerfile"), read("cpu", "Dockerfile")
    assert "ARG L4T_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0" in jet
    assert re.search(r"^FROM \$\{L4T_IMAGE\} AS ort-build$", jet, re.MULTILINE) and re.search(r"^FROM \$\{L4T_IMAGE\}$", jet, re.MULTILINE)
    assert "ARG ORT_VERSION=1.19.2" in jet and "build_ort.sh" in jet and "cuda-python==12.6.2.post1" in jet
    assert "CUDNN_HOME=/usr/lib/aarch64-linux-gnu" in jet and "TENSORRT_HOME=/usr/lib/aarch64-linux-gnu" in jet
    assert re.search(r"^FROM python:3\.11-slim$", cpu, re.MULTILINE) and "onnxruntime-training-cpu==1.19.2" in cpu
    want = ["--bundle", "/bundle", "--listen", "0.0.0.0:50051", "--state", "/state", "--token-file",
            "/run/secrets/edgeblock_token"]
    flags = _server_flags()
    for df in (jet, cpu):
        assert _cmd(df) == want
        assert {a for a in want if a.startswith("--")} <= flags  # the daemon really takes these flags
        assert 'ENTRYPOINT ["/opt/edgeblock/bin/edgeblock-edge"]' in df
        assert "STOPSIGNAL SIGTERM" in df and "HEALTHCHECK" in df and "edgeblock-health" in df
        assert '! python3 -c "import torch"' in df  # the build fails if torch slipped in
        assert not re.search(r"pip3? install[^\n]*\btorch\b", df)
        for src in re.findall(r"^COPY (?!--from)(.+) \S+$", df, re.MULTILINE):  # every COPY source exists
            for s in src.split():
                assert os.path.exists(os.path.join(ROOT, s)), s
    assert "USER edgeblock" in cpu and "USER" not in jet  # Jetson: root writes the first start's engines
    edge = read("bin", "edgeblock-edge")
    assert 'exec "$PY" -m edge_runtime.server "$@"' in edge
    for name in ("cpu", "jetson"):  # BuildKit reads <Dockerfile>.dockerignore: the context is only what is copied
        ignore = [line for line in read(name, "Dockerfile.dockerignore").splitlines() if line and line[0] != "#"]
        assert ignore[0] == "*"
        for needed in ("!edge_runtime/", "!deploy/bin/", "!deploy/requirements-edge.txt"):
            assert needed in ignore
    assert "!deploy/jetson/build_ort.sh" in read("jetson", "Dockerfile.dockerignore").splitlines()


def test_shell_scripts_parse():
    for script, shell in ((("bin", "edgeblock-edge"), "sh"), (("jetson", "build_ort.sh"), "bash")):
        r = subprocess.run([shell, "-n", os.path.join(DEPLOY, *script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert os.access(os.path.join(DEPLOY, *script), os.X_OK)


@pytest.mark.parametrize("mem_gib,cpus,jobs,nvcc", [(6.35, 6, 2, 1), (2, 4, 1, 1), (30, 4, 4, 2), (60, 12, 12, 1),
                                                    (200, 8, 8, 4)])
def test_build_ort_parallelism_follows_memory(mem_gib, cpus, jobs, nvcc):
    env = {**os.environ, "ORT_MEM_AVAILABLE_KB": str(int(mem_gib * 1024 * 1024)), "ORT_NPROC": str(cpus)}
    r = subprocess.run(["bash", os.path.join(DEPLOY, "jetson", "build_ort.sh"), "--plan"], capture_output=True,
                       text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    assert f"-> parallel={jobs} nvcc_threads={nvcc}" in r.stdout
    cmd = r.stdout.splitlines()[-1]
    for piece in ("--enable_training_apis", "--use_cuda", "--use_tensorrt", "--cuda_home /usr/local/cuda",
                  "--cudnn_home /usr/lib/aarch64-linux-gnu", "--tensorrt_home /usr/lib/aarch64-linux-gnu",
                  "CMAKE_CUDA_ARCHITECTURES=87", f"--parallel {jobs}", f"--nvcc_threads {nvcc}", "--build_wheel"):
        assert piece in cmd
    assert ("warning: less than 3 GB" in r.stderr) == (mem_gib < 3)


def test_build_ort_overrides_and_bad_values():
    env = {**os.environ, "ORT_MEM_AVAILABLE_KB": str(8 * 2**20), "ORT_NPROC": "8", "ORT_PARALLEL": "3"}
    r = subprocess.run(["bash", os.path.join(DEPLOY, "jetson", "build_ort.sh"), "--plan"], capture_output=True,
                       text=True, env=env)
    assert "-> parallel=3 " in r.stdout
    r = subprocess.run(["bash", os.path.join(DEPLOY, "jetson", "build_ort.sh"), "--plan"], capture_output=True,
                       text=True, env={**env, "ORT_GB_PER_JOB": "zero"})
    assert r.returncode == 2 and "ORT_GB_PER_JOB must be a positive integer" in r.stderr


def test_edge_requirements_cover_the_runtime_imports_without_torch():
    reqs = read("requirements-edge.txt")
    names = {re.split(r"[=<>;\s]", line)[0].lower() for line in reqs.splitlines() if line and not line.startswith("#")}
    assert not names & {"torch", "transformers", "diffusers", "peft"}
    imports = set()
    for root, _, files in os.walk(os.path.join(ROOT, "edge_runtime")):
        for n in files:
            if n.endswith(".py"):
                with open(os.path.join(root, n)) as f:
                    imports |= set(re.findall(r"^\s*(?:import|from) ([a-zA-Z_][a-zA-Z0-9_]*)", f.read(), re.MULTILINE))
    dist = {"numpy": "numpy", "PIL": "pillow", "grpc": "grpcio", "grpc_health": "grpcio-health-checking",
            "grpc_reflection": "grpcio-reflection", "grpc_status": "grpcio-status", "google": "protobuf", "tokenizers": "tokenizers",
            "safetensors": "safetensors", "onnx": "onnx", "tomli": "tomli"}  # tomli: Python 3.10's tomllib
    optional = {"onnxruntime", "tensorrt", "cuda", "torch", "grpc_tools", "edge_runtime"}  # installed apart / not at run time
    third_party = {m for m in imports if m not in sys.stdlib_module_names and m not in optional and m != "__future__"}
    assert third_party == set(dist), third_party
    assert {dist[m] for m in third_party} <= names
