"""The daemon's settings (ServerConfig with its Limits and Defaults) and its one argument parser:
`add_arguments` gives `python -m edge_runtime.server` and `edgeblock serve` the same flags, and
`config_kwargs` / `config_from_args` turn the parsed flags, over a --config file's settings (config_file.py),
into a ServerConfig."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from ..personalize import ImageLimits


class ConfigError(ValueError):
    pass


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass
class Limits:
    # the reference images' limits default to what personalize.decode_images enforces on its own
    max_images: int = ImageLimits.max_images
    max_image_bytes: int = ImageLimits.max_image_bytes
    max_image_pixels: int = ImageLimits.max_image_pixels
    max_steps: int = 5000
    max_prompt_chars: int = 1000
    max_generate_steps: int = 200
    max_queue: int = 4
    max_concurrent_generations: int = 2
    max_token_chars: int = 64
    max_name_chars: int = 200
    max_finished_jobs: int = 100  # finished jobs kept (the oldest beyond it are forgotten; adapters stay)
    finished_job_retention_s: float = 7 * 86400.0  # how long a finished job is kept after its last update
    max_page_size: int = 1000  # items per page of ListJobs / ListAdapters
    max_num_images: int = 4  # images per Generate
    max_adapters_per_generation: int = 4  # adapters applied together in one Generate
    max_validation_prompts: int = 4  # validation prompts per job
    max_validation_images: int = 64  # validation images per job (prompts x validations)


@dataclass
class Defaults:
    steps: int | None = None  # None: the bundle's recipe (manifest.json, edge_runtime.recipe)
    learning_rate: float | None = None  # None: the bundle's recipe
    checkpoint_every: int = 25
    generate_steps: int = 30
    guidance: float = 3.0
    seed: int = 0
    lr_schedule: str = "constant"  # edge_runtime.lr_schedule: constant, cosine or linear
    warmup_steps: int = 0


def parse_duration(text: str, flag: str = "duration") -> float:
    """Seconds of "90", "90s", "15m", "12h" or "7d"; a clear error otherwise."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    t = str(text).strip().lower()
    scale = units.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not a duration: give seconds or a number with s, m, h or d "
                         "(e.g. 90s, 15m, 12h, 7d)") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{flag} must be a positive duration, got {text!r}")
    return value


def check_tls(tls_cert: str | None, tls_key: str | None, tls_client_ca: str | None) -> None:
    """TLS needs a certificate and its key together; mTLS (a client CA) needs both."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if tls_client_ca and not tls_cert:
        raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")


@dataclass
class ServerConfig:
    bundle: str
    listen: str = "127.0.0.1:50051"
    state_dir: str = "edgeblock-state"
    token: str | None = None
    allow_insecure_remote: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    trainer: str = "auto"
    train_device: str = "auto"  # auto: cuda when the trainer's runtime has it, else cpu
    max_concurrent_generations: int | None = None
    max_queue: int | None = None
    limits: Limits = field(default_factory=Limits)
    defaults: Defaults = field(default_factory=Defaults)
    threads: int | None = None
    workers: int = 32
    # prompt encodings kept in STATE/prompt-cache (0: none). Off by default until the planner is calibrated with it:
    # on cal-b it lowered the job's measured peak by ~60 MiB (599 -> 540 MiB), outside the planner's 15 %
    prompt_cache_mb: float = 0.0
    # bytes the daemon process may hold (admission control, daemon/admission.py); None: what the machine has free
    # at start plus the daemon's own memory, less a margin
    memory_budget: int | None = None
    config_file: str = ""  # the --config file read (absolute), "" without one
    log_level: str = "info"  # debug, info, warning or error
    log_format: str = "text"  # text, or json: one JSON object a line

    def __post_init__(self) -> None:
        if self.max_concurrent_generations is not None:
            self.limits.max_concurrent_generations = int(self.max_concurrent_generations)
        if self.max_queue is not None:
            self.limits.max_queue = int(self.max_queue)
        if self.limits.max_concurrent_generations < 1:
            raise ValueError("max_concurrent_generations must be >= 1")
        if self.limits.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.limits.max_finished_jobs < 0:
            raise ValueError(f"max_finished_jobs must be >= 0, got {self.limits.max_finished_jobs}")
        if not self.limits.finished_job_retention_s > 0:
            raise ValueError(f"job retention must be positive, got {self.limits.finished_job_retention_s} s")
        if self.limits.max_page_size < 1:
            raise ValueError(f"max_page_size must be >= 1, got {self.limits.max_page_size}")
        if self.trainer not in ("auto", "ort", "torch"):
            raise ValueError(f"trainer must be auto, ort or torch, got {self.trainer!r}")
        if self.train_device != "auto":
            from ..ort_trainer import parse_device

            parse_device(self.train_device)
        check_tls(self.tls_cert, self.tls_key, self.tls_client_ca)
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory_budget must be positive, got {self.memory_budget}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be text or json, got {self.log_format!r}")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The daemon's flags on p (the device entrypoint's parser, or `edgeblock serve`'s). No flag has an argparse
    default: a flag given overrides the --config file, which overrides ServerConfig's defaults (config_kwargs)."""
    p.add_argument("--config", default=None, metavar="FILE",
                   help="TOML file of the daemon's settings (docs/daemon.md, \"Config file\"); flags override it")
    p.add_argument("--bundle", default=None,
                   help="a bundle written by `edgeblock compile` (required: this flag or bundle in --config)")
    p.add_argument("--listen", default=None, help="host:port (default 127.0.0.1:50051, loopback only)")
    p.add_argument("--state", default=None,
                   help="state directory: adapters, jobs, checkpoints (required: this flag or state_dir in --config)")
    p.add_argument("--token-file", default=None,
                   help="file holding the bearer token clients must send (default: $EDGEBLOCK_TOKEN); "
                        "required to listen beyond loopback")
    p.add_argument("--allow-insecure-remote", action="store_true", default=None,
                   help="allow listening beyond loopback without TLS (the token then travels in clear)")
    p.add_argument("--tls-cert", default=None, help="server certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", default=None, help="CA (PEM) that client certificates must chain to (mTLS)")
    p.add_argument("--trainer", choices=["auto", "ort", "torch"], default=None,
                   help="training backend: ORT training artifacts, torch fallback, or auto (ort when installed; "
                        "the default)")
    p.add_argument("--train-device", default=None,
                   help="where the trainer runs: auto (cuda when its runtime has it, else cpu; the default), cpu or "
                        "cuda[:N]")
    p.add_argument("--max-concurrent-generations", type=int, default=None,
                   help=f"generations that run at once (default {Limits.max_concurrent_generations})")
    p.add_argument("--max-queue", type=int, default=None,
                   help=f"queued training jobs beyond which Personalize is refused (default {Limits.max_queue})")
    p.add_argument("--max-finished-jobs", type=int, default=None,
                   help=f"finished jobs kept for GetJob/WatchJob/ListJobs; beyond it the oldest are forgotten, their "
                        f"adapters stay (default {Limits.max_finished_jobs})")
    p.add_argument("--job-retention", default=None, metavar="DURATION",
                   help="how long a finished job is kept after it ended, e.g. 12h or 7d (default 7d)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of each ONNX Runtime session (default: ONNX Runtime's)")
    p.add_argument("--prompt-cache-mb", type=float, default=None,
                   help="MiB of prompt encodings kept on disk in STATE/prompt-cache, so repeated prompts skip the "
                        "text encoder (default 0: no cache; e.g. 64)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="memory the daemon may use, e.g. 6GiB or 800MiB: a job or generation starts only when its "
                        "predicted peak fits beside what runs (generation streams its graphs when resident does not "
                        "fit), and one that never fits is refused with RESOURCE_EXHAUSTED (default: what the "
                        "machine has free at start, less a margin)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default=None, help="the daemon's log level (default info)")
    p.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                   help="text (the default), or json: one JSON object a line (time, level, logger, message, "
                        "exception)")
    return p


def read_token(path: str | None, flag: str = "--token-file") -> str | None:
    """The bearer token from a file (stripped), else $EDGEBLOCK_TOKEN, else None."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path}: no such file")
        with open(path) as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"{flag} {path}: the file is empty")
        return token
    return os.environ.get("EDGEBLOCK_TOKEN", "").strip() or None


# flag (argparse dest) -> the setting it gives: a ServerConfig field, token_file, or limits.FIELD
_FLAG_KEYS = {"bundle": "bundle", "listen": "listen", "state": "state_dir", "token_file": "token_file",
              "allow_insecure_remote": "allow_insecure_remote", "tls_cert": "tls_cert", "tls_key": "tls_key",
              "tls_client_ca": "tls_client_ca", "trainer": "trainer", "train_device": "train_device",
              "threads": "threads", "prompt_cache_mb": "prompt_cache_mb", "memory_budget": "memory_budget",
              "log_level": "log_level", "log_format": "log_format",
              "max_concurrent_generations": "limits.max_concurrent_generations", "max_queue": "limits.max_queue",
              "max_finished_jobs": "limits.max_finished_jobs", "job_retention": "limits.finished_job_retention_s"}
_PATHS = ("bundle", "tls_cert", "tls_key", "tls_client_ca")  # must exist


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given (not None), checked and converted, keyed by argparse dest."""
    given = {dest: getattr(args, dest) for dest in _FLAG_KEYS if getattr(args, dest, None) is not None}
    if given.get("max_concurrent_generations", 1) < 1:
        raise ValueError(f"--max-concurrent-generations must be at least 1, got {given['max_concurrent_generations']}")
    if given.get("max_queue", 0) < 0:
        raise ValueError(f"--max-queue must be >= 0, got {given['max_queue']}")
    if not given.get("prompt_cache_mb", 0) >= 0:
        raise ValueError(f"--prompt-cache-mb must be >= 0, got {given['prompt_cache_mb']}")
    if given.get("max_finished_jobs", 0) < 0:
        raise ValueError(f"--max-finished-jobs must be >= 0, got {given['max_finished_jobs']}")
    if "job_retention" in given:
        given["job_retention"] = parse_duration(given["job_retention"], "--job-retention")
    if "memory_budget" in given:
        from ..memory_plan import MemoryPlanError, parse_size

        try:
            given["memory_budget"] = parse_size(given["memory_budget"])
        except MemoryPlanError as e:
            raise ValueError(f"--memory-budget: {e}") from e
    return given


def config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """ServerConfig's keyword arguments from flags parsed by a parser given `add_arguments`: the --config file's
    settings (config_file.py), the flags given over them, ServerConfig's defaults for the rest; after checking
    that the files they name exist. Errors name the flag, or the file and its key."""
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    config_file = ""
    if getattr(args, "config", None):
        from .config_file import load_config_file

        fs = load_config_file(args.config)
        values, labels, config_file = dict(fs.values), dict(fs.labels), fs.path
    limits = dict(values.pop("limits", {}))
    defaults = dict(values.pop("defaults", {}))
    for dest, value in _flag_values(args).items():  # flags override the file
        key = _FLAG_KEYS[dest]
        labels[key] = "--" + dest.replace("_", "-")
        if key.startswith("limits."):
            limits[key.removeprefix("limits.")] = value
        else:
            values[key] = value
    for key, flag, in_file in (("bundle", "--bundle DIR", "bundle"), ("state_dir", "--state DIR", "state_dir")):
        if not values.get(key):
            where = (f" or {in_file} = \"...\" in {config_file}" if config_file
                     else f" (or {in_file} in a --config file)")
            raise ConfigError(f"no {key.replace('_', ' ')}: give {flag}{where}")
    try:
        check_tls(values.get("tls_cert"), values.get("tls_key"), values.get("tls_client_ca"))
    except ValueError as e:
        if any(not labels.get(k, "--").startswith("--") for k in ("tls_cert", "tls_key", "tls_client_ca")):
            raise ConfigError(f"{config_file}: [tls]: {e} (in the file: cert and key together; client_ca needs "
                              "both)") from None
        raise
    for key in _PATHS:
        path = values.get(key)
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{labels[key]} {path}: no such file or directory")
    if values.get("train_device", "auto") != "auto" and not labels["train_device"].startswith("--"):
        from ..ort_trainer import parse_device

        try:
            parse_device(values["train_device"])
        except ValueError as e:
            raise ConfigError(f"{labels['train_device']}: {e}: write e.g. train_device = \"cuda:0\"") from None
    token_file = values.pop("token_file", None)
    kwargs: dict[str, Any] = dict(values)
    kwargs["token"] = read_token(token_file, labels.get("token_file", "--token-file"))
    if kwargs.get("threads") == 0:
        kwargs["threads"] = None  # 0 in the file: ONNX Runtime's default, as without the flag
    kwargs["limits"] = Limits(**limits)
    kwargs["defaults"] = Defaults(**defaults)
    kwargs["config_file"] = config_file
    return kwargs


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of flags parsed by a parser given `add_arguments`."""
    return ServerConfig(**config_kwargs(args))
