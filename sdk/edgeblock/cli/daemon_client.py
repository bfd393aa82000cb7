"""The edge daemon's client commands: `edgeblock personalize`, `adapters` and `generate --server`, with the
connection flags they share (--server, --auth-token-file, TLS, --timeout) and the client they open.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from edge_runtime.daemon.config import read_token  # the daemon's own rule: file, else $EDGEBLOCK_TOKEN
from edge_runtime.lr_schedule import LR_SCHEDULES
from edge_runtime.precompute import PRECOMPUTE_MODES


def client_flags(p: argparse.ArgumentParser, required: bool, suppress: bool = False) -> None:
    """--server and the connection flags of the daemon's clients. With suppress (a sub-subcommand),
    unset flags leave the parent's values alone, so they may come before or after the action."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("--server", required=required, default=d(None), metavar="ADDR", help="the daemon's host:port")
    p.add_argument("--auth-token-file", default=d(None), help="file holding the bearer token (default: $EDGEBLOCK_TOKEN)")
    p.add_argument("--tls-ca", default=d(None), help="CA (PEM) of the daemon's certificate; without it: plaintext")
    p.add_argument("--tls-cert", default=d(None), help="client certificate (PEM) for mTLS")
    p.add_argument("--tls-key", default=d(None), help="client private key (PEM) for mTLS")
    p.add_argument("--timeout", type=float, default=d(None), help="deadline of each call in seconds (not of training)")


def _client(args: argparse.Namespace):
    if not getattr(args, "server", None):
        raise ValueError("--server ADDR (host:port of `edgeblock serve`) is required")
    for flag in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file")
    try:
        from ..client import EdgeClient
    except ImportError as e:
        raise RuntimeError(f"the daemon client needs grpcio ({e}); pip install 'edgeblock[device]'") from None
    return EdgeClient(args.server, token=read_token(args.auth_token_file, "--auth-token-file"), tls_ca=args.tls_ca,
                      tls_cert=args.tls_cert, tls_key=args.tls_key, timeout=args.timeout)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _as_dict(msg) -> dict:
    """A message as plain JSON values: enum names, numbers as numbers (uint64 too), float32 rounded."""
    from google.protobuf.descriptor import FieldDescriptor as F

    def value(f, v):
        if f.type == F.TYPE_MESSAGE:
            return _as_dict(v)
        if f.type == F.TYPE_ENUM:
            return f.enum_type.values_by_number[v].name if v in f.enum_type.values_by_number else v
        if f.type == F.TYPE_FLOAT:
            return float(f"{v:.7g}")
        if f.type == F.TYPE_BYTES:
            return len(v)
        return v

    out = {}
    for f in msg.DESCRIPTOR.fields:
        v = getattr(msg, f.name)
        repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == F.LABEL_REPEATED
        out[f.name] = [value(f, x) for x in v] if repeated else value(f, v)
    return out


def _adapter_weights(specs: list[str] | None) -> list[tuple[str, float]]:
    """--adapter ID or ID:SCALE, repeated, as (id, scale) pairs."""
    out = []
    for spec in specs or ():
        aid, sep, scale = spec.partition(":")
        try:
            out.append((aid, float(scale) if sep else 1.0))
        except ValueError:
            raise ValueError(f"--adapter {spec!r}: give ID or ID:SCALE, e.g. {aid}:0.8") from None
    return out


def output_paths(output: str, count: int) -> list[str]:
    """-o out.png for one image; out-0.png, out-1.png, ... for several."""
    if count <= 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{i}{ext or '.png'}" for i in range(count)]


def generate_remote(args: argparse.Namespace) -> int:
    """`generate --server`: images made by the daemon, written to -o (atomically), with a progress bar
    (GenerateStream) unless --quiet."""
    if args.model is not None:
        raise ValueError("--model and --server are exclusive (the daemon serves its bundle's model)")
    if args.num_images is not None and args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    adapters = _adapter_weights(args.adapter)
    kw = dict(seed=args.seed, steps=args.steps or 0, guidance=args.guidance or 0.0, size=args.size or 0,
              width=args.width or 0, height=args.height or 0,
              negative_prompt=args.negative_prompt or "", num_images=args.num_images or 0,
              adapters=adapters if len(adapters) > 1 or (adapters and adapters[0][1] != 1.0) else (),
              adapter_id=adapters[0][0] if len(adapters) == 1 and adapters[0][1] == 1.0 else "")
    with _client(args) as c:
        if args.quiet:
            r = c.generate(args.prompt, **kw)
        else:
            from tqdm import tqdm

            count = args.num_images or 1
            r = None
            with tqdm(total=None, desc="generating", unit="step", dynamic_ncols=True) as bar:
                for ev in c.generate_stream(args.prompt, **kw):
                    if ev.HasField("progress"):
                        p = ev.progress
                        bar.total = p.total_steps * count
                        bar.set_description_str(f"image {p.image + 1}/{count}" if count > 1 else "generating")
                        bar.update(p.image * p.total_steps + p.step - bar.n)
                    else:
                        r = ev.result
            if r is None:
                raise RuntimeError("the daemon's stream ended without the generated images")
    paths = output_paths(args.output, len(r.images))
    for path, im in zip(paths, r.images):
        _write_atomic(path, im.png)
    applied = ", ".join(f"{a.adapter_id}" + (f" x{a.scale:g}" if a.scale != 1.0 else "") for a in r.adapters)
    for path, im in zip(paths, r.images):
        print(f"{path}: {r.width or r.size}x{r.height or r.size} ({args.prompt!r}, seed {im.seed}, {r.steps} steps, guidance {r.guidance:g}"
              f"{', adapters ' + applied if applied else ''}) in {r.time.ToNanoseconds() / 1e9:.2f} s")
    return 0


def cmd_personalize(args: argparse.Namespace) -> int:
    import uuid

    from .jobs import follow_job

    for flag in ("steps", "seed", "checkpoint_every", "warmup_steps"):
        if (getattr(args, flag) or 0) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.lr < 0:
        raise ValueError(f"--lr must be >= 0, got {args.lr}")
    if args.prior_share and not 0.0 < args.prior_share < 1.0:
        raise ValueError(f"--prior-share must be in (0, 1), got {args.prior_share}")
    if (args.class_caption or args.prior_share) and not args.class_images:
        raise ValueError("--class-caption and --prior-share need --class-images")
    if args.validation_dir and not os.path.isdir(args.validation_dir):
        raise ValueError(f"--validation-dir {args.validation_dir}: no such directory")
    if args.reattach_timeout < 0:
        raise ValueError(f"--reattach-timeout must be >= 0, got {args.reattach_timeout}")
    request_id = args.request_id or uuid.uuid4().hex  # a re-sent request (re-attaching) finds its job by it
    with _client(args) as c:
        def open_stream(job_id: str):
            if job_id:
                return c.watch_job(job_id)
            return c.personalize(args.images, token=args.token, class_noun=args.class_noun, steps=args.steps,
                                 learning_rate=args.lr, seed=args.seed, checkpoint_every=args.checkpoint_every,
                                 name=args.name, precompute=args.precompute, captions=args.caption or (),
                                 class_images=args.class_images or (), class_captions=args.class_caption or (),
                                 prior_share=args.prior_share, request_id=request_id,
                                 lr_schedule=args.lr_schedule or "", warmup_steps=args.warmup_steps,
                                 validation_prompts=args.validation_prompt or (),
                                 validation_every=args.validation_every or 0)

        args.cancel_on_interrupt = True
        return follow_job(c, open_stream, args, "personalize")


def when(seconds: float) -> str:
    """A time (seconds since the epoch) as the listings show it; "-" for none."""
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds else "-"


def print_table(rows: list[tuple[str, ...]], none: str) -> None:
    """A header and its rows in aligned columns on stdout; `none` on stderr when there are no rows."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    if len(rows) == 1:
        print(none, file=sys.stderr)


def cmd_adapters(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "ls":
            adapters = c.list_adapters()
            if args.json:
                print(json.dumps([_as_dict(a) for a in adapters], indent=2))
                return 0
            rows = [("ID", "NAME", "TOKEN", "STEPS", "FINAL LOSS", "CREATED")]
            rows += [(a.id, a.name, a.token, str(a.steps), f"{a.final_loss:.4f}", when(a.create_time.seconds))
                     for a in adapters]
            print_table(rows, "(no adapters)")
            return 0
        if args.action == "rm":
            if c.delete_adapter(args.id):
                print(f"deleted {args.id}")
                return 0
            print(f"edgeblock adapters: error: {args.id} was not deleted", file=sys.stderr)
            return 1
        data, filename = c.export_adapter(args.id)
        if args.dtype == "fp16":  # the same file with its tensors in half precision (half the bytes)
            from edge_runtime import adapter_file

            f = adapter_file.decode(data)
            data = adapter_file.encode(f.weights, f.alpha, f.info, dtype="fp16")
        path = args.output or os.path.basename(filename or "") or f"{args.id}.safetensors"
        out_dir = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(out_dir):
            raise ValueError(f"-o {path}: no such directory {out_dir}")
        _write_atomic(path, data)
        print(f"{path}: {len(data)} bytes (adapter {args.id}, {args.dtype} safetensors, diffusers/PEFT LoRA)")
        return 0


def register(sub) -> None:
    """Add personalize and adapters to `edgeblock`'s subparsers (generate --server is in generate.py)."""
    pz = sub.add_parser("personalize", help="train a LoRA adapter on subject images on an edge daemon")
    pz.add_argument("--images", nargs="+", required=True, metavar="F", help="subject images (PNG/JPEG)")
    pz.add_argument("--token", required=True, help="the rare subject token, e.g. sks")
    pz.add_argument("--class-noun", required=True, help="the subject's class noun, e.g. dog")
    pz.add_argument("--steps", type=int, default=0, help="training steps (default: the bundle's)")
    pz.add_argument("--lr", type=float, default=0.0, help="learning rate (default: the bundle's)")
    pz.add_argument("--seed", type=int, default=None, help="seed of the draws (default: the daemon's)")
    pz.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                    help="learning rate over the steps: constant, cosine or linear decay (default: the daemon's, "
                         "constant)")
    pz.add_argument("--warmup-steps", type=int, default=None,
                    help="steps of linear learning-rate warmup before the schedule (default: the daemon's, 0)")
    pz.add_argument("--validation-prompt", action="append", default=None, metavar="TEXT",
                    help="a prompt to check the adapter on while it trains (repeat for up to 4): generated with the "
                         "adapter so far every --validation-every steps and after the last")
    pz.add_argument("--validation-every", type=int, default=None, metavar="N",
                    help="steps between validations (needed with --validation-prompt)")
    pz.add_argument("--validation-dir", default=None, metavar="DIR",
                    help="write the validation images there as stepNNNNN-K.png (K: the prompt's place)")
    pz.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (default: the daemon's)")
    pz.add_argument("--name", default="", help="adapter name (default: '{token} {class noun}')")
    pz.add_argument("--caption", action="append", default=None, metavar="TEXT",
                    help="training caption of the next image, in --images order, naming the token (e.g. 'a large "
                         "sks star on a blue background, top left'); give one per image or none (default: "
                         "'a {token} {class noun}' for every image)")
    pz.add_argument("--class-images", nargs="+", default=None, metavar="F",
                    help="prior preservation: class images (PNG/JPEG), the base model's own generations of the class "
                         "(e.g. `edgeblock generate --server ... --prompt 'a large red star on a green background, "
                         "left'`), trained on beside the subject so the adapter leaves other backgrounds and places "
                         "as the base model draws them")
    pz.add_argument("--class-caption", action="append", default=None, metavar="TEXT",
                    help="caption of the next class image, in --class-images order, not naming the token; one per "
                         "class image or none (default: 'a {class noun}')")
    pz.add_argument("--prior-share", type=float, default=0.0,
                    help="share of the training draws taken from the class images, in (0, 1) (default: 0.5)")
    pz.add_argument("--precompute", choices=["", *PRECOMPUTE_MODES], default="",
                    help="precompute mode (default: the daemon's rule, bank above 256 MiB of transformer weights)")
    pz.add_argument("--request-id", default="", metavar="ID",
                    help="the request's id (default: a new uuid4): the same request sent again with the same id "
                         "returns the same job instead of starting another")
    pz.add_argument("--reattach-timeout", type=float, default=600.0, metavar="S",
                    help="after a dropped connection, re-attach to the job (it goes on on the daemon) for up to S "
                         "seconds (0: give up at once; default 600)")
    pz.add_argument("--json", action="store_true", help="print every event as a JSON line (the last one is KIND_DONE)")
    pz.add_argument("--quiet", action="store_true", help="no progress bar")
    client_flags(pz, required=True)
    pz.set_defaults(func=cmd_personalize)

    ad = sub.add_parser("adapters", help="list, delete or export the adapters on an edge daemon")
    client_flags(ad, required=False)
    ad_sub = ad.add_subparsers(dest="action", required=True)
    ls = ad_sub.add_parser("ls", help="list adapters")
    ls.add_argument("--json", action="store_true")
    client_flags(ls, required=False, suppress=True)
    rm = ad_sub.add_parser("rm", help="delete an adapter")
    rm.add_argument("id", metavar="ID")
    client_flags(rm, required=False, suppress=True)
    ex = ad_sub.add_parser("export", help="write an adapter's LoRA weights as safetensors (diffusers/PEFT names)")
    ex.add_argument("id", metavar="ID")
    ex.add_argument("-o", "--output", default=None, help="file to write (default: the name the daemon suggests)")
    ex.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                    help="tensor precision of the file (fp16: half the size; diffusers' load_lora_weights reads both)")
    client_flags(ex, required=False, suppress=True)
    ad.set_defaults(func=cmd_adapters)
