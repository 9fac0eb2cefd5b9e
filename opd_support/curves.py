"""
A run's training curves from its metrics.jsonl, as one labelled PNG:

    python -m opd_support.curves runs/tiny                 # every stage of the run
    python -m opd_support.curves runs/tiny/student --out student.png

Columns: each task's sampled reward (RL stages), each task's loss (distillation), the gradient
norm, the validation metrics (--eval_every); rows: against the optimizer step and against
training seconds. Writes <run>/curves.png unless --out says otherwise.
"""
import argparse
import json
import os
import sys


def stage_folders(path):
    """The folders under path (path itself included) that hold a metrics.jsonl."""
    if os.path.isfile(os.path.join(path, "metrics.jsonl")):
        return [path]
    return sorted(os.path.join(path, d) for d in (os.listdir(path) if os.path.isdir(path) else [])
                  if os.path.isfile(os.path.join(path, d, "metrics.jsonl")))


def draw(path, out):
    """curves.png of every stage under path; returns the stages drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stages = stage_folders(path)
    if not stages:
        raise ValueError(f"no metrics.jsonl in {path} or its folders")
    fig, axes = plt.subplots(2, 4, figsize=(19, 7))
    titles = ["training reward (RL)", "training loss (distillation)", "gradient norm",
              "validation metrics (EMA weights)"]
    for d in stages:
        name = os.path.basename(os.path.normpath(d))
        rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
        train = [r for r in rows if "grad_norm" in r]
        val = [r for r in rows if "val" in r]
        for row, x in enumerate(("step", "elapsed")):
            for col, prefix in enumerate(("reward_", "loss_")):
                for k in sorted({k for r in train for k in r if k.startswith(prefix)}):
                    pts = [(r[x], r[k]) for r in train if k in r]
                    axes[row][col].plot(*zip(*pts), label=f"{name} {k[len(prefix):]}", lw=1)
            if train:
                axes[row][2].plot([r[x] for r in train], [r["grad_norm"] for r in train],
                                  label=name, lw=1)
            for t in sorted({t for r in val for t in r["val"]}):
                axes[row][3].plot([r[x] for r in val], [r["val"][t] for r in val], marker=".",
                                  label=f"{name} {t}", lw=1)
    for row, x in enumerate(("optimizer step", "training seconds")):
        for col, title in enumerate(titles):
            ax = axes[row][col]
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(x)
            if ax.lines:
                ax.legend(fontsize=6)
    for row in axes:
        for col in (1, 2):
            if row[col].lines:
                row[col].set_yscale("log")
    fig.suptitle(path, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return stages


def main(argv=None):
    ap = argparse.ArgumentParser(description="draw a run's metrics.jsonl as curves (PNG)")
    ap.add_argument("run", help="a run folder (--out of opd.py) or one stage's folder")
    ap.add_argument("--out", default="", help="the PNG (default: <run>/curves.png)")
    a = ap.parse_args(argv)
    out = a.out or os.path.join(a.run, "curves.png")
    try:
        stages = draw(a.run, out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{out}: {', '.join(os.path.basename(os.path.normpath(s)) for s in stages)}")


if __name__ == "__main__":
    main()
