"""The daemon's config file (`--config daemon.toml`): reads the TOML, checks every key against the schema
below and returns the settings it names, each with a label ("daemon.toml: [tls] cert") for error messages.
Relative paths are relative to the file's folder; config.py merges the result under the flags."""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from ..lr_schedule import LR_SCHEDULES
from .config import LOG_FORMATS, LOG_LEVELS, ConfigError, Defaults, Limits, parse_duration

TRAINERS = ("auto", "ort", "torch")

# key -> (kind, where it goes). kinds: path, str, bool, int>=N, number>=0, size, duration, choice
_TOP: dict[str, str] = {
    "bundle": "path", "listen": "str", "state_dir": "path", "trainer": "trainer", "train_device": "str",
    "threads": "int>=0", "workers": "int>=1", "prompt_cache_mb": "number>=0", "memory_budget": "size",
    "allow_insecure_remote": "bool",
}
_SECTIONS: dict[str, dict[str, str]] = {
    "auth": {"token_file": "path"},
    "tls": {"cert": "path", "key": "path", "client_ca": "path"},
    "log": {"level": "log_level", "format": "log_format"},
}
_FILE_TO_CONFIG = {("auth", "token_file"): "token_file", ("tls", "cert"): "tls_cert", ("tls", "key"): "tls_key",
                   ("tls", "client_ca"): "tls_client_ca", ("log", "level"): "log_level",
                   ("log", "format"): "log_format"}
# [limits]: every field of Limits under its own name, except the job retention, a duration ("7d")
_LIMIT_ALIASES = {"job_retention": "finished_job_retention_s"}
_LIMITS_AT_LEAST_0 = {"max_queue", "max_finished_jobs"}  # the other counts must be >= 1
# [defaults]: every field of Defaults; steps / learning_rate left out = the bundle's recipe
_DEFAULT_KINDS = {"steps": "int>=1", "learning_rate": "number>0", "checkpoint_every": "int>=1",
                  "generate_steps": "int>=1", "guidance": "number>=0", "seed": "uint64",
                  "lr_schedule": "lr_schedule", "warmup_steps": "int>=0"}


@dataclass
class FileSettings:
    """What a config file sets: `values` keyed as config.py merges them (bundle, state_dir, token_file, tls_cert,
    log_level, ..., with `limits` and `defaults` dicts of Limits / Defaults fields), `labels` the same keys
    (limits.X, defaults.X) naming where each came from."""

    path: str
    values: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def _limit_kinds() -> dict[str, str]:
    kinds = {}
    for f in fields(Limits):
        if f.name in _LIMIT_ALIASES.values():
            continue
        kinds[f.name] = "number>=0" if f.type in ("float", float) else (
            "int>=0" if f.name in _LIMITS_AT_LEAST_0 else "int>=1")
    kinds.update({alias: "duration" for alias in _LIMIT_ALIASES})
    return kinds


def schema() -> dict[str, dict[str, str] | str]:
    """The file's keys: top-level keys to their kind, sections to {key: kind} (docs/daemon.md shows it)."""
    out: dict[str, Any] = dict(_TOP)
    out.update(_SECTIONS)
    out["limits"] = _limit_kinds()
    out["defaults"] = {f.name: _DEFAULT_KINDS.get(f.name, "number>=0") for f in fields(Defaults)}
    return out


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a table",
            list: "an array"}.get(type(v), type(v).__name__)


class _Reader:
    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(path)

    def error(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {message}")

    def unknown(self, where: str, key: str, known: list[str], what: str = "key") -> ConfigError:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return self.error(where, f"unknown {what} {key!r}: {hint}known: {', '.join(sorted(known))}")

    def value(self, where: str, key: str, kind: str, v: Any) -> Any:
        """v checked against kind (a clear error naming the key and the fix), converted where needed."""

        def want(what: str, example: str) -> ConfigError:
            return self.error(where, f"expected {what}, got {v!r} ({_type_name(v)}): write e.g. {key} = {example}")

        if kind == "path":
            if not isinstance(v, str) or not v.strip():
                raise want("a path as a non-empty string", '"/path"')
            p = os.path.expanduser(v)
            return p if os.path.isabs(p) else os.path.normpath(os.path.join(self.folder, p))
        if kind == "str":
            if not isinstance(v, str) or not v.strip():
                raise want("a non-empty string", '"..."')
            return v
        if kind in ("trainer", "log_level", "log_format", "lr_schedule"):
            choices = {"trainer": TRAINERS, "log_level": LOG_LEVELS, "log_format": LOG_FORMATS,
                       "lr_schedule": LR_SCHEDULES}[kind]
            if not isinstance(v, str) or v.lower() not in choices:
                raise want("one of " + ", ".join(choices), f'"{ {"log_level": "info"}.get(kind, choices[0])}"')
            return v.lower()
        if kind == "bool":
            if not isinstance(v, bool):
                raise want("true or false", "true")
            return v
        if kind.startswith("int>=") or kind == "uint64":
            low = 0 if kind == "uint64" else int(kind[5:])
            if not isinstance(v, int) or isinstance(v, bool) or v < low or (kind == "uint64" and v >= 2**64):
                raise want(f"an integer >= {low}" + (" below 2**64" if kind == "uint64" else ""), str(max(low, 1)))
            return v
        if kind.startswith("number"):
            strict = kind == "number>0"
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
                v > 0 if strict else v >= 0)
            if not ok:
                raise want("a finite number " + ("> 0" if strict else ">= 0"), "1.5")
            return float(v)
        if kind == "size":
            from ..memory_plan import MemoryPlanError, parse_size

            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise want("a size (bytes, or a string with a unit)", '"6GiB"')
            try:
                return parse_size(v)
            except MemoryPlanError as e:
                raise self.error(where, f"{e}: write e.g. {key} = \"6GiB\"") from None
        if kind == "duration":
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise want("a duration (seconds, or a string with s, m, h or d)", '"7d"')
            try:
                return parse_duration(v, key)
            except ValueError as e:
                raise self.error(where, f"{e}: write e.g. {key} = \"7d\"") from None
        raise AssertionError(kind)  # pragma: no cover - the schema's kinds are the ones above


def load_config_file(path: str) -> FileSettings:
    """The settings of a daemon config file, checked: ConfigError naming the file, the key and the fix for an
    unreadable file, invalid TOML, an unknown section or key, a wrong type or a bad value."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (JetPack 6): the same parser as a package (deploy/requirements-edge.txt)
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("--config needs Python 3.11 or, on Python 3.10, the tomli package: "
                              "pip install tomli") from None

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    r = _Reader(path)
    out = FileSettings(path)
    sch = schema()
    for key, v in doc.items():
        if key not in sch:
            if isinstance(v, dict):
                raise r.unknown(f"[{key}]", key, [k for k, kinds in sch.items() if isinstance(kinds, dict)], "section")
            raise r.unknown(key, key, [k for k, kinds in sch.items() if isinstance(kinds, str)], "top-level key")
        kinds = sch[key]
        if isinstance(kinds, str):
            out.values[key] = r.value(key, key, kinds, v)
            out.labels[key] = f"{path}: {key}"
            continue
        if not isinstance(v, dict):
            raise r.error(key, f"expected a section [{key}], got {v!r} ({_type_name(v)}): write [{key}] on its "
                               f"own line with its keys below it")
        for sub, sv in v.items():
            where = f"[{key}] {sub}"
            if sub not in kinds:
                raise r.unknown(f"[{key}]", sub, list(kinds))
            checked = r.value(where, sub, kinds[sub], sv)
            if key in ("limits", "defaults"):
                name = _LIMIT_ALIASES.get(sub, sub)
                out.values.setdefault(key, {})[name] = checked
                out.labels[f"{key}.{name}"] = f"{path}: {where}"
            else:
                name = _FILE_TO_CONFIG[(key, sub)]
                out.values[name] = checked
                out.labels[name] = f"{path}: {where}"
    return out
