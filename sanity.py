"""
A 2D toy of DiffusionOPD, pure torch on CPU, using opd.py's maths (no second copy of it).

    python sanity.py                  # all three parts, ~2 min on 2 cores; sanity.png if matplotlib
    python sanity.py --part grad      # or noise, multitask
    python sanity.py --quick          # reduced sizes (what the tests run)

Parts
  grad       closed-form vs PPO-style gradient of the per-step teacher KL: both unbiased, the
             PPO one has a variance that grows as the noise level a shrinks (none at a = 0).
  noise      distil one teacher with rollouts at a = 0 (ODE), 0.3, 0.7: updates to 90% of the gap.
  multitask  8-Gaussian ring, 3 tasks: GRPO-Guard teachers, joint RL, cascade RL, and OPD.

The base is a small prompt-conditioned velocity MLP pretrained by flow matching on the ring
(every prompt sees the whole ring). Teachers are full fine-tunes (no LoRA in the toy).
"""
import argparse
import copy
import math
import time

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from opd import (Sampler, bcast, clipped_loss, distill_trajectory, group_advantages, log_ratio,
                 rollout, sampler_step_loss, transition)
from opd_support.conflict import Meter
from opd_support.sd3 import sd3_sigmas

N_PROMPTS = 12  # 4 prompts per task
# samples far off the ring earn nothing (else "upper" is won by flying off to y = +inf)
on_ring = lambda x: torch.exp(-(x.norm(dim=1) - 2) ** 2 / (2 * 0.25**2))
TASKS = {  # task -> (prompt ids, reward in [0, 1] of a (B, 2) sample)
    "upper": ([0, 1, 2, 3], lambda x: torch.sigmoid(4 * x[:, 1]) * on_ring(x)),
    "right": ([4, 5, 6, 7], lambda x: torch.sigmoid(4 * x[:, 0]) * on_ring(x)),
    # the ring's mode at 225 degrees (lower left): pulls against the two others
    "mode": ([8, 9, 10, 11], lambda x: torch.exp(-((x - MODE) ** 2).sum(1) / (2 * 0.5**2))),
}
MODE = 2.0 * torch.tensor([math.cos(5 * math.pi / 4), math.sin(5 * math.pi / 4)])
SIGMAS = sd3_sigmas(10, shift=1.0)  # 10 sampler steps; no shift needed in 2D


class VelocityMLP(nn.Module):
    """v(x, t, prompt): (B, 2) -> (B, 2)."""

    def __init__(self, hidden=128):
        super().__init__()
        self.emb = nn.Embedding(N_PROMPTS, 16)
        self.net = nn.Sequential(nn.Linear(2 + 8 + 16, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, t, prompt):
        t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0])[:, None]
        freqs = torch.arange(1, 5, dtype=torch.float32) * math.pi
        tf = torch.cat([torch.sin(t * freqs), torch.cos(t * freqs)], 1)
        return self.net(torch.cat([x, tf, self.emb(prompt)], 1))


def ring(n, g):
    """n samples of 8 Gaussians (std 0.1) on a ring of radius 2."""
    k = torch.randint(0, 8, (n,), generator=g).float() * (2 * math.pi / 8)
    return 2 * torch.stack([k.cos(), k.sin()], 1) + 0.1 * torch.randn(n, 2, generator=g)


def pretrain_base(steps, seed=0):
    """Flow matching: x_t = (1 - t) x0 + t eps, regress v = eps - x0, prompt ids at random."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = VelocityMLP()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        x0, eps = ring(512, g), torch.randn(512, 2, generator=g)
        t = torch.rand(512, 1, generator=g)
        p = torch.randint(0, N_PROMPTS, (512,), generator=g)
        loss = (model((1 - t) * x0 + t * eps, t[:, 0], p) - (eps - x0)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    return model


def vel(model, prompt):
    """The velocity closure opd.rollout / opd.distill_trajectory expect."""
    return lambda x, t: model(x, t, prompt)


def samples(model, prompt_ids, n, seed, noise_level=0.0):
    """n ODE samples per prompt id (fixed seed): returns (x (P*n, 2), prompts (P*n,))."""
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor(prompt_ids).repeat_interleave(n)
    x = rollout(vel(model, p), torch.randn(len(p), 2, generator=g), SIGMAS, noise_level, g)
    return x["states"][:, -1], p


def task_reward(model, task, n=512, seed=123):
    ids, reward = TASKS[task]
    x, _ = samples(model, ids, n, seed)
    return reward(x).mean().item()


# ---------------------------------------------------------------------------------- RL (toy)
def grpo_update(model, opt, task_prompts, g, meter, group=16, noise_level=0.7, clip=1e-3):
    """One GRPO-Guard update: per prompt a group of SDE rollouts, group advantages, then the
    clipped loss (RatioNorm, 1/|dt|) on every stored step. task_prompts: {task: (ids, reward)}.
    Each task's samples train in two halves, their gradients recorded by meter (conflict.py)."""
    p = torch.cat([torch.tensor(ids) for ids, _ in task_prompts.values()]).repeat_interleave(group)
    x = torch.randn(len(p), 2, generator=g)
    traj = rollout(vel(model, p), x, SIGMAS, noise_level, g)
    rewards = torch.zeros(len(p))
    for ids, reward in task_prompts.values():  # each prompt is rewarded by its own task
        m = torch.isin(p, torch.tensor(ids))
        rewards[m] = reward(traj["states"][m, -1])
    adv = group_advantages(rewards, p)
    opt.zero_grad()
    meter.start()
    N = len(SIGMAS) - 1
    for task, (ids, _) in task_prompts.items():
        rows = torch.isin(p, torch.tensor(ids)).nonzero()[:, 0]
        for half, r in enumerate((rows[0::2], rows[1::2])):  # two halves of the task's groups
            for j in range(N):
                x_j = traj["states"][r, j]
                mu, _ = transition(x_j, model(x_j, SIGMAS[j], p[r]), SIGMAS[j], SIGMAS[j + 1],
                                   noise_level)
                ratio = log_ratio(mu, traj["means"][r, j], traj["states"][r, j + 1],
                                  traj["stds"][r, j]).exp()
                # GRPO-Guard: RatioNorm's ratio, the clipped loss divided by |dt_j|
                loss = clipped_loss(ratio, adv[r], clip) / abs(float(SIGMAS[j + 1] - SIGMAS[j]))
                (loss.sum() / len(p) / N).backward()
            meter.mark(task, half)
    meter.before_step(opt)
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return rewards.mean().item()


def rl(model, tasks, updates, seed, lr=1e-3, conflict=None):
    """GRPO-Guard on a copy of model; tasks: the task names whose prompts are mixed per batch.
    conflict: a list that receives each update's gradient cosines (conflict.Meter's row)."""
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    meter = Meter(list(model.parameters()))
    for _ in range(updates):
        grpo_update(model, opt, {k: TASKS[k] for k in tasks}, g, meter)
        row = meter.row()
        if conflict is not None:
            conflict.append(row)
    return model


def opd(base, teachers, rounds, seed, noise_level=0.0, lr=1e-3, batch=256, log_every=0,
        eval_task=None, conflict=None):
    """OPD: student from the base; each round, for each task m, a student rollout on its prompts
    supervised by teacher m (closed form, steps 0..N-2), in two halves; one optimizer step a
    round on the mean of the tasks' gradients. conflict: as rl's."""
    student = copy.deepcopy(base)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    sampler = Sampler(SIGMAS, noise_level)  # loss on steps 0..N-2
    meter, curve = Meter(list(student.parameters())), []
    for r in range(rounds + 1):
        if log_every and r % log_every == 0:
            curve.append((r, task_reward(student, eval_task)))
        if r == rounds:
            break
        opt.zero_grad()
        meter.start()
        for task, teacher in teachers.items():
            ids = torch.tensor(TASKS[task][0])
            for half in (0, 1):
                p = ids[torch.randint(0, len(ids), (batch // 2,), generator=g)]
                distill_trajectory(vel(student, p), vel(teacher, p),
                                   torch.randn(batch // 2, 2, generator=g), sampler, g,
                                   0.5 / len(teachers))
                meter.mark(task, half)
        meter.before_step(opt)
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        row = meter.row()
        if conflict is not None:
            conflict.append(row)
    return student, curve


def conflict_table(name, rows):
    """Print each statistic of conflict.Meter's rows: mean and 95% t-interval over steps."""
    from scipy.stats import t as student_t
    out = {}
    for k in sorted({k for r in rows for k in r}):
        v = torch.tensor([r[k] for r in rows if r.get(k) is not None], dtype=torch.float64)
        half = float(student_t.ppf(0.975, len(v) - 1)) * v.std() / len(v) ** 0.5
        out[k] = (v.mean().item(), half.item())
        print(f"  {name:<9} {k:<22} {v.mean():+.3f} +- {half:.3f}")
    return out


# ---------------------------------------------------------------------------------- parts
def part_grad(base, teacher, quick):
    """Per-sample gradients (torch.func) of the closed-form loss and of the PPO surrogate."""
    print("\n== grad: closed-form vs PPO-style gradient of the per-step KL ==")
    n_draws = 400 if quick else 4000
    params = {k: v.detach() for k, v in base.named_parameters()}
    g = torch.Generator().manual_seed(1)
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
    flat = lambda gr, b=False: torch.cat([v.flatten(int(b)) for v in gr.values()], -1)
    print(f"fixed states (64 states at t={t:.2f}), {n_draws} single-sample draws per estimator")
    print(f"{'a':>5} {'|g_closed|':>11} {'rel.err PPO mean':>17} {'+- MC s.e.':>11} "
          f"{'var closed':>11} {'var PPO':>11} {'PPO/closed-norm^2':>18}")
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
        print(f"{a:5.1f} {g_c.norm():11.4g} {rel:17.4f} {se:11.4f} {0.0:11.3g} {var:11.4g} "
              f"{var / g_c.norm() ** 2:18.4g}")
    # a = 0: the closed form is the ODE loss 1/2 ||mu_S - mu_T||^2; the PPO ratio has no density
    g0 = flat(grad(loss_at)(params, x, torch.zeros(64, 2), 0.0, "closed"))
    print(f"  0.0 {g0.norm():11.4g}   (ODE: the closed form works; PPO needs a density: std = 0)")

    # whole rollouts: random states, gradient of the summed loss over steps 0..8 per trajectory
    n_traj = 200 if quick else 1000
    print(f"\nwhole rollouts ({n_traj} single-trajectory gradients, states random)")
    print(f"{'a':>5} {'var closed':>11} {'var PPO':>11} {'PPO/closed':>11}")
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
        vc = flat(vmap(grad(traj_loss), in_dims=(None, 0, 0, None))(params, traj["states"], eps,
                                                                    "closed"), True).var(0).sum()
        vp = flat(vmap(grad(traj_loss), in_dims=(None, 0, 0, None))(params, traj["states"], eps,
                                                                    "ppo"), True).var(0).sum()
        print(f"{a:5.1f} {vc:11.4g} {vp:11.4g} {vp / vc:11.3g}")
        rows.append((a, vc.item(), vp.item()))
    return rows


def part_noise(base, quick):
    print("\n== noise: distil one teacher (task 'upper') with rollouts at different noise "
          "levels ==")
    teacher = rl(base, ["upper"], 60 if quick else 150, seed=2)
    r_base, r_teacher = task_reward(base, "upper"), task_reward(teacher, "upper")
    print(f"reward: base {r_base:.3f}, teacher {r_teacher:.3f}")
    rounds = 60 if quick else 200
    curves, hit = {}, {}
    for a in [0.0, 0.3, 0.7]:
        _, curve = opd(base, {"upper": teacher}, rounds, seed=3, noise_level=a, log_every=5,
                       eval_task="upper")
        curves[a] = curve
        gap = [(r, (rw - r_base) / (r_teacher - r_base)) for r, rw in curve]
        hit[a] = next((r for r, f in gap if f >= 0.9), None)
        pts = ", ".join(f"{r}:{f:.2f}" for r, f in gap[:: max(1, len(gap) // 6)])
        print(f"a={a:.1f}  fraction of gap closed at update {pts};  90% at update {hit[a]}")
    if hit[0.0] and hit[0.7]:
        print(f"updates to 90%: SDE(a=0.7) / ODE = {hit[0.7] / hit[0.0]:.2f}x (paper: up to 5x)")
    else:
        print("updates to 90%: not reached by every setting within the budget")
    return dict(base=r_base, teacher=r_teacher, curves=curves, hit=hit)


def part_multitask(base, quick):
    print("\n== multitask: 3 tasks on the ring, teachers vs joint RL vs cascade RL vs OPD ==")
    T = 50 if quick else 150  # RL updates per task
    models = {"base": base}
    for i, k in enumerate(TASKS):
        models[f"teacher-{k}"] = rl(base, [k], T, seed=10 + i)
    # same number of sampled trajectories for joint, cascade and OPD: 3 T batches of each task
    conflict = {"joint RL": [], "OPD": []}  # per-step gradient cosines (conflict.py)
    models["joint RL"] = rl(base, list(TASKS), 3 * T, seed=20, conflict=conflict["joint RL"])
    m = base
    for i, k in enumerate(TASKS):
        m = rl(m, [k], 3 * T, seed=30 + i)
    models["cascade RL"] = m
    teachers = {k: models[f"teacher-{k}"] for k in TASKS}
    models["OPD"], _ = opd(base, teachers, 3 * T if not quick else 2 * T, seed=40, batch=128,
                           conflict=conflict["OPD"])
    table = {name: {k: task_reward(mdl, k) for k in TASKS} for name, mdl in models.items()}
    lo = {k: min(r[k] for r in table.values()) for k in TASKS}
    hi = {k: max(r[k] for r in table.values()) for k in TASKS}
    print(f"{'model':<14}" + "".join(f"{k:>9}" for k in TASKS) + f"{'avg':>9}")
    for name, r in list(table.items()):
        avg = sum((r[k] - lo[k]) / (hi[k] - lo[k] + 1e-12) for k in TASKS) / len(TASKS)
        r["avg"] = avg
        print(f"{name:<14}" + "".join(f"{r[k]:9.3f}" for k in TASKS) + f"{avg:9.3f}")
    print("(reward per task on its own prompts, ODE samples; avg = mean of min-max-normalised "
          "scores)")
    print("gradient conflict per step (conflict.py: cos_a_b raw, cos_adam_a_b preconditioned, "
          "cos_half_m the noise floor, dloss_m the first-order change of task m's loss):")
    table["conflict"] = {name: conflict_table(name, rows) for name, rows in conflict.items()}
    return table, models


def figure(models, noise, path="sanity.png"):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no figure)")
        return
    names = list(models)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3 * (len(names) + 1), 3))
    for ax, name in zip(axes, names):
        for k, c in zip(TASKS, ["tab:blue", "tab:orange", "tab:green"]):
            x, _ = samples(models[name], TASKS[k][0], 150, seed=7)
            ax.scatter(x[:, 0], x[:, 1], s=2, c=c, label=k)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=6, markerscale=3)
    if noise:
        ax = axes[-1]
        for a, curve in noise["curves"].items():
            ax.plot([r for r, _ in curve], [w for _, w in curve], label=f"a={a}")
        ax.axhline(noise["teacher"], ls="--", c="k", lw=0.8, label="teacher")
        ax.set_title("OPD reward vs updates", fontsize=9); ax.legend(fontsize=6)
    fig.tight_layout(); fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--part", choices=["all", "grad", "noise", "multitask"], default="all")
    ap.add_argument("--quick", action="store_true", help="reduced sizes (for tests)")
    ap.add_argument("--figure", default="sanity.png", help="where to save the figure ('' = none)")
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = pretrain_base(600 if args.quick else 2000)
    out = {}
    if args.part in ("all", "grad"):
        out["grad"] = part_grad(base, rl(base, ["upper"], 20 if args.quick else 60, seed=1),
                                args.quick)
    if args.part in ("all", "noise"):
        out["noise"] = part_noise(base, args.quick)
    if args.part in ("all", "multitask"):
        out["multitask"], models = part_multitask(base, args.quick)
        if args.figure:
            figure(models, out.get("noise"), args.figure)
    print(f"\ntotal time {time.time() - t0:.0f}s")
    return out


if __name__ == "__main__":
    main()
