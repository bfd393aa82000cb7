"""The `edgeblock` command line: the only place errors become exit codes and messages.

Subcommands mirror docs/ and ../shared/DESIGN.md: select, bench memory, compile, serve, personalize,
generate, adapters, ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("edgeblock")


def _blocks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks wants comma-separated block indices like 3,4; got {text!r}")


def _rows(text: str) -> tuple[str, ...]:
    """Row names for `eval --rows`; the benchmark's config checks them (a clear error names the valid ones)."""
    return tuple(r.strip() for r in text.split(",") if r.strip())


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def cmd_select(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .method.selection import bar_chart, score_blocks, selection_report, write_report
    from .models import load_model
    from .selection_data import calibration_set

    loaded = load_model(args.model)
    items = calibration_set(args.model, loaded, args.images, args.token, args.class_noun, args.prompt, args.res, args.count)
    total = len(items) * len(args.noise_levels) * args.noises
    with tqdm(total=total, desc="selection", unit="draw", disable=args.quiet) as bar:
        scores = score_blocks(
            loaded.adapter,
            loaded.objective,
            items,
            noise_levels=args.noise_levels,
            noises=args.noises,
            seed=args.seed,
            progress=lambda done, _: bar.update(done - bar.n),
        )
    report = selection_report(loaded.adapter, scores, args.top_k, args.contiguous)
    report.update({"model": args.model, "token": args.token, "class_noun": args.class_noun, "calibration": {
        "items": len(items), "noise_levels": list(args.noise_levels), "noises": args.noises, "seed": args.seed}})
    write_report(report, args.out)
    chart = args.chart or os.path.splitext(args.out)[0] + ".png"
    bar_chart(scores, loaded.adapter.block_names, report["selected"], chart)
    print(f"selected blocks {report['selected']} -> {args.out} (chart {chart})")
    for r in report["ranking"][: min(8, len(scores))]:
        print(f"  #{r['rank']:<2} block {r['block']:>3} {r['name']:<32} {r['score']:.4f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "daemon":
        return _bench_daemon(args)
    if args.what != "memory":
        raise ValueError(f"unknown benchmark {args.what!r}; available: memory, daemon")
    from .bench import memory

    def show(v, r):
        if not args.json:
            tensors = f"{r['peak_bytes'] / 2**20:8.1f} MiB" if r["peak_bytes"] is not None else "       -    "
            pre = f"{r['precompute_s']:.3f} s" if r["precompute_s"] is not None else "(as blockskip)"
            print(
                f"{v:<14} peak tensors {tensors}  peak RSS {r['peak_rss_bytes'] / 2**20:8.1f} MiB"
                f"  step {r['step_s']:.3f} s  precompute {pre}  ({r['tokens']} tokens)"
            )
        else:
            print(f"[bench] {v} done", file=sys.stderr)

    result = memory.run(args.model, args.blocks, progress=show, runtime=args.runtime)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.get("ratios", {}).items():
            print(f"{k}: {v:.3f}")
        for k, v in result.get("ort_vs_torch_blockskip", {}).items():
            print(f"ort_blockskip_{k}_vs_torch_blockskip: {v:.3f}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan.predict import PlanOptions, format_plan, plan
    from .plan.targets import targets

    if args.table:
        from .plan.table import fits_table

        print(fits_table(args.table_out))
        return 0
    if not args.config:
        raise ValueError("--config is required (a transformer config.json, its folder, `builtin`, or a shipped name: "
                         "flux1-dev, sd35-medium, pixart-sigma-xl-2-1024, sana-600m-1024, sana-1600m-1024)")
    names = list(targets()) if args.target == "all" else [args.target]
    results = {}
    for t in names:
        results[t] = plan(PlanOptions(args.config, t, train_res=args.train_res, gen_res=args.gen_res, blocks=args.blocks,
                                      precision=args.precision, lora_rank=args.lora_rank, precompute=args.precompute,
                                      max_group_mb=args.max_group_mb))
    if args.json:
        print(json.dumps(results[names[0]] if len(names) == 1 else results, indent=2))
    else:
        print("\n\n".join(format_plan(r) for r in results.values()))
    return 0


def _bench_daemon(args: argparse.Namespace) -> int:
    from .bench import daemon

    models = [args.model] if args.model else ["builtin", "bench"]
    say = (lambda m: print(m, file=sys.stderr)) if args.json else print
    results = {}
    for m in models:
        results[m] = daemon.run(m, steps=args.steps or 20, gen_steps=args.gen_steps, blocks=args.blocks, progress=say)
        if not args.json:
            print(daemon.format_table(results[m]))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.run import run_eval

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    results = run_eval(args.out, model=args.model, quick=args.quick, steps=args.steps, seed=args.seed,
                       blocks=args.blocks, dino=args.dino, clip=args.clip, progress=not args.quiet,
                       lr=args.lr, lora_rank=args.rank, top_k=args.top_k, captions=args.captions,
                       crop_ids=args.crop_ids, contiguous=args.contiguous or None, samples=args.samples,
                       prior=args.prior, prior_share=args.prior_share, subject_set=args.subject_set, rows=args.rows,
                       train_res=args.train_res, patch_min=args.patch_min)
    with open(os.path.join(args.out, "results.md")) as f:
        print(f.read())
    print(f"done in {results['wall_s']:.0f} s: {args.out}/results.json, results.md, grid.png")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ValueError(f"-o {args.output}: no such directory {out_dir}")
    if args.server:
        return _generate_remote(args)
    if args.size is not None:
        raise ValueError("--size needs --server (in-process generation uses the model's size)")
    from PIL import Image

    from .generate import generate_images

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    model = args.model or "builtin"
    seed = 0 if args.seed is None else args.seed
    steps = 30 if args.steps is None else args.steps
    guidance = 3.0 if args.guidance is None else args.guidance
    image = generate_images(model, [args.prompt], seed=seed, steps=steps, guidance=guidance, adapter=args.adapter)[0]
    Image.fromarray(image).save(args.output)
    print(f"{args.output}: {image.shape[1]}x{image.shape[0]} ({args.prompt!r}, seed {seed}, {steps} steps)")
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    if args.model is not None:
        raise ValueError("--model and --server are exclusive (the daemon serves its bundle's model)")
    with _client(args) as c:
        r = c.generate(args.prompt, adapter_id=args.adapter or "", seed=args.seed or 0, steps=args.steps or 0,
                       guidance=args.guidance or 0.0, size=args.size or 0)
    _write_atomic(args.output, r.png)
    adapter = f", adapter {r.adapter_id}" if r.adapter_id else ""
    print(f"{args.output}: {r.size}x{r.size} ({args.prompt!r}, seed {r.seed}, {r.steps} steps, "
          f"guidance {r.guidance:g}{adapter}) in {r.time_s:.2f} s")
    return 0


# -- the edge daemon and its clients ------------------------------------------------------------------

def _read_token(path: str | None, flag: str) -> str | None:
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


def _client(args: argparse.Namespace):
    if not getattr(args, "server", None):
        raise ValueError("--server ADDR (host:port of `edgeblock serve`) is required")
    for flag in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file")
    try:
        from .client import EdgeClient
    except ImportError as e:
        raise RuntimeError(f"the daemon client needs grpcio ({e}); pip install 'edgeblock[device]'") from None
    return EdgeClient(args.server, token=_read_token(args.auth_token_file, "--auth-token-file"), tls_ca=args.tls_ca,
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


def cmd_serve(args: argparse.Namespace) -> int:
    from edge_runtime.daemon.config import config_kwargs

    kwargs = config_kwargs(args)  # checks the flags before the daemon (and grpc) load
    from edge_runtime.server import ServerConfig, serve_forever

    rc = serve_forever(ServerConfig(**kwargs))
    return rc if isinstance(rc, int) else 0


def cmd_personalize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    for flag in ("steps", "seed", "checkpoint_every"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.lr < 0:
        raise ValueError(f"--lr must be >= 0, got {args.lr}")
    if args.prior_share and not 0.0 < args.prior_share < 1.0:
        raise ValueError(f"--prior-share must be in (0, 1), got {args.prior_share}")
    if (args.class_caption or args.prior_share) and not args.class_images:
        raise ValueError("--class-caption and --prior-share need --class-images")
    with _client(args) as c:
        from .client import pb

        Kind = pb.JobEvent.Kind
        stream = c.personalize(args.images, token=args.token, class_noun=args.class_noun, steps=args.steps,
                               learning_rate=args.lr, seed=args.seed, checkpoint_every=args.checkpoint_every,
                               name=args.name, precompute=args.precompute, captions=args.caption or (),
                               class_images=args.class_images or (), class_captions=args.class_caption or (),
                               prior_share=args.prior_share)
        bar = tqdm(total=None, desc="connecting", unit="step", disable=args.json or args.quiet, dynamic_ncols=True)
        postfix: dict = {}
        try:
            for ev in stream:
                if args.json:
                    print(json.dumps(_as_dict(ev)), flush=True)
                kind = Kind.Name(ev.kind) if ev.kind in Kind.values() else str(ev.kind)
                if ev.kind == Kind.STEP:
                    if ev.total_steps and bar.total != ev.total_steps:
                        bar.total = ev.total_steps
                    bar.set_description_str("training", refresh=False)
                    postfix["loss"] = f"{ev.loss:.4f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(max(ev.step - bar.n, 0))
                elif ev.kind == Kind.QUEUED:
                    bar.set_description_str(f"queued ({ev.queue_position} ahead)" if ev.queue_position else "queued")
                elif ev.kind == Kind.ENCODING:
                    bar.set_description_str("encoding")
                elif ev.kind == Kind.PRECOMPUTING:
                    bar.set_description_str(f"precomputing {ev.progress:.0%}")
                elif ev.kind == Kind.CHECKPOINT:
                    postfix["checkpoint"] = ev.step
                    bar.set_postfix(postfix)
                elif ev.kind == Kind.DONE:
                    bar.close()
                    if not args.json:
                        print(f"job {ev.job_id} done in {ev.elapsed_s:.1f} s: adapter {ev.adapter_id}", file=sys.stderr)
                        print(ev.adapter_id)
                    return 0
                elif ev.kind in (Kind.FAILED, Kind.CANCELLED):
                    bar.close()
                    what = "failed" if ev.kind == Kind.FAILED else "was cancelled"
                    print(f"edgeblock personalize: error: job {ev.job_id} {what}: {ev.message or kind}", file=sys.stderr)
                    return 1
            bar.close()
            print(f"edgeblock personalize: error: the stream of job {stream.job_id or '?'} ended without DONE",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            bar.close()
            if stream.job_id:
                try:
                    job = c.cancel_job(stream.job_id)
                    state = pb.Job.State.Name(job.state)
                    print(f"interrupted: cancelled job {stream.job_id} ({state}, step {job.step})", file=sys.stderr)
                except (RuntimeError, OSError) as e:  # ClientError; the daemon still cancels when the stream goes
                    print(f"interrupted: CancelJob {stream.job_id} failed ({e}); closing the stream", file=sys.stderr)
            else:
                print("interrupted before the job started; closing the stream", file=sys.stderr)
            stream.cancel()
            return 130
        finally:
            bar.close()


def _created(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def cmd_adapters(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "ls":
            adapters = c.list_adapters()
            if args.json:
                print(json.dumps([_as_dict(a) for a in adapters], indent=2))
                return 0
            rows = [("ID", "NAME", "TOKEN", "STEPS", "FINAL LOSS", "CREATED")]
            rows += [(a.id, a.name, a.token, str(a.steps), f"{a.final_loss:.4f}", _created(a.created)) for a in adapters]
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for r in rows:
                print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
            if not adapters:
                print("(no adapters)", file=sys.stderr)
            return 0
        if args.action == "rm":
            if c.delete_adapter(args.id):
                print(f"deleted {args.id}")
                return 0
            print(f"edgeblock adapters: error: {args.id} was not deleted", file=sys.stderr)
            return 1
        data, filename = c.export_adapter(args.id)
        path = args.output or os.path.basename(filename or "") or f"{args.id}.safetensors"
        out_dir = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(out_dir):
            raise ValueError(f"-o {path}: no such directory {out_dir}")
        _write_atomic(path, data)
        print(f"{path}: {len(data)} bytes (adapter {args.id}, safetensors, diffusers/PEFT names)")
        return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from .compile.bundle import CompileOptions, compile_bundle

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    opts = CompileOptions(
        model=args.model, out=args.out, blocks=args.blocks, selection=args.selection, target=args.target,
        train_res=args.train_res, gen_res=args.gen_res, lora_rank=args.lora_rank, precision=args.precision,
        verify=False if args.no_verify else None, seed=args.seed, max_group_mb=args.max_group_mb,
        crop_ids=args.crop_ids,
    )
    compile_bundle(opts, progress=print)
    return 0


def cmd_build_engines(args: argparse.Namespace) -> int:
    from edge_runtime.engines import build_engines

    if args.workspace_mb is not None and args.workspace_mb <= 0:
        raise ValueError(f"--workspace-mb must be positive, got {args.workspace_mb}")
    workspace = args.workspace_mb * 2**20 if args.workspace_mb is not None else None
    built = build_engines(args.bundle, cache_dir=args.cache_dir, workspace_bytes=workspace, progress=print, force=args.force)
    for g in built["groups"]:
        how = "cached" if g["cached"] else f"built in {g['build_s']:.1f} s"
        print(f"  {g['onnx']:<28} -> {g['engine']} ({how}, {g['precision']}, profiles {', '.join(g['profiles'])})")
    print(f"engines for TensorRT {built['tensorrt_version']} on {built['gpu_name']}: {args.bundle}/engines/built.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeblock", description="On-device DiT personalization (DiT-BlockSkip)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("select", help="rank blocks for personalization by cross-attention masking")
    s.add_argument("--model", required=True, help="`builtin` or a local diffusers pipeline directory")
    s.add_argument("--out", required=True, help="ranked JSON report (a bar chart PNG is written beside it)")
    s.add_argument("--images", nargs="*", default=None, help="subject images (default: procedural shapes)")
    s.add_argument("--token", default="sks", help="the rare subject token")
    s.add_argument("--class-noun", default=None, help="the subject's class noun (default: from the calibration images)")
    s.add_argument("--prompt", default=None, help="calibration prompt containing {token} and {noun}")
    s.add_argument("--top-k", type=int, default=2)
    s.add_argument("--contiguous", action="store_true", help="choose the best contiguous window of k blocks")
    s.add_argument("--noise-levels", type=_floats, default=(0.25, 0.5, 0.75))
    s.add_argument("--noises", type=int, default=2)
    s.add_argument("--count", type=int, default=4, help="calibration images when none are given")
    s.add_argument("--res", type=int, default=None, help="calibration image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chart", default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_select)

    b = sub.add_parser("bench", help="benchmarks that print figures")
    b.add_argument("what", choices=["memory", "daemon"],
                   help="memory: the method's training variants; daemon: the edge daemon beside torch")
    b.add_argument("--model", default=None,
                   help="memory: default the FLUX-shaped >=100M benchmark config; daemon: builtin, bench (the >=100M "
                        "FLUX-shaped config laid out like builtin) or a builtin-layout directory (default: both)")
    b.add_argument("--steps", type=int, default=None, help="daemon: personalization steps (default 20)")
    b.add_argument("--gen-steps", type=int, default=10, help="daemon: sampling steps of the timed generation")
    b.add_argument("--blocks", type=_blocks, default=None, help="trainable blocks for the skip variants")
    b.add_argument("--runtime", choices=["torch", "ort"], default="torch",
                   help="ort: add the ONNX Runtime training step (the device trainer) as ort_blockskip")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    pl = sub.add_parser("plan", help="predict the peak memory of each device phase from a transformer config.json")
    pl.add_argument("--config", default=None,
                    help="diffusers transformer config.json (or its folder), `builtin`, or a shipped name: flux1-dev, "
                         "sd35-medium, pixart-sigma-xl-2-1024, sana-600m-1024, sana-1600m-1024")
    pl.add_argument("--target", default="orin-nx-16gb",
                    help="orin-nano-8gb, orin-nx-16gb, agx-orin-32gb, agx-orin-64gb, host-cpu, or all")
    pl.add_argument("--train-res", type=int, default=None,
                    help="training crop side in pixels (default: the model's recipe; gen-res / 2 without a measured one)")
    pl.add_argument("--gen-res", type=int, default=None, help="generation side in pixels (default: the family's)")
    pl.add_argument("--blocks", type=_blocks, default=None,
                    help="trainable blocks (default: the recipe's number of blocks, the middle ones; two without a measured recipe)")
    pl.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                    help="frozen and generation weights (default: fp16 on Jetson, fp32 on host-cpu)")
    pl.add_argument("--lora-rank", type=int, default=None, help="default: the model's recipe (4 without a measured one)")
    pl.add_argument("--precompute", choices=["bank", "online"], default=None,
                    help="default: the daemon's rule (bank above 256 MiB of transformer weights)")
    pl.add_argument("--max-group-mb", type=float, default=None,
                    help="as `edgeblock compile --max-group-mb` (default: auto, the trainable blocks' size; 0: no cap)")
    pl.add_argument("--table", action="store_true", help="print the what-fits-where table of the shipped configs")
    pl.add_argument("--table-out", default=None, help="with --table: also write it (Markdown) to this file")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    e = sub.add_parser("eval", help="personalization benchmark: quality and memory table, sample grid")
    e.add_argument("--out", required=True, help="directory for results.json, results.md and grid.png")
    e.add_argument("--model", default="builtin", help="`builtin` or a directory laid out like it")
    e.add_argument("--quick", action="store_true", help="one subject, two prompts, a few steps (smoke test)")
    e.add_argument("--steps", type=int, default=None, help="training steps per subject and variant (default 300)")
    e.add_argument("--blocks", type=_blocks, default=None, help="trainable blocks of the skip rows (default: selection)")
    e.add_argument("--top-k", type=int, default=None, help="blocks selection picks for the skip rows (default 5)")
    e.add_argument("--contiguous", action="store_true",
                   help="selection picks the best window of --top-k consecutive blocks (default: the top-k blocks)")
    e.add_argument("--lr", type=float, default=None, help="learning rate of every fine-tuned row (default 0.003)")
    e.add_argument("--rank", type=int, default=None, help="LoRA rank of every fine-tuned row (default 8)")
    e.add_argument("--captions", choices=("per-image", "token"), default=None,
                   help="training prompts: each reference's own caption, 'a large sks star on a blue background, "
                        "top left' (per-image, default), or 'a sks <noun>' for every reference (token)")
    e.add_argument("--crop-ids", choices=("grid", "image"), default=None,
                   help="position ids of the patch rows' crops: the coordinates of the place in the image they "
                        "were cut from (image, default; what the daemon does) or their own token grid (grid)")
    e.add_argument("--train-res", type=int, default=None, metavar="PX",
                   help="training crop side of the patch rows in pixels (default: 3/4 of the generation side, 48 on builtin)")
    e.add_argument("--patch-min", type=float, default=None, metavar="F",
                   help="the smallest crop (noise level 0) as a fraction of the image side, in (0, 1] (default: "
                        "--train-res / the generation side: the smallest crop at the image's own scale)")
    e.add_argument("--samples", type=int, default=None,
                   help="images generated per prompt, each from its own noise (default 1)")
    e.add_argument("--prior", type=int, default=None, metavar="N",
                   help="prior preservation: N class images per subject, generated by the base model from prompts "
                        "of the subject's class noun, trained on by every fine-tuned row (default 0: none)")
    e.add_argument("--prior-share", type=float, default=None,
                   help="share of the training draws taken from the class images, in (0, 1) (default 0.5)")
    e.add_argument("--subject-set", choices=("benchmark", "validation"), default=None,
                   help="the benchmark's subjects (default) or the validation designs, held out from every choice "
                        "of the defaults")
    e.add_argument("--rows", type=_rows, default=None,
                   help="comma-separated rows to run, of base, standard_lora, patch, skip, blockskip (default: all; "
                        "the targets need base, standard_lora and blockskip)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--dino", default=None, help="local DINO ViT folder (transformers) for the DINO metric")
    e.add_argument("--clip", default=None, help="local CLIP folder (transformers) for CLIP-I and CLIP-T")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="text to image: in this process (--model) or on an edge daemon (--server)")
    g.add_argument("--model", default=None, help="`builtin` (default) or a directory laid out like it; not with --server")
    g.add_argument("--prompt", required=True)
    g.add_argument("-o", "--output", required=True, help="PNG to write")
    g.add_argument("--seed", type=int, default=None, help="default 0 (with --server: the daemon's default seed)")
    g.add_argument("--steps", type=int, default=None, help="default 30 (with --server: the bundle's default)")
    g.add_argument("--guidance", type=float, default=None, help="default 3.0 (with --server: the bundle's default)")
    g.add_argument("--adapter", default=None,
                   help="LoRA adapter .safetensors (edgeblock format); with --server: an adapter id on the daemon")
    g.add_argument("--size", type=int, default=None, help="image side in pixels, one of the bundle's sizes (--server only)")
    _client_flags(g, required=False)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("compile", help="compile a model into a verified device bundle (ONNX, ORT training, TensorRT plan)")
    c.add_argument("--model", required=True, help="`builtin` or a local diffusers pipeline directory")
    c.add_argument("--out", required=True, help="bundle directory (new, empty, or an existing bundle to update)")
    c.add_argument("--blocks", type=_blocks, default=None, help="trainable blocks, e.g. 3,4 (default: run selection)")
    c.add_argument("--selection", default=None, help="a selection.json written by `edgeblock select`")
    c.add_argument("--target", default="cpu", choices=["cpu", "orin-nano-8gb", "orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb"])
    c.add_argument("--train-res", type=int, default=None,
                   help="training crop side in pixels (default: the model's recipe: 3/4 of --gen-res for builtin, half otherwise)")
    c.add_argument("--gen-res", type=int, default=None, help="generation side in pixels (default: the model's)")
    c.add_argument("--lora-rank", type=int, default=None, help="default: the model's recipe (8 for builtin, 4 otherwise)")
    c.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="TensorRT engine precision (ONNX graphs are fp32)")
    c.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch verification")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--max-group-mb", type=float, default=None,
                   help="cap each frozen group's fp32 weights (MiB): the bank precompute holds one group at a time "
                        "(default: the trainable blocks' size; 0: one group per skipped run)")
    c.add_argument("--crop-ids", choices=("grid", "image"), default=None,
                   help="FLUX: position ids of the daemon's training crops, the coordinates of the place in the "
                        "image they were cut from (image, the recipe's) or their own token grid (grid)")
    c.set_defaults(func=cmd_compile)

    be = sub.add_parser("build-engines", help="build and cache the TensorRT engines of a bundle's frozen groups (on the device)")
    be.add_argument("bundle", metavar="BUNDLE", help="a bundle written by `edgeblock compile`")
    be.add_argument("--cache-dir", default=None, help="engine cache directory (default: BUNDLE/engines/cache)")
    be.add_argument("--workspace-mb", type=int, default=None, help="TensorRT builder workspace limit in MiB (default: TensorRT's)")
    be.add_argument("--force", action="store_true", help="rebuild engines even when the cache has them")
    be.set_defaults(func=cmd_build_engines)

    sv = sub.add_parser("serve", help="run the edge daemon (gRPC) on a compiled bundle")
    from edge_runtime.daemon.config import add_arguments as add_daemon_arguments

    add_daemon_arguments(sv)  # the flags of `python -m edge_runtime.server`
    sv.set_defaults(func=cmd_serve)

    pz = sub.add_parser("personalize", help="train a LoRA adapter on subject images on an edge daemon")
    pz.add_argument("--images", nargs="+", required=True, metavar="F", help="subject images (PNG/JPEG)")
    pz.add_argument("--token", required=True, help="the rare subject token, e.g. sks")
    pz.add_argument("--class-noun", required=True, help="the subject's class noun, e.g. dog")
    pz.add_argument("--steps", type=int, default=0, help="training steps (default: the bundle's)")
    pz.add_argument("--lr", type=float, default=0.0, help="learning rate (default: the bundle's)")
    pz.add_argument("--seed", type=int, default=0, help="seed of the draws (0: the daemon's default)")
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
    pz.add_argument("--precompute", choices=["", "bank", "online"], default="",
                    help="precompute mode (default: the daemon's memory plan decides)")
    pz.add_argument("--json", action="store_true", help="print every event as a JSON line (the last one is DONE)")
    pz.add_argument("--quiet", action="store_true", help="no progress bar")
    _client_flags(pz, required=True)
    pz.set_defaults(func=cmd_personalize)

    ad = sub.add_parser("adapters", help="list, delete or export the adapters on an edge daemon")
    _client_flags(ad, required=False)
    ad_sub = ad.add_subparsers(dest="action", required=True)
    ls = ad_sub.add_parser("ls", help="list adapters")
    ls.add_argument("--json", action="store_true")
    _client_flags(ls, required=False, suppress=True)
    rm = ad_sub.add_parser("rm", help="delete an adapter")
    rm.add_argument("id", metavar="ID")
    _client_flags(rm, required=False, suppress=True)
    ex = ad_sub.add_parser("export", help="write an adapter's LoRA weights as safetensors (diffusers/PEFT names)")
    ex.add_argument("id", metavar="ID")
    ex.add_argument("-o", "--output", default=None, help="file to write (default: the name the daemon suggests)")
    _client_flags(ex, required=False, suppress=True)
    ad.set_defaults(func=cmd_adapters)
    from .deploy import register as _register_deploy

    _register_deploy(sub)
    return p


def _client_flags(p: argparse.ArgumentParser, required: bool, suppress: bool = False) -> None:
    """--server and the connection flags of the daemon's clients. With suppress (a sub-subcommand),
    unset flags leave the parent's values alone, so they may come before or after the action."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("--server", required=required, default=d(None), metavar="ADDR", help="the daemon's host:port")
    p.add_argument("--auth-token-file", default=d(None), help="file holding the bearer token (default: $EDGEBLOCK_TOKEN)")
    p.add_argument("--tls-ca", default=d(None), help="CA (PEM) of the daemon's certificate; without it: plaintext")
    p.add_argument("--tls-cert", default=d(None), help="client certificate (PEM) for mTLS")
    p.add_argument("--tls-key", default=d(None), help="client private key (PEM) for mTLS")
    p.add_argument("--timeout", type=float, default=d(None), help="deadline of each call in seconds (not of training)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # The daemon client's errors (edgeblock.client.ClientError) carry exit_code 1; usage errors are 2.
        print(f"edgeblock {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
