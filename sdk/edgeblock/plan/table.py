"""The what-fits-where table of docs/plan.md: every shipped config on every Jetson target, defaults."""

from __future__ import annotations

from .inventory import load_inventory, shipped_configs
from .predict import PlanOptions, plan
from .targets import GiB, targets

JETSONS = ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb")


def fits_table(out: str | None = None) -> str:
    lines = ["| model | method | " + " | ".join(JETSONS) + " |", "|---|---|" + "---|" * len(JETSONS)]
    detail = ["", "Peaks per phase (GiB, precompute / train / generate), default settings:", "",
              "| model | params | train/gen px | method | precompute | train | generate |", "|---|---|---|---|---|---|---|"]
    tg = targets()
    for name, path in shipped_configs().items():
        inv = load_inventory(path)
        rows = {t: plan(PlanOptions(path, t), inv=inv) for t in JETSONS}
        for meth in ("standard_lora", "blockskip"):
            cells = []
            for t in JETSONS:
                m = rows[t]["methods"][meth]
                bad = [ph for ph in ("precompute", "train", "generate") if not m[ph]["fits"]]
                cells.append("fits" if not bad else "no (" + ", ".join(bad) + ")")
            lines.append(f"| {name} | {meth} | " + " | ".join(cells) + " |")
            r = rows[JETSONS[0]]
            m = r["methods"][meth]
            detail.append(f"| {name} | {r['model']['parameters'] / 1e9:.2f}B | {r['model']['train_res']}/"
                          f"{r['model']['gen_res']} | {meth} | " + " | ".join(
                              f"{m[ph]['peak_bytes'] / GiB:.1f}" for ph in ("precompute", "train", "generate")) + " |")
    usable = ", ".join(f"{t} {tg[t].usable_bytes / GiB:.1f} GiB" for t in JETSONS)
    text = "\n".join(lines + detail + ["", f"Usable memory: {usable} (targets.py: total minus what L4T keeps)."])
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return text
