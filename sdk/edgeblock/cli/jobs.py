"""Following a training job on an edge daemon from the command line: the progress bar over its events,
re-attaching after a dropped connection (WatchJob once the job is known, else the same request again
with its request_id), and `edgeblock jobs ls|watch|cancel`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from .daemon_client import _as_dict, _client, client_flags, print_table, when

# a dropped or refused connection, or a daemon restarting: worth re-attaching (the job goes on on the daemon)
RETRY_CODES = ("UNAVAILABLE",)


def follow_job(client, open_stream: Callable[[str], object], args: argparse.Namespace, what: str) -> int:
    """Show a job's events until its final one: open_stream(job_id) opens the events ("" before the job is
    known). After a dropped connection it re-attaches for up to args.reattach_timeout seconds (0: never).
    Exit status 0 for DONE, 1 for FAILED/CANCELLED or a stream that ended early, 130 after Ctrl-C (which
    cancels the job when args.cancel_on_interrupt)."""
    from tqdm import tqdm

    from ..client import ClientError, kind_name, pb, state_name

    Kind = pb.JobEvent.Kind
    bar = tqdm(total=None, desc="connecting", unit="step", disable=args.json or args.quiet, dynamic_ncols=True)
    postfix: dict = {}
    job_id, last_seen = "", 0  # events already shown (a re-attached stream starts from the first again)
    validations: dict[int, int] = {}  # step -> validation images of it written
    lost_since = None
    try:
        while True:
            stream = open_stream(job_id)
            seen = 0
            try:
                for ev in stream:
                    seen += 1
                    job_id = ev.job_id or job_id
                    lost_since = None
                    if seen <= last_seen:
                        continue
                    last_seen = seen
                    if args.json:
                        print(json.dumps(_as_dict(ev)), flush=True)
                    if ev.kind == Kind.KIND_STEP:
                        if ev.total_steps and bar.total != ev.total_steps:
                            bar.total = ev.total_steps
                        bar.set_description_str("training", refresh=False)
                        postfix["loss"] = f"{ev.loss:.4f}"
                        bar.set_postfix(postfix, refresh=False)
                        bar.update(max(ev.step - bar.n, 0))
                    elif ev.kind == Kind.KIND_QUEUED:
                        bar.set_description_str(f"queued ({ev.queue_position} ahead)" if ev.queue_position else "queued")
                    elif ev.kind == Kind.KIND_ENCODING:
                        bar.set_description_str("encoding")
                    elif ev.kind == Kind.KIND_PRECOMPUTING:
                        bar.set_description_str(f"precomputing {ev.progress:.0%}")
                    elif ev.kind == Kind.KIND_CHECKPOINT:
                        postfix["checkpoint"] = ev.step
                        bar.set_postfix(postfix)
                    elif ev.kind == Kind.KIND_VALIDATION:
                        saved = _save_validation(ev, getattr(args, "validation_dir", None), validations)
                        postfix["validation"] = f"step {ev.step}" + (f" -> {saved}" if saved else "")
                        bar.set_postfix(postfix)
                    elif ev.kind == Kind.KIND_DONE:
                        bar.close()
                        if not args.json:
                            took = ev.elapsed.ToNanoseconds() / 1e9 if ev.HasField("elapsed") else ev.elapsed_s
                            print(f"job {ev.job_id} done in {took:.1f} s: adapter {ev.adapter_id}", file=sys.stderr)
                            print(ev.adapter_id)
                        return 0
                    elif ev.kind in (Kind.KIND_FAILED, Kind.KIND_CANCELLED):
                        bar.close()
                        verb = "failed" if ev.kind == Kind.KIND_FAILED else "was cancelled"
                        print(f"edgeblock {what}: error: job {ev.job_id} {verb}: {ev.message or kind_name(ev.kind)}",
                              file=sys.stderr)
                        return 1
                raise ClientError("UNAVAILABLE", "the stream ended before the job's final event")
            except ClientError as e:
                if e.code not in RETRY_CODES or not args.reattach_timeout:
                    raise
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > args.reattach_timeout:
                    raise ClientError(e.code, f"{e.details} (no connection for {args.reattach_timeout:g} s; the job "
                                              f"{job_id or '?'} may still run: `edgeblock jobs watch {job_id}`)") from None
                bar.set_description_str(f"reconnecting ({e.code})")
                time.sleep(1.0)
    except KeyboardInterrupt:
        bar.close()
        if job_id and getattr(args, "cancel_on_interrupt", False):
            try:
                job = client.cancel_job(job_id)
                print(f"interrupted: cancelled job {job_id} ({state_name(job.state)}, step {job.step})", file=sys.stderr)
            except (RuntimeError, OSError) as e:  # ClientError
                print(f"interrupted: CancelJob {job_id} failed ({e}); it goes on: `edgeblock jobs cancel {job_id}`",
                      file=sys.stderr)
        elif job_id:
            print(f"interrupted: job {job_id} goes on (`edgeblock jobs watch {job_id}`)", file=sys.stderr)
        else:
            print("interrupted before the job started", file=sys.stderr)
        return 130
    finally:
        bar.close()


def _save_validation(ev, folder: str | None, written: dict[int, int]) -> str:
    """Write a KIND_VALIDATION event's PNG as FOLDER/stepNNNNN-K.png (K: its prompt's place); "" without a folder."""
    if not folder:
        return ""
    import os

    from edge_runtime.fileio import atomic_write

    k = written.get(ev.step, 0)
    written[ev.step] = k + 1
    path = os.path.join(folder, f"step{ev.step:05d}-{k}.png")
    atomic_write(path, ev.png)
    return path


def cmd_jobs(args: argparse.Namespace) -> int:
    from ..client import state_name

    with _client(args) as c:
        if args.action == "ls":
            jobs = c.list_jobs()
            if args.json:
                print(json.dumps([_as_dict(j) for j in jobs], indent=2))
                return 0
            rows = [("ID", "STATE", "STEP", "NAME", "ADAPTER", "CREATED")]
            rows += [(j.id, state_name(j.state), f"{j.step}/{j.total_steps}", j.name, j.adapter_id or "-",
                      when(j.create_time.seconds)) for j in jobs]
            print_table(rows, "(no jobs)")
            return 0
        if args.action == "cancel":
            j = c.cancel_job(args.id)
            print(f"job {j.id}: {state_name(j.state)} at step {j.step}/{j.total_steps}")
            return 0
        return follow_job(c, lambda _job_id: c.watch_job(args.id), args, "jobs watch")


def register(sub) -> None:
    """Add `jobs` to `edgeblock`'s subparsers."""
    jb = sub.add_parser("jobs", help="list, follow or cancel the training jobs on an edge daemon")
    client_flags(jb, required=False)
    jb_sub = jb.add_subparsers(dest="action", required=True)
    ls = jb_sub.add_parser("ls", help="list jobs, newest first")
    ls.add_argument("--json", action="store_true")
    client_flags(ls, required=False, suppress=True)
    w = jb_sub.add_parser("watch", help="follow a job's events until it ends (from any client; Ctrl-C leaves it running)")
    w.add_argument("id", metavar="JOB_ID")
    w.add_argument("--json", action="store_true", help="print every event as a JSON line")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.add_argument("--reattach-timeout", type=float, default=600.0, metavar="S",
                   help="after a dropped connection, re-attach for up to S seconds (0: give up at once; default 600)")
    client_flags(w, required=False, suppress=True)
    c = jb_sub.add_parser("cancel", help="cancel a queued or running job")
    c.add_argument("id", metavar="JOB_ID")
    client_flags(c, required=False, suppress=True)
    jb.set_defaults(func=cmd_jobs)
