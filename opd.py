"""
DiffusionOPD: on-policy distillation of several RL-trained teachers into one flow-matching
text-to-image student (Stable Diffusion 3 / 3.5), after arXiv 2605.15055. This file is the
method; what is not (options, run folders, evaluation, the model wrapper) is in opd_support/.

Run manual (README.md has the numbers to expect)
    python opd.py               # tiny SD3, offline, 7.5 min on 2 CPU cores: 3 teachers, distil,
                                # eval -> runs/tiny/eval.md, each teacher up on its own task,
                                # the one student keeping most of every teacher's gain
    python opd.py --stage teacher --task color --algo nft          # one DiffusionNFT teacher
    torchrun --nproc_per_node=2 opd.py --out runs/two               # the same on 2 processes
    M=stabilityai/stable-diffusion-3.5-medium                        # the paper, 8 GPUs each:
    torchrun --nproc_per_node=8 opd.py --model $M --stage teacher --task ocr --grad_checkpointing
    torchrun --nproc_per_node=8 opd.py --model $M --stage distill --tasks geneval,ocr,aesthetic
The baselines run from baselines.py, the speed and memory bench from bench.py, and sanity.py runs
this file's maths on a 2D toy: closed-form against PPO-style gradients, OPD's pull on the
student's own states, OPD's variants and joint and cascade RL at equal rollouts.

Algorithm 1 (stage 2), line by line in distill()
    teachers pi_T^1..M from stage 1 (train_rl); student = the base + a LoRA with B = 0
    for every round:                                                 runs.each_round
        for every task m: prompts c ~ D_m                            draw_prompts
            roll out the student x_0 -> x_N (ODE; SDE with a > 0)    distill_trajectory (the
                                                                     reference), _fused (default)
            at every x_j: mu_S(x_j) with grad, mu_T^m(x_j) without   transition
            the gradient of the per-step KL (Eq. 11 / 12)            sampler_step_loss, opd_loss
        one optimizer step on the mean gradient of the M tasks       runs.optimizer_step
        EMA of the student, log, checkpoint                          runs.after_step

The values that matter, as the defaults set them (`python opd.py --help`; test_opd.py checks this
table against opd_support/config.py). SD3.5-M's are the public configs, batches over 8 GPUs.
    model    stage                a    CFG  lr    batch  K  clip  sampler steps  group size
    tiny     teacher, GRPO-Guard  0.7  4.5  1e-3  24     2  1e-4  10             12
    tiny     teacher, NFT         0    1    1e-3  24     1  -     10             12
    tiny     distill              0    4.5  3e-3  16     1  -     10             -
    SD3.5-M  teacher, GRPO-Guard  0.7  4.5  1e-4  576    2  2e-6  10             24
    SD3.5-M  teacher, NFT         0    1    3e-4  1152   1  -     10             24
    SD3.5-M  distill              0    4.5  3e-4  24     1  -     10             -
    a: the training rollouts' SDE noise level (0: the ODE); CFG: their guidance (1: off); batch:
    trajectories per optimizer step and task; K: optimizer steps per RL epoch (stage 2: one step
    per round); clip: PPO's clip range of the ratio.

Simplifications (and why)
1. Teachers and student are LoRA adapters on ONE transformer (peft): M teachers cost one model's
   memory; switching adapters switches models.
2. Per-step losses average over latent elements and over the trained steps (as the public
   code), where the paper's equations sum: constant factors, absorbed by Adam.
3. Stage 1 is GRPO-Guard or DiffusionNFT (--algo nft, the paper's GenEval teacher), an epoch of
   --updates_per_epoch optimizer steps as their public configs; NFT samples with the Euler ODE
   where its public code uses a second-order solver.
4. The default model is an SD3 built from configs and pretrained ~2 min on synthetic images,
   with toy rewards: it shows that the machinery works, not what SD3.5 reaches. Its adapters
   (teachers and students alike) adapt the AdaLN and text projections too.
5. One optimizer step a round on the mean of the tasks' gradients, as the public code's gradient
   accumulation; its task-by-task micro-batches give the same gradient as the public code's
   mixed ones (docs/design.md has the other details and where they differ).
"""
import dataclasses
import math

import torch

from opd_support import evaluation, runs
from opd_support.config import parse_config, parse_pairs, parse_steps, resolve
from opd_support.conflict import micro_batches
from opd_support.loras import load_lora, run_info
from opd_support.machinery import chunks, gather, main as cli, rng, sum_over_ranks
from opd_support.prompts import draw_prompts, score
from opd_support.sd3 import sd3_sigmas


# ---------------------------------------------------------------------------------------------
# maths: the flow-matching SDE/ODE step, log-densities, the paper's closed-form OPD loss and its
# two variants, GRPO-Guard, DiffusionNFT. Shared by the 2D toy (sanity.py) and SD3.
# Paper symbols -> code: t_j -> t, t_{j+1} -> t_next, dt_j -> dt, a -> noise_level,
# sigma_t -> sigma, sigma-bar_j (full transition std) -> std, mu_j -> mu, x_j -> x; the times
# t_0 = 1 > ... > t_N = 0 of a sampler -> sigmas (diffusers' name for them: not sigma_t).
# Convention: t = 1 is pure noise, t = 0 is data; x_t = (1 - t) x0 + t eps; v = eps - x0.
# ---------------------------------------------------------------------------------------------
def bcast(value, x):
    """A (B,) tensor -> shape (B, 1, 1, ...) to broadcast against x (a scalar stays 0-d), fp32."""
    value = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    return value.reshape(value.shape + (1,) * (x.dim() - value.dim())) if value.dim() else value


def transition(x, v, t, t_next, noise_level):
    """Mean and std of the Gaussian transition p(x_{j+1} | x_j) of the flow-matching SDE
    (Flow-GRPO's Euler-Maruyama form) from time t to t_next. x, v: (B, ...) state and velocity;
    t, t_next: floats or (B,). Returns (mu, std): mu fp32 like x, std (B,) the full transition
    std (sigma-bar_j). noise_level = 0 is the Euler ODE step with std = 0."""
    x, v = x.float(), v.float()
    B = x.shape[0]
    tt, tn = bcast(t, x), bcast(t_next, x)
    dt = tn - tt  # < 0
    if noise_level == 0:
        # ODE: mu_j = x_j + v dt
        return x + v * dt, x.new_zeros(B)
    # sigma_t = a sqrt(t / (1 - t)); at t = 1 (the first step) the denominator uses 1 - t_{j+1}
    # instead: 1 - t is 0 there (Flow-GRPO's sigma_max = its second time does the same)
    sigma = noise_level * torch.sqrt(tt / torch.where(tt >= 1, 1 - tn, 1 - tt))
    # mu_j = x_j + [v + sigma_t^2 / (2t) (x_j + (1 - t) v)] dt
    mu = x + (v + sigma**2 / (2 * tt) * (x + (1 - tt) * v)) * dt
    # std_j = sigma_t sqrt(-dt)
    std = (sigma * torch.sqrt(-dt)).expand(B, *[1] * (x.dim() - 1)).reshape(B)
    return mu, std


def sde_step(x, v, t, t_next, noise_level, generator=None):
    """One step x_j -> x_{j+1}: returns (x_next, mu, std), fp32. With noise_level = 0 it is the
    plain Euler ODE step and draws no noise; else the noise is drawn from the generator (on its
    device: a CPU generator on a GPU run), then moved."""
    mu, std = transition(x, v, t, t_next, noise_level)
    if noise_level == 0:
        return mu, mu, std
    dev = generator.device if generator is not None else mu.device
    noise = torch.randn(mu.shape, generator=generator, device=dev).to(mu.device)
    # x_{j+1} = mu_j + std_j eps_j,  eps_j ~ N(0, I)
    return mu + bcast(std, mu) * noise, mu, std


def gaussian_logp(x_next, mu, std, reduce="mean"):
    """log N(x_next; mu, std^2 I) per sample, (B,). reduce='mean' averages the per-element
    log-density over latent elements (Flow-GRPO's convention: its tiny clip ranges assume it);
    reduce='sum' is the true log-density of the transition."""
    sd = bcast(std, x_next)
    # log p = -(x - mu)^2 / (2 std^2) - log std - log sqrt(2 pi), per element
    lp = -((x_next.float() - mu) ** 2) / (2 * sd**2) - torch.log(sd) - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    return lp.mean(1) if reduce == "mean" else lp.sum(1)


def rollout(velocity, x, sigmas, noise_level, generator=None):
    """Sample one batch of trajectories, no grad; velocity(x, t) -> v is any model (the 2D toy
    of sanity.py or the SD3 transformer). Returns a dict with states (B, N+1, ...) x_0..x_N,
    means (B, N, ...), stds (B, N) and logps (B, N) (element-mean log-density of each step taken;
    0 for the ODE)."""
    states, means, stds, logps = [x.float()], [], [], []
    with torch.no_grad():
        for j in range(len(sigmas) - 1):
            x_next, mu, std = sde_step(x, velocity(x, sigmas[j]), sigmas[j], sigmas[j + 1],
                                       noise_level, generator)
            lp = gaussian_logp(x_next, mu, std) if noise_level > 0 else torch.zeros_like(std)
            states.append(x_next); means.append(mu); stds.append(std); logps.append(lp)
            x = x_next
    if not means:  # no step: only x_0
        return dict(states=states[0][:, None], means=states[0][:, None][:, :0],
                    stds=states[0].new_zeros(len(x), 0), logps=states[0].new_zeros(len(x), 0))
    return dict(states=torch.stack(states, 1), means=torch.stack(means, 1),
                stds=torch.stack(stds, 1), logps=torch.stack(logps, 1))


def opd_loss(mu_s, mu_t, std=None):
    """The paper's per-step loss: the closed-form KL between the student's and the teacher's
    Gaussian steps from the same state x_j, (B,).
    SDE (Eq. 11; std (B,) = std_j = sigma_t sqrt(|dt|) of transition):
        KL(N(mu_S, std^2 I) || N(mu_T, std^2 I)) = ||mu_S - mu_T||^2 / (2 std^2)
    ODE (Eq. 12; std None, the step is deterministic): 1/2 ||mu_S - mu_T||^2.
    Reduction: the squared norm is averaged over latent elements (public code), i.e. the paper's
    KL divided by the number of elements D. The teacher target is cast to fp32."""
    d2 = (mu_s.float() - mu_t.float()).pow(2).flatten(1).mean(1)  # ||mu_S - mu_T||^2 / D
    if std is None:  # ODE: Eq. 12
        return 0.5 * d2
    return 1 / (2 * std.float() ** 2) * d2  # SDE: Eq. 11


# Two variants of the paper's loss, each selected by a field of Sampler (--sde_weight, --loss).
def sigma_weighted_opd_loss(mu_s, mu_t, std, dt):
    """VARIANT, the public code's SDE weight (sde_weight="sigma"): ||mu_S - mu_T||^2 / D over
    2 sigma_t^2 instead of Eq. 11's 2 std_j^2, i.e. Eq. 11 x |dt|: steps with a small |dt| weigh
    relatively less (with SD3's shifted schedule the early ones, t near 1: |dt| 0.04 there, 0.27
    at the last trained step). (B,)."""
    d2 = (mu_s.float() - mu_t.float()).pow(2).flatten(1).mean(1)  # ||mu_S - mu_T||^2 / D
    dt = torch.as_tensor(dt, dtype=torch.float32, device=std.device)
    return 1 / (2 * std.float() ** 2) * dt.abs() * d2  # 1 / (2 sigma_t^2) = |dt| / (2 std^2)


def ppo_surrogate(delta, logp, logp_old):
    """VARIANT (loss="ppo"): the PPO-style surrogate of the per-step cost Delta_j (the KL to the
    teacher, which the paper's section 3.3 treats as a per-step reward to minimise), (B,):
    L_PG = rho_j Delta_j,  rho_j = pi_theta(a_j | x_j) / pi_old(a_j | x_j).
    On-policy rho = 1 at the sampled a_j, but grad rho = rho grad log pi, so a single sample's
    gradient carries the extra term Delta_j grad log pi = Delta_j (eps_j / std_j) grad mu: zero
    mean, a variance that grows like Delta_j^2 / std_j^2 as the noise shrinks."""
    return torch.exp(logp - logp_old.detach()) * delta


@dataclasses.dataclass
class Sampler:
    """The student's sampler in stage 2 and the loss on its steps."""
    sigmas: torch.Tensor      # (N + 1,) the times t_0 = 1 > ... > t_N = 0
    noise_level: float = 0.0  # a: 0 is the ODE (Eq. 12), > 0 Flow-GRPO's SDE (Eq. 11)
    loss_steps: list = None   # the steps j with a loss (None: all but the last, as the paper)
    loss: str = "closed"      # "closed": the paper's KL; VARIANT "ppo": its PPO-style surrogate
    sde_weight: str = "kl"    # "kl": Eq. 11's 1 / (2 std_j^2); VARIANT "sigma": 1 / (2 sigma_t^2)

    def __post_init__(self):
        if self.loss_steps is None:
            self.loss_steps = list(range(len(self.sigmas) - 2))


def sampler_step_loss(mu_s, mu_t, std, x_next, dt, sampler):
    """Stage 2's loss at one sampler step j, per sample (B,), as the Sampler selects it: the
    paper's (Eq. 12 on the ODE, Eq. 11 on the SDE) or a variant above. The PPO surrogate's
    action a_j = x_{j+1} is the state the rollout took (its true log-density: a sum)."""
    if sampler.noise_level == 0:
        delta = opd_loss(mu_s, mu_t)  # ODE: Eq. 12
    elif sampler.sde_weight == "kl":
        delta = opd_loss(mu_s, mu_t, std)  # SDE: Eq. 11
    else:
        delta = sigma_weighted_opd_loss(mu_s, mu_t, std, dt)
    if sampler.loss == "closed":
        return delta
    logp = gaussian_logp(x_next.detach(), mu_s, std, reduce="sum")
    return ppo_surrogate(delta, logp, logp.detach())


def group_advantages(rewards, groups, clip=5.0, eps=1e-4, global_std=False):
    """Group-relative advantages (GRPO): A = (r - mean_group) / (std + 1e-4), clipped to
    [-clip, clip]; std per group, or over the whole batch (global_std, DiffusionNFT's choice).
    rewards (B,), groups (B,) integer group ids (one group per prompt)."""
    rewards = rewards.float()
    adv = torch.zeros_like(rewards)
    for group_id in groups.unique():
        in_group = groups == group_id
        group = rewards[in_group]
        std = (rewards if global_std else group).std(unbiased=False)
        adv[in_group] = (group - group.mean()) / (std + eps)
    return adv.clamp(-clip, clip)


def log_ratio(mu, mu_old, x_next, std, ratio_norm=True):
    """log pi_theta(x_{j+1} | x_j) - log pi_old(x_{j+1} | x_j) of one step, (B,), with the
    element-mean convention. mu: the trained policy's mean (with grad); mu_old, x_next, std:
    stored from the rollout. ratio_norm: GRPO-Guard's RatioNorm, else plain Flow-GRPO."""
    if ratio_norm:
        # the true element-mean log-ratio, with dmu = mu_theta - mu_old and x_{j+1} = mu_old +
        # s eps:  log r = mean(eps * dmu) / s - mean(dmu^2) / (2 s^2), a mean below 0 (the
        # "left shift") and a scale 1/s that explodes as s -> 0. RatioNorm drops the shift and
        # multiplies by s, per sample:  log r_hat = mean(eps * dmu)
        eps = (x_next - mu_old) / bcast(std, mu)
        return (eps * (mu.float() - mu_old)).flatten(1).mean(1)
    return gaussian_logp(x_next, mu, std) - gaussian_logp(x_next, mu_old, std)


def clipped_loss(ratio, adv, clip_range):
    """PPO's clipped policy loss, (B,): L = max(-A r, -A clip(r, 1 - e, 1 + e))."""
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))


NFT_ADV_CLIP = 5.0  # DiffusionNFT's adv_clip_max: the advantages' clip, and its loss's scale


def nft_optimality(adv, clip=NFT_ADV_CLIP):
    """DiffusionNFT's optimality probability r in [0, 1] of each sample from its advantage:
    r = clip(0.5 + 0.5 clip(A, -5, 5) / 5, 0, 1)."""
    return (0.5 + 0.5 * adv.float().clamp(-clip, clip) / clip).clamp(0, 1)


def nft_loss(v, v_old, target, t, optimality, beta):
    """DiffusionNFT's loss at noise level t, (B,). With the implicit positive and negative
    policies v+ = beta v_theta + (1 - beta) v_old and v- = (1 + beta) v_old - beta v_theta,
    their clean-image predictions x0+- = x_t - t v+- are pulled to x0 with weights r and 1 - r:
        L = (r ||x0+ - x0||^2 / w+ + (1 - r) ||x0- - x0||^2 / w-) / beta * 5,
    w+- = mean|x0+- - x0| (no grad; the public code's adaptive weighting), element means. As
    x_t = (1 - t) x0 + t eps, x0+- - x0 = t (target - v+-) with target = eps - x0: the public
    code's x0-space loss, written with velocities. v: v_theta (with grad); v_old, target:
    (B, ...); t: float or (B,); optimality: r (B,), from nft_optimality."""
    v, v_old, target, tt = v.float(), v_old.float(), target.float(), bcast(t, v)
    v_pos = beta * v + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v

    def term(v_hat):  # ||x0_hat - x0||^2 / mean|x0_hat - x0|, per sample (element means)
        err = (tt * (target - v_hat)).flatten(1)
        return err.pow(2).mean(1) / err.abs().mean(1).detach().clamp_min(1e-5)
    return (optimality * term(v_pos) + (1 - optimality) * term(v_neg)) / beta * NFT_ADV_CLIP


def nft_timesteps(batch, num_steps, generator):
    """DiffusionNFT's trained times: per sample a random permutation of the sampler's N steps, of
    which the first int(0.99 N) are trained (timestep_fraction 0.99: N - 1 for N <= 100; here
    always N - 1), each with fresh noise. Returns (batch, N - 1) step indices, distinct within a
    row."""
    order = torch.rand(batch, num_steps, generator=generator).argsort(1)  # a permutation per row
    return order[:, :num_steps - 1]


# ---------------------------------------------------------------------------------------------
# stage 2, Algorithm 1: the student's own rollouts, every state supervised by the task's teacher
# ---------------------------------------------------------------------------------------------
def distill_trajectory(student, teacher, x, sampler, generator=None, scale=1.0):
    """On-policy distillation on one batch of the student's trajectories (paper Eq. 11/12), the
    reference form. student, teacher: velocity functions v(x, t); x (B, ...): the noise at t = 1.
    The student first samples x_0 -> x_N without grad: the states it visits are data, as any
    on-policy method's samples are (no gradient flows through how they depend on the weights).
    Then at every x_j with j in loss_steps the student's mean mu_S(x_j) (with grad) is pulled to
    the teacher's mu_T(x_j) (no grad, fp32): the KL between the two Gaussian steps has a closed
    form, so the action a_j needs no score-function term either (ppo_surrogate is the estimator
    that has one). Each step's loss (batch mean / number of loss steps) x scale is
    backpropagated at once (its graph freed). Returns (x_N, the loss as a float)."""
    sigmas, a, total = sampler.sigmas, sampler.noise_level, 0.0
    traj = rollout(student, x, sigmas, a, generator)  # states (B, N+1, ...)
    for j in sampler.loss_steps:
        t, t_next = sigmas[j], sigmas[j + 1]
        x, x_next = traj["states"][:, j], traj["states"][:, j + 1]
        with torch.no_grad():  # the teacher's mean on the student's own state
            mu_teacher, _ = transition(x, teacher(x, t), t, t_next, a)
        mu_student, std = transition(x, student(x, t), t, t_next, a)  # with grad
        loss = sampler_step_loss(mu_student, mu_teacher, std, x_next, t_next - t, sampler).mean()
        loss = loss / len(sampler.loss_steps)
        # model.use() switches the adapter of every layer, and gradient checkpointing recomputes
        # a block in the backward pass with the adapter active then: the student's, as its
        # forward came after the teacher's (the fused loop below and nft_update keep that order)
        (loss * scale).backward()
        total += float(loss.detach())
    return traj["states"][:, -1], total


def distill_trajectory_fused(student, teacher, x, sampler, generator=None, scale=1.0):
    """distill_trajectory in one pass (the default; --two_pass runs the reference): the weights
    do not change inside a round, so the student's forward with grad at x_j can be the step it
    takes, its state then detached. The same gradient with fewer student forwards (tested)."""
    sigmas, a, total = sampler.sigmas, sampler.noise_level, 0.0
    for j in range(len(sigmas) - 1):
        t, t_next, train = sigmas[j], sigmas[j + 1], j in sampler.loss_steps
        if train:
            with torch.no_grad():
                mu_teacher, _ = transition(x, teacher(x, t), t, t_next, a)
        with torch.set_grad_enabled(train):
            x_next, mu_student, std = sde_step(x, student(x, t), t, t_next, a, generator)
        if train:
            loss = sampler_step_loss(mu_student, mu_teacher, std, x_next, t_next - t,
                                     sampler).mean()
            (loss / len(sampler.loss_steps) * scale).backward()
            total += float(loss.detach()) / len(sampler.loss_steps)
        x = x_next.detach()  # the next state is data
    return x, total


def sampler_of(cfg):
    """The stage-2 Sampler of a config."""
    return Sampler(sd3_sigmas(cfg.sampler_steps), cfg.noise_level,
                   parse_steps(cfg.loss_steps, cfg.sampler_steps), cfg.loss, cfg.sde_weight)


def load_teachers_and_guidance(cfg, model, teacher_dirs):
    """The M teachers as adapters teacher-<task> on the one transformer; returns {task: the CFG
    its teacher samples with}: --teacher_guidance, else the CFG the teacher trained with."""
    for task, d in teacher_dirs.items():  # --teachers: any LoRA layout, or a hub id
        made_here = None if cfg.teachers else \
            f"python opd.py --stage teacher --task {task} --out {cfg.out}"
        load_lora(model.tr, d, f"teacher-{task}", made_here)
    given = parse_pairs(cfg.teacher_guidance)
    return {task: float(given.get(task, run_info(d, "guidance", cfg.guidance)))
            for task, d in teacher_dirs.items()}


def distill(cfg, model, tasks, teacher_dirs, name="student"):
    """Stage 2, Algorithm 1, into <out>/<name>: each round, every task's prompts, the student's
    rollouts from its own noise with every state supervised by that task's teacher, then ONE
    optimizer step on the round's gradient (--resume continues exactly)."""
    run = runs.start_run(cfg, model, name, "student")  # a new LoRA, B = 0: the base
    if run is None:  # finished before: its LoRA is reused
        return
    guidance_of = load_teachers_and_guidance(cfg, model, teacher_dirs)
    sampler = sampler_of(cfg)
    trajectory = distill_trajectory if cfg.two_pass else distill_trajectory_fused
    for r in runs.each_round(cfg, model, tasks, run):  # + validation, the text encoders ahead
        run.opt.zero_grad(set_to_none=True)
        row = {}  # the round's metrics: each task's loss, the gradient norm
        for m, task in enumerate(tasks):  # every task m, round-robin
            prompts = runs.my_share(draw_prompts(cfg, task, r, m, cfg.batch_size), run)
            g = rng(cfg.seed, "rollout", m, run.rank, step=r)  # the student's own noise
            row[f"loss_{task.name}"] = 0.0
            for half, s in micro_batches(len(prompts), cfg.micro_batch):  # half: the meter's
                ps, share = prompts[s], len(prompts[s]) / len(prompts)
                student = model.velocity("student", ps, cfg.guidance)
                teacher = model.velocity(f"teacher-{task.name}", ps, guidance_of[task.name])
                _, loss = trajectory(student, teacher, model.noise(len(ps), g), sampler, g,
                                     share / len(tasks))  # the gradient: a mean over tasks
                row[f"loss_{task.name}"] += loss * share
                run.conflict.mark(task.name, half)  # --log_conflict: the halves of a task
        row["grad_norm"] = runs.optimizer_step(cfg, run)  # averaged over the ranks, clipped
        runs.after_step(cfg, run, r + 1, row)  # EMA, time, log, checkpoint: no maths
    runs.finish_run(cfg, model, run, trajectories=run.step * len(tasks) * cfg.batch_size)


# ---------------------------------------------------------------------------------------------
# stage 1: a specialist teacher per task by RL, GRPO-Guard or DiffusionNFT (one LoRA each)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Samples:
    """One task's samples of an RL epoch on this rank."""
    task_name: str
    prompts: list              # (n,) the prompt of each image, n = K x batch_size / ranks
    traj: dict                 # rollout(): states (n, N+1, C, h, w), means, stds, logps
    advantages: torch.Tensor   # (n,) within each prompt's group (NFT: the batch's std)


def rl_sample(cfg, model, tasks, first, run):
    """The samples of the RL epoch at optimizer step `first`: per task, updates_per_epoch x
    batch_size trajectories, G images for each of its prompts. GRPO-Guard: SDE rollouts of the
    policy, every state kept; NFT: ODE samples of the 'old' adapter (x0 and the reward are used).
    Each image is scored by its own task's reward and its advantage computed within its prompt's
    group (NFT: with the std of the task's batch), so the tasks' reward scales never mix. (NFT
    samples with the noise level of its defaults row, 0.)
    Returns ([Samples] of this rank, the epoch's statistics: reward_<task>, its mean reward, and
    flat_groups_<task>, the share of its groups whose images all scored the same: their
    advantages are 0, they give no gradient)."""
    G, nft = cfg.group_size, cfg.algo == "nft"
    n = cfg.updates_per_epoch * cfg.batch_size  # the epoch's trajectories per task, all ranks
    sigmas, samples, rewards, flat_groups = sd3_sigmas(cfg.sampler_steps), [], {}, {}
    for m, task in enumerate(tasks):  # the epoch's prompts: draw number first // K
        draw = first // cfg.updates_per_epoch
        prompts = [p for p in draw_prompts(cfg, task, draw, m, n // G) for _ in range(G)]
        mine = runs.my_share(prompts, run)
        g = rng(cfg.seed, "rollout", m, run.rank, step=first)
        parts = []
        for s in chunks(len(mine), cfg.micro_batch):
            policy = model.velocity("old" if nft else "policy", mine[s], cfg.guidance)
            parts.append(rollout(policy, model.noise(len(mine[s]), g), sigmas, cfg.noise_level,
                                 g))
        traj = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        images = model.decode(traj["states"][:, -1])
        scores = gather(score(task, images, mine).to(model.device), run.world).cpu()  # all ranks
        adv = group_advantages(scores, torch.arange(len(prompts)) // G, global_std=nft)
        rewards[f"reward_{task.name}"] = scores.mean().item()
        all_same = scores.view(-1, G).std(1) == 0  # (prompts,) the groups with no gradient
        flat_groups[f"flat_groups_{task.name}"] = all_same.float().mean().item()
        samples.append(Samples(task.name, mine, traj, runs.my_share(adv, run).to(model.device)))
    return samples, {**rewards, **flat_groups}


def grpo_guard_update(cfg, model, samples, rows, run):
    """GRPO-Guard's gradient for one update on the samples `rows` (indices into each task's
    samples on this rank): the clipped ratio at the stored steps 0..N-2 in order, RatioNorm and
    1/|dt| (--no_ratio_norm: plain Flow-GRPO). Returns the update's statistics over all ranks as
    Flow-GRPO logs them: clipfrac (ratios outside the clip range), ratio_dev (mean |ratio - 1|),
    approx_kl (0.5 mean (log ratio)^2)."""
    N, b, sigmas = cfg.sampler_steps, len(rows), sd3_sigmas(cfg.sampler_steps)
    stats = torch.zeros(4, dtype=torch.float64, device=model.device)  # summed on the device
    for task_samples in samples:  # each task's
        traj = task_samples.traj
        for half, s in micro_batches(b, cfg.micro_batch):  # half: --log_conflict's
            idx = rows[s]
            states, adv = traj["states"][idx], task_samples.advantages[idx.to(model.device)]
            ps = [task_samples.prompts[index] for index in idx]
            policy = model.velocity("policy", ps, cfg.guidance)
            for j in range(N - 1):
                t, t_next, x = sigmas[j], sigmas[j + 1], states[:, j]
                mu, _ = transition(x, policy(x, t), t, t_next, cfg.noise_level)
                ratio = log_ratio(mu, traj["means"][idx, j], states[:, j + 1],
                                  traj["stds"][idx, j], not cfg.no_ratio_norm).exp()
                loss = clipped_loss(ratio, adv, cfg.clip_range)
                if not cfg.no_ratio_norm:  # every timestep contributes equally: / |dt_j|
                    loss = loss / abs(float(t_next - t))
                (loss.sum() / (b * len(samples) * (N - 1))).backward()
                dev = (ratio.detach().double() - 1).abs()
                stats += torch.stack([(dev > cfg.clip_range).sum(), dev.sum(),
                                      ratio.detach().double().log().pow(2).sum(),
                                      dev.new_tensor(len(dev))])
            run.conflict.mark(task_samples.task_name, half)  # --log_conflict
    clipped, abs_dev, log_sq, count = sum_over_ranks(stats, run.world).tolist()
    return dict(clipfrac=clipped / count, ratio_dev=abs_dev / count,
                approx_kl=0.5 * log_sq / count)


def nft_update(cfg, model, samples, rows, step, run):
    """DiffusionNFT's gradient for one update on the samples `rows`: per sample a random N - 1
    of the sampler's N times (nft_timesteps), each at x_t = (1 - t) x0 + t eps with fresh eps,
    the loss nft_loss against the old adapter, plus nft_kl x mean (v - v_ref)^2, the distance
    to the base's velocity (nft_kl 0: off)."""
    N, b, sigmas = cfg.sampler_steps, len(rows), sd3_sigmas(cfg.sampler_steps)
    for m, task_samples in enumerate(samples):  # task m's
        g = rng(cfg.seed, "nft", m, run.rank, step=step)  # times and fresh noise
        for half, s in micro_batches(b, cfg.micro_batch):  # half: --log_conflict's
            idx = rows[s]
            ps = [task_samples.prompts[index] for index in idx]
            x0 = task_samples.traj["states"][idx, -1]  # the samples' images (latents)
            optimality = nft_optimality(task_samples.advantages[idx.to(model.device)])
            policy = model.velocity("policy", ps, cfg.guidance)
            old = model.velocity("old", ps, cfg.guidance)
            base = model.velocity(None, ps, cfg.guidance)  # the base: adapters off
            times = nft_timesteps(len(idx), N, g)
            for col in range(N - 1):  # the col-th trained time of each sample
                t = sigmas[times[:, col]].to(x0.device)  # (B,) each sample's own time
                eps = torch.randn(x0.shape, generator=g).to(x0.device)
                x_t = (1 - bcast(t, x0)) * x0 + bcast(t, x0) * eps
                with torch.no_grad():
                    v_old, v_ref = old(x_t, t), (base(x_t, t) if cfg.nft_kl else None)
                v = policy(x_t, t)
                loss = nft_loss(v, v_old, eps - x0, t, optimality, cfg.nft_beta)
                if cfg.nft_kl:  # + KL to the base model: mean (v_theta - v_ref)^2
                    loss = loss + cfg.nft_kl * (v - v_ref).pow(2).flatten(1).mean(1)
                (loss.sum() / (b * len(samples) * (N - 1))).backward()
            run.conflict.mark(task_samples.task_name, half)  # --log_conflict
    return {}


def nft_decay(cfg, step):
    """The old adapter's decay after optimizer step `step`: 0 before FLAT, then min(RATE (step -
    FLAT), MAX) (DiffusionNFT: GenEval 0,0.001,0.5; OCR 75,0.0075,0.999)."""
    flat, rate, cap = (float(x) for x in cfg.nft_decay.split(","))
    return 0.0 if step < flat else min(rate * (step - flat), cap)


def nft_follow(cfg, run, step):
    """NFT's old adapter follows the trained one at an epoch's end:
    theta_old <- d theta_old + (1 - d) theta, with d = nft_decay at the step reached."""
    with torch.no_grad():
        for p_old, p in zip(run.aux, run.params):
            p_old.lerp_(p.detach(), 1 - nft_decay(cfg, step))


def train_rl(cfg, model, schedule, name):
    """Stage 1 into <out>/<name>: a teacher (schedule: its one task every epoch), or one LoRA on
    several tasks (baselines.py). Each epoch samples K = updates_per_epoch batches of the tasks
    in schedule[epoch], shuffles them on each rank and takes K optimizer steps, one per
    batch_size trajectories, as the public configs do: every update after the first trains on
    samples of an older policy, where the ratio, RatioNorm and the clip act. NFT's old adapter
    follows the trained one once per epoch."""
    run = runs.start_run(cfg, model, name, "policy", aux=("old",) if cfg.algo == "nft" else ())
    if run is None:  # finished before: its LoRA is reused
        return
    K, b = cfg.updates_per_epoch, cfg.batch_size // run.world
    for first in runs.each_epoch(cfg, model, schedule, run):  # + validation, text encoders ahead
        with runs.epoch_start_weights(run, first):  # resumed inside the epoch: the saved ones
            samples, epoch_stats = rl_sample(cfg, model, schedule[first // K], first, run)
        order = torch.randperm(K * b, generator=rng(cfg.seed, "shuffle", run.rank, step=first))
        for u, step in enumerate(range(first, first + K)):  # K updates of batch_size each
            if step < run.start:  # resumed inside this epoch: taken before the stop
                continue
            runs.stop_inside_epoch(cfg, model, run, step)  # a stop signal: checkpoint, stop
            rows = order[u * b:(u + 1) * b]
            run.opt.zero_grad(set_to_none=True)
            stats = grpo_guard_update(cfg, model, samples, rows, run) \
                if cfg.algo == "grpo_guard" else nft_update(cfg, model, samples, rows, step, run)
            grad_norm = runs.optimizer_step(cfg, run)  # averaged over the ranks, clipped
            if cfg.algo == "nft" and u == K - 1:  # the epoch's end: NFT's old adapter follows
                nft_follow(cfg, run, first + K)
            row = {**(epoch_stats if u == 0 else {}), "grad_norm": grad_norm, **stats}
            runs.after_step(cfg, run, step + 1, row)  # EMA, time, log, checkpoint: no maths
    trajectories = sum(len(schedule[e]) for e in range(run.step // K)) * K * cfg.batch_size
    runs.finish_run(cfg, model, run, trajectories=trajectories)


# ---------------------------------------------------------------------------------------------
# main: every stage's options checked before any model loads, then the stages
# ---------------------------------------------------------------------------------------------
def run_stages(cfg):
    stages = ["teacher", "distill", "eval"] if cfg.stage == "all" else [cfg.stage]
    runs.preflight(cfg, stages)
    model, tasks = runs.setup(cfg, stages[0])
    for stage in stages:
        c = resolve(cfg, stage)
        if stage == "teacher":
            for task in tasks:  # one LoRA per task, its one task every epoch
                epochs = c.optim_steps // c.updates_per_epoch
                train_rl(c, model, [[task]] * epochs, f"teacher-{task.name}")
        elif stage == "distill":
            name = "student" if c.loss == "closed" else f"student-{c.loss}"
            distill(c, model, tasks, runs.teacher_dirs(c, [task.name for task in tasks]), name)
        else:
            return evaluation.evaluate(c, model, tasks, parse_pairs(c.lora))


def main(argv=None):
    cli(run_stages, parse_config, argv)


if __name__ == "__main__":
    main()
