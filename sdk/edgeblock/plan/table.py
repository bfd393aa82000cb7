"""The what-fits-where table of docs/plan.md: every shipped config on every Jetson target, at the default
settings and with the levers for big models (streamed generation, int8 / int4 weights)."""

from __future__ import annotations

from .inventory import load_inventory, shipped_configs
from .predict import PlanOptions, plan
from .targets import GiB, targets

JETSONS = ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb")
# (row label, method, PlanOptions settings)
VARIANTS = (
    ("standard_lora", "standard_lora", {}),
    ("blockskip", "blockskip", {}),
    ("blockskip, streamed", "blockskip", {"generation": "streamed"}),
    ("blockskip, int8, streamed", "blockskip", {"weights": "int8", "generation": "streamed"}),
    ("blockskip, int4, streamed", "blockskip", {"weights": "int4", "generation": "streamed"}),
)


def fits_table(out: str | None = None) -> str:
    lines = ["| model | method | " + " | ".join(JETSONS) + " |", "|---|---|" + "---|" * len(JETSONS)]
    detail = ["", "Peaks per phase (GiB, precompute / train / generate):", "",
              "| model | params | train/gen px | method | precompute | train | generate |", "|---|---|---|---|---|---|---|"]
    tg = targets()
    for name, path in shipped_configs().items():
        inv = load_inventory(path)
        for label, meth, settings in VARIANTS:
            rows = {t: plan(PlanOptions(path, t, **settings), inv=inv) for t in JETSONS}
            cells = []
            for t in JETSONS:
                m = rows[t]["methods"][meth]
                bad = [ph for ph in ("precompute", "train", "generate") if not m[ph]["fits"]]
                cells.append("fits" if not bad else "no (" + ", ".join(bad) + ")")
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
            r = rows[JETSONS[0]]
            m = r["methods"][meth]
            detail.append(f"| {name} | {r['model']['parameters'] / 1e9:.2f}B | {r['model']['train_res']}/"
                          f"{r['model']['gen_res']} | {label} | " + " | ".join(
                              f"{m[ph]['peak_bytes'] / GiB:.1f}" for ph in ("precompute", "train", "generate")) + " |")
    usable = ", ".join(f"{t} {tg[t].usable_bytes / GiB:.1f} GiB" for t in JETSONS)
    text = "\n".join(lines + detail + ["", f"Usable memory: {usable} (targets.py: total minus what L4T keeps)."])
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return text
