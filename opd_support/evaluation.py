"""
Evaluation of every model of a run folder: ODE samples (Euler, --eval_sampler_steps, CFG) of
each task's held-out prompts, the task's metric, the table eval.json / eval.md, samples.png.
"""
import json
import math
import os
import textwrap
import time

import torch

from opd_support.checkpoints import write_text
from opd_support.loras import LORA_FILE, load_lora, run_info
from opd_support.machinery import cost, gather, rank_world, rng
from opd_support.prompts import score
from opd_support.sd3 import drop_adapters, sd3_sigmas


@torch.no_grad()
def sample_images(model, adapter, prompts, seeds, cfg, guidance):
    """ODE samples (Euler, eval_sampler_steps, CFG) for prompts, the noise of each from its own
    seed: x_{j+1} = x_j + v(x_j, t_j) (t_{j+1} - t_j), opd.py's transition at a = 0."""
    sigmas, out = sd3_sigmas(cfg.eval_sampler_steps), []
    for i in range(0, len(prompts), cfg.eval_batch):
        ps, ss = prompts[i:i + cfg.eval_batch], seeds[i:i + cfg.eval_batch]
        x = torch.cat([model.noise(1, rng(cfg.seed, "eval", s)) for s in ss]).float()
        v = model.velocity(adapter, ps, guidance)
        for j in range(len(sigmas) - 1):
            x = x + v(x, sigmas[j]).float() * (sigmas[j + 1] - sigmas[j])
        out.append(model.decode(x).cpu())
    return torch.cat(out)


def held_out(cfg, model, tasks, adapter, guidance, grid=None, export=None, split="test",
             images=None):
    """{task: mean metric} of a model on each task's test (or validation) prompts, eval_seeds
    images a prompt (image i has seed i), split across ranks. grid: a list that receives, per
    task, the first seed of two test prompts; export: a folder for GenEval's layout; images: a
    dict that receives, per task, [(prompt, metric)] of every image in order."""
    rank, world = rank_world()
    out = {}
    for t in tasks:
        test = t.val if split == "val" else t.test
        test = test[: cfg.eval_prompts] if cfg.eval_prompts else test
        seeds = cfg.val_seeds if split == "val" else cfg.eval_seeds
        test = [p for p in test for _ in range(seeds)]
        mine = list(range(rank, len(test), world))
        model.encode(list(dict.fromkeys(test[i] for i in mine)))  # one visit of the encoders
        imgs = sample_images(model, adapter, [test[i] for i in mine], mine, cfg, guidance)
        r = score(t, imgs, [test[i] for i in mine], evaluation=True) if mine else torch.zeros(0)
        pad = torch.full((math.ceil(len(test) / world),), float("nan"))  # equal for all_gather
        pad[: len(r)] = r
        allr = gather(pad.to(model.device), world).cpu()
        out[t.name] = allr[~torch.isnan(allr)].mean().item()
        if images is not None:  # rank k's i-th image is image k + i world
            at = [k + i * world for k in range(world) for i in range(len(pad))]
            ordered = sorted((i, float(r)) for i, r in zip(at, allr) if i < len(test))
            images[t.name] = [(test[i], r) for i, r in ordered]
        if export and t.name == "geneval":
            import rewards
            rewards.export_geneval(export, [t.meta[test[i]] for i in mine],
                                   [i // seeds for i in mine],
                                   [i % seeds for i in mine], imgs)
        if grid is not None:
            two = [0, seeds][: len(test) // seeds]
            grid.append((imgs[[mine.index(i) for i in two]] if world == 1 else
                         sample_images(model, adapter, [test[i] for i in two], two, cfg, guidance),
                         [test[i] for i in two]))
    return out


def validate(cfg, model, tasks, run, step):
    """With --eval_every: the EMA model's metrics on each task's validation prompts at step 0,
    every --eval_every optimizer steps after and at the end (step None: the run's last step),
    into metrics.jsonl as `val` (not timed); their mean over tasks into run.val. Returns True
    when --plateau says to stop."""
    end = step is None
    step = run.step if end else step
    due = run.val[-1][0] + cfg.eval_every <= step if run.val else True
    if not cfg.eval_every or not (due or end) or (run.val and run.val[-1][0] == step):
        return False
    passes, t0 = dict(model.passes), time.perf_counter()
    with run.ema.applied():
        metrics = held_out(cfg, model, tasks, run.adapter, cfg.guidance, split="val")
    model.passes.update(passes)  # validation is not the run's compute
    run.val.append((step, sum(metrics.values()) / len(metrics)))
    run.log(step=step, val=metrics, val_seconds=round(time.perf_counter() - t0, 3))
    if cfg.plateau and not end:
        k, d, *least = cfg.plateau.split(",")
        spent = cost(model.passes) >= cfg.min_cost  # --min_cost: an equal-compute comparison
        return step >= int((least or [0])[0]) and spent and plateaued(
            [v for _, v in run.val], int(k), float(d))
    return False


def plateaued(values, k, d):
    """The plateau rule: True once the best of the last k values beats the best of those
    before them by less than d (False while there are not k + 1 values)."""
    return len(values) > k and max(values[-k:]) - max(values[:-k]) < d


ORDER = ["teacher-", "joint-grpo_guard", "joint-nft", "cascade-grpo_guard", "cascade-nft",
         "student"]  # the rows of the table; then the other students, by name


def discover(out, tasks, extra=None):
    """Every model of a run: the base, then each finished LoRA folder of <out> (teachers in
    --tasks order, then the others), then --lora extras. name -> folder (None: the base)."""
    found = sorted(d for d in (os.listdir(out) if os.path.isdir(out) else [])
                   if os.path.isfile(os.path.join(out, d, LORA_FILE)))
    teachers = [f"teacher-{t}" for t in tasks] + [d for d in found if d.startswith("teacher-")]

    def rank_of(d):
        return (ORDER.index(d) if d in ORDER else len(ORDER), d)
    others = sorted((d for d in found if not d.startswith("teacher-")), key=rank_of)
    names = list(dict.fromkeys([d for d in teachers if d in found] + others))
    return {"base": None, **{n: os.path.join(out, n) for n in names}, **(extra or {})}


def evaluate(cfg, model, tasks, loras=None):
    """Writes <out>/eval.json (model -> task -> metric, seconds), eval.md and samples.png. Each
    model samples with the CFG it was trained with (NFT models: 1)."""
    models = discover(cfg.out, [t.name for t in tasks], loras)
    for i, (name, d) in enumerate(models.items()):  # adapter names m0, m1, ... (any folder name)
        if d is not None:  # the run's folders, and --lora's (any layout, or hub ids)
            load_lora(model.tr, d, f"m{i}")
    table, grid, images = {}, [], {}
    for i, (name, d) in enumerate(models.items()):
        model.active = "?"
        g = cfg.guidance if d is None else float(run_info(d, "guidance", cfg.guidance))
        export = os.path.join(cfg.out, "geneval", name) if cfg.export_geneval else None
        images[name] = {}
        table[name] = held_out(cfg, model, tasks, None if d is None else f"m{i}", g, grid,
                               export, images=images[name])
        for k in ("seconds", "cost", "steps"):  # the training's cost
            table[name][k] = 0 if d is None else run_info(d, k, 0)
    drop_adapters(model)
    if rank_world()[0] == 0:
        write_eval(cfg.out, table, [t.name for t in tasks], grid)
        write_text(os.path.join(cfg.out, "eval_images.json"), json.dumps(per_image(images)))
    return table


def per_image(images):
    """{"prompts": {task: [the prompt of each image]}, "scores": {model: {task: [its metric on
    each image]}}} from evaluate's {model: {task: [(prompt, metric)]}}: the images behind
    eval.json's means (image i of a prompt has seed i in every model)."""
    first = next(iter(images.values()))
    return {"prompts": {t: [p for p, _ in v] for t, v in first.items()},
            "scores": {m: {t: [round(r, 6) for _, r in v] for t, v in per.items()}
                       for m, per in images.items()}}


def normalised_mean(table, tasks, ref=None):
    """Mean over tasks of min-max-normalised scores across the compared models (paper Table 1);
    the minima and maxima are those of ref (default: the table itself)."""
    ref = ref or table
    lo = {k: min(r[k] for r in ref.values()) for k in tasks}
    hi = {k: max(r[k] for r in ref.values()) for k in tasks}
    return {name: sum((r[k] - lo[k]) / (hi[k] - lo[k]) if hi[k] > lo[k] else 0.0
                      for k in tasks) / len(tasks) for name, r in table.items()}


def method_seconds(table, key="seconds"):
    """Training seconds (or another cost: key) of each model's whole method: a student's include
    its teachers'."""
    teachers = sum(r.get(key, 0) for n, r in table.items() if n.startswith("teacher-"))
    return {n: r.get(key, 0) + (teachers if n.startswith("student") else 0)
            for n, r in table.items()}


def write_eval(out, table, tasks, grid):
    avg, secs = normalised_mean(table, tasks), method_seconds(table)
    lines = ["| model | " + " | ".join(tasks) + " | avg | train time |",
             "|---" * (len(tasks) + 3) + "|"]
    for name, r in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in tasks) +
                     f" | {avg[name]:.3f} | " +
                     (f"{secs[name]:.0f} s |" if secs[name] else "- |"))
    md = "\n".join(lines) + "\n\nMean metric on each task's test prompts (ODE sampler); avg = " \
        "mean of min-max-normalised scores across the models above; train time: training " \
        "seconds (a student's include its teachers').\n"
    write_text(os.path.join(out, "eval.json"), json.dumps(table, indent=1))
    write_text(os.path.join(out, "eval.md"), md)
    print(md, flush=True)
    samples_figure(os.path.join(out, "samples.png"), list(table), grid, len(tasks))


def samples_figure(path, models, grid, n_tasks, cell=128):
    """samples.png: one row per model (labelled), two test prompts per task in columns (each
    labelled with its prompt), the same seeds in every row."""
    from PIL import Image, ImageDraw, ImageFont

    import rewards
    prompts = [p for _, ps in grid[:n_tasks] for p in ps]
    left, top, font = 150, 34, ImageFont.load_default(size=11)
    canvas = Image.new("RGB", (left + cell * len(prompts), top + cell * len(models)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, p in enumerate(prompts):  # column labels: the prompt, on two lines at most
        draw.multiline_text((left + c * cell + 3, 2), "\n".join(textwrap.wrap(p, 22)[:2]),
                            fill="black", font=font)
    for r, name in enumerate(models):
        draw.text((4, top + r * cell + cell // 2 - 6), name, fill="black", font=font)
        ims = torch.cat([g[0] for g in grid[r * n_tasks:(r + 1) * n_tasks]])
        for c, im in enumerate(rewards.uint8(ims)):
            canvas.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST),
                         (left + c * cell, top + r * cell))
    canvas.save(path)
