"""
The comparisons' data, committed, and every results table and figure made from it. A compare
run's seed folder is collected into results/<regime>/seed-<s>/ (what its tables need, a few
hundred kB, never weights):

  eval.json, eval_images.json   each model's test metric per task, and per image (prompt-major)
  budget.json, lr.json          compute, seconds, optimizer steps; the lr grid's scores (seed 0)
  runs/<model>.jsonl            the run's metrics.jsonl: training rows (losses, meter, rewards,
                                groups with no gradient) and validation rows, cost and seconds
  runs/<model>.json             its run.json and config.json

results/tiny/ holds `python opd.py`'s eval.json, results/toy/ `python sanity.py`'s tables.md,
results/designs/ the conflict designs tried (one joint RL run each). A table in README.md or
docs/results.md sits between `<!-- results: NAME -->` and `<!-- /results -->`; tables() makes
every NAME from the data alone (python -m opd_support.reports writes them, --check compares).
Nothing here trains or samples; the bootstrap has a fixed seed: the same data, the same tables.
"""
import glob
import json
import os
import re
import shutil

from opd_support import conflict
from opd_support.checkpoints import write_text
from opd_support.evaluation import normalised_mean

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")
DOCS = ("README.md", os.path.join("docs", "results.md"))
FIGURES = os.path.join(ROOT, "docs", "figures")
REGIMES = ("control", "conflict")
CORE = ("base", "joint-grpo_guard", "student")  # in every seed (with the teachers): the
#                                                 min-max average's reference models
LABEL = {"student": "**OPD**", "student-sft": "SFT (teacher images)",
         "joint-grpo_guard": "joint GRPO-Guard", "joint-nft": "joint NFT",
         "cascade-nft": "cascade NFT"}
SHARE = 0.9  # equal cost: the compute at which a method first reaches this share of the gains
BOOT = 2000  # bootstrap resamples of the prompts
GAIN_FLOOR = 0.01  # a teacher's gain below this (metric units) counts as this much


# ---------------------------------------------------------------------------------- statistics
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


# ---------------------------------------------------------------------------------- collect
def rounded(v):
    """Floats to 6 significant digits, in nested rows: the files stay small, the tables equal."""
    if isinstance(v, float):
        return float(f"{v:.6g}")
    if isinstance(v, dict):
        return {k: rounded(x) for k, x in v.items()}
    return [rounded(x) for x in v] if isinstance(v, list) else v


def collect(run_root, regime, dest=RESULTS):
    """Copy every seed-<s>/ of a compare run folder (run_root) into dest/<regime>/seed-<s>/."""
    seeds = sorted(glob.glob(os.path.join(run_root, "seed-*")))
    if not seeds:
        raise SystemExit(f"error: {run_root} holds no seed-<s> folder")
    for src in seeds:
        out = os.path.join(dest, regime, os.path.basename(src))
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(os.path.join(out, "runs"))
        for f in ("eval.json", "eval_images.json", "budget.json", "lr.json"):
            if os.path.isfile(os.path.join(src, f)):
                shutil.copy(os.path.join(src, f), out)
        for run_dir in sorted(glob.glob(os.path.join(src, "*", "metrics.jsonl"))):
            d = os.path.dirname(run_dir)
            rows = [rounded(json.loads(line)) for line in open(run_dir)]
            name = os.path.basename(d)
            write_text(os.path.join(out, "runs", name + ".jsonl"),
                       "".join(json.dumps(r) + "\n" for r in rows))
            info = {k: json.load(open(os.path.join(d, f"{k}.json"))) for k in ("run", "config")
                    if os.path.isfile(os.path.join(d, f"{k}.json"))}
            write_text(os.path.join(out, "runs", name + ".json"), json.dumps(info, indent=1))
        print(f"collected {src} -> {out}")


def collect_design(run_dir, label, dest=RESULTS):
    """One joint RL run with the meter (a conflict design tried) -> dest/designs/<label>.jsonl
    (its metrics rows) and <label>.json (its config and run.json, when written)."""
    rows = [rounded(json.loads(line)) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    out = os.path.join(dest, "designs")
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, label + ".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    info = {k: json.load(open(os.path.join(run_dir, f"{k}.json"))) for k in ("run", "config")
            if os.path.isfile(os.path.join(run_dir, f"{k}.json"))}
    write_text(os.path.join(out, label + ".json"), json.dumps(info, indent=1))
    print(f"collected {run_dir} -> {out}/{label}.jsonl")


# ---------------------------------------------------------------------------------- load
def seeds_of(regime, root=RESULTS):
    found = glob.glob(os.path.join(root, regime, "seed-*"))
    return sorted(int(os.path.basename(d)[5:]) for d in found)


def load(regime, s, root=RESULTS):
    """One seed's data: eval, images, budget, lr, runs {model: rows}, info {model: ...}."""
    d = os.path.join(root, regime, f"seed-{s}")

    def opt(f):
        return json.load(open(os.path.join(d, f))) if os.path.isfile(os.path.join(d, f)) else {}
    runs = {os.path.basename(p)[:-6]: [json.loads(line) for line in open(p)]
            for p in sorted(glob.glob(os.path.join(d, "runs", "*.jsonl")))}
    info = {os.path.basename(p)[:-5]: json.load(open(p))
            for p in sorted(glob.glob(os.path.join(d, "runs", "*.json")))}
    return dict(seed=s, eval=opt("eval.json"), images=opt("eval_images.json"),
                budget=opt("budget.json"), lr=opt("lr.json"), runs=runs, info=info)


def tasks_of(data):
    return list(data["images"]["prompts"])


def models_of(seeds):
    """The models in any seed, in the first seed's table order (then the others')."""
    return list(dict.fromkeys(n for d in seeds for n in d["eval"]))


# ---------------------------------------------------------------------------------- scores
def scores(d, tasks):
    """{model: {task: test metric, 'avg': min-max average over the core models and teachers,
    'share': mean over tasks of the share of its teacher's gain over the base}} of one seed."""
    ev = d["eval"]
    ref = {n: r for n, r in ev.items() if n in CORE or n.startswith("teacher-")}
    avg = normalised_mean(ev, tasks, ref)
    gain = {t: max(ev[f"teacher-{t}"][t] - ev["base"][t], GAIN_FLOOR) for t in tasks}
    return {n: {**{t: r[t] for t in tasks}, "avg": avg[n],
                "share": sum((r[t] - ev["base"][t]) / gain[t] for t in tasks) / len(tasks)}
            for n, r in ev.items()}


def compute(d, model, tasks, path="total"):
    """A model's compute: its own; a student's with its teachers' (path 'total': all of them,
    'critical': the longest, as teachers trained side by side)."""
    own = d["eval"][model].get("cost", 0)
    if not model.startswith("student"):
        return own
    teach = [d["eval"][f"teacher-{t}"].get("cost", 0) for t in tasks]
    return own + (sum(teach) if path == "total" else max(teach))


def marked(p, digits=3):
    """A paired() difference as mean ± sd, with ** when its 95% t-interval excludes 0."""
    star = " **" if p["ci95"] is not None and abs(p["mean"]) > p["ci95"] else ""
    return f"{p['mean']:+.{digits}f} ± {p['sd']:.{digits}f}{star}"


def num(x):
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x:,.0f}"


# ---------------------------------------------------------------------------------- tables
def table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def summary_table(seeds, tasks):
    """Per model: seeds, the min-max average and the fixed-reference share of the teachers'
    gains (mean ± sd), OPD minus it paired by seed, compute and training seconds."""
    per = {d["seed"]: scores(d, tasks) for d in seeds}
    rows = []
    for n in models_of(seeds):
        have = [d for d in seeds if n in d["eval"]]
        cell = []
        for k in ("avg", "share"):
            cell.append(pm(spread([per[d["seed"]][n][k] for d in have])))
            both = [per[d["seed"]]["student"][k] - per[d["seed"]][n][k] for d in have
                    if "student" in d["eval"]]
            cell.append("-" if n == "student" or not both else marked(paired(both)))
        cost = [compute(d, n, tasks) for d in have]
        crit = [compute(d, n, tasks, "critical") for d in have]
        secs = [d["eval"][n].get("seconds", 0) for d in have]
        money = "-" if n == "base" else num(sum(cost) / len(cost)) + (
            f" ({num(sum(crit) / len(crit))})" if n.startswith("student") else "")
        rows.append([LABEL.get(n, n), str(len(have)), *cell, money,
                     "-" if n == "base" else f"{sum(secs) / len(secs):.0f} s"])
    return table(["model", "seeds", "avg (min-max)", "OPD minus it", "share of the teachers' "
                  "gains", "OPD minus it", "compute (critical path)", "own train time"], rows)


def tasks_table(seeds, tasks):
    """Each model's test metric per task, mean ± sd over its seeds."""
    per = {d["seed"]: scores(d, tasks) for d in seeds}
    rows = [[LABEL.get(n, n)] + [pm(spread([per[d["seed"]][n][t] for d in seeds
                                            if n in d["eval"]])) for t in tasks]
            for n in models_of(seeds)]
    return table(["model", *tasks], rows)


def prompt_means(d, model, task):
    """{prompt: [the model's metric on each of its images]} on the test prompts of one seed."""
    out = {}
    for p, r in zip(d["images"]["prompts"][task], d["images"]["scores"][model][task]):
        out.setdefault(p, []).append(r)
    return out


def bootstrap(a, b, n=BOOT, seed=0):
    """a, b: {prompt: [scores]} of two models on the same images. The mean difference a - b and
    its 95% percentile interval over prompts resampled with replacement (each prompt's images
    stay together: they share the prompt)."""
    import torch
    keys = sorted(a)
    diff = torch.tensor([sum(a[k]) / len(a[k]) - sum(b[k]) / len(b[k]) for k in keys],
                        dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    boot = diff[torch.randint(len(keys), (n, len(keys)), generator=g)].mean(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(diff.mean()), lo, hi


def bootstrap_table(seeds, tasks):
    """OPD minus each model per task over every image of the seeds both ran (a prompt's images
    pooled over those seeds), with the prompt-clustered bootstrap interval; a 0/1 task also as
    hits out of images."""
    rows = []
    for n in models_of(seeds):
        if n == "student":
            continue
        both = [d for d in seeds if n in d["eval"] and "student" in d["eval"]]
        cells = []
        for t in tasks:
            a, b = {}, {}
            for d in both:
                for src, m in ((a, "student"), (b, n)):
                    for p, rs in prompt_means(d, m, t).items():
                        src.setdefault(p, []).extend(rs)
            mean, lo, hi = bootstrap(a, b)
            cell = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" + ("" if lo <= 0 <= hi else " **")
            flat = [r for rs in b.values() for r in rs]
            if set(flat) <= {0.0, 1.0}:
                hits = sum(r for rs in a.values() for r in rs)
                cell += f" ({hits:.0f} vs {sum(flat):.0f} of {len(flat)})"
            cells.append(cell)
        rows.append([LABEL.get(n, n), str(len(both)), *cells])
    return table(["OPD minus", "seeds", *tasks], rows)


def val_curve(d, model, tasks, lead=0.0):
    """[(compute, validation share of the teachers' validation gains)] of a run, its compute
    shifted by lead (a student's teachers')."""
    rows = d["runs"].get(model, [])
    teach = {t: [r for r in d["runs"][f"teacher-{t}"] if "val" in r] for t in tasks}
    base = {t: teach[t][0]["val"][t] for t in tasks}
    gain = {t: max(teach[t][-1]["val"][t] - base[t], GAIN_FLOOR) for t in tasks}
    return [(lead + r["cost"], sum((r["val"][t] - base[t]) / gain[t] for t in tasks) / len(tasks))
            for r in rows if "val" in r]


def lead(d, model, tasks, path):
    return compute(d, model, tasks, path) - d["eval"][model].get("cost", 0)


def at(curve, x):
    """The share at the last validation at or before compute x (the run stopped there), and
    whether the run ended before x."""
    before = [s for c, s in curve if c <= x * (1 + 1e-9)]
    return (before[-1] if before else None), curve[-1][0] < x * (1 - 1e-9)


def equal_cost_table(seeds, tasks):
    """Per method: the validation share of the teachers' gains at OPD's total compute and at its
    critical-path compute (the last validation before), and the compute at which it first
    reaches SHARE of them."""
    rows = []
    for n in models_of(seeds):
        if n == "base" or n.startswith("teacher-"):
            continue
        have = [d for d in seeds if n in d["runs"] and "student" in d["eval"]]
        cells = []
        for path in ("total", "critical"):
            vals, short = [], 0
            for d in have:
                x = compute(d, "student", tasks, path)
                v, ended = at(val_curve(d, n, tasks, lead(d, n, tasks, path)), x)
                if v is not None:
                    vals.append(v)
                short += ended
            cells.append((pm(spread(vals)) if vals else "-") +
                         (f" (ended before it in {short})" if short else ""))
        reach = []
        for d in have:
            hit = [c for c, s in val_curve(d, n, tasks, lead(d, n, tasks, "total")) if s >= SHARE]
            reach.append(hit[0] if hit else None)
        got = [r for r in reach if r is not None]
        cells.append((num(sum(got) / len(got)) if got else "not reached") +
                     (f" (reached in {len(got)} of {len(reach)})" if len(got) < len(reach)
                      else ""))
        rows.append([LABEL.get(n, n), str(len(have)), *cells])
    return table(["method", "seeds", "at OPD's total compute", "at OPD's critical path",
                  f"compute to {SHARE:.0%} of the gains"], rows)


def run_means(rows, key):
    xs = [r[key] for r in rows if r.get(key) is not None]
    return sum(xs) / len(xs) if xs else None


def meter(seeds, tasks):
    """{(run, pair): {'raw', 'half_a', 'half_b', 'corrected', 'adam_corrected': paired() over
    seeds}} from each seed's means over the run's steps (corrected per seed: conflict.py)."""
    out = {}
    runs = [r for r in ("joint-grpo_guard", "joint-nft", "student")
            if any(r in d["runs"] for d in seeds)]
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:]]
    for run in runs:
        for a, b in pairs:
            vals = {}
            for d in seeds:
                rows = [r for r in d["runs"].get(run, []) if "grad_norm" in r]
                if not rows:
                    continue
                m = {k: run_means(rows, f"cos_{k}") for k in (
                    f"{a}_{b}", f"half_{a}", f"half_{b}", f"adam_{a}_{b}", f"adam_half_{a}",
                    f"adam_half_{b}")}
                row = {"raw": m[f"{a}_{b}"], "half_a": m[f"half_{a}"], "half_b": m[f"half_{b}"],
                       "corrected": conflict.corrected(m[f"{a}_{b}"], m[f"half_{a}"],
                                                       m[f"half_{b}"]),
                       "adam_corrected": conflict.corrected(m[f"adam_{a}_{b}"],
                                                            m[f"adam_half_{a}"],
                                                            m[f"adam_half_{b}"])}
                for k, v in row.items():
                    if v is not None:
                        vals.setdefault(k, []).append(v)
            if vals:
                out[run, f"{a}-{b}"] = {k: paired(v) for k, v in vals.items()}
    return out


def interval(p):
    if not p:
        return "-"
    if p["ci95"] is None:
        return f"{p['mean']:+.2f} (1 seed)"
    lo, hi = p["mean"] - p["ci95"], p["mean"] + p["ci95"]
    return f"{p['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]" + (" **" if lo > 0 or hi < 0 else "")


def meter_table(seeds, tasks):
    """Per run and task pair: the raw cosine, the two tasks' split-half cosines, the
    noise-corrected cosine and the same after Adam's preconditioning, with 95% t-intervals
    over the seeds (n = seeds with a defined value)."""
    rows = []
    for (run, pair), v in meter(seeds, tasks).items():
        rows.append([LABEL.get(run, run), pair, pm(v["raw"], 3) if "raw" in v else "-",
                     " / ".join(f"{v[k]['mean']:+.2f}" if k in v else "-"
                                for k in ("half_a", "half_b")),
                     interval(v.get("corrected")) + (f" (n {len(v['corrected']['values'])})"
                                                     if "corrected" in v else ""),
                     interval(v.get("adam_corrected"))])
    return table(["run", "pair", "raw cosine", "split-half cosines", "corrected [95%]",
                  "after Adam, corrected [95%]"], rows)


def flat_table(seeds, tasks):
    """The share of each task's sampled groups whose images all scored the same (advantage 0:
    no gradient), mean over the RL runs' epochs, then over seeds."""
    rows = []
    names = [n for n in models_of(seeds) if n.startswith(("teacher-", "joint-", "cascade-"))]
    for n in names:
        cells = []
        for t in tasks:
            xs = [run_means(d["runs"][n], f"flat_groups_{t}") for d in seeds if n in d["runs"]]
            xs = [x for x in xs if x is not None]
            cells.append(f"{sum(xs) / len(xs):.2f}" if xs else "-")
        rows.append([LABEL.get(n, n), *cells])
    return table(["run", *tasks], rows)


def designs_table(root=RESULTS):
    """Each conflict design tried (one joint GRPO-Guard run each): its training steps, and per
    task pair the raw cosine (mean ± s.e. over steps, a lower bound: steps are correlated), the
    split-half cosines, the corrected cosine; the share of each task's groups with no
    gradient."""
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "designs", "*.jsonl"))):
        train = [json.loads(line) for line in open(path)]
        train = [r for r in train if "grad_norm" in r]
        tasks = [k[len("flat_groups_"):] for k in train[0] if k.startswith("flat_groups_")]
        for i, a in enumerate(tasks):
            for b in tasks[i + 1:]:
                raw = [r[f"cos_{a}_{b}"] for r in train if r.get(f"cos_{a}_{b}") is not None]
                se = spread(raw)["sd"] / len(raw) ** 0.5
                halves = [run_means(train, f"cos_half_{t}") for t in (a, b)]
                c = conflict.corrected(sum(raw) / len(raw), *halves)
                rows.append([os.path.basename(path)[:-6], str(len(train)), f"{a}-{b}",
                             f"{sum(raw) / len(raw):+.3f} ± {se:.3f}",
                             " / ".join(f"{h:+.2f}" for h in halves),
                             "-" if c is None else f"{c:+.2f}",
                             " / ".join(f"{run_means(train, f'flat_groups_{t}'):.2f}"
                                        for t in (a, b))])
    return table(["design", "steps", "pair", "raw cosine", "split-half cosines", "corrected",
                  "groups with no gradient"], rows)


def budget_table(d, tasks):
    """One seed's runs: optimizer steps, transformer passes with and without grad, compute,
    training and validation seconds."""
    rows = []
    for n, r in d["eval"].items():
        if n == "base":
            continue
        p = d["info"].get(n, {}).get("run", {}).get("passes", {})
        b = d["budget"].get(n, {})
        rows.append([LABEL.get(n, n), str(r.get("steps", 0)), f"{p.get('grad', 0):,}",
                     f"{p.get('nograd', 0):,}", f"{r.get('cost', 0):,}",
                     f"{r.get('seconds', 0):.0f}", f"{b.get('val_seconds', 0):.0f}"])
    return table(["run", "optimizer steps", "passes with grad", "without", "compute",
                  "train s", "validation s"], rows)


def time_table(seeds):
    """Where each seed's time went: training, validation and final evaluation seconds, and the
    process's CPU seconds."""
    rows = []
    for d in seeds:
        runs = {n: v for n, v in d["budget"].items() if n != "process"}
        proc = d["budget"].get("process", {})
        rows.append([str(d["seed"]), str(len(runs)),
                     f"{sum(v['seconds'] for v in runs.values()) / 60:.1f}",
                     f"{sum(v.get('val_seconds', 0) for v in runs.values()) / 60:.1f}",
                     f"{proc.get('eval_seconds', 0) / 60:.1f}",
                     f"{proc.get('cpu_seconds', 0) / 60:.1f}"])
    return table(["seed", "trained models", "training min", "validation min", "evaluation min",
                  "CPU min (process)"], rows)


def lr_table(d):
    """The learning-rate grid of seed 0: each run's validation score per multiple of its
    default lr and the one chosen."""
    mults = sorted({float(m) for v in d["lr"].values() for m in v["scores"]})
    rows = [[LABEL.get(n, n)] + [f"{v['scores'][f'{m:g}']:.3f}" if f"{m:g}" in v["scores"]
                                 else "-" for m in mults] + [f"x{v['multiple']:g}"]
            for n, v in d["lr"].items()]
    return table(["run", *[f"x{m:g}" for m in mults], "chosen"], rows)


def tiny_table(root=RESULTS):
    """`python opd.py`'s table: each model's test metric per task, the min-max average and the
    training seconds (a student's with its teachers')."""
    ev = json.load(open(os.path.join(root, "tiny", "eval.json")))
    tasks = [k for k in next(iter(ev.values())) if k not in ("seconds", "cost", "steps")]
    avg = normalised_mean(ev, tasks)
    teach = sum(r.get("seconds", 0) for n, r in ev.items() if n.startswith("teacher-"))
    rows = [[n, *[f"{r[t]:.3f}" for t in tasks], f"{avg[n]:.3f}",
             "-" if n == "base" else
             f"{r.get('seconds', 0) + (teach if n.startswith('student') else 0):.0f} s"]
            for n, r in ev.items()]
    return table(["model", *tasks, "avg", "train time"], rows)


def toy_tables(root=RESULTS):
    """sanity.py's tables.md (a caption, then its table, ...; last its time line) as
    {"toy-<the caption's first word>": the table} ('every' -> "toy"; "toy-time": the line)."""
    chunks = open(os.path.join(root, "toy", "tables.md")).read().strip().split("\n\n")
    out = {"toy-time": chunks[-1]}
    for caption, body in zip(chunks[:-1:2], chunks[1:-1:2]):
        word = re.match(r"\w+", caption).group(0)
        out["toy" if word == "every" else f"toy-{word}"] = body
    return out


def tiny_kept_table(root=RESULTS):
    """`python opd.py`: each task's teacher gain over the base on its own task, the student's,
    and the share of the teacher's gain the student keeps."""
    ev = json.load(open(os.path.join(root, "tiny", "eval.json")))
    tasks = [n[len("teacher-"):] for n in ev if n.startswith("teacher-")]
    rows = []
    for t in tasks:
        teacher, student = (ev[n][t] - ev["base"][t] for n in (f"teacher-{t}", "student"))
        rows.append([t, f"{teacher:+.3f}", f"{student:+.3f}", f"{student / teacher:.0%}"])
    return table(["task", "teacher's gain", "student's gain", "kept"], rows)


def tables(root=RESULTS):
    """{NAME: markdown} of every results table the data make."""
    out = {}
    if os.path.isfile(os.path.join(root, "toy", "tables.md")):
        out.update(toy_tables(root))
    if glob.glob(os.path.join(root, "designs", "*.jsonl")):
        out["designs"] = designs_table(root)
    if os.path.isfile(os.path.join(root, "tiny", "eval.json")):
        out["tiny"], out["tiny-kept"] = tiny_table(root), tiny_kept_table(root)
    for regime in REGIMES:
        seeds = [load(regime, s, root) for s in seeds_of(regime, root)]
        if not seeds:
            continue
        tasks = tasks_of(seeds[0])
        summary = summary_table(seeds, tasks)
        out.update({f"{regime}-summary": summary,  # -headline: the README's, no teacher rows
                    f"{regime}-headline": "\n".join(
                        r for r in summary.splitlines() if not r.startswith("| teacher-")),
                    f"{regime}-tasks": tasks_table(seeds, tasks),
                    f"{regime}-bootstrap": bootstrap_table(seeds, tasks),
                    f"{regime}-cost": equal_cost_table(seeds, tasks),
                    f"{regime}-meter": meter_table(seeds, tasks),
                    f"{regime}-flat": flat_table(seeds, tasks),
                    f"{regime}-budget": budget_table(seeds[0], tasks),
                    f"{regime}-time": time_table(seeds)})
        if seeds[0]["lr"]:
            out[f"{regime}-lr"] = lr_table(seeds[0])
    return out


# ---------------------------------------------------------------------------------- documents
BLOCK = re.compile(r"(<!-- results: ([\w-]+) -->\n)(.*?)(<!-- /results -->)", re.S)  # may be empty


def fill(text, made):
    """The document with each block's table replaced by the made one; and the first block
    whose table differs (or that names no table), else None."""
    first = []

    def put(m):
        name = m.group(2)
        if name not in made:
            first.append(f"names no table the data make ({name})")
            return m.group(0)
        if m.group(3).strip() != made[name].strip() and not first:
            first.append(f"table {name!r} differs from the one the data make")
        return m.group(1) + made[name].strip() + "\n" + m.group(4)
    return BLOCK.sub(put, text), (first[0] if first else None)


def write_docs(check=False, root=RESULTS, docs=DOCS):
    """Fill every document's results blocks (check: compare only). Returns the problems."""
    made, problems = tables(root), []
    for doc in docs:
        path = os.path.join(ROOT, doc)
        text = open(path).read()
        new, bad = fill(text, made)
        if bad and (check or "names no table" in bad):  # written: only a name can be wrong
            problems.append(f"{doc}: {bad}")
        if not check and new != text:
            write_text(path, new)
    return problems


# ---------------------------------------------------------------------------------- figures
def figures(root=RESULTS, where=FIGURES):
    """anytime-<regime>.png (every seed's validation curve against compute, OPD's after its
    teachers', the two costs OPD is read at marked) and meter-<regime>.png (the corrected
    cosines with their intervals)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for regime in REGIMES:
        seeds = [load(regime, s, root) for s in seeds_of(regime, root)]
        if not seeds:
            continue
        tasks, colours = tasks_of(seeds[0]), {}
        fig, ax = plt.subplots(figsize=(8, 4))
        for d in seeds:
            for n in d["eval"]:
                if n == "base" or n.startswith("teacher-") or n not in d["runs"]:
                    continue
                c = val_curve(d, n, tasks, lead(d, n, tasks, "total"))
                line, = ax.plot([p[0] for p in c], [p[1] for p in c], lw=2 if n == "student"
                                else 1, alpha=0.8, color=colours.get(n),
                                label=None if n in colours else LABEL.get(n, n).strip("*"))
                colours[n] = line.get_color()
            for path, style in (("total", "--"), ("critical", ":")):
                ax.axvline(compute(d, "student", tasks, path), c="grey", ls=style, lw=0.6)
        ax.axhline(1, c="k", lw=0.5)
        ax.set_ylim(max(-1, ax.get_ylim()[0]), None)
        ax.set_xlabel("compute, transformer passes (OPD's after its teachers'; dashed: OPD's "
                      "total, dotted: its critical path)", fontsize=8)
        ax.set_ylabel("validation: share of the teachers' gains")
        ax.set_title(f"{regime}: {', '.join(tasks)}; every seed", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(where, f"anytime-{regime}.png"), dpi=100)
        plt.close(fig)
        stats = meter(seeds, tasks)
        if stats:
            fig, ax = plt.subplots(figsize=(8, 3.4))
            keys = [k for k, v in stats.items() if "corrected" in v]
            for i, k in enumerate(keys):
                p = stats[k]["corrected"]
                ax.errorbar(i, p["mean"], yerr=p["ci95"] or 0, fmt="o", capsize=3)
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels([f"{LABEL.get(r, r).strip('*')}\n{pair}" for r, pair in keys],
                               fontsize=6)
            ax.axhline(0, c="k", lw=0.5)
            ax.set_ylabel("noise-corrected cosine")
            ax.set_title(f"{regime}: cross-task gradient cosines, 95% intervals over seeds",
                         fontsize=9)
            fig.tight_layout()
            fig.savefig(os.path.join(where, f"meter-{regime}.png"), dpi=100)
            plt.close(fig)
