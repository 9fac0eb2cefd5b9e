"""
The paper's comparisons on the SD3 path, reached through opd.py's --stage and --loss:

  --stage joint     multi-task RL: one LoRA, every step draws prompts from every task, each image
                    scored by its own task's reward, advantages within its prompt's group
  --stage cascade   multi-task RL, one task after another in --tasks order, one LoRA throughout
                    (both with --algo grpo_guard or nft: the paper's Multi-task GRPO-Guard,
                    Multi-task NFT, Cascade NFT)
  --loss sft        off-policy: the teacher rolls out (ODE); the student's mean is matched to the
                    teacher's on the teacher's states (the closed-form loss on other states)
  --loss dance      DanceOPD: the student's ODE trajectory to one low-noise state; velocity MSE to
                    the teachers' mean velocity there (all teachers, 1:1:1)
  --loss flow       FlowOPD: the student's SDE rollout; the teacher's log-density of each step the
                    student took is that step's reward; advantages per step over the batch; PPO
  (--loss ppo, the PPO-style surrogate of the closed form, is opd.py's)
  --stage compare   all of the above from the same teachers, with the same budget of sampled
                    trajectories as OPD (teachers + distillation), then one table (eval)
  --stage noise     OPD with rollouts at a = 0, 0.3, 0.7 from the same teachers and seeds:
                    held-out metrics every few rounds, rounds to 90% of the final gain, noise.png

The public DanceOPD and FlowOPD runs are CFG-free; here every method uses the run's --guidance,
so that the comparison differs in the method only.
"""
import dataclasses
import json
import math
import os

import torch

import opd
from opd import gaussian_logp, opd_loss, rollout, transition


# ------------------------------------------------------------------------------ multi-task RL
def joint(cfg, m, tasks, rank, world):
    c = opd.resolve(cfg, "joint")
    return opd.train_rl(c, m, tasks, f"joint-{c.algo}", rank, world)


def cascade(cfg, m, tasks, rank, world):
    """--steps in all, an equal share per task in --tasks order, one LoRA (and optimizer) throughout."""
    c = opd.resolve(cfg, "cascade")
    per = max(1, c.steps // len(tasks))
    return opd.train_rl(c, m, tasks, f"cascade-{c.algo}", rank, world,
                        schedule=lambda step: [tasks[min(step // per, len(tasks) - 1)]])


# ------------------------------------------------------------------------------ distillation
def sft_trajectory(student, teacher, x, sigmas, noise_level, train_steps, loss, backward, two_pass=False,
                   generator=None):
    """Off-policy SFT: the TEACHER rolls out with the ODE; on each of its states x_j the
    student's mean is pulled to the teacher's, 1/2 ||mu_S(x_j) - mu_T(x_j)||^2: the closed-form
    loss, on states the student would not visit itself. Returns (x_N, loss)."""
    traj = rollout(teacher, x, sigmas, 0.0)  # states (B, N+1, ...), the teacher's means (B, N, ...)
    logged = 0.0
    for j in train_steps:
        xj = traj["states"][:, j]
        mu_s, std = transition(xj, student(xj, sigmas[j]), sigmas[j], sigmas[j + 1], 0.0)
        l = opd_loss(mu_s, traj["means"][:, j], std).mean() / len(train_steps)
        logged += float(l.detach())
        backward(l)
    return traj["states"][:, -1], logged


def query_step(sigmas, t_query=0.28):
    """The sampler step whose time is closest to t_query (DanceOPD's low-noise query state)."""
    return min(range(len(sigmas) - 1), key=lambda j: abs(float(sigmas[j]) - t_query))


def dance_trajectory(student, teacher, x, sigmas, noise_level, train_steps, loss, backward, two_pass=False,
                     generator=None):
    """DanceOPD: the student's deterministic (ODE) trajectory down to the query state x_q at
    t_q ~ 0.28, then L = mean (v_S(x_q) - v_T(x_q))^2, teacher = the mean of all teachers'
    velocities (distill_round passes it). One trained forward per sample. Returns (x_q, loss)."""
    q = query_step(sigmas)
    with torch.no_grad():
        for j in range(q):
            x, _, _ = opd.sde_step(x, student(x, sigmas[j]), sigmas[j], sigmas[j + 1], 0.0)
        v_t = teacher(x, sigmas[q])
    l = (student(x, sigmas[q]).float() - v_t.float()).pow(2).flatten(1).mean(1).mean()
    backward(l)
    return x, float(l.detach())


def flow_trajectory(student, teacher, x, sigmas, noise_level, train_steps, loss, backward, two_pass=False,
                    generator=None, clip=0.2):
    """FlowOPD: the student's SDE rollout (a > 0, log-density of every step); the reward of step
    j is the teacher's log-density of the step the student took, r_j = log p_T(x_{j+1} | x_j);
    advantages normalised per step over the batch, A = (r - mean) / (std + 1e-4); clipped PPO
    (clip 0.2) on every trained transition. An unbiased, noisy estimator of the per-step KL's
    gradient (paper section 3.3). Returns (x_N, loss)."""
    traj = rollout(student, x, sigmas, noise_level, generator)
    logged = 0.0
    for j in train_steps:
        xj, xn, std = traj["states"][:, j], traj["states"][:, j + 1], traj["stds"][:, j]
        with torch.no_grad():
            mu_t, _ = transition(xj, teacher(xj, sigmas[j]), sigmas[j], sigmas[j + 1], noise_level)
            r = gaussian_logp(xn, mu_t, std)  # (B,) element-mean log-density
            adv = (r - r.mean()) / (r.std(unbiased=False) + 1e-4)
        mu_s, _ = transition(xj, student(xj, sigmas[j]), sigmas[j], sigmas[j + 1], noise_level)
        ratio = torch.exp(gaussian_logp(xn, mu_s, std) - traj["logps"][:, j])
        l = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean() / len(train_steps)
        logged += float(l.detach())
        backward(l)
    return traj["states"][:, -1], logged


TRAJECTORIES = {"sft": sft_trajectory, "dance": dance_trajectory, "flow": flow_trajectory}


# ------------------------------------------------------------------------------ the comparison
DISTILL_BASELINES = [("sft", 0.0), ("ppo", 0.7), ("dance", 0.0), ("flow", 0.7)]  # (--loss, rollout noise a)


def budget_steps(cfg):
    """RL steps of joint and cascade RL that sample as many trajectories as OPD: M teachers x
    T steps x B_T, plus D distillation rounds x M x B_D. Joint samples M x B_T a step, cascade
    B_T a step: joint T + D B_D / B_T steps, cascade M times that."""
    t, d = opd.resolve(cfg, "teacher"), opd.resolve(cfg, "distill")
    steps = t.steps + math.ceil(d.steps * d.batch_size / t.batch_size)
    return steps, steps * len(cfg.tasks.split(","))


def compare(cfg, m, tasks, rank, world):
    """Teachers, OPD (with held-out metrics every eval_every rounds), joint RL with both
    algorithms, cascade NFT, the distillation baselines from the same teachers; then the table,
    and the time OPD (teachers + distillation) took to reach each RL baseline's final average
    (compare.json)."""
    names = [t.name for t in tasks]
    for t in tasks:
        opd.train_rl(opd.resolve(cfg, "teacher"), m, [t], f"teacher-{t.name}", rank, world)
    dirs = opd.teacher_dirs(cfg, names)
    d = opd.resolve(cfg, "distill")
    every = cfg.eval_every or max(1, d.steps // 6)
    opd.distill(dataclasses.replace(d, eval_every=every), m, tasks, dirs, rank, world)
    j_steps, c_steps = budget_steps(cfg)
    for algo, stage, steps in [("grpo_guard", "joint", j_steps), ("nft", "joint", j_steps), ("nft", "cascade", c_steps)]:
        sub = dataclasses.replace(cfg, algo=algo, steps=steps)
        (joint if stage == "joint" else cascade)(sub, m, tasks, rank, world)
    for loss, a in DISTILL_BASELINES:
        opd.distill(opd.resolve(dataclasses.replace(cfg, loss=loss, noise_level=a), "distill"), m, tasks, dirs, rank, world)
    table = opd.evaluate(opd.resolve(cfg, "eval"), m, tasks, rank, world)
    if rank == 0:  # the paper: OPD reached joint RL's level in ~97 of its ~130 GPU hours
        reach = {t: time_to_reach(cfg.out, table, names, t) for t in ("joint-grpo_guard", "joint-nft", "cascade-nft")}
        opd.write_text(os.path.join(cfg.out, "compare.json"), json.dumps(reach, indent=1))
        for r in reach.values():
            opd.say(0, r["says"])
    return table


def held_out_curve(run_dir):
    """[(round, training seconds, {task: metric})] from a distillation run's metrics.jsonl."""
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["elapsed"], r["held_out"]) for r in rows if "held_out" in r]


def time_to_reach(out, table, tasks, target):
    """Training seconds until OPD's student (teachers' seconds + distillation's, read from its
    held-out curve, normalised with the table's min and max) reaches the target's average."""
    avg = lambda r: opd.normalised_mean({"x": r}, tasks, ref=table)["x"]
    goal, secs = avg(table[target]), opd.method_seconds(table)
    teachers = secs["student"] - table["student"]["seconds"]
    hit = next(((s, e) for s, e, r in held_out_curve(os.path.join(out, "student")) if avg(r) >= goal), None)
    res = {"target": target, "target_avg": goal, "target_seconds": secs[target], "opd_teachers_seconds": teachers,
           "opd_round": hit and hit[0], "opd_seconds": hit and teachers + hit[1]}
    res["says"] = (f"OPD (teachers {teachers:.0f} s + distillation) reached {target}'s average {goal:.3f} after "
                   f"{res['opd_seconds']:.0f} s (round {hit[0]}); {target} trained {secs[target]:.0f} s" if hit else
                   f"OPD's held-out curve never reached {target}'s average {goal:.3f} ({target}: {secs[target]:.0f} s)")
    return res


# ------------------------------------------------------------------------------ noise ablation
NOISE_LEVELS = (0.0, 0.3, 0.7)


def noise(cfg, m, tasks, rank, world):
    """OPD from the run's teachers with rollouts at a = 0, 0.3 and 0.7 (same seeds), held-out
    metrics every eval_every rounds (default: a tenth of the rounds); writes noise.json
    (curves, rounds to 90% of the final gain) and noise.png."""
    names = [t.name for t in tasks]
    dirs = opd.teacher_dirs(cfg, names)
    d = opd.resolve(cfg, "distill")
    every = cfg.eval_every or max(1, d.steps // 10)
    for a in NOISE_LEVELS:
        c = dataclasses.replace(d, noise_level=a, eval_every=every)
        opd.distill(c, m, tasks, dirs, rank, world, name=f"noise/student-a{a}")
    if rank == 0:  # rank 0 wrote the curves
        res = {"eval_every": every, "levels": {}}
        for a in NOISE_LEVELS:
            curve = held_out_curve(os.path.join(cfg.out, f"noise/student-a{a}"))
            gain = [sum(r[k] - curve[0][2][k] for k in names) / len(names) for _, _, r in curve]  # mean gain over tasks
            hit = next(s for (s, _, _), g in zip(curve, gain) if g >= 0.9 * gain[-1]) if gain[-1] > 0 else None
            res["levels"][str(a)] = {"rounds": [s for s, _, _ in curve], "held_out": [r for _, _, r in curve],
                                     "mean_gain": gain, "rounds_to_90pct": hit}
        opd.write_text(os.path.join(cfg.out, "noise.json"), json.dumps(res, indent=1))
        for a, r in res["levels"].items():
            opd.say(0, f"a = {a}: rounds to 90% of the final gain {r['rounds_to_90pct']} "
                       f"(final mean gain {r['mean_gain'][-1]:+.3f})")
        noise_figure(os.path.join(cfg.out, "noise.png"), res, names)


def noise_figure(path, res, names):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.2))
    for a, r in res["levels"].items():
        axes[0].plot(r["rounds"], r["mean_gain"], marker="o", label=f"a = {a}")
        for ax, k in zip(axes[1:], names):
            ax.plot(r["rounds"], [h[k] for h in r["held_out"]], marker=".", label=f"a = {a}")
    axes[0].set_title("mean held-out gain over the base")
    for ax, k in zip(axes[1:], names):
        ax.set_title(f"held-out {k}")
    for ax in axes:
        ax.set_xlabel("distillation round")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
