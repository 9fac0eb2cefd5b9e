"""
Reports over run folders: held-out curves, the time OPD takes to reach another method's
average, the noise ablation's figure, and the summaries over seeds (mean, spread, paired
differences with 95% t-intervals). They read the JSON files the runs wrote; nothing is trained.
"""
import json
import os

from opd_support.checkpoints import write_text
from opd_support.evaluation import method_seconds, normalised_mean

FRACTIONS = (0.5, 0.75, 0.9)  # rounds until the held-out gain first reaches these of its final


def held_out_curve(run_dir):
    """[(round, training seconds, {task: metric})] from a distillation run's metrics.jsonl."""
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["elapsed"], r["held_out"]) for r in rows if "held_out" in r]


def time_to_reach(out, table, tasks, target):
    """Training seconds until OPD's student (teachers' seconds + distillation's, read from its
    held-out curve, normalised with the table's min and max) reaches the target's average."""
    avg = lambda r: normalised_mean({"x": r}, tasks, ref=table)["x"]
    goal, secs = avg(table[target]), method_seconds(table)
    teachers = secs["student"] - table["student"]["seconds"]
    curve = held_out_curve(os.path.join(out, "student"))
    hit = next(((s, e) for s, e, r in curve if avg(r) >= goal), None)
    res = {"target": target, "target_avg": goal, "target_seconds": secs[target],
           "opd_teachers_seconds": teachers, "opd_round": hit and hit[0],
           "opd_seconds": hit and teachers + hit[1]}
    res["says"] = (f"OPD (teachers {teachers:.0f} s + distillation) reached {target}'s average "
                   f"{goal:.3f} after {res['opd_seconds']:.0f} s (round {hit[0]}); {target} "
                   f"trained {secs[target]:.0f} s" if hit else
                   f"OPD's held-out curve never reached {target}'s average {goal:.3f} "
                   f"({target}: {secs[target]:.0f} s)")
    return res


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


def spread(xs):
    """mean, sample standard deviation (0 for one value) and the values."""
    mean = sum(xs) / len(xs)
    sd = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return {"mean": mean, "sd": sd, "values": xs}


def paired(xs):
    """spread() of paired differences plus the half-width of their 95% t-interval,
    t_{0.975, n-1} sd / sqrt(n) (None for one seed): the interval excludes 0 when |mean| > it."""
    from scipy.stats import t as student_t
    d, n = spread(xs), len(xs)
    d["ci95"] = float(student_t.ppf(0.975, n - 1)) * d["sd"] / n ** 0.5 if n > 1 else None
    return d


def pm(d, p=3):
    """'mean ± sd' of a spread()."""
    return f"{d['mean']:.{p}f} ± {d['sd']:.{p}f}"


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
                "seconds": method_seconds(t)[n]} for n in models} for t in tables]
    summary = {n: {k: spread([p[n][k] for p in per]) for k in [*cols, "seconds"]} for n in models}
    diffs = {n: {k: paired([p["student"][k] - p[n][k] for p in per]) for k in cols}
             for n in models if n != "student"}
    lines = [f"Seeds {','.join(map(str, seeds))}: mean ± sd over seeds.", "",
             "| model | " + " | ".join(cols) + " | train time |", "|---" * (len(cols) + 2) + "|"]
    lines += [f"| {n} | " + " | ".join(pm(summary[n][k]) for k in cols) +
              (f" | {pm(summary[n]['seconds'], 0)} s |" if any(summary[n]["seconds"]["values"])
               else " | - |") for n in models]
    lines += ["", "OPD (student) minus each model, paired by seed (* : the same sign in every seed "
              "and |mean| > sd; ** : the 95% paired t-interval excludes 0):", "",
              "| OPD minus | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(marked(d[k]) for k in cols) + " |"
              for n, d in diffs.items()]
    md = "\n".join(lines) + "\n"
    write_text(os.path.join(out, "seeds.json"), json.dumps(
        {"seeds": seeds, "models": summary, "opd_minus": diffs}, indent=1))
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
