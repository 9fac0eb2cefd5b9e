"""
The paper's comparisons on opd.py's SD3 code path, a runnable script of its own:

    python baselines.py --stage compare          # every method below from the same teachers
    python baselines.py --stage noise            # OPD with rollouts at a = 0, 0.3, 0.7
    python baselines.py --stage joint --algo nft # one multi-task RL baseline
    python baselines.py --stage distill --loss sft --teachers color=DIR   # one student
    torchrun --nproc_per_node=2 baselines.py --stage joint

  --stage joint     multi-task RL: one LoRA, every step draws prompts from every task, each image
                    scored by its own task's reward, advantages within its prompt's group
  --stage cascade   multi-task RL, one task after another in --tasks order, one LoRA throughout
                    (both with --algo grpo_guard or nft: the paper's Multi-task GRPO-Guard,
                    Multi-task NFT, Cascade NFT)
  --loss sft        the paper's SFT: each task's teacher samples images (ODE, its own CFG) for the
                    task's prompts; the student is fine-tuned on them by flow matching
  --loss offpolicy  the closed-form loss on the TEACHER's ODE states: on- against off-policy with
                    the loss held fixed
  --loss dance      DanceOPD: the student's ODE trajectory, one low-noise query state per sample
                    (Beta(5, 2) over the states), velocity MSE to the task's teacher
  --loss flow       FlowOPD: the student's SDE rollout; the teacher's log-density of each step the
                    student took is that step's reward; advantages per step; clipped PPO
  (--loss closed and ppo are opd.py's: the closed form and its PPO-style surrogate)
  --stage compare   all of the above from the same teachers, with the same budget of sampled
                    trajectories as OPD (teachers + distillation), then one table (eval)
  --stage noise     OPD at a = 0, 0.3, 0.7 from the same teachers and seeds, the SDE runs with
                    both step weights (Eq. 11's and the public code's): held-out metrics every 2
                    rounds, rounds to 50 / 75 / 90% of the final gain, noise.png

Every student is routed: each task's prompts are supervised by that task's teacher alone (the
public FlowOPD code averages its teachers because its tasks share one prompt set). The public
DanceOPD and FlowOPD runs are CFG-free; here every method uses the run's --guidance, so that the
comparison differs in the method only.
"""
import dataclasses
import functools
import json
import math
import os

import torch

import opd
from machinery import gather, main as cli, say, write_text
from opd import gaussian_logp, opd_loss, rollout, transition
from options import arg, one_of

DISTILL_LOSSES = ("closed", "ppo", "sft", "offpolicy", "dance", "flow")
ODE_LOSSES = ("sft", "offpolicy", "dance")  # they roll out (or sample) with the ODE


@dataclasses.dataclass
class Args(opd.Config):
    stage: str = arg("compare", one_of("distill", "joint", "cascade", "compare", "noise"), "stage")
    loss: str = arg("closed", one_of(*DISTILL_LOSSES), "distill: the student's method")

    def relations(self, stage):
        a = self.noise_level
        return super().relations(stage) + [
            (stage == "distill" and self.loss == "flow" and a == 0,
             "--loss flow needs --noise_level > 0: the ODE step has no density"),
            (stage == "distill" and self.loss in ODE_LOSSES and a > 0,
             f"--loss {self.loss} rolls out with the ODE: --noise_level must be 0, got {a}"),
            (self.two_pass and self.loss not in ("closed", "ppo"),
             f"--two_pass applies to --loss closed or ppo, not {self.loss}"),
            (stage == "distill" and self.loss == "flow" and self.batch_size < 2,
             "--loss flow normalises over the batch: --batch_size must be at least 2"),
            (self.sde_weight != "kl" and self.loss not in ("closed", "ppo"),
             f"--sde_weight applies to --loss closed or ppo, not {self.loss}"),
        ]


# ------------------------------------------------------------------------------ multi-task RL
RL_STEPS = {("tiny", "joint"): 100, ("tiny", "cascade"): 300, ("real", "joint"): 2000,
            ("real", "cascade"): 6000}


def rl_config(cfg, stage):
    """The teachers' RL settings, with the stage's steps; on the tiny model one adapter holds
    every task, so it gets the student's targets (AdaLN and text projections too)."""
    kind = opd.model_kind(cfg.model)
    return opd.resolve(cfg, "teacher", steps=RL_STEPS[kind, stage],
                       lora_targets=opd.TINY_MULTI if kind == "tiny" else opd.ATTN)


def joint(cfg, m, tasks, rank, world):
    c = rl_config(cfg, "joint")
    return opd.train_rl(c, m, tasks, f"joint-{c.algo}", rank, world)


def cascade(cfg, m, tasks, rank, world):
    """--steps in all, an equal share per task in --tasks order, one LoRA (and optimizer)."""
    c = rl_config(cfg, "cascade")
    per = max(1, c.steps // len(tasks))
    return opd.train_rl(c, m, tasks, f"cascade-{c.algo}", rank, world,
                        schedule=lambda step: [tasks[min(step // per, len(tasks) - 1)]])


# ------------------------------------------------------------------------------ distillation
# Each has distill_trajectory's signature: (student, teacher, x, sigmas, noise_level,
# train_steps, loss, backward, two_pass, generator, sde_weight) -> (x_N, logged loss); student
# and teacher are velocity closures v(x, t) with their CFG, one backward(loss) per trained forward.
def sft_trajectory(student, teacher, x, sigmas, noise_level, train_steps, loss, backward,
                   two_pass=False, generator=None, sde_weight="kl"):
    """The paper's SFT: the teacher samples x0 (ODE, its own CFG) from the noise x; the student
    is trained by flow matching on it: t ~ U(0, 1), x_t = (1 - t) x0 + t eps, loss
    mean (v_S(x_t) - (eps - x0))^2, as many times (each with fresh t and eps) as OPD trains steps,
    so both make the same number of trained forwards. The velocity trained is the student's
    guided one, the velocity it samples with (as every student here)."""
    x0 = rollout(teacher, x, sigmas, 0.0)["states"][:, -1]  # (B, C, h, w) the teacher's samples
    logged = 0.0
    for _ in train_steps:
        t = torch.rand(len(x0), generator=generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        tt = t.view(-1, *[1] * (x0.dim() - 1))
        x_t = (1 - tt) * x0 + tt * eps
        # flow matching: v(x_t) -> eps - x0
        l = (student(x_t, t).float() - (eps - x0)).pow(2).flatten(1).mean(1).mean()
        l = l / len(train_steps)
        logged += float(l.detach())
        backward(l)
    return x0, logged


def offpolicy_trajectory(student, teacher, x, sigmas, noise_level, train_steps, loss, backward,
                         two_pass=False, generator=None, sde_weight="kl"):
    """Off-policy OPD: the TEACHER rolls out with the ODE; on each of its states x_j the
    student's mean is pulled to the teacher's, 1/2 ||mu_S(x_j) - mu_T(x_j)||^2: the closed-form
    loss on states the student would not visit itself."""
    traj = rollout(teacher, x, sigmas, 0.0)  # states (B, N+1, ...), the teacher's means (B, N, ...)
    logged = 0.0
    for j in train_steps:
        xj = traj["states"][:, j]
        mu_s, std = transition(xj, student(xj, sigmas[j]), sigmas[j], sigmas[j + 1], 0.0)
        l = opd_loss(mu_s, traj["means"][:, j], std).mean() / len(train_steps)
        logged += float(l.detach())
        backward(l)
    return traj["states"][:, -1], logged


def dance_query(n_states, batch, generator):
    """DanceOPD's query state of each sample: index int(u n_states), u ~ Beta(5, 2) (its
    'low_t' bias: mean 5/7, toward the low-noise end of the states x_0 (t = 1) .. x_{n-1}),
    clamped to n_states - 1. Beta(5, 2) is the 5th smallest of 6 uniforms. (batch,) indices."""
    u = torch.rand(batch, 6, generator=generator).sort(1).values[:, 4]
    return (u * n_states).long().clamp(max=n_states - 1)


def dance_trajectory(student, teacher, x, sigmas, noise_level, train_steps, loss, backward,
                     two_pass=False, generator=None, sde_weight="kl"):
    """DanceOPD: the student's deterministic (ODE) trajectory; per sample one query state x_q
    (dance_query over the sampler's N states with a velocity); L = mean (v_S(x_q) - v_T(x_q))^2
    against the task's teacher. One trained forward per sample; returns (x_q, loss)."""
    q = dance_query(len(sigmas) - 1, len(x), generator).to(x.device)
    states = rollout(student, x, sigmas[: int(q.max()) + 1], 0.0)["states"]  # to the deepest x_q
    x_q = states[torch.arange(len(x)), q]  # (B, C, h, w)
    t_q = sigmas.to(x.device)[q]          # (B,)
    with torch.no_grad():
        v_t = teacher(x_q, t_q)
    l = (student(x_q, t_q).float() - v_t.float()).pow(2).flatten(1).mean(1).mean()
    backward(l)
    return x_q, float(l.detach())


def stepwise_advantages(r, world):
    """FlowOPD's advantages: each trained step's rewards r (b, n) normalised over the whole
    batch of every rank (a gather), A = (r - mean) / (std + 1e-4), unbiased std as torch.std;
    no clip. Returns this rank's (b, n)."""
    r_all = gather(r, world)
    return (r - r_all.mean(0)) / (r_all.std(0) + 1e-4)


def flow_round(cfg, m, tasks, step, rank, world, teacher_of, guidance_of, clip=0.2):
    """FlowOPD, one round (opd.distill_round's signature): per task, the student's SDE rollouts
    (a > 0, no grad) and the reward of each trained step, the teacher's element-mean
    log-density of the step the student took, r_j = log p_T(x_{j+1} | x_j); advantages per step
    over the task's whole batch, all micro-batches and ranks (stepwise_advantages); then clipped
    PPO (clip 0.2) on the stored transitions, ratio exp(log p_S - log p_old), one optimizer step
    (on-policy: the ratio is 1 where it is evaluated). The original averages its teachers'
    log-densities because its tasks share one prompt set; here each task has its own teacher."""
    sigmas, n = opd.sd3_sigmas(cfg.num_steps), opd.parse_steps(cfg.train_steps, cfg.num_steps)
    b, losses, a = cfg.batch_size // world, {}, cfg.noise_level
    for i, task in enumerate(tasks):
        mine = opd.draw_prompts(cfg, task, step, i, cfg.batch_size)[rank * b:(rank + 1) * b]
        g, parts = opd.rng(cfg.seed, step, 1, i, rank), []
        for s in opd.chunks(b, cfg.micro_batch):  # the rollouts and the teacher's rewards
            student = m.velocity("student", mine[s], cfg.guidance)
            teacher = m.velocity(teacher_of(task), mine[s], guidance_of[task.name])
            traj = rollout(student, m.noise(len(mine[s]), g), sigmas, a, g)
            with torch.no_grad():
                r = [gaussian_logp(traj["states"][:, j + 1], transition(
                    traj["states"][:, j], teacher(traj["states"][:, j], sigmas[j]), sigmas[j],
                    sigmas[j + 1], a)[0], traj["stds"][:, j]) for j in n]
            parts.append((s, traj, torch.stack(r, 1)))
        adv = stepwise_advantages(torch.cat([r for _, _, r in parts]), world)
        losses[task.name] = 0.0
        for s, traj, _ in parts:  # the training pass on the stored transitions
            student = m.velocity("student", mine[s], cfg.guidance)
            for k, j in enumerate(n):
                xj = traj["states"][:, j]
                mu_s, _ = transition(xj, student(xj, sigmas[j]), sigmas[j], sigmas[j + 1], a)
                # the plain PPO ratio of Flow-GRPO: exp(log p_theta - log p_old), clip 0.2
                l, _ = opd.grpo_loss(mu_s, traj["means"][:, j], traj["states"][:, j + 1],
                                     traj["stds"][:, j], sigmas[j + 1] - sigmas[j], adv[s, k],
                                     clip, ratio_norm=False, dt_reweight=False)
                l = l.sum() / (b * len(n))
                m.use("student")
                l.backward()
                losses[task.name] += float(l.detach())
    return losses


TRAJECTORIES = {"closed": None, "ppo": None, "sft": sft_trajectory,
                "offpolicy": offpolicy_trajectory, "dance": dance_trajectory}
ROUNDS = {"flow": flow_round}  # whole-round methods; the others plug a trajectory into opd's


def student(cfg, m, tasks, dirs, rank, world, name=None):
    c = opd.resolve(cfg, "distill")
    round_fn = ROUNDS.get(c.loss) or functools.partial(opd.distill_round,
                                                       trajectory=TRAJECTORIES[c.loss])
    return opd.distill(c, m, tasks, dirs, rank, world, name, round_fn)


# ------------------------------------------------------------------------------ the comparison
DISTILL_BASELINES = [("sft", 0.0), ("offpolicy", 0.0), ("ppo", 0.7), ("dance", 0.0),
                     ("flow", 0.7)]  # (--loss, rollout noise a)


def budget_steps(cfg, algo):
    """RL steps of joint and cascade RL (with --algo algo) that sample as many trajectories as
    OPD: M teachers x T steps x B_T, plus D distillation rounds x M x B_D. Joint samples M x B_T
    a step, cascade B_T a step: joint T + D B_D / B_T steps, cascade M times that; each rounded
    up to whole epochs of the algorithm."""
    t, d = opd.resolve(cfg, "teacher"), opd.resolve(cfg, "distill")
    k = opd.resolve(dataclasses.replace(cfg, algo=algo), "teacher").updates_per_epoch
    steps = t.steps + math.ceil(d.steps * d.batch_size / t.batch_size)
    up = lambda n: math.ceil(n / k) * k
    return up(steps), up(steps * len(cfg.tasks.split(",")))


def compare(cfg, m, tasks, rank, world):
    """Teachers, OPD (held-out metrics every eval_every rounds), joint RL with both algorithms,
    cascade NFT, the distillation baselines from the same teachers; then the table, and the
    time OPD (teachers + distillation) took to reach each RL baseline's average (compare.json)."""
    names = [t.name for t in tasks]
    for t in tasks:
        opd.train_rl(opd.resolve(cfg, "teacher"), m, [t], f"teacher-{t.name}", rank, world)
    dirs = opd.teacher_dirs(cfg, names)
    d = opd.resolve(cfg, "distill")
    opd.distill(dataclasses.replace(d, eval_every=cfg.eval_every or max(1, d.steps // 6)), m,
                tasks, dirs, rank, world)
    for algo, stage in [("grpo_guard", "joint"), ("nft", "joint"), ("nft", "cascade")]:
        steps = budget_steps(cfg, algo)[stage == "cascade"]
        sub = dataclasses.replace(cfg, algo=algo, steps=steps)
        (joint if stage == "joint" else cascade)(sub, m, tasks, rank, world)
    for loss, a in DISTILL_BASELINES:
        student(dataclasses.replace(cfg, loss=loss, noise_level=a), m, tasks, dirs, rank, world)
    table = opd.evaluate(opd.resolve(cfg, "eval"), m, tasks, rank, world)
    if rank == 0:  # the paper: OPD reached joint RL's level in ~97 of its ~130 GPU hours
        reach = {t: time_to_reach(cfg.out, table, names, t)
                 for t in ("joint-grpo_guard", "joint-nft", "cascade-nft")}
        write_text(os.path.join(cfg.out, "compare.json"), json.dumps(reach, indent=1))
        for r in reach.values():
            say(0, r["says"])
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


# ------------------------------------------------------------------------------ noise ablation
NOISE_RUNS = [(0.0, "kl"), (0.3, "kl"), (0.7, "kl"), (0.3, "sigma"), (0.7, "sigma")]
FRACTIONS = (0.5, 0.75, 0.9)  # rounds until the held-out gain first reaches these of its final


def noise_label(a, weight):
    return f"a{a}" + ("" if weight == "kl" else f"-{weight}")


def rounds_to(rounds, gain):
    """{fraction: the first round whose mean gain reaches fraction x the final gain} (None when
    the final gain is not positive)."""
    return {str(f): (next(s for s, g in zip(rounds, gain) if g >= f * gain[-1])
                     if gain[-1] > 0 else None) for f in FRACTIONS}


def noise(cfg, m, tasks, rank, world):
    """OPD from the run's teachers with rollouts at a = 0, 0.3 and 0.7, the SDE ones with both
    step weights (--sde_weight kl and sigma), same seeds; held-out metrics every eval_every
    rounds (default: every 2 rounds); writes noise.json (curves, rounds to 50 / 75 / 90% of the
    final gain) and noise.png."""
    names = [t.name for t in tasks]
    dirs = opd.teacher_dirs(cfg, names)
    d = opd.resolve(cfg, "distill")
    every = cfg.eval_every or 2
    for a, weight in NOISE_RUNS:
        c = dataclasses.replace(d, noise_level=a, sde_weight=weight, eval_every=every)
        opd.distill(c, m, tasks, dirs, rank, world, name=f"noise/student-{noise_label(a, weight)}")
    if rank != 0:  # rank 0 wrote the curves
        return
    res = {"eval_every": every, "levels": {}}
    for a, weight in NOISE_RUNS:
        curve = held_out_curve(os.path.join(cfg.out, f"noise/student-{noise_label(a, weight)}"))
        rounds = [s for s, _, _ in curve]
        gain = [sum(r[k] - curve[0][2][k] for k in names) / len(names) for _, _, r in curve]
        res["levels"][noise_label(a, weight)] = {
            "noise_level": a, "sde_weight": weight, "rounds": rounds,
            "held_out": [r for _, _, r in curve], "mean_gain": gain,
            "rounds_to": rounds_to(rounds, gain)}
    write_text(os.path.join(cfg.out, "noise.json"), json.dumps(res, indent=1))
    for label, r in res["levels"].items():
        say(0, f"{label}: rounds to 50/75/90% of the final gain "
               f"{'/'.join(str(v) for v in r['rounds_to'].values())} "
               f"(final mean gain {r['mean_gain'][-1]:+.3f})")
    noise_figure(os.path.join(cfg.out, "noise.png"), res, names)


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


# ------------------------------------------------------------------------------ main
def run(cfg):
    stages = {"compare": ["teacher", "distill", "eval"], "noise": ["distill", "eval"],
              "distill": ["distill"]}.get(cfg.stage, ["teacher"])
    opd.preflight(cfg, stages)
    if cfg.stage in ("joint", "cascade"):
        rl_config(cfg, cfg.stage)
    m, tasks, rank, world = opd.setup(cfg, stages[0])
    if cfg.stage == "distill":
        return student(cfg, m, tasks, opd.teacher_dirs(cfg, [t.name for t in tasks]), rank, world)
    stage = {"joint": joint, "cascade": cascade, "compare": compare, "noise": noise}[cfg.stage]
    return stage(cfg, m, tasks, rank, world)


def main(argv=None):
    cli(lambda a: run(opd.parse_config(a, Args, "the paper's baselines: see baselines.py")), argv)


if __name__ == "__main__":
    main()
