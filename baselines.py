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
from options import arg, one_of, text

DISTILL_LOSSES = ("closed", "ppo", "sft", "offpolicy", "dance", "flow", "dmd", "tdm")
ODE_LOSSES = ("sft", "offpolicy", "dance", "dmd", "tdm")  # they roll out (or sample) with the ODE


def _seeds_ok(s):
    seeds = s.split(",")
    return all(x.isdigit() for x in seeds) and len(set(map(int, seeds))) == len(seeds)


@dataclasses.dataclass
class Args(opd.Config):
    stage: str = arg("compare", one_of("distill", "joint", "cascade", "compare", "noise"), "stage")
    loss: str = arg("closed", one_of(*DISTILL_LOSSES), "distill: the student's method")
    seeds: str = arg("", text(True, _seeds_ok, "distinct seeds like 0,1,2"),
                     "compare / noise: one run per seed into <out>/seed-<s>, then mean and spread")

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
def flow_matching_loss(velocity, x0, generator):
    """The flow-matching loss on clean latents x0 (B, ...), per sample: t ~ U(0, 1), eps fresh,
    x_t = (1 - t) x0 + t eps, mean (v(x_t, t) - (eps - x0))^2."""
    t = torch.rand(len(x0), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = (1 - opd._bcast(t, x0)) * x0 + opd._bcast(t, x0) * eps
    return (velocity(x_t, t).float() - (eps - x0)).pow(2).flatten(1).mean(1)


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
        l = flow_matching_loss(student, x0, generator).mean() / len(train_steps)
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


def flow_round(cfg, m, tasks, step, rank, world, teacher_of, guidance_of, helpers=None,
               clip=0.2):
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


# DMD and TDM: a second trained adapter, the fake score (starting at the base, CFG 1), tracks
# the distribution of the student's own predictions; the student moves along (fake - teacher).
# Both take the student's one-step clean prediction at a state of its own ODE rollout,
# x0_hat = x_k - t_k v_S(x_k) (flow matching: x_t = (1 - t) x0 + t eps, v = eps - x0); every
# model's clean prediction at x_t is x_t - t v(x_t). The teacher is the task's, with its CFG;
# the student keeps its own CFG (as every student here), so the teacher's guidance is in its
# guided prediction once (TDM folds it into a CFG-free student's target instead).
DMD_FAKE_UPDATES = 5      # DMD2's SDXL scripts: 5 fake-score updates per generator update
DMD_T = (0.02, 0.98)      # DMD2's min/max_step_percent: the re-noising t of the student's loss
DMD_FAKE = dict(weight_decay=0.01)  # DMD2: AdamW (0.9, 0.999), the generator's lr, clip 10
TDM_FAKE = dict(betas=(0.0, 0.95), weight_decay=0.01)  # TDM: the fake's lr is 5x the student's
TDM_STUDENT = dict(betas=(0.0, 0.95), weight_decay=0.01)


def x0_of(x_t, v, t):
    """A velocity's clean prediction at x_t: x0 = x_t - t v, fp32; t a float or (B,)."""
    return x_t.float() - opd._bcast(t, x_t) * v.float()


def dmd_loss(x0_hat, x0_teacher, x0_fake):
    """DMD's student loss per sample (B,): the reverse-KL direction g = (x0_fake - x0_teacher) /
    mean|x0_hat - x0_teacher| (per sample, no grad, nan_to_num as DMD2) through
    1/2 mean (x0_hat - sg(x0_hat - g))^2, whose gradient in x0_hat is g / D."""
    with torch.no_grad():
        w = (x0_hat - x0_teacher).abs().flatten(1).mean(1)
        g = torch.nan_to_num((x0_fake - x0_teacher) / opd._bcast(w, x0_hat))
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
    c = lambda u: opd._bcast(u, x0_hat)
    x_s = (1 - c(s)) * x0_hat + c(s) * eps_hat
    a = (1 - t) / (1 - s)
    beta = (t**2 - (a * s) ** 2).clamp(min=0).sqrt()
    x = c(a) * x_s + c(beta) * z
    return x, t, (c(a * s) * eps_hat + c(beta) * z) / c(t), z


def tdm_fake_loss(x0_fake, x0_hat, t, eps_mix, z):
    """TDM's fake-score loss per sample (B,): mean (x0_fake - x0_hat)^2 x min(SNR, 5), SNR =
    ((1 - t) / t)^2, x the demo's importance weight exp(-mean(eps_mix^2) / 2) /
    exp(-mean(z^2) / 2)."""
    snr = ((1 - t) / t) ** 2
    w_is = torch.exp(-0.5 * eps_mix.pow(2).flatten(1).mean(1) + 0.5 * z.pow(2).flatten(1).mean(1))
    return (x0_fake - x0_hat).pow(2).flatten(1).mean(1) * snr.clamp(max=5) * w_is


def student_states(cfg, m, tasks, step, rank, world, draws):
    """The round's student rollouts (ODE, its CFG, no grad), per task and micro-batch, as deep as
    the deepest of the draws: draws(n, g) -> [(n,) step indices]. Returns [(task, prompts, share
    of the rank's batch, states (n, k+1, ...), [indices], generator)]."""
    sigmas, b, out = opd.sd3_sigmas(cfg.num_steps), cfg.batch_size // world, []
    for i, task in enumerate(tasks):
        mine = opd.draw_prompts(cfg, task, step, i, cfg.batch_size)[rank * b:(rank + 1) * b]
        g = opd.rng(cfg.seed, step, 1, i, rank)
        for s in opd.chunks(b, cfg.micro_batch):
            ps, ks = mine[s], draws(len(mine[s]), g)
            deepest = max(int(k.max()) for k in ks)
            states = rollout(m.velocity("student", ps, cfg.guidance), m.noise(len(ps), g),
                             sigmas[:deepest + 1], 0.0)["states"]
            out.append((task, ps, len(ps) / b, states, ks, g))
    return out


def student_loss(m, ps, x0_hat, x, t, teacher, teacher_cfg, loss_fn, share):
    """DMD's or TDM's student loss at the re-noised x (time t): the teacher's (its CFG) and the
    fake's (CFG 1) clean predictions there, no grad; loss_fn(x0_hat, x0_teacher, x0_fake)'s
    batch mean, backpropagated x share into the student. Returns the loss."""
    with torch.no_grad():
        x0_t = x0_of(x, m.velocity(teacher, ps, teacher_cfg)(x, t), t)
        x0_f = x0_of(x, m.velocity("fake", ps, 1.0)(x, t), t)
    loss = loss_fn(x0_hat, x0_t, x0_f).mean()
    m.use("student")
    (loss * share).backward()
    return float(loss.detach())


def _update_fake(cfg, m, fake, loss_of, batch, clip, rank, world):
    """One optimizer step of the fake adapter on sum over the batch of loss_of(entry) x share
    (entry[2]), gradients averaged over the ranks."""
    params, opt = fake
    student, m.trainable = m.trainable, params  # only the fake's weights require grad here
    opt.zero_grad(set_to_none=True)
    for entry in batch:
        loss = loss_of(entry)
        m.use("fake")  # gradient checkpointing recomputes with the active adapter
        (loss * entry[2]).backward()
    opd.optimizer_step(dataclasses.replace(cfg, grad_clip=clip), opt, params, 0, rank, world)
    m.trainable = student


def dmd_round(cfg, m, tasks, step, rank, world, teacher_of, guidance_of, helpers):
    """DMD (DMD2 without its GAN head, which needs real images), one round: one sampler step k
    for the round (DMD2's backward simulation: k steps of the student from noise), the
    student's x0_hat there (with grad); re-noised x_t = (1 - t) sg(x0_hat) + t eps, t ~
    U(0.02, 0.98); the student's loss dmd_loss with the teacher's and the fake's clean
    predictions at x_t. Then DMD_FAKE_UPDATES updates of the fake adapter, each the flow-matching
    loss on the round's sg(x0_hat) at fresh t ~ U(0, 1) (DMD2 gives each fake update fresh
    generator samples; here they share the round's, so every method samples the same number of
    trajectories a round). Student and fake share the lr; the fake's clip is DMD2's 10."""
    sigmas, n = opd.sd3_sigmas(cfg.num_steps), opd.parse_steps(cfg.train_steps, cfg.num_steps)
    k = n[int(torch.randint(len(n), (1,), generator=opd.rng(cfg.seed, step, 4)))]
    batch = student_states(cfg, m, tasks, step, rank, world,
                           lambda b, g: [torch.full((b,), k, dtype=torch.long)])
    losses, made = {}, []
    for task, ps, share, states, _, g in batch:
        x_k, t_k = states[:, k], sigmas[k]
        x0_hat = x0_of(x_k, m.velocity("student", ps, cfg.guidance)(x_k, t_k), t_k)
        t = DMD_T[0] + (DMD_T[1] - DMD_T[0]) * torch.rand(len(ps), generator=g).to(x_k.device)
        eps = torch.randn(x_k.shape, generator=g).to(x_k.device)
        x_t = (1 - opd._bcast(t, x_k)) * x0_hat.detach() + opd._bcast(t, x_k) * eps
        loss = student_loss(m, ps, x0_hat, x_t, t, teacher_of(task), guidance_of[task.name],
                            dmd_loss, share)
        losses[task.name] = losses.get(task.name, 0.0) + loss * share
        made.append((ps, x0_hat.detach(), share, g))
    for _ in range(DMD_FAKE_UPDATES):
        _update_fake(cfg, m, helpers["fake"], lambda e: flow_matching_loss(
            m.velocity("fake", e[0], 1.0), e[1], e[3]).mean(), made, 10.0, rank, world)
    return losses


def tdm_round(cfg, m, tasks, step, rank, world, teacher_of, guidance_of, helpers):
    """TDM, one round: per sample a random stage k of the student's sampler (its train steps,
    uniform), drawn apart for the fake's update and the student's loss, both on the round's
    ODE rollouts. First one update of the fake adapter (TDM steps it first): tdm_fake_loss at
    the student's re-noised prediction (tdm_renoise, no grad). Then the student's loss tdm_loss
    at a freshly re-noised x' with the teacher's (guided) and the fake's clean predictions. The
    fake's AdamW lr is 5x the student's (TDM: student lr = fake lr / 5), betas (0, 0.95) for
    both, no clip for the fake."""
    sigmas, n = opd.sd3_sigmas(cfg.num_steps), opd.parse_steps(cfg.train_steps, cfg.num_steps)
    steps = torch.tensor(n)
    draw = lambda b, g: [steps[torch.randint(len(n), (b,), generator=g)] for _ in range(2)]
    batch = student_states(cfg, m, tasks, step, rank, world, draw)
    sig = sigmas.to(m.device)

    def prediction(ps, states, k, grad):  # x0_hat and eps_hat of the student at x_k, per sample
        x_k, t_k = states[torch.arange(len(ps)), k], sig[k]
        with torch.set_grad_enabled(grad):
            v = m.velocity("student", ps, cfg.guidance)(x_k, t_k)
        return x0_of(x_k, v, t_k), x_k.float() + opd._bcast(1 - t_k, x_k) * v.float().detach()

    def fake_loss(entry):
        _, ps, _, states, (k, _), g = entry
        with torch.no_grad():
            x0_hat, eps_hat = prediction(ps, states, k, False)
            x, t, eps_mix, z = tdm_renoise(x0_hat, eps_hat, sig[k], sig[k + 1], g)
        x0_f = x0_of(x, m.velocity("fake", ps, 1.0)(x, t), t)
        return tdm_fake_loss(x0_f, x0_hat, t, eps_mix, z).mean()
    _update_fake(cfg, m, helpers["fake"], fake_loss, batch, math.inf, rank, world)
    losses = {}
    for task, ps, share, states, (_, k), g in batch:
        x0_hat, eps_hat = prediction(ps, states, k, True)
        with torch.no_grad():
            x, t, _, _ = tdm_renoise(x0_hat.detach(), eps_hat, sig[k], sig[k + 1], g)
        loss = student_loss(m, ps, x0_hat, x, t, teacher_of(task), guidance_of[task.name],
                            tdm_loss, share)
        losses[task.name] = losses.get(task.name, 0.0) + loss * share
    return losses


TRAJECTORIES = {"closed": None, "ppo": None, "sft": sft_trajectory,
                "offpolicy": offpolicy_trajectory, "dance": dance_trajectory}
ROUNDS = {"flow": flow_round, "dmd": dmd_round, "tdm": tdm_round}  # whole-round methods; the
# others plug a trajectory into opd.distill_round


def helpers_of(cfg):
    """The extra trained adapters of a method and their AdamW settings (opd.start_training)."""
    return {"dmd": {"fake": DMD_FAKE},
            "tdm": {"fake": {**TDM_FAKE, "lr": 5 * cfg.lr}, "student": TDM_STUDENT}}.get(cfg.loss)


def student(cfg, m, tasks, dirs, rank, world, name=None):
    c = opd.resolve(cfg, "distill")
    round_fn = ROUNDS.get(c.loss) or functools.partial(opd.distill_round,
                                                       trajectory=TRAJECTORIES[c.loss])
    return opd.distill(c, m, tasks, dirs, rank, world, name, round_fn, helpers_of(c))


# ------------------------------------------------------------------------------ the comparison
DISTILL_BASELINES = [("sft", 0.0), ("offpolicy", 0.0), ("ppo", 0.7), ("dance", 0.0),
                     ("flow", 0.7), ("dmd", 0.0), ("tdm", 0.0)]  # (--loss, rollout noise a)


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


def noise(cfg, m, tasks, rank, world, dirs=None):
    """OPD from the run's teachers with rollouts at a = 0, 0.3 and 0.7, the SDE ones with both
    step weights (--sde_weight kl and sigma), same seeds; held-out metrics every eval_every
    rounds (default: every 2 rounds); writes noise.json (curves, rounds to 50 / 75 / 90% of the
    final gain) and noise.png. dirs: the teachers (default --teachers or <out>/teacher-*)."""
    names = [t.name for t in tasks]
    dirs = dirs or opd.teacher_dirs(cfg, names)
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


# ------------------------------------------------------------------------------ seeds
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
    per = [{n: {**{k: t[n][k] for k in tasks}, "avg": opd.normalised_mean(t, tasks)[n],
                "seconds": opd.method_seconds(t)[n]} for n in models} for t in tables]
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
    if not cfg.seeds:
        return stage(cfg, m, tasks, rank, world)
    seeds, names = [int(s) for s in cfg.seeds.split(",")], [t.name for t in tasks]
    for s in seeds:  # noise: the run's teachers for every seed (only OPD's seed varies)
        c = dataclasses.replace(cfg, seed=s, out=os.path.join(cfg.out, f"seed-{s}"))
        extra = {"dirs": opd.teacher_dirs(cfg, names)} if cfg.stage == "noise" else {}
        stage(c, m, tasks, rank, world, **extra)
    if rank == 0:
        compare_seeds(cfg.out, seeds, names) if cfg.stage == "compare" else \
            noise_seeds(cfg.out, seeds)


def main(argv=None):
    cli(lambda a: run(opd.parse_config(a, Args, "the paper's baselines: see baselines.py")), argv)


if __name__ == "__main__":
    main()
