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
                    student took is that step's reward; advantages per step over the whole
                    round's batch (all ranks); clipped PPO
  --loss dmd        DMD (DMD2 without its GAN head): a second trained adapter, the fake score,
                    learns the student's own samples; the student's clean prediction moves
                    along (fake - teacher), 5 fake updates per student update
  --loss tdm        TDM: the same fake score, trained and queried inside a random stage of the
                    student's sampler (its sampling-steps-aware re-noising), 1:1 updates
  (--loss closed and ppo are opd.py's: the closed form and its PPO-style surrogate)
  --stage compare   all of the above from the same teachers, with the same budget of sampled
                    trajectories as OPD (teachers + distillation), then one table (eval)
  --stage noise     OPD at a = 0, 0.3, 0.7 from the same teachers and seeds, the SDE runs with
                    both step weights (Eq. 11's and the public code's): held-out metrics every 2
                    rounds, rounds to 50 / 75 / 90% of the final gain, noise.png

Every student is routed: each task's prompts are supervised by that task's teacher alone (the
public FlowOPD code averages its teachers because its tasks share one prompt set). The public
DanceOPD and FlowOPD runs are CFG-free; here every method uses the run's --guidance, so that the
comparison differs in the method only. The students other than OPD's run through this file's
own loop (distill_baseline), built from opd.py's pieces as opd.distill is.
"""
import dataclasses
import json
import math
import os
import time

import torch

import opd
from opd import bcast, gaussian_logp, opd_loss, rollout, transition
from opd_support import evaluation, reports, runs
from opd_support.config import ATTN, TINY_TARGETS, Config, model_kind, parse_config, resolve
from opd_support.machinery import chunks, gather, main as cli, rank_world, rng, say
from opd_support.checkpoints import write_text
from opd_support.loras import run_info
from opd_support.options import arg, names, one_of, text
from opd_support.prompts import draw_prompts
from opd_support.sd3 import sd3_sigmas

DISTILL_LOSSES = ("closed", "ppo", "sft", "offpolicy", "dance", "flow", "dmd", "tdm")
ODE_LOSSES = ("sft", "offpolicy", "dance", "dmd", "tdm")  # they roll out (or sample) with the ODE


STUDENTS = {"sft": 0.0, "offpolicy": 0.0, "ppo": 0.7, "dance": 0.0, "flow": 0.7, "dmd": 0.0,
            "tdm": 0.0}  # the distillation baselines: --loss -> the noise level of its rollouts
METHODS = ("opd", *STUDENTS, "joint-grpo_guard", "joint-nft", "cascade-nft")


def _seeds_ok(s):
    seeds = s.split(",")
    return all(x.isdigit() for x in seeds) and len(set(map(int, seeds))) == len(seeds)


def _grid_ok(s):
    return all(float(x) > 0 for x in s.split(","))


def _choice_ok(s):
    return isinstance(json.loads(s), dict)


@dataclasses.dataclass
class Args(Config):
    # which runs a command makes, not what one of them computes: these may change on --resume
    resumable = Config.resumable | {"seeds", "methods", "lr_grid", "lr_choice"}
    stage: str = arg("compare", one_of("distill", "joint", "cascade", "compare", "noise"), "stage")
    loss: str = arg("closed", one_of(*DISTILL_LOSSES), "distill: the student's method")
    seeds: str = arg("", text(True, _seeds_ok, "distinct seeds like 0,1,2"),
                     "compare / noise: one run per seed into <out>/seed-<s>, then mean and spread")
    methods: str = arg(",".join(METHODS), names(METHODS),
                       "compare: the methods besides the teachers")
    lr_grid: str = arg("", text(True, _grid_ok, "multiples like 0.3,1,3"),
                       "compare: each method's lr from these multiples of its default, chosen on "
                       "the validation prompts (the first of --seeds chooses for all)")
    lr_choice: str = arg("", text(True, _choice_ok, "a JSON object"),
                         "compare: {run: multiple} chosen before (later seeds add the first "
                         "seed's grid)")

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
            (self.seeds and self.stage not in ("compare", "noise"),
             "--seeds applies to --stage compare or noise"),
            (self.sde_weight != "kl" and self.loss not in ("closed", "ppo"),
             f"--sde_weight applies to --loss closed or ppo, not {self.loss}"),
        ]


# ------------------------------------------------------------------------------ multi-task RL
RL_STEPS = {("tiny", "joint"): 100, ("tiny", "cascade"): 300, ("real", "joint"): 2000,
            ("real", "cascade"): 6000}


def rl_config(cfg, stage):
    """The teachers' RL settings, with the stage's steps; on the tiny model one adapter holds
    every task, so it gets the student's targets (AdaLN and text projections too)."""
    kind = model_kind(cfg.model)
    return resolve(cfg, "teacher", optim_steps=RL_STEPS[kind, stage],
                   lora_targets=TINY_TARGETS if kind == "tiny" else ATTN)


def joint(c, model, tasks, name=None):
    """Every epoch samples every task: one LoRA, each image scored by its own task's reward.
    c: rl_config's."""
    opd.train_rl(c, model, [tasks] * (c.optim_steps // c.updates_per_epoch),
                 name or f"joint-{c.algo}")


def cascade(c, model, tasks, name=None):
    """--optim_steps in all, an equal share per task in --tasks order, one LoRA (and
    optimizer) throughout. c: rl_config's."""
    per, K = max(1, c.optim_steps // len(tasks)), c.updates_per_epoch
    schedule = [[tasks[min(first // per, len(tasks) - 1)]] for first in range(0, c.optim_steps, K)]
    opd.train_rl(c, model, schedule, name or f"cascade-{c.algo}")


# ------------------------------------------------------------------------------ distillation
# Trajectory methods have opd.distill_trajectory's signature: (student, teacher, x, sampler,
# generator, scale) -> (x_N, the loss as a float); student and teacher are velocity closures
# v(x, t) with their CFG; each trained forward's loss x scale is backpropagated at once.
def flow_matching_loss(velocity, x0, generator):
    """The flow-matching loss on clean latents x0 (B, ...), per sample: t ~ U(0, 1), eps fresh,
    x_t = (1 - t) x0 + t eps, mean (v(x_t, t) - (eps - x0))^2."""
    t = torch.rand(len(x0), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = (1 - bcast(t, x0)) * x0 + bcast(t, x0) * eps
    return (velocity(x_t, t).float() - (eps - x0)).pow(2).flatten(1).mean(1)


def sft_trajectory(student, teacher, x, sampler, generator=None, scale=1.0):
    """The paper's SFT: the teacher samples x0 (ODE, its own CFG) from the noise x; the student
    is trained by flow matching on it: t ~ U(0, 1), x_t = (1 - t) x0 + t eps, loss
    mean (v_S(x_t) - (eps - x0))^2, as many times (each with fresh t and eps) as OPD trains steps,
    so both make the same number of passes with grad. The velocity trained is the student's
    guided one, the velocity it samples with (as every student here)."""
    x0 = rollout(teacher, x, sampler.sigmas, 0.0)["states"][:, -1]  # (B, C, h, w)
    logged, n = 0.0, len(sampler.loss_steps)
    for _ in sampler.loss_steps:
        loss = flow_matching_loss(student, x0, generator).mean() / n
        (loss * scale).backward()
        logged += float(loss.detach())
    return x0, logged


def offpolicy_trajectory(student, teacher, x, sampler, generator=None, scale=1.0):
    """Off-policy OPD: the TEACHER rolls out with the ODE; on each of its states x_j the
    student's mean is pulled to the teacher's, 1/2 ||mu_S(x_j) - mu_T(x_j)||^2: the closed-form
    loss on states the student would not visit itself."""
    sig, n = sampler.sigmas, len(sampler.loss_steps)
    traj = rollout(teacher, x, sig, 0.0)  # states (B, N+1, ...), the teacher's means (B, N, ...)
    logged = 0.0
    for j in sampler.loss_steps:
        xj = traj["states"][:, j]
        mu_s, _ = transition(xj, student(xj, sig[j]), sig[j], sig[j + 1], 0.0)
        loss = opd_loss(mu_s, traj["means"][:, j]).mean() / n  # the ODE's (Eq. 12)
        (loss * scale).backward()
        logged += float(loss.detach())
    return traj["states"][:, -1], logged


def dance_query(n_states, batch, generator):
    """DanceOPD's query state of each sample: index int(u n_states), u ~ Beta(5, 2) (its
    'low_t' bias: mean 5/7, toward the low-noise end of the states x_0 (t = 1) .. x_{n-1}),
    clamped to n_states - 1. Beta(5, 2) is the 5th smallest of 6 uniforms. (batch,) indices."""
    u = torch.rand(batch, 6, generator=generator).sort(1).values[:, 4]
    return (u * n_states).long().clamp(max=n_states - 1)


def dance_trajectory(student, teacher, x, sampler, generator=None, scale=1.0):
    """DanceOPD: the student's deterministic (ODE) trajectory; per sample one query state x_q
    (dance_query over the sampler's N states with a velocity); L = mean (v_S(x_q) - v_T(x_q))^2
    against the task's teacher. One trained forward per sample; returns (x_q, loss)."""
    sigmas = sampler.sigmas
    q = dance_query(len(sigmas) - 1, len(x), generator).to(x.device)
    states = rollout(student, x, sigmas[: int(q.max()) + 1], 0.0)["states"]  # to the deepest
    x_q = states[torch.arange(len(x)), q]  # (B, C, h, w)
    t_q = sigmas.to(x.device)[q]          # (B,)
    with torch.no_grad():
        v_t = teacher(x_q, t_q)
    loss = (student(x_q, t_q).float() - v_t.float()).pow(2).flatten(1).mean(1).mean()
    (loss * scale).backward()
    return x_q, float(loss.detach())


def trajectory_round(cfg, model, tasks, r, run, guidance):
    """One round of a trajectory method (TRAJECTORIES), as opd.distill's round: per task its
    prompts, per micro-batch the method on the student's noise. Returns {task: loss}."""
    sampler, losses = opd.sampler_of(cfg), {}
    for i, task in enumerate(tasks):
        prompts = runs.my_share(draw_prompts(cfg, task, r, i, cfg.batch_size), run)
        g, losses[task.name] = rng(cfg.seed, "rollout", i, run.rank, step=r), 0.0
        for s in chunks(len(prompts), cfg.micro_batch):
            ps, share = prompts[s], len(prompts[s]) / len(prompts)
            student = model.velocity("student", ps, cfg.guidance)
            teacher = model.velocity(f"teacher-{task.name}", ps, guidance[task.name])
            _, loss = TRAJECTORIES[cfg.loss](student, teacher, model.noise(len(ps), g), sampler,
                                             g, share / len(tasks))  # a mean over tasks
            losses[task.name] += loss * share
    return losses


def stepwise_advantages(r, world):
    """FlowOPD's advantages: each trained step's rewards r (b, n) normalised over the whole
    batch of every rank (a gather), A = (r - mean) / (std + 1e-4), unbiased std as torch.std;
    no clip. Returns this rank's (b, n)."""
    r_all = gather(r, world)
    return (r - r_all.mean(0)) / (r_all.std(0) + 1e-4)


FLOW_CLIP = 0.2  # FlowOPD's PPO clip range (Flow-GRPO's plain ratio)


def flow_round(cfg, model, tasks, r, run, guidance):
    """FlowOPD, one round: per task, the student's SDE rollouts (a > 0, no grad) and the reward
    of each trained step, the teacher's element-mean log-density of the step the student took,
    r_j = log p_T(x_{j+1} | x_j); advantages per step over the task's whole batch, all
    micro-batches and ranks (stepwise_advantages); then clipped PPO on the stored transitions,
    ratio exp(log p_S - log p_old), one optimizer step (on-policy: the ratio is 1 where it is
    evaluated). The original averages its teachers' log-densities because its tasks share one
    prompt set; here each task has its own teacher."""
    sampler, a, losses = opd.sampler_of(cfg), cfg.noise_level, {}
    sig, n = sampler.sigmas, sampler.loss_steps
    for i, task in enumerate(tasks):
        prompts = runs.my_share(draw_prompts(cfg, task, r, i, cfg.batch_size), run)
        g, parts = rng(cfg.seed, "rollout", i, run.rank, step=r), []
        for s in chunks(len(prompts), cfg.micro_batch):  # the rollouts and the teacher's rewards
            student = model.velocity("student", prompts[s], cfg.guidance)
            teacher = model.velocity(f"teacher-{task.name}", prompts[s], guidance[task.name])
            traj = rollout(student, model.noise(len(prompts[s]), g), sig, a, g)
            states = traj["states"]
            with torch.no_grad():
                rew = [gaussian_logp(states[:, j + 1], transition(
                    states[:, j], teacher(states[:, j], sig[j]), sig[j], sig[j + 1], a)[0],
                    traj["stds"][:, j]) for j in n]
            parts.append((s, traj, torch.stack(rew, 1)))
        adv = stepwise_advantages(torch.cat([rw for _, _, rw in parts]), run.world)
        losses[task.name] = 0.0
        for s, traj, _ in parts:  # the training pass on the stored transitions
            student = model.velocity("student", prompts[s], cfg.guidance)
            for k, j in enumerate(n):
                xj = traj["states"][:, j]
                mu_s, _ = transition(xj, student(xj, sig[j]), sig[j], sig[j + 1], a)
                ratio = opd.log_ratio(mu_s, traj["means"][:, j], traj["states"][:, j + 1],
                                      traj["stds"][:, j], ratio_norm=False).exp()
                loss = opd.clipped_loss(ratio, adv[s, k], FLOW_CLIP).sum() / (len(prompts) *
                                                                              len(n))
                (loss / len(tasks)).backward()  # the round's gradient: a mean over tasks
                losses[task.name] += float(loss.detach())
    return losses


# DMD and TDM: a second trained adapter, the fake score (starting at the base, CFG 1), tracks
# the distribution of the student's own predictions; the student moves along (fake - teacher).
# Both take the student's one-step clean prediction at a state of its own ODE rollout,
# x0_hat = x_k - t_k v_S(x_k) (flow matching: x_t = (1 - t) x0 + t eps, v = eps - x0); every
# model's clean prediction at x_t is x_t - t v(x_t). The teacher is the task's, with its CFG;
# the student keeps its own CFG (as every student here), so the teacher's guidance is in its
# guided prediction once (TDM folds it into a CFG-free student's target instead).
DMD_FAKE_UPDATES = 5      # DMD2's SDXL scripts: 5 fake-score updates per generator update
DMD_T = (0.02, 0.98)      # DMD2's min/max_step_percent: the re-noising t of the student's loss
DMD_FAKE = dict(weight_decay=0.01, clip=10.0)  # DMD2: AdamW (0.9, 0.999), the student's lr
TDM_FAKE = dict(betas=(0.0, 0.95), weight_decay=0.01, clip=math.inf)  # lr: 5x the student's
TDM_STUDENT = dict(betas=(0.0, 0.95), weight_decay=0.01)


def x0_of(x_t, v, t):
    """A velocity's clean prediction at x_t: x0 = x_t - t v, fp32; t a float or (B,)."""
    return x_t.float() - bcast(t, x_t) * v.float()


def dmd_loss(x0_hat, x0_teacher, x0_fake):
    """DMD's student loss per sample (B,): the reverse-KL direction g = (x0_fake - x0_teacher) /
    mean|x0_hat - x0_teacher| (per sample, no grad, nan_to_num as DMD2) through
    1/2 mean (x0_hat - sg(x0_hat - g))^2, whose gradient in x0_hat is g / D."""
    with torch.no_grad():
        w = (x0_hat - x0_teacher).abs().flatten(1).mean(1)
        g = torch.nan_to_num((x0_fake - x0_teacher) / bcast(w, x0_hat))
    return 0.5 * (x0_hat - (x0_hat.detach() - g)).pow(2).flatten(1).mean(1)


def tdm_loss(x0_hat, x0_teacher, x0_fake):
    """TDM's student loss per sample (B,): target x0_hat + (x0_teacher - x0_fake) (no grad),
    mean (x0_hat - target)^2 / mean|x0_hat - x0_teacher| (per sample, no grad; the demo's MSE
    form, without its optional pseudo-Huber)."""
    with torch.no_grad():
        w = (x0_hat - x0_teacher).abs().flatten(1).mean(1)
        target = x0_hat + (x0_teacher - x0_fake)
    return (x0_hat - target).pow(2).flatten(1).mean(1) / w


def tdm_renoise(x0_hat, eps_hat, t_k, s, generator):
    """TDM's sampling-steps-aware re-noising of stage k (t_k -> s = t_{k+1}), per sample, in
    flow matching (TDM's alpha_t -> 1 - t, sigma_t -> t): the student's deterministic jump to
    the stage's end, x_s = (1 - s) x0_hat + s eps_hat, then the forward process from s to
    t' ~ U(max(s, 0.02), t_k): x' = (1 - t') / (1 - s) x_s + beta z, z ~ N(0, I),
    beta^2 = t'^2 - ((1 - t') s / (1 - s))^2, so x' = (1 - t') x0_hat + t' eps_mix with
    eps_mix = ((1 - t') s / (1 - s) eps_hat + beta z) / t'. t_k, s: (B,). Returns
    (x', t', eps_mix, z)."""
    lo = s.clamp(min=0.02)
    t = lo + (t_k - lo) * torch.rand(len(s), generator=generator).to(s.device)
    z = torch.randn(x0_hat.shape, generator=generator).to(x0_hat.device)
    x_s = (1 - bcast(s, x0_hat)) * x0_hat + bcast(s, x0_hat) * eps_hat
    a = (1 - t) / (1 - s)
    beta = (t**2 - (a * s) ** 2).clamp(min=0).sqrt()
    x = bcast(a, x0_hat) * x_s + bcast(beta, x0_hat) * z
    return x, t, (bcast(a * s, x0_hat) * eps_hat + bcast(beta, x0_hat) * z) / bcast(t, x0_hat), z


def tdm_fake_loss(x0_fake, x0_hat, t, eps_mix, z):
    """TDM's fake-score loss per sample (B,): mean (x0_fake - x0_hat)^2 x min(SNR, 5), SNR =
    ((1 - t) / t)^2, x the demo's importance weight exp(-mean(eps_mix^2) / 2) /
    exp(-mean(z^2) / 2)."""
    snr = ((1 - t) / t) ** 2
    w_is = torch.exp(-0.5 * eps_mix.pow(2).flatten(1).mean(1) + 0.5 * z.pow(2).flatten(1).mean(1))
    return (x0_fake - x0_hat).pow(2).flatten(1).mean(1) * snr.clamp(max=5) * w_is


@dataclasses.dataclass
class States:
    """A micro-batch of the round's student rollouts (ODE, its CFG, no grad)."""
    task: object
    prompts: list
    share: float             # of the rank's batch of the task
    weight: float            # of the round's gradient: share / number of tasks
    states: torch.Tensor     # (n, k + 1, C, h, w), as deep as the deepest drawn step
    steps: list              # [(n,) step indices], as drawn
    generator: torch.Generator


def student_states(cfg, model, tasks, r, run, draws):
    """The round's student rollouts per task and micro-batch, as deep as the deepest of the
    draws: draws(n, g) -> [(n,) step indices]. Returns [States]."""
    sigmas, out = sd3_sigmas(cfg.sampler_steps), []
    for i, task in enumerate(tasks):
        prompts = runs.my_share(draw_prompts(cfg, task, r, i, cfg.batch_size), run)
        g = rng(cfg.seed, "rollout", i, run.rank, step=r)
        for s in chunks(len(prompts), cfg.micro_batch):
            ps, ks = prompts[s], draws(len(prompts[s]), g)
            deepest = max(int(k.max()) for k in ks)
            states = rollout(model.velocity("student", ps, cfg.guidance), model.noise(len(ps), g),
                             sigmas[:deepest + 1], 0.0)["states"]
            share = len(ps) / len(prompts)
            out.append(States(task, ps, share, share / len(tasks), states, ks, g))
    return out


def student_loss(model, batch, x0_hat, renoised, guidance, loss_fn):
    """DMD's or TDM's student loss at the re-noised (x, t): the teacher's (its CFG) and the
    fake's (CFG 1) clean predictions there, no grad; loss_fn(x0_hat, x0_teacher, x0_fake)'s
    batch mean, backpropagated x the batch's weight into the student. Returns the loss."""
    x, t = renoised
    with torch.no_grad():
        teacher = model.velocity(f"teacher-{batch.task.name}", batch.prompts,
                                 guidance[batch.task.name])
        x0_t = x0_of(x, teacher(x, t), t)
        x0_f = x0_of(x, model.velocity("fake", batch.prompts, 1.0)(x, t), t)
    loss = loss_fn(x0_hat, x0_t, x0_f).mean()
    model.use("student")  # gradient checkpointing recomputes with the active adapter
    (loss * batch.weight).backward()
    return float(loss.detach())


def update_fake(cfg, model, run, loss_of, batch):
    """One optimizer step of the fake adapter on the sum over the batch of loss_of(entry) x its
    weight, gradients averaged over the ranks (only the fake's weights require grad here)."""
    fake = run.extra["fake"]
    model.trainable = fake.params
    fake.opt.zero_grad(set_to_none=True)
    for entry in batch:
        loss = loss_of(entry)
        model.use("fake")  # gradient checkpointing recomputes with the active adapter
        (loss * entry.weight).backward()
    runs.optimizer_step(cfg, run, "fake")
    model.trainable = run.params


def dmd_round(cfg, model, tasks, r, run, guidance):
    """DMD (DMD2 without its GAN head, which needs real images), one round: one sampler step k
    for the round (DMD2's backward simulation: k steps of the student from noise), the
    student's x0_hat there (with grad); re-noised x_t = (1 - t) sg(x0_hat) + t eps, t ~
    U(0.02, 0.98); the student's loss dmd_loss with the teacher's and the fake's clean
    predictions at x_t. Then DMD_FAKE_UPDATES updates of the fake adapter, each the flow-matching
    loss on the round's sg(x0_hat) at fresh t ~ U(0, 1) (DMD2 gives each fake update fresh
    generator samples; here they share the round's, so every method samples the same number of
    trajectories a round). Student and fake share the lr; the fake's clip is DMD2's 10."""
    sigmas, n = sd3_sigmas(cfg.sampler_steps), opd.sampler_of(cfg).loss_steps
    k = n[int(torch.randint(len(n), (1,), generator=rng(cfg.seed, "dmd", step=r)))]
    batch = student_states(cfg, model, tasks, r, run,
                           lambda b, g: [torch.full((b,), k, dtype=torch.long)])
    losses, made = {}, []
    for e in batch:
        x_k, t_k = e.states[:, k], sigmas[k]
        x0_hat = x0_of(x_k, model.velocity("student", e.prompts, cfg.guidance)(x_k, t_k), t_k)
        t = DMD_T[0] + (DMD_T[1] - DMD_T[0]) * torch.rand(len(e.prompts), generator=e.generator)
        t = t.to(x_k.device)
        eps = torch.randn(x_k.shape, generator=e.generator).to(x_k.device)
        x_t = (1 - bcast(t, x_k)) * x0_hat.detach() + bcast(t, x_k) * eps
        loss = student_loss(model, e, x0_hat, (x_t, t), guidance, dmd_loss)
        losses[e.task.name] = losses.get(e.task.name, 0.0) + loss * e.share
        made.append(dataclasses.replace(e, states=x0_hat.detach()))

    def fake_loss(e):  # flow matching on the student's clean predictions
        return flow_matching_loss(model.velocity("fake", e.prompts, 1.0), e.states,
                                  e.generator).mean()
    for _ in range(DMD_FAKE_UPDATES):
        update_fake(cfg, model, run, fake_loss, made)
    return losses


def tdm_round(cfg, model, tasks, r, run, guidance):
    """TDM, one round: per sample a random stage k of the student's sampler (its train steps,
    uniform), drawn apart for the fake's update and the student's loss, both on the round's
    ODE rollouts. First one update of the fake adapter (TDM steps it first): tdm_fake_loss at
    the student's re-noised prediction (tdm_renoise, no grad). Then the student's loss tdm_loss
    at a freshly re-noised x' with the teacher's (guided) and the fake's clean predictions. The
    fake's AdamW lr is 5x the student's (TDM: student lr = fake lr / 5), betas (0, 0.95) for
    both, no clip for the fake."""
    n = torch.tensor(opd.sampler_of(cfg).loss_steps)
    batch = student_states(cfg, model, tasks, r, run, lambda b, g: [
        n[torch.randint(len(n), (b,), generator=g)] for _ in range(2)])
    sig = sd3_sigmas(cfg.sampler_steps).to(model.device)

    def prediction(e, k, grad):  # x0_hat and eps_hat of the student at x_k, per sample
        x_k, t_k = e.states[torch.arange(len(e.prompts)), k], sig[k]
        with torch.set_grad_enabled(grad):
            v = model.velocity("student", e.prompts, cfg.guidance)(x_k, t_k)
        return x0_of(x_k, v, t_k), x_k.float() + bcast(1 - t_k, x_k) * v.float().detach()

    def fake_loss(e):
        k = e.steps[0]
        with torch.no_grad():
            x0_hat, eps_hat = prediction(e, k, False)
            x, t, eps_mix, z = tdm_renoise(x0_hat, eps_hat, sig[k], sig[k + 1], e.generator)
        x0_f = x0_of(x, model.velocity("fake", e.prompts, 1.0)(x, t), t)
        return tdm_fake_loss(x0_f, x0_hat, t, eps_mix, z).mean()
    update_fake(cfg, model, run, fake_loss, batch)
    losses = {}
    for e in batch:
        k = e.steps[1]
        x0_hat, eps_hat = prediction(e, k, True)
        with torch.no_grad():
            x, t, _, _ = tdm_renoise(x0_hat.detach(), eps_hat, sig[k], sig[k + 1], e.generator)
        loss = student_loss(model, e, x0_hat, (x, t), guidance, tdm_loss)
        losses[e.task.name] = losses.get(e.task.name, 0.0) + loss * e.share
    return losses


TRAJECTORIES = {"sft": sft_trajectory, "offpolicy": offpolicy_trajectory,
                "dance": dance_trajectory}
ROUNDS = {**dict.fromkeys(TRAJECTORIES, trajectory_round), "flow": flow_round,
          "dmd": dmd_round, "tdm": tdm_round}


def extra_adapters(cfg):
    """The extra trained adapters of a method and their AdamW settings and clip (runs.start_run)."""
    return {"dmd": {"fake": DMD_FAKE},
            "tdm": {"fake": {**TDM_FAKE, "lr": 5 * cfg.lr}, "student": TDM_STUDENT}}.get(cfg.loss)


def distill_baseline(cfg, model, tasks, teacher_dirs, name):
    """A student of the same teachers by another method (--loss, ROUNDS), through opd.distill's
    rounds: each round the method's gradient, then one optimizer step and the bookkeeping."""
    run = runs.start_run(cfg, model, name, "student", extra=extra_adapters(cfg))
    if run is None:
        return
    guidance = opd.load_teachers_and_guidance(cfg, model, teacher_dirs)
    for r in runs.each_round(cfg, model, tasks, run):  # + validation, the text encoders ahead
        run.opt.zero_grad(set_to_none=True)
        losses = ROUNDS[cfg.loss](cfg, model, tasks, r, run, guidance)
        grad_norm = runs.optimizer_step(cfg, run)
        row = {**{f"loss_{task}": v for task, v in losses.items()}, "grad_norm": grad_norm}
        runs.after_step(cfg, run, r + 1, row)  # EMA, time, log, checkpoint
    runs.finish_run(cfg, model, run, run.step * len(tasks) * cfg.batch_size)


def student(cfg, model, tasks, dirs, name=None):
    c = resolve(cfg, "distill")
    name = name or ("student" if c.loss == "closed" else f"student-{c.loss}")
    if c.loss in ("closed", "ppo"):
        return opd.distill(c, model, tasks, dirs, name)
    return distill_baseline(c, model, tasks, dirs, name)


# ------------------------------------------------------------------------------ the comparison
COMPARE_CAPS = {"tiny": dict(teacher=60, distill=40, joint=150),     # optimizer steps at most:
                "real": dict(teacher=2000, distill=1000, joint=6000)}  # --plateau stops before
COMPARE_PLATEAU, COMPARE_EVERY = "3,0.003", 10  # unless --plateau / --eval_every are given


def final_val(run_dir):
    """(the validation metrics at the first and at the last evaluation of a run)."""
    curve = reports.held_out_curve(run_dir)
    return curve[0][2], curve[-1][2]


def tuned(cfg, c, name, train, score):
    """Train the run `name` with c, its learning rate chosen on the validation prompts: with
    --lr_grid one run per multiple of c.lr into grid/<name>-x<multiple>, the best by
    score(run folder) copied to <name>; the choice and every score in <out>/lr.json. A choice
    given in cfg.lr_choice (another seed's) is trained directly."""
    import shutil
    given = json.loads(cfg.lr_choice or "{}").get(name)
    grid = [given] if given else [float(x) for x in (cfg.lr_grid or "1").split(",")]
    if len(grid) == 1:
        return train(dataclasses.replace(c, lr=c.lr * grid[0]), name)
    scores = {}
    for mult in grid:
        folder = f"grid/{name}-x{mult:g}"
        train(dataclasses.replace(c, lr=c.lr * mult), folder)
        scores[mult] = score(os.path.join(cfg.out, folder))
    best = max(scores, key=scores.get)
    path, final = os.path.join(cfg.out, "lr.json"), os.path.join(cfg.out, name)
    if rank_world()[0] == 0:
        if not os.path.isdir(final):
            shutil.copytree(os.path.join(cfg.out, f"grid/{name}-x{best:g}"), final)
        chosen = json.load(open(path)) if os.path.isfile(path) else {}
        chosen[name] = {"multiple": best, "lr": c.lr * best,
                        "scores": {f"{m:g}": v for m, v in scores.items()}}
        write_text(path, json.dumps(chosen, indent=1))
        say(0, f"{name}: lr {c.lr * best:g} ({best:g} x {c.lr:g}) chosen on the validation "
               f"prompts, scores {', '.join(f'{m:g}: {v:.3f}' for m, v in scores.items())}")
    barrier_all()


def barrier_all():
    from opd_support.machinery import barrier
    barrier(rank_world()[1])


def compare(cfg, model, tasks):
    """Every method from the same base on --tasks, each trained until its validation average
    stops improving (--plateau; a cap of optimizer steps) with its learning rate chosen from
    --lr_grid on the validation prompts: the teachers, then OPD and the students of the same
    teachers, joint RL with both algorithms, cascade NFT; then the table on the test prompts
    (eval), budget.json (each method's compute and seconds) and the figures
    anytime.png (validation average against compute) and conflict.png."""
    names, kind = [t.name for t in tasks], model_kind(cfg.model)
    caps = {k: cfg.optim_steps or v for k, v in COMPARE_CAPS[kind].items()}  # --optim_steps
    cfg = dataclasses.replace(cfg, eval_every=cfg.eval_every or COMPARE_EVERY,
                              plateau=cfg.plateau or COMPARE_PLATEAU)

    def capped(c, cap):  # at most cap steps; --plateau not before a third of them
        least = "" if cfg.plateau.count(",") == 2 else f",{cap // 3}"
        return dataclasses.replace(c, optim_steps=cap, plateau=cfg.plateau + least)
    methods = cfg.methods.split(",")
    own = {}
    for t in tasks:  # the teachers: each scored on its own task
        c = capped(resolve(dataclasses.replace(cfg, optim_steps=caps["teacher"]), "teacher"),
                   caps["teacher"])
        tuned(cfg, c, f"teacher-{t.name}", lambda c, n, t=t: opd.train_rl(
            c, model, [[t]] * (c.optim_steps // c.updates_per_epoch), n),
            lambda d, t=t: final_val(d)[1][t.name])
        own[t.name] = final_val(os.path.join(cfg.out, f"teacher-{t.name}"))
    base = {t: own[t][0][t] for t in names}

    def share_of_gains(d):  # mean over tasks of the share of its teacher's validation gain
        return reports.gain_share(final_val(d)[1], base, {t: own[t][1][t] for t in names},
                                  names)
    dirs = runs.teacher_dirs(cfg, names)
    d = capped(resolve(dataclasses.replace(cfg, optim_steps=caps["distill"], log_conflict=True),
                       "distill"), caps["distill"])
    if "opd" in methods:
        tuned(cfg, d, "student", lambda c, n: opd.distill(c, model, tasks, dirs, n),
              share_of_gains)
    for loss, a in STUDENTS.items():
        if loss in methods:
            c = capped(resolve(dataclasses.replace(cfg, loss=loss, noise_level=a,
                                                   optim_steps=caps["distill"]), "distill"),
                       caps["distill"])
            tuned(cfg, c, f"student-{loss}",
                  lambda c, n: student(c, model, tasks, dirs, n), share_of_gains)
    steps = [run_info(dirs[t], "steps", 0) for t in names]
    opd_cost = sum(run_info(dirs[t], "cost", 0) for t in names) + (
        run_info(os.path.join(cfg.out, "student"), "cost", 0) if "opd" in methods else 0)
    for algo, stage in [("grpo_guard", "joint"), ("nft", "joint"), ("nft", "cascade")]:
        if f"{stage}-{algo}" not in methods:
            continue
        c = rl_config(dataclasses.replace(cfg, algo=algo, log_conflict=stage == "joint"), stage)
        K = c.updates_per_epoch
        # joint RL: no plateau stop before it has spent OPD's whole compute (teachers + student)
        c = dataclasses.replace(capped(c, caps["joint"]), min_cost=opd_cost) if \
            stage == "joint" else \
            dataclasses.replace(c, plateau="", optim_steps=math.ceil(sum(steps) / K) * K)
        train = joint if stage == "joint" else cascade
        tuned(cfg, c, f"{stage}-{algo}", lambda c, n, train=train: train(c, model, tasks, n),
              share_of_gains)
    t0 = time.perf_counter()
    table = evaluation.evaluate(resolve(cfg, "eval"), model, tasks)
    if rank_world()[0] == 0:
        reports.budget(cfg.out, table, names, eval_seconds=time.perf_counter() - t0)
        reports.anytime_figure(cfg.out, table, names)
        reports.conflict_figure(cfg.out, names)
    return table
# ------------------------------------------------------------------------------ noise ablation
NOISE_RUNS = [(0.0, "kl"), (0.3, "kl"), (0.7, "kl"), (0.3, "sigma"), (0.7, "sigma")]


def noise_label(a, weight):
    return f"a{a}" + ("" if weight == "kl" else f"-{weight}")


def noise(cfg, model, tasks, dirs=None):
    """OPD from the run's teachers with rollouts at a = 0, 0.3 and 0.7, the SDE ones with both
    step weights (--sde_weight kl and sigma), same seeds; held-out metrics every eval_every
    rounds (default: every 2 rounds); writes noise.json (curves, rounds to 50 / 75 / 90% of the
    final gain) and noise.png. dirs: the teachers (default --teachers or <out>/teacher-*)."""
    names = [t.name for t in tasks]
    dirs = dirs or runs.teacher_dirs(cfg, names)
    d = resolve(cfg, "distill")
    every = cfg.eval_every or 2
    for a, weight in NOISE_RUNS:
        c = dataclasses.replace(d, noise_level=a, sde_weight=weight, eval_every=every)
        opd.distill(c, model, tasks, dirs, f"noise/student-{noise_label(a, weight)}")
    if rank_world()[0] != 0:  # rank 0 wrote the curves
        return
    res = {"eval_every": every, "levels": {}}
    for a, weight in NOISE_RUNS:
        curve = reports.held_out_curve(os.path.join(cfg.out,
                                                    f"noise/student-{noise_label(a, weight)}"))
        rounds = [s for s, _, _ in curve]
        gain = [sum(r[k] - curve[0][2][k] for k in names) / len(names) for _, _, r in curve]
        res["levels"][noise_label(a, weight)] = {
            "noise_level": a, "sde_weight": weight, "rounds": rounds,
            "held_out": [r for _, _, r in curve], "mean_gain": gain,
            "rounds_to": reports.rounds_to(rounds, gain)}
    write_text(os.path.join(cfg.out, "noise.json"), json.dumps(res, indent=1))
    for label, r in res["levels"].items():
        say(0, f"{label}: rounds to 50/75/90% of the final gain "
               f"{'/'.join(str(v) for v in r['rounds_to'].values())} "
               f"(final mean gain {r['mean_gain'][-1]:+.3f})")
    reports.noise_figure(os.path.join(cfg.out, "noise.png"), res, names)


# ------------------------------------------------------------------------------ main
def run(cfg):
    stages = {"compare": ["teacher", "distill", "eval"], "noise": ["distill", "eval"],
              "distill": ["distill"]}.get(cfg.stage, ["teacher"])
    runs.preflight(cfg, stages)
    if cfg.stage in ("joint", "cascade"):
        rl = rl_config(cfg, cfg.stage)
    model, tasks = runs.setup(cfg, stages[0])
    if cfg.stage == "distill":
        return student(cfg, model, tasks, runs.teacher_dirs(cfg, [t.name for t in tasks]))
    if cfg.stage in ("joint", "cascade"):
        return (joint if cfg.stage == "joint" else cascade)(rl, model, tasks)
    stage = {"compare": compare, "noise": noise}[cfg.stage]
    if not cfg.seeds:
        return stage(cfg, model, tasks)
    seeds, names = [int(s) for s in cfg.seeds.split(",")], [t.name for t in tasks]
    for s in seeds:  # noise: the run's teachers for every seed (only OPD's seed varies)
        c = dataclasses.replace(cfg, seed=s, out=os.path.join(cfg.out, f"seed-{s}"))
        extra = {"dirs": runs.teacher_dirs(cfg, names)} if cfg.stage == "noise" else {}
        if cfg.stage == "compare" and s != seeds[0]:  # the learning rates seed 0 chose
            c = dataclasses.replace(c, lr_choice=lr_choice(cfg.out, seeds[0], cfg.lr_choice))
        stage(c, model, tasks, **extra)
    if rank_world()[0] == 0:
        if cfg.stage == "compare":
            reports.compare_seeds(cfg.out, seeds, names)
        else:
            reports.noise_seeds(cfg.out, seeds)


def lr_choice(out, seed, given=""):
    """{run: the multiple of its default lr}: given (--lr_choice's JSON), then what the grid of
    <out>/seed-<seed>/lr.json chose; as JSON."""
    path = os.path.join(out, f"seed-{seed}", "lr.json")
    chosen = json.load(open(path)) if os.path.isfile(path) else {}
    return json.dumps({**json.loads(given or "{}"),
                       **{k: v["multiple"] for k, v in chosen.items()}})


def parse_args(argv=None):
    return parse_config(argv, Args, "the paper's baselines: see baselines.py")


def main(argv=None):
    cli(run, parse_args, argv)


if __name__ == "__main__":
    main()
