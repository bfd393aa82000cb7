"""`make demo`: the product end to end on the built-in model.

1. compile  the built-in model into a device bundle (cached: a rerun finds it up to date);
2. serve    start the edge daemon on loopback (its own torch-free process);
3. personalize  a held-out subject the model has never seen, over gRPC, with a progress bar;
4. generate a grid of prompts with and without the adapter, over gRPC;
5. summary  the daemon's peak memory while training and while generating, time per step,
            generation latency; the daemon is stopped with SIGTERM and must exit 0.

Outputs go to the folder it names (default demo-out/): subject.png, grid.png (row 1 without,
row 2 with the adapter), generate_*.png, adapter.safetensors (diffusers/PEFT names),
summary.json, summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from tqdm import tqdm

# The demo's subject: one of the held-out eval subjects (a purple star with a white ring inside).
SUBJECT = "ringstar"
EXTRA_PROMPTS = ["a red circle on a blue background, center"]


def fidelity(rows: list[list[np.ndarray]], scored, subject) -> dict[str, dict[str, float]]:
    """The benchmark's subject and prompt fidelity (edgeblock.eval.metrics) of the generations of the subject's
    prompts, without (row 0) and with (row 1) the adapter."""
    from .eval import metrics

    refs = [metrics.describe(im) for im in subject.images]
    out = {}
    for name, row in (("base", rows[0]), ("adapter", rows[1])):
        vals = [metrics.score(img, refs, p.background, p.position) for img, p in zip(row, scored)]
        out[name] = {k: float(np.mean([v[k] for v in vals])) for k in ("subject_fidelity", "prompt_fidelity")}
    return out


def bundle_cache() -> str:
    root = os.environ.get("EDGEBLOCK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "edgeblock"))
    return os.path.join(root, "bundles", "builtin")


class RssSampler:
    """A process's peak RSS per named phase.

    Where Linux lets us reset the kernel's high-water mark (VmHWM, /proc/PID/clear_refs), each phase's
    peak is the mark read when the phase ends, reset when it starts: no transient is missed however
    busy the machine is. A poll every few ms runs as well (and alone where the reset is refused).
    """

    def __init__(self, pid: int, every: float = 0.02):
        from edge_runtime.memstat import reset_rss_peak

        self.pid, self.every = pid, every
        self._phase: str | None = None
        self.peaks: dict[str, int] = {}
        self._lock = threading.Lock()
        self.hwm = reset_rss_peak(pid)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @property
    def phase(self) -> str | None:
        return self._phase

    @phase.setter
    def phase(self, name: str | None) -> None:
        if name == self._phase:
            return
        with self._lock:
            self._close_phase()
            self._phase = name

    def _credit(self, phase: str | None, r: int) -> None:
        if phase:
            self.peaks[phase] = max(self.peaks.get(phase, 0), r)

    def _close_phase(self) -> None:
        from edge_runtime.memstat import reset_rss_peak, rss_peak_bytes

        if not self.hwm:
            return
        try:
            self._credit(self._phase, rss_peak_bytes(self.pid))
            reset_rss_peak(self.pid)
        except (OSError, RuntimeError):
            self.hwm = False

    def _run(self) -> None:
        from edge_runtime.memstat import rss_bytes

        while not self._stop.is_set():
            try:
                r = rss_bytes(self.pid)
            except (OSError, RuntimeError):
                return
            with self._lock:
                self._credit(self._phase, r)
            time.sleep(self.every)

    def stop(self) -> None:
        with self._lock:
            self._close_phase()
            self._phase = None
        self._stop.set()
        self._t.join(1)


def _grid(rows: list[list[np.ndarray]], path: str, scale: int = 3) -> None:
    from PIL import Image

    h, w = rows[0][0].shape[:2]
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(Image.fromarray(im), (x * w, y * h))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


def start_daemon(bundle: str, state: str, log_path: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """`python -m edge_runtime.server` on a free loopback port (extra: more of its flags); (process, address)."""
    cmd = [sys.executable, "-m", "edge_runtime.server", "--bundle", bundle, "--listen", "127.0.0.1:0", "--state", state,
           *extra]
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline().decode()
        m = re.search(r"\(port (\d+)\)", line)
        if m:
            return proc, f"127.0.0.1:{m.group(1)}"
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"the daemon did not start; see {log_path}")


def stop_daemon(proc: subprocess.Popen, wait: float = 60) -> int:
    """SIGTERM (the daemon checkpoints and exits 0), killed after `wait` seconds; its exit code (-9: killed)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgeblock-demo")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--steps", type=int, default=0, help="personalization steps (default: the bundle's recipe)")
    p.add_argument("--lr", type=float, default=0.0, help="learning rate (default: the bundle's recipe)")
    p.add_argument("--gen-steps", type=int, default=30)
    p.add_argument("--prior", type=int, default=0,
                   help="class images for prior preservation, generated on the daemon by the base model (default 0: "
                        "none; docs/results.md: they cost DiT-BlockSkip subject fidelity)")
    p.add_argument("--bundle", default=None, help="bundle directory (default: the cache)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    summary: dict = {"subject": SUBJECT}

    # 1. compile (cached)
    from .compile.bundle import CompileOptions, compile_bundle

    bundle = os.path.abspath(args.bundle or bundle_cache())
    os.makedirs(os.path.dirname(bundle), exist_ok=True)
    print(f"[1/5] compile: built-in model -> {bundle}")
    t0 = time.perf_counter()
    res = compile_bundle(CompileOptions("builtin", bundle), progress=lambda m: print("      " + m.replace("[compile] ", "")))
    summary["compile_s"] = time.perf_counter() - t0
    summary["compile_cached"] = bool(res.up_to_date)

    from edge_runtime.manifest import load_manifest

    from .client import EdgeClient, kind_name
    from .eval.subjects import load_subjects

    m = load_manifest(bundle, verify_files=False)
    subject = load_subjects(names=[SUBJECT])[0]
    ref_dir = os.path.join(os.path.dirname(__file__), "eval", "data")
    pngs = [os.path.join(ref_dir, r.file) for r in subject.references]
    _grid([[np.asarray(im) for im in subject.images]], os.path.join(out, "subject.png"))
    # every prompt of the subject (scored with the benchmark's metrics, without and with the adapter) + extras
    scored = list(subject.prompts)
    prompts = [pr.text for pr in scored] + EXTRA_PROMPTS

    # 2. serve
    state = os.path.join(out, "state")
    print(f"[2/5] serve: edge daemon on loopback (state {state})")
    proc, address = start_daemon(bundle, state, os.path.join(out, "daemon.log"))
    rss = RssSampler(proc.pid)
    try:
        with EdgeClient(address, timeout=600) as c:
            c.wait_ready(60)
            info = c.info()
            print(f"      {address}: {info.family}, {info.parameters / 1e6:.2f}M parameters, trainable blocks "
                  f"{list(info.trainable_blocks)} of {info.num_blocks}, trainer {info.trainer}, executor {info.executor}")
            summary["daemon"] = {"address": address, "trainer": info.trainer, "executor": info.executor,
                                 "trainable_blocks": list(info.trainable_blocks)}
            steps = args.steps or info.defaults.steps  # 0: the daemon's default, the bundle's recipe
            lr = args.lr or info.defaults.learning_rate
            print(f"      recipe: {m.train_res} px crops of {m.gen_res}, LoRA rank {m.lora_rank}, "
                  f"{steps} steps of {m.training_recipe().batch} draws, lr {lr:g}")

            # 3. personalize (with --prior N: prior preservation, the base model's own images of the class first)
            rss.phase = "generate"
            from .builtin.world import class_captions

            class_caps = class_captions(subject.noun, args.prior, seed=1) if args.prior > 0 else []
            class_pngs = [c.generate(cap, seed=101 + k, steps=args.gen_steps, guidance=3.0).png
                          for k, cap in enumerate(tqdm(class_caps, desc="[3/5] class images (base model)", unit="image",
                                                       disable=not class_caps))]
            summary["class_images"] = class_caps
            rss.phase = "personalize"
            losses: list[float] = []
            adapter_id, t0 = "", time.perf_counter()
            with tqdm(total=steps, desc=f"[3/5] personalize '{subject.description}' (sks {subject.noun})",
                      unit="step") as bar:
                # each reference trains on its own caption ("a large sks star on a blue background, top left")
                for ev in c.personalize(pngs, token="sks", class_noun=subject.noun, steps=steps,
                                        learning_rate=lr, seed=1, captions=subject.captions,
                                        class_images=class_pngs, class_captions=class_caps):
                    kind = kind_name(ev.kind)
                    if kind == "STEP":
                        losses.append(ev.loss)
                        bar.update(ev.step - bar.n)
                        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
                    elif kind == "DONE":
                        adapter_id = ev.adapter_id
                    elif kind in ("FAILED", "CANCELLED"):
                        raise RuntimeError(f"personalization {kind.lower()}: {ev.message}")
            train_s = time.perf_counter() - t0
            summary["personalize"] = {"steps": steps, "batch": m.training_recipe().batch, "learning_rate": lr,
                                      "train_res": m.train_res, "seconds": train_s, "s_per_step": train_s / steps,
                                      "loss_first20": float(np.mean(losses[:20])),
                                      "loss_last20": float(np.mean(losses[-20:])), "adapter_id": adapter_id}

            # 4. generate
            rss.phase = "generate"
            rows: list[list[np.ndarray]] = [[], []]
            times = []
            import io

            from PIL import Image

            with tqdm(total=2 * len(prompts), desc="[4/5] generate (without / with the adapter)", unit="image") as bar:
                for row, aid in ((0, ""), (1, adapter_id)):
                    for k, prompt in enumerate(prompts):
                        r = c.generate(prompt, adapter_id=aid, seed=1 + k, steps=args.gen_steps, guidance=3.0)
                        times.append(r.time_s)
                        im = np.asarray(Image.open(io.BytesIO(r.png)).convert("RGB"))
                        rows[row].append(im)
                        with open(os.path.join(out, f"generate_{'adapter' if aid else 'base'}_{k}.png"), "wb") as f:
                            f.write(r.png)
                        bar.update(1)
            _grid(rows, os.path.join(out, "grid.png"))
            data, _name = c.export_adapter(adapter_id)
            with open(os.path.join(out, "adapter.safetensors"), "wb") as f:
                f.write(data)
            summary["fidelity"] = fidelity(rows, scored, subject)
            summary["generate"] = {"prompts": prompts, "steps": args.gen_steps, "guidance": 3.0,
                                   "latency_s_mean": float(np.mean(times)), "latency_s_max": float(np.max(times))}
            rss.phase = None
    finally:
        rss.stop()
        code = stop_daemon(proc)  # 5. stop: SIGTERM, graceful
    summary["daemon"]["exit_code"] = code
    summary["daemon"]["peak_rss_bytes"] = {k: int(v) for k, v in rss.peaks.items()}
    summary["total_s"] = time.perf_counter() - t_start
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    pr, ge, fid = summary["personalize"], summary["generate"], summary["fidelity"]
    peaks = summary["daemon"]["peak_rss_bytes"]
    md = [
        "# edgeblock demo", "",
        f"Model: built-in FLUX-architecture DiT ({m.model['parameters'] / 1e6:.2f}M parameters), bundle {bundle}",
        f"Subject: {subject.description} ('sks {subject.noun}'), {len(pngs)} reference images, each trained on "
        f"its own caption (e.g. '{subject.captions[0]}')"
        + (f"; prior preservation with {len(class_caps)} class images the daemon generated from class captions"
           if class_caps else ""), "",
        "| phase | figure |", "|---|---|",
        f"| compile | {summary['compile_s']:.1f} s ({'cached' if summary['compile_cached'] else 'built'}) |",
        f"| recipe | {pr['train_res']} px crops, {pr['steps']} steps of {pr['batch']} draws, lr {pr['learning_rate']:g} |",
        f"| personalize | {pr['steps']} steps in {pr['seconds']:.1f} s ({pr['s_per_step'] * 1000:.0f} ms/step, precompute included); "
        f"loss {pr['loss_first20']:.4f} -> {pr['loss_last20']:.4f} |",
        f"| daemon peak RSS, personalize | {peaks.get('personalize', 0) / 2**20:.0f} MiB |",
        f"| subject fidelity (eval metric, {len(scored)} prompts) | {fid['base']['subject_fidelity']:.3f} without the "
        f"adapter -> {fid['adapter']['subject_fidelity']:.3f} with it |",
        f"| prompt fidelity | {fid['base']['prompt_fidelity']:.3f} -> {fid['adapter']['prompt_fidelity']:.3f} |",
        f"| generate | {ge['steps']} steps, mean {ge['latency_s_mean']:.2f} s / image (max {ge['latency_s_max']:.2f} s) |",
        f"| daemon peak RSS, generate | {peaks.get('generate', 0) / 2**20:.0f} MiB |",
        f"| daemon exit on SIGTERM | {code} |", "",
        "grid.png: row 1 without the adapter, row 2 with it; prompts: " + "; ".join(prompts), "",
    ]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(md))
    print("[5/5] summary")
    print("\n".join("      " + line for line in md[5:15]))
    print(f"done in {summary['total_s']:.0f} s; outputs in {out}/ (grid.png, subject.png, adapter.safetensors, summary.md)")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
