"""The daemon's config file (`--config daemon.toml`, edge_runtime/daemon/config_file.py): every section parsed,
flags over the file over the built-in defaults, paths relative to the file, errors that name the file, the key
and the fix; the shipped example and the docs match the schema; JSON-lines logs; and the real daemon started
with --config reporting in GetInfo what the file (and one flag over it) set."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re

import pytest

from edge_runtime.daemon import config_file
from edge_runtime.daemon.config import ConfigError, Defaults, Limits, ServerConfig, add_arguments, config_from_args
from edge_runtime.daemon.logs import JsonLinesFormatter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FULL = """
bundle = "bundle"
listen = "0.0.0.0:6001"
state_dir = "state"
allow_insecure_remote = true
trainer = "ort"
train_device = "cpu"
threads = 3
workers = 8
prompt_cache_mb = 1.5
memory_budget = "6GiB"

[auth]
token_file = "secrets/token"

[tls]
cert = "tls/server.pem"
key = "tls/server.key"
client_ca = "tls/ca.pem"

[limits]
max_images = 5
max_image_bytes = 1000000
max_image_pixels = 250000
max_steps = 400
max_prompt_chars = 300
max_generate_steps = 50
max_queue = 0
max_concurrent_generations = 3
max_token_chars = 20
max_name_chars = 40
max_finished_jobs = 7
job_retention = "12h"
max_page_size = 25

[defaults]
steps = 40
learning_rate = 0.002
checkpoint_every = 5
generate_steps = 8
guidance = 2.5
seed = 11

[log]
level = "debug"
format = "json"
"""


def parse(argv: list[str]) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.fixture()
def conf_dir(tmp_path):
    """A folder with what FULL names: bundle/, secrets/token, tls/{server.pem, server.key, ca.pem}."""
    d = tmp_path / "etc"
    for sub in ("bundle", "secrets", "tls"):
        (d / sub).mkdir(parents=True)
    (d / "secrets" / "token").write_text("tok-from-file\n")
    for name in ("server.pem", "server.key", "ca.pem"):
        (d / "tls" / name).write_text("pem")
    return d


def write(folder, text: str, name: str = "daemon.toml") -> str:
    path = os.path.join(str(folder), name)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_every_section_and_key_of_the_file(conf_dir):
    path = write(conf_dir, FULL)
    cfg = config_from_args(parse(["--config", path]))
    d = str(conf_dir)
    assert cfg.config_file == path
    assert (cfg.bundle, cfg.state_dir, cfg.listen) == (f"{d}/bundle", f"{d}/state", "0.0.0.0:6001")
    assert cfg.token == "tok-from-file" and cfg.allow_insecure_remote is True
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) == (f"{d}/tls/server.pem", f"{d}/tls/server.key",
                                                              f"{d}/tls/ca.pem")
    assert (cfg.trainer, cfg.train_device, cfg.threads, cfg.workers) == ("ort", "cpu", 3, 8)
    assert cfg.prompt_cache_mb == 1.5 and cfg.memory_budget == 6 * 2**30
    assert (cfg.log_level, cfg.log_format) == ("debug", "json")
    assert cfg.limits == Limits(max_images=5, max_image_bytes=1000000, max_image_pixels=250000, max_steps=400,
                                max_prompt_chars=300, max_generate_steps=50, max_queue=0, max_concurrent_generations=3,
                                max_token_chars=20, max_name_chars=40, max_finished_jobs=7,
                                finished_job_retention_s=12 * 3600.0, max_page_size=25)
    assert cfg.defaults == Defaults(steps=40, learning_rate=0.002, checkpoint_every=5, generate_steps=8, guidance=2.5,
                                    seed=11)


def test_the_schema_covers_every_limit_and_default():
    """A field added to Limits or Defaults is a key of the file (job retention as a duration)."""
    sch = config_file.schema()
    limits = {config_file._LIMIT_ALIASES.get(k, k) for k in sch["limits"]}
    assert limits == {f for f in Limits.__dataclass_fields__}
    assert set(sch["defaults"]) == set(Defaults.__dataclass_fields__)
    assert sch["limits"]["job_retention"] == "duration"


def test_flags_override_the_file_which_overrides_the_defaults(conf_dir, tmp_path):
    path = write(conf_dir, 'bundle = "bundle"\nstate_dir = "state"\nlisten = "0.0.0.0:6001"\nthreads = 3\n'
                           '[limits]\nmax_queue = 9\nmax_steps = 400\njob_retention = "1d"\n'
                           '[log]\nlevel = "warning"\nformat = "json"\n')
    other = tmp_path / "other-bundle"
    other.mkdir()
    cfg = config_from_args(parse(["--config", path, "--bundle", str(other), "--listen", "127.0.0.1:7000",
                                  "--max-queue", "2", "--job-retention", "90m", "--log-format", "text"]))
    assert cfg.bundle == str(other) and cfg.listen == "127.0.0.1:7000"  # flags
    assert cfg.limits.max_queue == 2 and cfg.limits.finished_job_retention_s == 90 * 60.0
    assert cfg.log_format == "text"
    assert cfg.state_dir == f"{conf_dir}/state" and cfg.threads == 3 and cfg.limits.max_steps == 400  # the file
    assert cfg.log_level == "warning"
    fresh, base = Limits(), ServerConfig(bundle="x")  # untouched: the built-in defaults, from the dataclasses
    assert cfg.limits.max_images == fresh.max_images and cfg.limits.max_finished_jobs == fresh.max_finished_jobs
    assert cfg.defaults == Defaults() and cfg.trainer == base.trainer and cfg.workers == base.workers
    assert cfg.memory_budget is None and cfg.prompt_cache_mb == base.prompt_cache_mb
    # no file: the flags alone, as before
    plain = config_from_args(parse(["--bundle", str(other), "--state", "s"]))
    assert plain.config_file == "" and plain.listen == base.listen and plain.limits == Limits()
    assert (plain.log_level, plain.log_format) == ("info", "text")


def test_bundle_and_state_from_flag_or_file_or_a_clear_error(conf_dir):
    with pytest.raises(ConfigError, match=r"no bundle: give --bundle DIR"):
        config_from_args(parse(["--state", "s"]))
    path = write(conf_dir, 'bundle = "bundle"\n')
    with pytest.raises(ConfigError, match=rf"no state dir: give --state DIR or state_dir = .* in {re.escape(path)}"):
        config_from_args(parse(["--config", path]))
    assert config_from_args(parse(["--config", path, "--state", "s"])).state_dir == "s"  # a flag: as given


def test_relative_paths_are_relative_to_the_files_folder(conf_dir, tmp_path, monkeypatch):
    sub = conf_dir / "conf.d"
    sub.mkdir()
    path = write(sub, 'bundle = "../bundle"\nstate_dir = "../state"\n[auth]\ntoken_file = "../secrets/token"\n'
                      '[tls]\ncert = "~/never-read.pem"\n', "d.toml")
    monkeypatch.chdir(tmp_path)  # elsewhere: the file's folder counts, not the working directory
    fs = config_file.load_config_file(os.path.relpath(path, tmp_path))
    assert fs.path == path
    assert fs.values["bundle"] == f"{conf_dir}/bundle" and fs.values["state_dir"] == f"{conf_dir}/state"
    assert fs.values["token_file"] == f"{conf_dir}/secrets/token"
    assert fs.values["tls_cert"] == os.path.expanduser("~/never-read.pem")
    assert fs.labels["tls_cert"] == f"{path}: [tls] cert"


@pytest.mark.parametrize("text,where,fix", [
    ('max_qeue = 2', "max_qeue", "unknown top-level key 'max_qeue'"),
    ('[limits]\nmax_qeue = 2', "[limits]", "did you mean 'max_queue'?"),
    ('[limit]\nmax_queue = 2', "[limit]", "did you mean 'limits'?"),
    ('[tls]\ncertificate = "c.pem"', "[tls]", "did you mean 'cert'?"),
    ('limits = 3', "limits", "write [limits] on its own line"),
    ('threads = "2"', "threads", "expected an integer >= 0, got '2' (a string): write e.g. threads = 1"),
    ('workers = 0', "workers", "expected an integer >= 1"),
    ('allow_insecure_remote = "yes"', "allow_insecure_remote", "expected true or false"),
    ('bundle = 7', "bundle", "a path as a non-empty string"),
    ('prompt_cache_mb = -1', "prompt_cache_mb", "a finite number >= 0"),
    ('memory_budget = "6XB"', "memory_budget", 'write e.g. memory_budget = "6GiB"'),
    ('memory_budget = true', "memory_budget", "expected a size"),
    ('trainer = "tf"', "trainer", "expected one of auto, ort, torch"),
    ('train_device = "gpu"', "train_device", 'write e.g. train_device = "cuda:0"'),
    ('[limits]\nmax_steps = 0', "[limits] max_steps", "an integer >= 1"),
    ('[limits]\nmax_queue = -1', "[limits] max_queue", "an integer >= 0"),
    ('[limits]\nmax_images = 2.5', "[limits] max_images", "an integer"),
    ('[limits]\njob_retention = "3w"', "[limits] job_retention", 'write e.g. job_retention = "7d"'),
    ('[limits]\njob_retention = 0', "[limits] job_retention", "positive duration"),
    ('[defaults]\nlearning_rate = 0', "[defaults] learning_rate", "a finite number > 0"),
    ('[defaults]\nseed = -1', "[defaults] seed", "below 2**64"),
    ('[defaults]\nguidance = nan', "[defaults] guidance", "a finite number"),
    ('[log]\nlevel = "loud"', "[log] level", 'one of debug, info, warning, error, got \'loud\''),
    ('[log]\nformat = "xml"', "[log] format", "one of text, json"),
    ('[tls]\ncert = "tls/server.pem"', "[tls]", "cert and key together"),
    ('[auth]\ntoken_file = "missing"', "[auth] token_file", "no such file"),
    ('bundle = "missing"\nstate_dir = "s"', "bundle", "no such file or directory"),
    ('listen = ', "not valid TOML", "Invalid value"),
])
def test_errors_name_the_file_the_key_and_the_fix(conf_dir, text, where, fix):
    path = write(conf_dir, text)
    argv = ["--config", path] + ([] if text.startswith("bundle") else ["--bundle", str(conf_dir / "bundle"),
                                                                      "--state", "s"])
    with pytest.raises((ConfigError, FileNotFoundError)) as e:
        config_from_args(parse(argv))
    msg = str(e.value)
    assert msg.startswith(path) and where in msg and fix in msg, msg


def test_a_missing_file_and_the_cli_exit_2(tmp_path, capsys):
    from edgeblock.cli import main

    with pytest.raises(ConfigError, match="no such file"):
        config_from_args(parse(["--config", str(tmp_path / "nope.toml")]))
    bad = write(tmp_path, "[limits]\nmax_queue = -1\n")
    assert main(["serve", "--config", bad, "--bundle", str(tmp_path), "--state", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert bad in err and "[limits] max_queue" in err
    assert main(["serve", "--state", str(tmp_path / "s")]) == 2  # no bundle anywhere
    assert "no bundle" in capsys.readouterr().err


def test_flag_errors_keep_their_flag_names(tmp_path):
    for argv, word in ((["--max-queue", "-1"], "--max-queue"), (["--job-retention", "soon"], "--job-retention"),
                       (["--memory-budget", "lots"], "--memory-budget"), (["--tls-cert", "c"], "--tls-key")):
        with pytest.raises(ValueError, match=re.escape(word)):
            config_from_args(parse(["--bundle", str(tmp_path), "--state", "s", *argv]))
    with pytest.raises(FileNotFoundError, match="--bundle"):
        config_from_args(parse(["--bundle", str(tmp_path / "nope"), "--state", "s"]))


def _uncommented(example: str) -> str:
    """The example with every commented `key = value` / `[section]` line made live (comments after them kept)."""
    lines = []
    for line in example.splitlines():
        m = re.match(r"^# (\[[a-z_]+\](?:\s+#.*)?|[a-z_]+ = .*)$", line)
        lines.append(m.group(1) if m else line)
    return "\n".join(lines) + "\n"


def test_the_shipped_example_is_valid_and_shows_every_key(tmp_path):
    with open(os.path.join(ROOT, "deploy", "systemd", "daemon.toml")) as f:
        example = f.read()
    as_shipped = config_file.load_config_file(write(tmp_path, example))
    assert as_shipped.values == {}  # installing it changes nothing: every key is commented out
    live = config_file.load_config_file(write(tmp_path, _uncommented(example), "live.toml"))
    keys = {k.split(".")[-1] for k in live.labels}
    sch = config_file.schema()
    want = {k for k, v in sch.items() if isinstance(v, str)}
    want |= {config_file._FILE_TO_CONFIG[(s, k)] for s in ("auth", "tls", "log") for k in sch[s]}
    want |= {config_file._LIMIT_ALIASES.get(k, k) for k in sch["limits"]} | set(sch["defaults"])
    assert keys == want
    # the example's values are the built-in defaults where it says so
    lim, dft = live.values["limits"], live.values["defaults"]
    assert {k: lim[k] for k in Limits.__dataclass_fields__} == Limits().__dict__
    assert dft["checkpoint_every"] == Defaults.checkpoint_every and dft["seed"] == Defaults.seed
    assert (live.values["log_level"], live.values["log_format"]) == ("info", "text")


def test_the_docs_show_every_key():
    with open(os.path.join(ROOT, "docs", "daemon.md")) as f:
        doc = f.read()
    section = doc[doc.index("## Config file"):]
    section = section[:section.index("\n## ", 3)]
    for key, kinds in config_file.schema().items():
        if isinstance(kinds, str):
            assert re.search(rf"^{key} = ", section, re.MULTILINE), key
        else:
            assert f"[{key}]" in section, key
            for sub in kinds:
                assert re.search(rf"^{sub} = ", section, re.MULTILINE), f"[{key}] {sub}"


def test_json_lines_formatter():
    f = JsonLinesFormatter()
    rec = logging.LogRecord("edgeblock.daemon", logging.WARNING, __file__, 1, "job %s\nfailed", ("ab",), None)
    line = f.format(rec)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "WARNING" and obj["logger"] == "edgeblock.daemon" and obj["message"] == "job ab\nfailed"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", obj["time"]) and "exception" not in obj
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    obj = json.loads(f.format(rec))
    assert "RuntimeError: boom" in obj["exception"] and "Traceback" in obj["exception"]


# ---------------------------------------------------------------------------------------------
# the real daemon, started with --config
# ---------------------------------------------------------------------------------------------
def test_the_daemon_reports_the_files_settings_in_force(builtin_bundle, tmp_path):
    pytest.importorskip("onnxruntime.training")
    from daemon_util import DaemonProc
    from edgeblock.client import EdgeClient

    path = write(tmp_path, f"""
bundle = "{builtin_bundle[0]}"
state_dir = "state"
threads = 2
workers = 6
prompt_cache_mb = 1.5
memory_budget = "8GiB"
trainer = "ort"
[limits]
max_steps = 400
max_queue = 3
max_concurrent_generations = 1
max_finished_jobs = 7
job_retention = "12h"
max_page_size = 25
[defaults]
steps = 20
learning_rate = 0.002
checkpoint_every = 5
generate_steps = 8
guidance = 2.5
seed = 11
[log]
level = "debug"
format = "text"
""")
    # DaemonProc's own flags (--bundle, --listen, --state, --threads 1) and --log-format override the file
    d = DaemonProc(builtin_bundle[0], str(tmp_path / "state"), "--config", path, "--log-format", "json")
    try:
        with EdgeClient(d.address, timeout=60) as c:
            c.wait_ready(20)
            info = c.info()
        s, L, D = info.settings, info.limits, info.defaults
        assert s.config_file == path and s.state_dir == str(tmp_path / "state")
        assert s.threads == 1  # the flag, over the file's 2
        assert (s.workers, s.prompt_cache_mb, s.trainer) == (6, 1.5, "ort")
        assert (s.log_level, s.log_format) == ("debug", "json")
        assert (L.max_steps, L.max_queue, L.max_concurrent_generations, L.max_finished_jobs, L.max_page_size) == (
            400, 3, 1, 7, 25)
        assert L.finished_job_retention.ToSeconds() == 12 * 3600
        assert L.max_images == Limits.max_images  # not in the file: the default
        assert (D.steps, D.checkpoint_every, D.generate_steps, D.seed) == (20, 5, 8, 11)
        assert D.learning_rate == pytest.approx(0.002) and D.guidance == pytest.approx(2.5)
        assert info.memory.budget_bytes == 8 * 2**30
    finally:
        d.stop()
    records = [json.loads(line) for line in d.logs().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"] == "edgeblock.daemon" and f"settings from {path}" in r["message"] for r in records)
    assert not re.search(r"edgeblock\.daemon (INFO|DEBUG|WARNING) ", d.logs())  # no text lines of the daemon's


def test_the_systemd_unit_reads_the_file_and_the_start_script_finds_its_bundle(tmp_path):
    import subprocess
    import sys

    with open(os.path.join(ROOT, "deploy", "systemd", "edgeblock.service")) as f:
        start = re.search(r"^ExecStart=(.*)$", f.read(), re.MULTILINE).group(1).split()
    assert start[start.index("--config") + 1] == "/etc/edgeblock/daemon.toml"
    assert start.index("--config") < start.index("--bundle")  # the unit's flags follow (and override) the file
    # edgeblock-edge without --bundle: the engine step takes the bundle from --config (no TensorRT here: skipped),
    # then the daemon itself starts and stops at the missing state directory (exit 2)
    (tmp_path / "b").mkdir()
    env = {**os.environ, "EDGEBLOCK_PYTHON": sys.executable}
    path = write(tmp_path, 'bundle = "b"\n')
    r = subprocess.run(["sh", os.path.join(ROOT, "deploy", "bin", "edgeblock-edge"), "--config", path],
                       capture_output=True, text=True, timeout=120, env=env)
    assert "edgeblock-edge: engines skipped: TensorRT not available" in r.stderr, r.stderr
    assert r.returncode == 2 and "no state dir" in r.stderr, r.stderr
    bad = write(tmp_path, "bundle = 3\n", "bad.toml")  # a bad file: only the daemon's own message, no traceback
    r = subprocess.run(["sh", os.path.join(ROOT, "deploy", "bin", "edgeblock-edge"), "--config", bad],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and f"{bad}: bundle: expected a path" in r.stderr, r.stderr
