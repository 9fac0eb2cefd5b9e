"""
Reports over run folders: held-out curves, the time OPD takes to reach another method's
average, the noise ablation's figure, and the summaries over seeds (mean, spread, paired
differences with 95% t-intervals). They read the JSON files the runs wrote; nothing is trained.
"""
import json
import os

from opd_support import results
from opd_support.checkpoints import write_text
from opd_support.evaluation import method_seconds, normalised_mean
from opd_support.results import GAIN_FLOOR, paired, pm, spread

FRACTIONS = (0.5, 0.75, 0.9)  # rounds until the held-out gain first reaches these of its final


def held_out_curve(run_dir):
    """[(step, training seconds, {task: validation metric})] from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["elapsed"], r["val"]) for r in rows if "val" in r]


def rounds_to(rounds, gain):
    """{fraction: the first round whose mean gain reaches fraction x the final gain} (None when
    the final gain is not positive)."""
    return {str(f): (next(s for s, g in zip(rounds, gain) if g >= f * gain[-1])
                     if gain[-1] > 0 else None) for f in FRACTIONS}


def noise_figure(path, res, names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.2))
    for label, r in res["levels"].items():
        name = f"a = {r['noise_level']}" + ("" if r["sde_weight"] == "kl" else ", 1/sigma^2")
        style = "-" if r["sde_weight"] == "kl" else "--"
        axes[0].plot(r["rounds"], r["mean_gain"], style, marker="o", label=name)
        for ax, k in zip(axes[1:], names):
            ax.plot(r["rounds"], [h[k] for h in r["held_out"]], style, marker=".", label=name)
    axes[0].set_title("mean held-out gain over the base")
    for ax, k in zip(axes[1:], names):
        ax.set_title(f"held-out {k}")
    for ax in axes:
        ax.set_xlabel("distillation round")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def marked(d, p=3):
    """pm() of a paired() difference, then ** when its 95% t-interval excludes 0, else * when it
    has the same (non-zero) sign in every seed and |mean| > sd."""
    same = len({x > 0 for x in d["values"]}) == 1 and all(x != 0 for x in d["values"])
    star = " **" if d["ci95"] is not None and abs(d["mean"]) > d["ci95"] else \
        " *" if same and abs(d["mean"]) > d["sd"] else ""
    return pm(d, p) + star


def compare_seeds(out, seeds, tasks):
    """Over the seeds' eval.json (avg normalised within each seed's table; train time of the
    whole method): every model's mean and spread, and OPD's paired difference to every other
    model (per seed: OPD minus it). A difference whose sign is the same in every seed and whose
    mean exceeds its sd is marked *, one whose 95% paired t-interval excludes 0 **. Writes
    seeds.json and seeds.md."""
    tables = [json.load(open(os.path.join(out, f"seed-{s}", "eval.json"))) for s in seeds]
    models = [n for n in tables[0] if all(n in t for t in tables)]
    cols = [*tasks, "avg"]
    per = [{n: {**{k: t[n][k] for k in tasks}, "avg": normalised_mean(t, tasks)[n],
                "seconds": method_seconds(t)[n], "cost": method_seconds(t, "cost")[n]}
            for n in models} for t in tables]
    summary = {n: {k: spread([p[n][k] for p in per]) for k in [*cols, "seconds", "cost"]}
               for n in models}
    diffs = {n: {k: paired([p["student"][k] - p[n][k] for p in per]) for k in cols}
             for n in models if n != "student"}
    lines = [f"Seeds {','.join(map(str, seeds))}: mean ± sd over seeds.", "",
             "| model | " + " | ".join(cols) + " | train time | compute (passes) |",
             "|---" * (len(cols) + 3) + "|"]
    lines += [f"| {n} | " + " | ".join(pm(summary[n][k]) for k in cols) +
              (f" | {pm(summary[n]['seconds'], 0)} s | {summary[n]['cost']['mean']:,.0f} |"
               if any(summary[n]["seconds"]["values"]) else " | - | - |") for n in models]
    lines += ["", "OPD (student) minus each model, paired by seed (* : the same sign in every seed "
              "and |mean| > sd; ** : the 95% paired t-interval excludes 0):", "",
              "| OPD minus | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(marked(d[k]) for k in cols) + " |"
              for n, d in diffs.items()]
    conflict = conflict_seeds(out, seeds)
    if conflict:
        lines += ["", "Gradient cosines (conflict.py), mean over the steps of each seed, then "
                  "mean ± sd and 95% t-interval over the seeds:", "",
                  "| run | statistic | mean ± sd | 95% interval |", "|---|---|---|---|"]
        lines += [f"| {r} | {k} | {pm(v)} | {v['mean'] - v['ci95']:+.3f} .. "
                  f"{v['mean'] + v['ci95']:+.3f} |" if v["ci95"] is not None else
                  f"| {r} | {k} | {pm(v)} | - |" for r, stats in conflict.items()
                  for k, v in stats.items()]
    md = "\n".join(lines) + "\n"
    write_text(os.path.join(out, "seeds.json"), json.dumps(
        {"seeds": seeds, "models": summary, "opd_minus": diffs, "conflict": conflict},
        indent=1))
    write_text(os.path.join(out, "seeds.md"), md)
    print(md, flush=True)


def noise_seeds(out, seeds):
    """Over the seeds' noise.json: per run, mean and spread of the rounds to 50 / 75 / 90% of
    the final gain (over the seeds where it was reached) and of the final gain; per SDE run, its
    paired difference to the ODE run (the first) in rounds to 90% (over the seeds where both
    reached it) and in final gain, marked as compare_seeds marks them."""
    res = [json.load(open(os.path.join(out, f"seed-{s}", "noise.json"))) for s in seeds]
    summary, ode, top = {}, next(iter(res[0]["levels"])), str(FRACTIONS[-1])
    lines = [f"Seeds {','.join(map(str, seeds))}: mean ± sd over seeds; the last two columns are "
             f"paired by seed, this run minus {ode} (* : the same sign in every seed and "
             "|mean| > sd; ** : the 95% paired t-interval excludes 0).", "",
             "| run | final mean gain | rounds to 50% | 75% | 90% | 90%, minus ODE | "
             "final gain, minus ODE |", "|---|---|---|---|---|---|---|"]
    for label in res[0]["levels"]:
        runs = [r["levels"][label] for r in res]
        gain = spread([r["mean_gain"][-1] for r in runs])
        reach = {f: [r["rounds_to"][f] for r in runs] for f in runs[0]["rounds_to"]}
        reach = {f: spread([x for x in v if x is not None]) if any(x is not None for x in v)
                 else None for f, v in reach.items()}
        summary[label] = {"final_mean_gain": gain, "rounds_to": reach}
        rel = ["-", "-"]
        if label != ode:  # paired with the ODE run, seed by seed
            lv = [(r["levels"][label], r["levels"][ode]) for r in res]
            both = [x["rounds_to"][top] - y["rounds_to"][top] for x, y in lv
                    if x["rounds_to"][top] is not None and y["rounds_to"][top] is not None]
            vs = summary[label][f"minus_{ode}"] = {
                f"rounds_to_{top}": paired(both) if both else None,
                "final_mean_gain": paired([x["mean_gain"][-1] - y["mean_gain"][-1] for x, y in lv])}
            rel = [marked(vs[f"rounds_to_{top}"], 1) + f" (n {len(both)})" if both else "-",
                   marked(vs["final_mean_gain"])]
        cell = lambda d: f"{d['mean']:.1f} ± {d['sd']:.1f} (n {len(d['values'])})" if d else "-"
        lines.append(f"| {label} | {gain['mean']:+.3f} ± {gain['sd']:.3f} | " +
                     " | ".join([cell(d) for d in reach.values()] + rel) + " |")
    md = "\n".join(lines) + "\n"
    write_text(os.path.join(out, "seeds.json"), json.dumps({"seeds": seeds, "runs": summary},
                                                            indent=1))
    write_text(os.path.join(out, "seeds.md"), md)
    print(md, flush=True)


# ------------------------------------------------------------------------------ budget, curves
CONFLICT_RUNS = ("joint-grpo_guard", "joint-nft", "student")  # the runs with --log_conflict


def budget(out, table, tasks, eval_seconds=0.0):
    """budget.json / budget.md: each model's optimizer steps, compute (runs.cost), training and
    validation seconds, its own and its whole method's (a student's with its teachers'); the
    final evaluation's seconds and the process's CPU seconds so far (all threads)."""
    import resource
    secs, fwd = method_seconds(table), method_seconds(table, "cost")
    rows = {n: {"steps": r.get("steps", 0), "cost": r.get("cost", 0),
                "method_cost": fwd[n], "seconds": r.get("seconds", 0),
                "method_seconds": secs[n], "val_seconds": val_seconds(os.path.join(out, n))}
            for n, r in table.items() if n != "base"}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rows["process"] = {"eval_seconds": round(eval_seconds, 1),
                       "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1)}
    lines = ["| model | optimizer steps | compute | seconds | method's compute | "
             "method's seconds |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['steps']} | {r['cost']:,} | {r['seconds']:.0f} | "
              f"{r['method_cost']:,} | {r['method_seconds']:.0f} |" for n, r in rows.items()
              if n != "process"]
    write_text(os.path.join(out, "budget.json"), json.dumps(rows, indent=1))
    write_text(os.path.join(out, "budget.md"), "\n".join(lines) + "\n")


def val_seconds(run_dir):
    """The seconds a run spent on validation (its metrics.jsonl's val rows)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    return round(sum(r.get("val_seconds", 0) for r in rows), 1)




def gain_share(metrics, base, teachers, tasks):
    """The mean over tasks of the share of its teacher's gain over the base (a gain below
    GAIN_FLOOR counts as GAIN_FLOOR: a teacher that barely moved would blow the share up)."""
    return sum((metrics[t] - base[t]) / max(teachers[t] - base[t], GAIN_FLOOR)
               for t in tasks) / len(tasks)


def anytime_curves(out, table, tasks):
    """{model: [(compute, seconds, share of the teachers' validation gains)]}, a
    student's costs starting after its teachers'; and the teachers' (base, final) validation."""
    runs_ = {n: held_out_curve(os.path.join(out, n)) for n in table
             if n != "base" and os.path.isfile(os.path.join(out, n, "metrics.jsonl"))}
    teach = {t: runs_[f"teacher-{t}"] for t in tasks if f"teacher-{t}" in runs_}
    if len(teach) < len(tasks):
        return {}, {}, {}
    base = {t: teach[t][0][2][t] for t in tasks}
    final = {t: teach[t][-1][2][t] for t in tasks}
    fwd0 = sum(table[f"teacher-{t}"].get("cost", 0) for t in tasks)
    sec0 = sum(table[f"teacher-{t}"].get("seconds", 0) for t in tasks)
    out_ = {}
    for n, curve in runs_.items():
        if n.startswith("teacher-") or not curve or set(tasks) - set(curve[0][2]):
            continue
        rows = [json.loads(line) for line in open(os.path.join(out, n, "metrics.jsonl"))]
        forwards = {r["step"]: r.get("cost", 0) for r in rows if "val" in r}
        lead = (fwd0, sec0) if n.startswith("student") else (0, 0)
        out_[n] = [(lead[0] + forwards.get(s, 0), lead[1] + e, gain_share(v, base, final, tasks))
                   for s, e, v in curve]
    return out_, base, final


def anytime_figure(out, table, tasks):
    """anytime.png: every method's validation average (the share of the teachers' gains,
    mean over tasks) against cumulative compute (runs.cost) and against training seconds; OPD's
    and the students' curves start after their teachers' cost; the dashed line marks the
    paper's cost ratio, OPD's ~97 GPU-hours against joint RL's ~130."""
    curves, _, _ = anytime_curves(out, table, tasks)
    if not curves:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for n, c in curves.items():
        for ax, i in zip(axes, (0, 1)):
            ax.plot([p[i] for p in c], [p[2] for p in c], marker=".", label=n,
                    lw=2 if n == "student" else 1)
    joint = curves.get("joint-grpo_guard")
    if joint:
        axes[0].axvline(joint[-1][0] * 97 / 130, ls="--", c="k", lw=0.8,
                        label="paper: OPD's cost = 97/130 of joint RL's")
    axes[0].set_xlabel("compute, transformer passes (a student's after its teachers')")
    axes[1].set_xlabel("training seconds (a student's after its teachers')")
    low = min(p[2] for c in curves.values() for p in c)  # a share far below 0 (a task a method
    for ax in axes:                                         # unlearnt whose teacher gained little)
        ax.axhline(1, c="grey", lw=0.5)                     # would hide the rest: cut at -1
        ax.set_ylabel("validation: share of the teachers' gains")
        ax.set_ylim(max(low, -1) - 0.05, None)
        if low < -1:
            ax.set_title(f"axis cut at -1 (lowest point {low:.1f})", fontsize=8)
    axes[0].legend(fontsize=7)
    where = os.path.join(*os.path.normpath(out).split(os.sep)[-2:])
    fig.suptitle(f"{where}: tasks {', '.join(tasks)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "anytime.png"), dpi=110)
    plt.close(fig)


def conflict_summary(run_dir):
    """{statistic: spread over the run's steps with a 95% t-interval} of every cos_* and
    dloss_* that metrics.jsonl logged (None values, e.g. a zero gradient, left out). The steps
    are correlated, so the interval is a lower bound on the uncertainty: the seeds' is honest."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    rows = [json.loads(line) for line in open(path)]
    keys = sorted({k for r in rows for k in r if k.startswith(("cos_", "dloss_"))})
    return {k: paired([r[k] for r in rows if r.get(k) is not None]) for k in keys
            if any(r.get(k) is not None for r in rows)}


def conflict_seeds(out, seeds):
    """{run: {statistic: paired() over the seeds' per-seed step means}}."""
    res = {}
    for r in CONFLICT_RUNS:
        per = [conflict_summary(os.path.join(out, f"seed-{s}", r)) for s in seeds]
        keys = set.intersection(*(set(p) for p in per)) if per else set()
        if keys:
            res[r] = {k: paired([p[k]["mean"] for p in per]) for k in sorted(keys)}
    return res


def conflict_figure(out, tasks):
    """conflict.png and conflict.json: per run with --log_conflict (joint RL, OPD), each task
    pair's gradient cosine (raw and Adam-preconditioned) and each task's split-half cosine (the
    noise floor) against the optimizer step, smoothed over 5 steps."""
    found = {r: os.path.join(out, r) for r in CONFLICT_RUNS
             if os.path.isfile(os.path.join(out, r, "metrics.jsonl"))}
    summary = {r: conflict_summary(d) for r, d in found.items()}
    write_text(os.path.join(out, "conflict.json"), json.dumps(summary, indent=1))
    found = {r: d for r, d in found.items() if summary[r]}
    if not found:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(found), figsize=(5.5 * len(found), 3.8), squeeze=False)
    for ax, (r, d) in zip(axes[0], found.items()):
        rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
        for k in sorted({k for row in rows for k in row if k.startswith("cos_")}):
            pts = [(row["step"], row[k]) for row in rows if row.get(k) is not None]
            y = [sum(v for _, v in pts[max(0, i - 4):i + 1]) / len(pts[max(0, i - 4):i + 1])
                 for i in range(len(pts))]
            style = ":" if k.startswith("cos_half") else "--" if k.startswith("cos_adam") else "-"
            ax.plot([s for s, _ in pts], y, style, label=k[4:], lw=1)
        ax.axhline(0, c="k", lw=0.5)
        ax.set_title(r, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cosine (5-step mean)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "conflict.png"), dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ the command
def main(argv=None):
    """python -m opd_support.reports: every results table of README.md and docs/results.md
    (between their `<!-- results: NAME -->` markers) and figure from the data in results/;
    --check: exit 1 naming the first table that differs from the data's, else 0;
    --collect RUN REGIME: copy a compare run's seed folders into results/REGIME/; --design
    RUN LABEL: one joint run's metrics into results/designs/."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__.split(";")[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    ap.add_argument("--collect", nargs=2, metavar=("RUN", "REGIME"),
                    help="copy RUN/seed-*/ into results/REGIME/")
    ap.add_argument("--design", nargs=2, metavar=("RUN", "LABEL"),
                    help="copy one joint run's metrics (a conflict design) into results/designs/")
    a = ap.parse_args(argv)
    if a.collect or a.design:
        return results.collect(*a.collect) if a.collect else results.collect_design(*a.design)
    problems = results.write_docs(check=a.check)
    if not a.check:
        results.figures()
    for p in problems[:1]:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print("every results table equals the one the data make" if a.check else
          "results tables and figures written")


if __name__ == "__main__":
    main()
