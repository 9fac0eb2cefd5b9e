"""
A 2D toy of DiffusionOPD in pure torch on the CPU, with opd.py's maths (no second copy of it): why
the closed-form per-step KL is the gradient to use, what on-policy distillation does to a student's
trajectories, and how it compares with joint RL, cascade RL and its own variants.

    pip install torch matplotlib      # all the toy needs
    python sanity.py                  # every part, 5 seeds, 2 processes: 3.5 min on 2 cores
    python sanity.py --part variants  # or grad, noise, multitask (docs/results.md: their times)
    python sanity.py --quick          # reduced sizes, 1 seed (what the test runs): ~1 CPU-min

Parts (README.md and docs/results.md have the numbers to expect)
  grad       closed-form vs PPO-style gradient of the per-step KL: both unbiased; the PPO one has
             a variance that grows as the noise level a shrinks, and no density at a = 0 (ODE).
  noise      distil one teacher with rollouts at a = 0 (ODE), 0.3, 0.7: updates to 90% of the gap.
  multitask  8 Gaussians on a ring, 3 tasks with their own prompts: GRPO-Guard teachers, joint RL
             (two learning rates), cascade RL and OPD, every method sampling the same number of
             trajectories per task; joint RL's groups with zero advantage; the conflict meter.
  variants   OPD's variants at equal rollouts, with their costs: the closed form on every state
             (ours), DanceOPD, the teachers averaged, off-policy, PPO-style.
--out (default runs/sanity) receives tables.md (every table printed) and the figures:
sanity-opd.png (the student's states and the teachers' pulls on them; the variants' reward against
their costs) and sanity-multitask.png (every model's samples on every task).

Simplifications (and why)
1. The base is a small prompt-conditioned velocity MLP pretrained by flow matching on the ring
   (every prompt sees the whole ring); teachers, students and RL models are full fine-tunes of
   it (no LoRA in 2D). One base for every seed: a seed changes the training, not the base.
2. 10 sampler steps, t uniform (no shift in 2D); rewards are in [0, 1] and read from the last
   state x_N (no decoder).
3. Every method samples 64 trajectories per task and update (RL: 4 prompts x a group of 16;
   OPD: 64 student rollouts); joint and cascade RL get as many updates as a teacher and the
   student together, so each method samples as many trajectories per task as OPD with its teacher.
4. Seeds run in worker processes (--workers), each single-threaded.
"""
import argparse
import collections
import contextlib
import copy
import dataclasses
import math
import os
import time
import zlib

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from opd import (Sampler, bcast, clipped_loss, distill_trajectory_fused, group_advantages,
                 log_ratio, rollout, sampler_step_loss, transition)
from baselines import dance_query, dance_trajectory, offpolicy_trajectory  # as on the SD3
from opd_support.conflict import OFF, Meter, corrected
from opd_support.sd3 import sd3_sigmas


@dataclasses.dataclass
class Sizes:
    """How long each part trains (--quick: QUICK)."""
    pretrain: int = 1500       # flow-matching steps of the base (batch 512)
    teacher: int = 60          # GRPO-Guard updates of a teacher (64 trajectories of its task each)
    rounds: int = 100          # OPD rounds (64 student rollouts per task each); joint and cascade
                               # RL: teacher + rounds updates (per task, in cascade)
    noise_rounds: int = 45     # OPD rounds of the noise part (one task)
    draws: int = 2000          # grad: single-sample draws per estimator at fixed states
    trajectories: int = 500    # grad: single-trajectory gradients over whole rollouts


NOISE_LEVELS = [0.0, 0.3, 0.7]  # the noise part's rollouts: a = 0 is the ODE
JOINT_LRS = [1e-3, 2e-3]  # joint RL: the default learning rate (every method's) and twice it
QUICK = Sizes(pretrain=600, teacher=40, rounds=60, noise_rounds=40, draws=400, trajectories=150)


def gen(*key):
    """A generator for one named stream of random numbers, e.g. gen(seed, "teacher", task)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# ---------------------------------------------------------------------------------- the toy
N_PROMPTS = 12  # 4 prompts per task
MODE = 2.0 * torch.tensor([math.cos(5 * math.pi / 4), math.sin(5 * math.pi / 4)])


def on_ring(x):  # samples far off the ring earn nothing (else "upper" flies off to y = +inf)
    return torch.exp(-(x.norm(dim=1) - 2) ** 2 / (2 * 0.25**2))


TASKS = {  # task -> (prompt ids, reward in [0, 1] of (B, 2) final states)
    "upper": ([0, 1, 2, 3], lambda x: torch.sigmoid(4 * x[:, 1]) * on_ring(x)),
    "right": ([4, 5, 6, 7], lambda x: torch.sigmoid(4 * x[:, 0]) * on_ring(x)),
    # the ring's mode at 225 degrees (lower left): pulls against the two others
    "mode": ([8, 9, 10, 11], lambda x: torch.exp(-((x - MODE) ** 2).sum(1) / (2 * 0.5**2))),
}
SIGMAS = sd3_sigmas(10, shift=1.0)  # 10 sampler steps t_0 = 1 > ... > t_10 = 0; no shift in 2D
GROUP = 16  # RL: trajectories per prompt; 4 prompts x 16 = 64 per task and update


FREQS = torch.arange(1, 5, dtype=torch.float32) * math.pi  # the time embedding's


class VelocityMLP(nn.Module):
    """v(x, t, prompt): (B, 2) -> (B, 2); t a float or (B,)."""

    def __init__(self, hidden=128):
        super().__init__()
        self.emb = nn.Embedding(N_PROMPTS, 16)
        self.net = nn.Sequential(nn.Linear(2 + 8 + 16, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, t, prompt):
        t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0])[:, None]
        tf = torch.cat([torch.sin(t * FREQS), torch.cos(t * FREQS)], 1)
        return self.net(torch.cat([x, tf, self.emb(prompt)], 1))


def ring(n, g):
    """n samples of 8 Gaussians (std 0.1) on a ring of radius 2."""
    k = torch.randint(0, 8, (n,), generator=g).float() * (2 * math.pi / 8)
    return 2 * torch.stack([k.cos(), k.sin()], 1) + 0.1 * torch.randn(n, 2, generator=g)


def pretrain_base(steps):
    """Flow matching: x_t = (1 - t) x0 + t eps, regress v = eps - x0, prompt ids at random."""
    g = gen("base")
    torch.manual_seed(0)
    model = VelocityMLP()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        x0, eps = ring(512, g), torch.randn(512, 2, generator=g)
        t = torch.rand(512, 1, generator=g)
        p = torch.randint(0, N_PROMPTS, (512,), generator=g)
        loss = (model((1 - t) * x0 + t * eps, t[:, 0], p) - (eps - x0)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    return model


def vel(model, prompt, count=None, who="student"):
    """The velocity function v(x, t) that opd.py's samplers call, for these prompts. count (a
    Counter) adds the rows each call evaluates, under who (the student's: with grad or not)."""
    def v(x, t):
        if count is not None:
            grad_on = who == "student" and torch.is_grad_enabled()
            count[f"{who} with grad" if grad_on else who] += len(x)
        return model(x, t, prompt)
    return v


def samples(model, task, n, seed=123):
    """n ODE samples on each of the task's prompts (fixed noise): (4 n, 2) final states."""
    p = torch.tensor(TASKS[task][0]).repeat_interleave(n)
    return rollout(vel(model, p), torch.randn(len(p), 2, generator=gen(seed)), SIGMAS, 0.0)[
        "states"][:, -1]


def rewards_of(model, n=512):
    """{task: mean reward on its own prompts}, ODE samples."""
    return {k: TASKS[k][1](samples(model, k, n)).mean().item() for k in TASKS}


# ---------------------------------------------------------------------------------- RL (toy)
ZERO_SPREAD = 1e-6  # a group whose rewards' std is below this has all advantages ~0 (< 0.01)


def grpo_update(model, opt, tasks, g, meter, count, noise_level=0.7, clip=1e-3):
    """One GRPO-Guard update: per prompt a group of SDE rollouts, each rewarded by its prompt's
    task, group advantages, then the clipped loss (RatioNorm, 1/|dt|) on every stored step (all
    the steps of a trajectory in one batch: the weights do not change inside the update). Each
    task's groups train in two halves, their gradients recorded by the meter (conflict.py).
    count: as opd's. Returns {task: share of its groups with zero advantage (rewards all equal)}.
    """
    p = torch.cat([torch.tensor(TASKS[k][0]) for k in tasks]).repeat_interleave(GROUP)  # (B,)
    traj = rollout(vel(model, p, count), torch.randn(len(p), 2, generator=g), SIGMAS,
                   noise_level, g)
    count["trajectories"] += len(p)
    rewards = torch.zeros(len(p))
    for k in tasks:  # each prompt is rewarded by its own task
        m = torch.isin(p, torch.tensor(TASKS[k][0]))
        rewards[m] = TASKS[k][1](traj["states"][m, -1])
    adv = group_advantages(rewards, p)  # (B,) A = (r - mean_group) / (std_group + 1e-4)
    N, silent = len(SIGMAS) - 1, {}
    opt.zero_grad()
    meter.start()
    for k in tasks:
        rows = torch.isin(p, torch.tensor(TASKS[k][0])).nonzero()[:, 0]
        spread = rewards[rows].view(-1, GROUP).std(1)  # (prompts,) a group's reward spread
        silent[k] = (spread < ZERO_SPREAD).float().mean().item()
        for half, r in enumerate((rows[0::2], rows[1::2])):  # two halves of the task's groups
            b = len(r)
            t, t_next = SIGMAS[:-1].repeat(b), SIGMAS[1:].repeat(b)  # (b N,)
            x = traj["states"][r, :-1].reshape(b * N, 2)  # x_j of every step j, (b N, 2)
            v = vel(model, p[r].repeat_interleave(N), count)(x, t)  # with grad
            mu, _ = transition(x, v, t, t_next, noise_level)
            ratio = log_ratio(mu, traj["means"][r].reshape(b * N, 2),
                              traj["states"][r, 1:].reshape(b * N, 2),
                              traj["stds"][r].reshape(b * N)).exp()
            # GRPO-Guard: RatioNorm's ratio, the clipped loss divided by |dt_j|
            loss = clipped_loss(ratio, adv[r].repeat_interleave(N), clip) / (t - t_next)
            (loss.sum() / len(p) / N).backward()
            meter.mark(k, half)
    meter.before_step(opt)
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return silent


def rl(model, tasks, updates, g, lr=1e-3, log=None, count=None):
    """GRPO-Guard on a copy of model, the prompts of `tasks` mixed in every batch. log: a list
    that receives each update's row: the meter's statistics and zero_adv_<task>; count: a
    Counter of the forwards, as opd's."""
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    meter = Meter(list(model.parameters())) if log is not None else OFF  # OFF: records nothing
    count = collections.Counter() if count is None else count
    for _ in range(updates):
        silent = grpo_update(model, opt, tasks, g, meter, count)
        if log is not None:
            log.append({**meter.row(), **{f"zero_adv_{k}": v for k, v in silent.items()}})
    return model


# ------------------------------------------------------------------- OPD and its variants
def averaged(teachers, prompt, count):
    """The teachers averaged (no routing): mean_m v_T^m, whose step's mean is the mean of the
    teachers' means (mu is affine in v at a given state)."""
    vs = [vel(t, prompt, count, "teacher") for t in teachers.values()]
    return lambda x, t: sum(v(x, t) for v in vs) / len(vs)


VARIANTS = {  # name -> (trajectory function, rollout noise level a, loss, teachers' target)
    "OPD (ours)": (distill_trajectory_fused, 0.0, "closed", "routed"),
    "DanceOPD": (dance_trajectory, 0.0, "closed", "routed"),
    "teachers averaged": (distill_trajectory_fused, 0.0, "closed", "averaged"),
    "off-policy": (offpolicy_trajectory, 0.0, "closed", "routed"),
    "PPO-style (a=0.7)": (distill_trajectory_fused, 0.7, "ppo", "routed"),
}


def opd(base, teachers, rounds, g, variant="OPD (ours)", noise_level=None, lr=1e-3, batch=64,
        log=None, curve_every=0):
    """Algorithm 1 on the toy. The student starts at the base; each round, for each task m,
    `batch` student rollouts on m's prompts (two halves), every state supervised by teacher m
    (closed form, steps 0..N-2), then ONE optimizer step on the mean of the tasks' gradients.
    variant (VARIANTS) changes which states, which target and which loss; noise_level overrides
    its a.
    log: as rl's. Returns (student, Counter of forwards, [(round, reward of the first task)])."""
    trajectory, a, loss, target = VARIANTS[variant]
    sampler = Sampler(SIGMAS, a if noise_level is None else noise_level, loss=loss)
    student = copy.deepcopy(base)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    meter = Meter(list(student.parameters())) if log is not None else OFF
    count, curve = collections.Counter(), []
    first = next(iter(teachers))
    for r in range(rounds + 1):
        if curve_every and r % curve_every == 0:
            curve.append((r, TASKS[first][1](samples(student, first, 256)).mean().item()))
        if r == rounds:
            break
        opt.zero_grad()
        meter.start()
        for task, teacher in teachers.items():
            ids = torch.tensor(TASKS[task][0])
            for half in (0, 1):
                p = ids[torch.randint(0, len(ids), (batch // 2,), generator=g)]
                pull = (vel(teacher, p, count, "teacher") if target == "routed"
                        else averaged(teachers, p, count))
                trajectory(vel(student, p, count), pull, torch.randn(batch // 2, 2, generator=g),
                           sampler, g, 0.5 / len(teachers))  # the gradient: a mean over tasks
                meter.mark(task, half)
        meter.before_step(opt)
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if log is not None:
            log.append(meter.row())
    count["trajectories"] = rounds * batch * len(teachers)
    return student, count, curve


# ------------------------------------------------------------- jobs (one seed, one method)
def cpu_seconds():
    return time.process_time()  # this process's CPU time: a job runs single-threaded in it


def job_teacher(base, task, seed, size):
    t0, count = cpu_seconds(), collections.Counter()
    model = rl(base, [task], size.teacher, gen(seed, "teacher", task), count=count)
    return dict(model=model, seconds=cpu_seconds() - t0, rewards=rewards_of(model), count=count)


def job_joint(base, seed, lr, size):
    t0, log, count = cpu_seconds(), [], collections.Counter()
    model = rl(base, list(TASKS), size.teacher + size.rounds, gen(seed, "joint", lr), lr, log,
               count)
    return dict(model=model, seconds=cpu_seconds() - t0, rewards=rewards_of(model), log=log,
                count=count)


def job_cascade(base, seed, size):
    t0, model, log, count = cpu_seconds(), base, [], collections.Counter()
    for k in TASKS:  # one task after another, each as long as a teacher and the student together
        model = rl(model, [k], size.teacher + size.rounds, gen(seed, "cascade", k), log=log,
                   count=count)
    return dict(model=model, seconds=cpu_seconds() - t0, rewards=rewards_of(model), log=log,
                count=count)


def job_opd(base, teachers, seed, variant, size):
    t0, log = cpu_seconds(), []
    model, count, _ = opd(base, teachers, size.rounds, gen(seed, "opd", variant), variant,
                          log=log if variant == "OPD (ours)" else None)
    return dict(model=model, seconds=cpu_seconds() - t0, rewards=rewards_of(model), log=log,
                count=count)


def job_noise(base, teacher, seed, a, size):
    _, _, curve = opd(base, {"upper": teacher}, size.noise_rounds, gen(seed, "noise", a),
                      noise_level=a, curve_every=5)
    return dict(curve=curve)


def job_grad(base, teacher, size):
    return dict(rows=part_grad(base, teacher, size))


def timed(fn, kwargs):
    """fn(**kwargs), single-threaded, with its wall and CPU seconds ("wall", "cpu")."""
    torch.set_num_threads(1)
    t0, c0 = time.time(), cpu_seconds()
    out = fn(**kwargs)
    return {**out, "wall": time.time() - t0, "cpu": cpu_seconds() - c0}


def run_jobs(pool, jobs):
    """{key: (fn, kwargs)} -> {key: timed result}, on the pool's processes (None: here)."""
    if pool is None:
        return {key: timed(fn, kw) for key, (fn, kw) in jobs.items()}
    futures = {key: pool.submit(timed, fn, kw) for key, (fn, kw) in jobs.items()}
    return {key: f.result() for key, f in futures.items()}


def worker_pool(workers):
    """`workers` fresh interpreters (spawn: no forked torch state), or None for one."""
    if workers <= 1:
        return contextlib.nullcontext()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


# ---------------------------------------------------------------------------------- parts
def part_grad(base, teacher, size):
    """Per-sample gradients (torch.func) of the closed-form loss and of the PPO surrogate."""
    n_draws = size.draws
    params = {k: v.detach() for k, v in base.named_parameters()}
    g = gen("grad")
    j = 5  # a middle step of the 10-step schedule
    t, t_next = SIGMAS[j], SIGMAS[j + 1]
    p = torch.zeros(64, dtype=torch.long)
    # fixed states x_j: ODE states of the student at step j (64 states)
    x = rollout(vel(base, p), torch.randn(64, 2, generator=g), SIGMAS, 0.0)["states"][:, j]

    def loss_at(prm, x, eps, a, kind):  # one draw of one estimator at states x
        v_s = functional_call(base, prm, (x, t, p[: len(x)]))
        with torch.no_grad():
            mu_t, _ = transition(x, teacher(x, t, p[: len(x)]), t, t_next, a)
        mu_s, std = transition(x, v_s, t, t_next, a)
        x_next = mu_s + bcast(std, mu_s) * eps  # the step taken, with this draw's noise
        return sampler_step_loss(mu_s, mu_t, std, x_next, t_next - t,
                                 Sampler(SIGMAS, a, loss=kind)).mean()

    # dict of gradients -> one vector (or one row per draw when batched by vmap)
    def flat(gr, batched=False):
        return torch.cat([v.flatten(int(batched)) for v in gr.values()], -1)
    rows = []
    for a in [1.0, 0.7, 0.3, 0.1]:
        eps = torch.randn(n_draws, 64, 2, generator=g)
        g_c = flat(grad(loss_at)(params, x, eps[0], a, "closed"))
        g_p = flat(vmap(grad(loss_at), in_dims=(None, None, 0, None, None))(params, x, eps, a,
                                                                            "ppo"), True)
        mean, var = g_p.mean(0), g_p.var(0).sum()  # total variance = trace of the covariance
        rel = (mean - g_c).norm() / g_c.norm()
        se = (var / n_draws).sqrt() / g_c.norm()
        rows.append((a, rel.item(), se.item(), var.item() / g_c.norm().item() ** 2))
    # whole rollouts: random states, gradient of the summed loss over steps 0..8 per trajectory
    n_traj = size.trajectories
    pr = torch.zeros(1, dtype=torch.long)
    for a in [1.0, 0.7, 0.3, 0.1]:
        traj = rollout(vel(base, torch.zeros(n_traj, dtype=torch.long)),
                       torch.randn(n_traj, 2, generator=g), SIGMAS, a, g)
        eps = (traj["states"][:, 1:] - traj["means"]) / traj["stds"][..., None]  # (R, N, 2)

        def traj_loss(prm, states, eps, kind):
            tot = 0.0
            for jj in range(len(SIGMAS) - 2):
                xs = states[jj][None]
                v_s = functional_call(base, prm, (xs, SIGMAS[jj], pr))
                with torch.no_grad():
                    mu_t, _ = transition(xs, teacher(xs, SIGMAS[jj], pr), SIGMAS[jj],
                                         SIGMAS[jj + 1], a)
                mu_s, std = transition(xs, v_s, SIGMAS[jj], SIGMAS[jj + 1], a)
                x_next = mu_s + bcast(std, mu_s) * eps[jj][None]
                tot = tot + sampler_step_loss(mu_s, mu_t, std, x_next,
                                              SIGMAS[jj + 1] - SIGMAS[jj],
                                              Sampler(SIGMAS, a, loss=kind)).sum()
            return tot
        per_traj = vmap(grad(traj_loss), in_dims=(None, 0, 0, None))
        vc = flat(per_traj(params, traj["states"], eps, "closed"), True).var(0).sum()
        vp = flat(per_traj(params, traj["states"], eps, "ppo"), True).var(0).sum()
        rows.append((a, vc.item(), vp.item()))
    return rows


def table_grad(rows, size):
    fixed, whole = rows[:4], rows[4:]
    out = [f"grad: 64 fixed states at t = {SIGMAS[5]:.2f}, {size.draws} single-sample draws per "
           f"estimator; whole rollouts: {size.trajectories} single-trajectory gradients", "",
           "| a | rel. error of PPO mean | MC s.e. | var PPO / closed-form norm^2 "
           "| whole rollouts: var PPO / var closed |", "|---|---|---|---|---|"]
    for (a, rel, se, rv), (_, vc, vp) in zip(fixed, whole):
        out.append(f"| {a} | {rel:.3f} | {se:.3f} | {rv:.3g} | {vp / vc:.3g} |")
    out.append("| 0 (ODE) | the closed form works | | PPO has no density (std = 0) | |")
    return "\n".join(out)


def updates_to(curve, lo, hi, share=0.9):
    """The first logged round at which the reward closed `share` of the gap lo -> hi (or None)."""
    return next((r for r, w in curve if (w - lo) / (hi - lo) >= share), None)


def table_noise(res, seeds, base_r, teacher_r):
    out = ["noise: one teacher (task upper) distilled with rollouts at noise level a; rounds "
           "to close 90% of the base-teacher gap (read every 5), per seed", "",
           "| a | rounds to 90%, per seed | mean ± sd | gap closed at round 20 |",
           "|---|---|---|---|"]
    for a in NOISE_LEVELS:
        hits = [updates_to(res["noise", s, a]["curve"], base_r[s], teacher_r[s]) for s in seeds]
        at20 = [next(((w - base_r[s]) / (teacher_r[s] - base_r[s]) for r, w in
                      res["noise", s, a]["curve"] if r == 20), float("nan")) for s in seeds]
        ok = [h for h in hits if h is not None]
        ms = mean_sd(ok, 1) if len(ok) == len(hits) else f"{len(hits) - len(ok)} not reached"
        per_seed = ", ".join("-" if h is None else str(h) for h in hits)
        out.append(f"| {a} | {per_seed} | {ms} | {mean_sd(at20, 2)} |")
    return "\n".join(out)


def lr_name(lr):
    return f"{lr:.0e}".replace("e-0", "e-")  # 0.001 -> 1e-3


def mean_sd(v, digits=3):
    """'mean ± sd' over seeds (sd: the sample standard deviation); one seed: its value."""
    v = torch.tensor([float(x) for x in v], dtype=torch.float64)
    if len(v) == 1:
        return f"{v.item():.{digits}f}"
    return f"{v.mean().item():.{digits}f} ± {v.std().item():.{digits}f}"


def normalised_avg(table):
    """Per model: the mean over tasks of (r - min) / (max - min) within one seed's table."""
    lo = {k: min(r[k] for r in table.values()) for k in TASKS}
    hi = {k: max(r[k] for r in table.values()) for k in TASKS}
    return {m: sum((r[k] - lo[k]) / (hi[k] - lo[k] + 1e-12) for k in TASKS) / len(TASKS)
            for m, r in table.items()}


def multitask_models(res, seed, base_rewards):
    """{row name: job result (or the base's rewards)} of one seed's multitask table."""
    rows = {"base": dict(rewards=base_rewards, seconds=0.0)}
    rows |= {f"teacher-{k}": res["teacher", seed, k] for k in TASKS}
    rows |= {f"joint RL, lr {lr_name(lr)}": res["joint", seed, lr] for lr in JOINT_LRS}
    rows["cascade RL"] = res["cascade", seed]
    opd_row = res["opd", seed, "OPD (ours)"]
    rows["OPD"] = {**opd_row, "seconds": opd_row["seconds"] + sum(
        res["teacher", seed, k]["seconds"] for k in TASKS)}  # with its teachers'
    return rows


def table_multitask(res, seeds, base_rewards, size):
    per_seed = [multitask_models(res, s, base_rewards) for s in seeds]
    avgs = [normalised_avg({m: row["rewards"] for m, row in t.items()}) for t in per_seed]
    T, R = size.teacher, size.rounds
    traj = {"base": "-", "OPD": f"{(T + R) * 64:,}"}  # trajectories per task
    out = [f"multitask: reward per task on its own prompts (ODE samples), mean ± sd over "
           f"{len(seeds)} seeds; avg = mean of min-max-normalised scores within each seed; "
           f"trajectories sampled per task (OPD's: its teacher's {T} x 64 and its own {R} x 64); "
           "train CPU-s: single-threaded, OPD's with its three teachers'", "",
           "| model | upper | right | mode | avg | trajectories per task | train CPU-s |",
           "|---|---|---|---|---|---|---|"]
    for m in per_seed[0]:
        n = traj.get(m, f"{T * 64:,}" if m.startswith("teacher") else f"{(T + R) * 64:,}")
        cells = [mean_sd([t[m]["rewards"][k] for t in per_seed]) for k in TASKS]
        avg = mean_sd([a[m] for a in avgs])
        secs = "-" if m == "base" else f"{sum(t[m]['seconds'] for t in per_seed) / len(seeds):.0f}"
        out.append(f"| {m} | {' | '.join(cells)} | {avg} | {n} | {secs} |")
    return "\n".join(out)


def table_zero_adv(res, seeds):
    """Each task's share of groups with zero advantage in joint RL and in cascade RL (each of
    its stages on its own task), by tenths of the updates on that task."""
    runs = {f"joint RL, lr {lr_name(lr)}": [res["joint", s, lr]["log"] for s in seeds]
            for lr in JOINT_LRS}
    runs["cascade RL"] = [res["cascade", s]["log"] for s in seeds]
    out = ["zero advantage: the share of each task's groups whose rewards are all equal (spread "
           f"< {ZERO_SPREAD:g}: no gradient) among the updates on that task, by tenths of them; "
           f"mean over the updates and {len(seeds)} seeds (cascade RL: each stage, its task)", "",
           "| run | task | " + " | ".join(f"{10 * i}-{10 * i + 10}%" for i in range(10)) + " |",
           "|---|---|" + "---|" * 10]
    for name, logs in runs.items():
        for k in TASKS:
            cells = []
            for i in range(10):
                v = []
                for log in logs:
                    rows = [row[f"zero_adv_{k}"] for row in log if f"zero_adv_{k}" in row]
                    v += rows[len(rows) * i // 10: len(rows) * (i + 1) // 10]
                cells.append(f"{100 * sum(v) / len(v):.0f}%")
            out.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def table_conflict(res, seeds):
    """conflict.Meter's statistics: per run the mean over its updates, then mean ± sd over
    seeds; whatever keys the meter's rows have, and each pair's noise-corrected cosine (raw and
    after Adam) from each seed's means (conflict.corrected)."""
    lr = JOINT_LRS[0]
    runs = {f"joint RL, lr {lr_name(lr)}": [res["joint", s, lr]["log"] for s in seeds],
            "OPD": [res["opd", s, "OPD (ours)"]["log"] for s in seeds]}
    keys = sorted({k for logs in runs.values() for log in logs for row in log for k in row
                   if not k.startswith("zero_adv")})
    means = {name: [{k: sum(v) / len(v) for k in keys
                     if (v := [row[k] for row in log if row.get(k) is not None])}
                    for log in logs] for name, logs in runs.items()}  # per run, per seed
    pairs = [k[4:].split("_") for k in keys if k.startswith("cos_") and k.count("_") == 2
             and not k.startswith(("cos_half", "cos_adam"))]
    for name, per_seed in means.items():
        for m in per_seed:
            for a, b in pairs:
                for kind in ("", "adam_"):
                    c = corrected(m.get(f"cos_{kind}{a}_{b}"), m.get(f"cos_{kind}half_{a}"),
                                  m.get(f"cos_{kind}half_{b}"))
                    if c is not None:
                        m[f"corrected_{kind}{a}_{b}"] = c
    keys += sorted({k for per_seed in means.values() for m in per_seed for k in m
                    if k.startswith("corrected_")})
    out = ["conflict: the gradient-conflict meter (opd_support/conflict.py) per update; mean over "
           f"each run's updates, then mean ± sd over {len(seeds)} seeds; corrected_*: the "
           "cross-task cosine with the split halves' noise taken out, from each seed's means", "",
           "| statistic | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for k in keys:
        cells = [mean_sd(v) if (v := [m[k] for m in per_seed if k in m]) else "-"
                 for per_seed in means.values()]
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def variant_rows(res, seeds):
    """{variant: {"rewards": [per seed {task: r}], "count": per-run Counter, "seconds": [..]}}."""
    out = {}
    for v in VARIANTS:
        runs = [res["opd", s, v] for s in seeds]
        out[v] = dict(rewards=[r["rewards"] for r in runs], count=runs[0]["count"],
                      seconds=[r["seconds"] for r in runs])
    return out


def table_variants(res, seeds, size):
    rows = variant_rows(res, seeds)
    out = [f"variants: OPD's variants from the same teachers, {size.rounds} rounds of 64 "
           f"trajectories per task each; forwards per run (rows of the toy's MLP; a forward "
           f"with grad is followed by its backward); CPU-s single-threaded; reward mean ± sd "
           f"over {len(seeds)} seeds", "",
           "| variant | trajectories | student forwards, no grad | student forward+backward "
           "| teacher forwards | CPU-s | upper | right | mode | mean |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for v, row in rows.items():
        c = row["count"]
        cells = [mean_sd([r[k] for r in row["rewards"]]) for k in TASKS]
        mean = mean_sd([sum(r.values()) / len(r) for r in row["rewards"]])
        out.append(f"| {v} | {c['trajectories']:,} | {c['student']:,} | "
                   f"{c['student with grad']:,} | {c['teacher']:,} | "
                   f"{sum(row['seconds']) / len(seeds):.1f} | {' | '.join(cells)} | {mean} |")
    return "\n".join(out)


def every_model(res, seeds, base_rewards):
    """{model: [its run of each seed]}, multitask's models then OPD's variants."""
    rows = multitask_models(res, seeds[0], base_rewards)
    rows = {m: [multitask_models(res, s, base_rewards)[m] for s in seeds] for m in rows}
    rows.pop("OPD")
    teacher_s = [sum(res["teacher", s, k]["seconds"] for k in TASKS) for s in seeds]
    for v in VARIANTS:  # OPD's seconds with its teachers', as in the multitask table
        rows[v] = [{**res["opd", s, v], "seconds": res["opd", s, v]["seconds"] + t}
                   for s, t in zip(seeds, teacher_s)]
    return rows


def table_per_seed(res, seeds, base_rewards):
    out = ["per seed: reward on upper / right / mode", "",
           "| model | " + " | ".join(f"seed {s}" for s in seeds) + " |",
           "|---|" + "---|" * len(seeds)]
    for m, runs in every_model(res, seeds, base_rewards).items():
        cells = ["/".join(f"{r['rewards'][k]:.2f}" for k in TASKS) for r in runs]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def table_summary(res, seeds, base_rewards, size):
    """The README's table: every model of multitask and variants, reward and costs."""
    rows = every_model(res, seeds, base_rewards)
    T, R = size.teacher, size.rounds
    out = [f"every method samples {(T + R) * 64:,} trajectories per task (OPD and its variants: "
           f"their teacher's {T * 64:,} and their own {R * 64:,}; a teacher {T * 64:,}); reward "
           f"on each task's prompts, mean ± sd over {len(seeds)} seeds; trained: the student's "
           "forward+backward per trajectory; teacher: the teachers' forwards per trajectory; "
           "CPU-s: training, single-threaded, OPD's with its teachers'", "",
           "| model | upper | right | mode | mean | trained | teacher | CPU-s |",
           "|---|---|---|---|---|---|---|---|"]
    for m, runs in rows.items():
        cells = [mean_sd([r["rewards"][k] for r in runs]) for k in TASKS]
        mean = mean_sd([sum(r["rewards"].values()) / len(TASKS) for r in runs])
        c = runs[0].get("count")
        cost = (["-"] * 3 if c is None else
                [f"{c['student with grad'] / c['trajectories']:.0f}",
                 f"{c['teacher'] / c['trajectories']:.0f}",
                 f"{sum(r['seconds'] for r in runs) / len(runs):.0f}"])
        out.append(f"| {m} | {' | '.join(cells)} | {mean} | {' | '.join(cost)} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------- figures
COLORS = {"upper": "tab:blue", "right": "tab:orange", "mode": "tab:green"}


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("(matplotlib not installed: no figures)")
        return None


def draw_targets(ax, tasks=TASKS):
    """Each task's target region: the upper / right half of the ring, the lower-left mode."""
    from matplotlib.patches import Circle, Wedge
    ax.add_patch(Circle((0, 0), 2, fill=False, color="0.8", lw=0.8))
    arcs = {"upper": (0, 180), "right": (-90, 90)}
    for k in tasks:
        if k in arcs:
            ax.add_patch(Wedge((0, 0), 2.25, *arcs[k], width=0.5, color=COLORS[k], alpha=0.15,
                               lw=0))
        else:
            ax.add_patch(Circle(MODE.tolist(), 0.5, color=COLORS[k], alpha=0.2, lw=0))
    ax.set_xlim(-3, 3); ax.set_ylim(-3, 3); ax.set_aspect("equal")
    ax.set_xticks([]); ax.set_yticks([])


def draw_pulls(axes, base, teachers, student, per_task=2, magnify=2.0):
    """A few student trajectories (ODE), and at every state with a loss the student's next mean
    and the teacher's next mean on that same state (an arrow from one to the other), at the
    start of distillation and at its end; third panel: DanceOPD's one queried state each. The
    same noise x_0 in every panel. Three axes."""
    panels = [(base, "OPD, round 0: every state pulled", False),
              (student, "OPD, its end: the pulls are small", False),
              (base, "DanceOPD, round 0: one state each", True)]
    noise = torch.randn(len(TASKS), per_task, 2, generator=gen("figure"))
    query = dance_query(len(SIGMAS) - 1, per_task, gen("figure", "query"))
    torch.set_grad_enabled(False)  # drawing only
    for ax, (model, title, dance) in zip(axes, panels):
        draw_targets(ax)
        for (k, teacher), x0 in zip(teachers.items(), noise):
            p = torch.tensor(TASKS[k][0][:per_task])
            s = rollout(vel(model, p), x0, SIGMAS, 0.0)["states"]  # (n, N+1, 2)
            for i in range(per_task):
                ax.plot(s[i, :, 0], s[i, :, 1], "-o", c=COLORS[k], ms=2, lw=1,
                        label=k if i == 0 else None)
            # (sample, step) with a loss: every state x_0..x_8, or DanceOPD's one per sample
            pairs = ([(i, int(query[i])) for i in range(per_task)] if dance else
                     [(i, j) for i in range(per_task) for j in range(len(SIGMAS) - 2)])
            i, j = torch.tensor(pairs).T
            x, t, t_next = s[i, j], SIGMAS[j], SIGMAS[j + 1]
            mu_teacher, _ = transition(x, teacher(x, t, p[i]), t, t_next, 0.0)
            mu_student = s[i, j + 1]  # the ODE: the student's next mean is its next state
            d = mu_teacher - mu_student
            ax.quiver(mu_student[:, 0], mu_student[:, 1], d[:, 0], d[:, 1], angles="xy",
                      scale_units="xy", scale=1 / magnify, width=0.006, color="k")
            if dance:
                ax.plot(x[:, 0], x[:, 1], "s", mfc="none", mec="k", ms=7)
        ax.set_title(title, fontsize=9)
    torch.set_grad_enabled(True)
    axes[0].legend(fontsize=7, loc="lower right", handlelength=1)
    for ax, note in zip(axes, ["shaded: each task's target",
                               f"arrow: student's next mean -> teacher's (x{magnify:g})",
                               "square: the state queried"]):
        ax.set_xlabel(note, fontsize=8)


def draw_costs(axes, res, seeds, base_rewards, teacher_mean):
    """OPD's variants: mean reward over the tasks (± sd over seeds) against each cost, one point
    per variant. Three axes."""
    rows = variant_rows(res, seeds)
    costs = {"student forward+backward / trajectory":
             lambda r: r["count"]["student with grad"] / r["count"]["trajectories"],
             "teacher forwards / trajectory":
             lambda r: r["count"]["teacher"] / r["count"]["trajectories"],
             "CPU-seconds / run (teachers' not counted)":
             lambda r: sum(r["seconds"]) / len(r["seconds"])}
    for ax, (label, cost) in zip(axes, costs.items()):
        for i, (v, row) in enumerate(rows.items()):
            m = torch.tensor([sum(r.values()) / len(r) for r in row["rewards"]])
            sd = m.std().item() if len(m) > 1 else 0.0
            ax.errorbar(cost(row), m.mean().item(), yerr=sd, fmt="o", c=f"C{i}", capsize=3,
                        label=v)
        for level, name, ls in [(teacher_mean, "teachers", "--"),
                                (sum(base_rewards.values()) / len(TASKS), "base", ":")]:
            ax.axhline(level, ls=ls, c="0.4", lw=0.8)
            ax.text(0.01, level, name, transform=ax.get_yaxis_transform(), va="bottom",
                    fontsize=7)
        ax.set_xlabel(label, fontsize=8); ax.set_xlim(left=0); ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("mean reward over the 3 tasks", fontsize=9)
    axes[1].set_yticklabels([]); axes[2].set_yticklabels([])


def figure_opd(path, plt, base, teachers, student, costs=None):
    """sanity-opd.png: the pulls (draw_pulls) and, given draw_costs' arguments, the variants'
    reward against cost below them."""
    rows = 2 if costs else 1
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3.5 + 3.3 * (rows - 1)), squeeze=False)
    draw_pulls(axes[0], base, teachers, student)
    if costs:
        draw_costs(axes[1], *costs)
        fig.legend(*axes[1, 0].get_legend_handles_labels(), loc="lower center",
                   ncol=len(VARIANTS), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 if costs else 0, 1, 1))
    fig.savefig(path, dpi=100); plt.close(fig)


def figure_multitask(models, rewards, path, plt):
    """Samples of every model on every task's prompts, the task's target region marked; two
    blocks of models side by side."""
    names = list(models)
    half = (len(names) + 1) // 2
    fig, axes = plt.subplots(half, 2 * len(TASKS), figsize=(9, 1.55 * half + 0.4), squeeze=False)
    for i, name in enumerate(names):
        row, col0 = i % half, len(TASKS) * (i // half)
        for c, k in enumerate(TASKS):
            ax = axes[row, col0 + c]
            draw_targets(ax, [k])
            x = samples(models[name], k, 40, seed=7)
            ax.scatter(x[:, 0], x[:, 1], s=2, c=COLORS[k])
            ax.text(-2.85, 2.3, f"{rewards[name][k]:.2f}", fontsize=7)
            if row == 0:
                ax.set_title(k, fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.text(0.01, 0.005, "samples of seed 0's models on each task's prompts (ODE); shaded: the "
             "task's target; corner: its reward", fontsize=8)
    fig.tight_layout(pad=0.3, rect=(0, 0.03, 1, 1)); fig.savefig(path, dpi=100); plt.close(fig)


# ---------------------------------------------------------------------------------- main
def jobs_of(parts, seeds, base, size, teachers=None):
    """The jobs of the parts asked for: {key: (function, kwargs)}; without teachers, stage 1
    (the teachers every later job needs), else everything else, the longest jobs first."""
    if teachers is None:
        tasks = ["upper"] if set(parts) <= {"grad", "noise"} else list(TASKS)
        return {("teacher", s, k): (job_teacher, dict(base=base, task=k, seed=s, size=size))
                for s in ([0] if parts == ["grad"] else seeds) for k in tasks}
    jobs = {}
    if "grad" in parts:
        jobs["grad"] = (job_grad, dict(base=base, teacher=teachers[0]["upper"], size=size))
    variants = (list(VARIANTS) if "variants" in parts
                else ["OPD (ours)"] if "multitask" in parts else [])
    for s in seeds:
        jobs |= {("opd", s, v): (job_opd, dict(base=base, teachers=teachers[s], seed=s,
                                               variant=v, size=size)) for v in variants}
    if "multitask" in parts:
        for s in seeds:
            jobs["cascade", s] = (job_cascade, dict(base=base, seed=s, size=size))
            jobs |= {("joint", s, lr): (job_joint, dict(base=base, seed=s, lr=lr, size=size))
                     for lr in JOINT_LRS}
    if "noise" in parts:
        for s in seeds:
            jobs |= {("noise", s, a): (job_noise, dict(base=base, teacher=teachers[s]["upper"],
                                                       seed=s, a=a, size=size))
                     for a in NOISE_LEVELS}
    return jobs


def report(parts, seeds, res, base_rewards, size):
    """The tables of the parts run (markdown), and the numbers the tests check."""
    tables, out = [], {"base": base_rewards, "res": res}
    if "grad" in parts:
        tables.append(table_grad(res["grad"]["rows"], size))
        out["grad"] = res["grad"]["rows"]
    if "noise" in parts:
        r_t = {s: res["teacher", s, "upper"]["rewards"]["upper"] for s in seeds}
        tables.append(table_noise(res, seeds, {s: base_rewards["upper"] for s in seeds}, r_t))
        out["noise"] = {a: [updates_to(res["noise", s, a]["curve"], base_rewards["upper"],
                                       r_t[s]) for s in seeds] for a in NOISE_LEVELS}
    if "multitask" in parts:
        tables += [table_multitask(res, seeds, base_rewards, size),
                   table_zero_adv(res, seeds), table_conflict(res, seeds)]
        out["multitask"] = [multitask_models(res, s, base_rewards) for s in seeds]
    if "variants" in parts:
        tables.append(table_variants(res, seeds, size))
        out["variants"] = variant_rows(res, seeds)
    if {"multitask", "variants"} <= set(parts):
        tables.insert(0, table_summary(res, seeds, base_rewards, size))
        tables.append(table_per_seed(res, seeds, base_rewards))
    return tables, out


def draw(parts, seeds, res, base, base_rewards, folder):
    """The figures of the parts run, into folder: sanity-opd.png (seed 0's OPD, and the variants'
    costs with --part variants or all), sanity-multitask.png (seed 0's models)."""
    plt = pyplot()
    if not plt or not {"multitask", "variants"} & set(parts):
        return
    s0 = seeds[0]
    teachers = {k: res["teacher", s0, k]["model"] for k in TASKS}
    costs = None
    if "variants" in parts:
        teacher_mean = sum(res["teacher", s, k]["rewards"][k] for s in seeds for k in TASKS) / (
            len(TASKS) * len(seeds))
        costs = (res, seeds, base_rewards, teacher_mean)
    figure_opd(os.path.join(folder, "sanity-opd.png"), plt, base, teachers,
               res["opd", s0, "OPD (ours)"]["model"], costs)
    if "multitask" in parts:
        rows = multitask_models(res, s0, base_rewards)
        models = {m: (base if m == "base" else row["model"]) for m, row in rows.items()}
        figure_multitask(models, {m: row["rewards"] for m, row in rows.items()},
                         os.path.join(folder, "sanity-multitask.png"), plt)


PART_OF = {"teacher": "teachers", "grad": "grad", "noise": "noise", "joint": "joint RL",
           "cascade": "cascade RL", "opd": "OPD and its variants"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--part", choices=["all", "grad", "noise", "multitask", "variants"],
                    default="all")
    ap.add_argument("--quick", action="store_true", help="reduced sizes and 1 seed (the test)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 5, --quick 1)")
    ap.add_argument("--workers", type=int, default=2,
                    help="worker processes, each single-threaded (1: none, all in this one)")
    ap.add_argument("--out", default="runs/sanity", help="tables.md and the figures ('' = none)")
    args = ap.parse_args(argv)
    size = QUICK if args.quick else Sizes()
    seeds = list(range(args.seeds or (1 if args.quick else 5)))
    workers = args.workers
    parts = ["grad", "noise", "multitask", "variants"] if args.part == "all" else [args.part]
    print(f"parts {parts}, seeds {seeds}, workers {workers}, {size}")
    t0, c0 = time.time(), cpu_seconds()
    torch.set_num_threads(1)
    base = pretrain_base(size.pretrain)
    base_rewards = rewards_of(base)
    cpu = {"pretraining": cpu_seconds() - c0}
    with worker_pool(workers) as pool:
        res = run_jobs(pool, jobs_of(parts, seeds, base, size))
        teachers = collections.defaultdict(dict)  # {seed: {task: teacher}}
        for (_, s, k), r in res.items():
            teachers[s][k] = r["model"]
        res |= run_jobs(pool, jobs_of(parts, seeds, base, size, teachers))
    tables, out = report(parts, seeds, res, base_rewards, size)
    for key, r in res.items():  # every job's CPU time, by part
        part = PART_OF[key if isinstance(key, str) else key[0]]
        cpu[part] = cpu.get(part, 0.0) + r["cpu"]
    c1 = cpu_seconds()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        draw(parts, seeds, res, base, base_rewards, args.out)
    cpu["figures"] = cpu_seconds() - c1
    tables.append("time, CPU-seconds (each job single-threaded): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
                  + f"; in all {sum(cpu.values()):.0f} CPU-s, {time.time() - t0:.0f} s of "
                  f"wall-clock with {workers} worker process(es)")
    print("\n\n".join(tables))
    if args.out:
        with open(os.path.join(args.out, "tables.md"), "w") as f:
            f.write("\n\n".join(tables) + "\n")
        print(f"tables and figures: {args.out}/")
    return out


if __name__ == "__main__":
    main()
