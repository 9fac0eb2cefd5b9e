"""
DiffusionOPD: on-policy distillation of several RL-trained teachers into one flow-matching
text-to-image student (Stable Diffusion 3 / 3.5). One file, read top to bottom:
config -> maths -> models -> tasks -> checkpoints -> stage 1 (teachers) -> stage 2 (distill)
-> eval -> main.

Run manual
----------
Tiny, offline, CPU (a random-weight SD3 built from configs, weight-free toy rewards):
    python opd.py                      # teachers for color/position/jpeg, distill, eval: ~4 min
    python opd.py --stage teacher --task color --out runs/x          # one teacher, ~1.5 min
    torchrun --nproc_per_node=2 opd.py --stage teacher --task color --out runs/y
    python opd.py --stage distill --teachers color=runs/tiny/teacher-color,... --out runs/tiny
    python opd.py --stage eval --out runs/tiny          # eval.json, eval.md, samples.png
One GPU, the real SD3.5-Medium (weights from the hub or a local folder):
    python opd.py --model stabilityai/stable-diffusion-3.5-medium --stage teacher --task ocr \
        --prompts ocr_train.txt --test_prompts ocr_test.txt --resolution 512 ...
Eight GPUs (the paper's stage 2):
    torchrun --nproc_per_node=8 opd.py --model stabilityai/stable-diffusion-3.5-medium \
        --stage distill --teachers geneval=DIR,ocr=DIR,aesthetic=DIR ...
See README.md for the full ladder, the settings of the paper and the numbers to expect.

Simplifications (and why)
-------------------------
1. Teachers and student are LoRA adapters on ONE transformer (peft); switching adapters switches
   models, so M teachers cost one model's memory.
2. Stage 1 is GRPO-Guard (Flow-GRPO + RatioNorm + 1/|dt| reweighting) for every task; the paper
   used DiffusionNFT for its GenEval teacher. Any teacher LoRA can be passed to stage 2.
3. Per-step losses are averaged over latent elements (as the public code), not summed (as the
   paper's equations): a constant factor per resolution, absorbed by Adam.
4. The tiny default model has random weights and its tasks have toy rewards (colour, position,
   JPEG size). Its numbers show that the machinery works, not what SD3.5 reaches.
"""
import math

import torch

# ----------------------------------------------------------------------------------------------
# maths: the flow-matching SDE/ODE step, log-densities, the closed-form OPD loss, PPO, GRPO-Guard
# Paper symbols -> code: t_j -> t, t_{j+1} -> t_next, dt_j -> dt, a -> noise_level,
# sigma_t -> sigma, sigma-bar_j (full transition std) -> std, mu_j -> mu, x_j -> x.
# Convention: t = 1 is pure noise, t = 0 is data; x_t = (1 - t) x0 + t eps; v = eps - x0.
# ----------------------------------------------------------------------------------------------


def sd3_sigmas(num_steps, shift=3.0, num_train_timesteps=1000):
    """The sampler's times 1 = t_0 > ... > t_N = 0 of diffusers' FlowMatchEulerDiscreteScheduler
    (SD3: shift 3.0, no dynamic shifting). Returns (N + 1,) float32."""
    shifted = lambda s: shift * s / (1 + (shift - 1) * s)
    t_min = shifted(1.0 / num_train_timesteps)  # the scheduler's smallest training time
    # evenly spaced in the already shifted range, then shifted once more, as diffusers does
    t = shifted(torch.linspace(1.0, t_min, num_steps, dtype=torch.float64))
    return torch.cat([t, t.new_zeros(1)]).float()


def _bcast(s, x):
    """A scalar or (B,) tensor -> shape (B, 1, 1, ...) to broadcast against x, fp32."""
    s = torch.as_tensor(s, dtype=torch.float32, device=x.device)
    return s.reshape(s.shape + (1,) * (x.dim() - s.dim())) if s.dim() else s


def transition(x, v, t, t_next, noise_level):
    """Mean and std of the Gaussian transition p(x_{j+1} | x_j) of the flow-matching SDE
    (Flow-GRPO's Euler-Maruyama form) from time t to t_next. x, v: (B, ...) state and velocity;
    t, t_next: floats or (B,). Returns (mu, std): mu fp32 like x, std (B,) the full transition
    std (sigma-bar_j). noise_level = 0 is the Euler ODE step with std = 0."""
    x, v = x.float(), v.float()
    B = x.shape[0]
    tt, tn = _bcast(t, x), _bcast(t_next, x)
    dt = tn - tt  # < 0
    if noise_level == 0:
        # ODE: mu_j = x_j + v dt
        return x + v * dt, x.new_zeros(B)
    # sigma_t = a sqrt(t / (1 - t)); at t = 1 the denominator uses 1 - t_{j+1} instead
    sigma = noise_level * torch.sqrt(tt / torch.where(tt >= 1, 1 - tn, 1 - tt))
    # mu_j = x_j + [v + sigma_t^2 / (2t) (x_j + (1 - t) v)] dt
    mu = x + (v + sigma**2 / (2 * tt) * (x + (1 - tt) * v)) * dt
    # std_j = sigma_t sqrt(-dt)
    std = (sigma * torch.sqrt(-dt)).expand(B, *[1] * (x.dim() - 1)).reshape(B)
    return mu, std


def sde_step(x, v, t, t_next, noise_level, noise=None, generator=None):
    """One step x_j -> x_{j+1}: returns (x_next, mu, std), fp32. With noise_level = 0 it is the
    plain Euler ODE step and draws no noise."""
    mu, std = transition(x, v, t, t_next, noise_level)
    if noise_level == 0:
        return mu, mu, std
    if noise is None:
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=torch.float32)
    # x_{j+1} = mu_j + std_j eps_j,  eps_j ~ N(0, I)
    return mu + _bcast(std, mu) * noise, mu, std


def gaussian_logp(x_next, mu, std, reduce="mean"):
    """log N(x_next; mu, std^2 I) per sample, (B,). reduce='mean' averages the per-element
    log-density over latent elements (Flow-GRPO's convention: its tiny clip ranges assume it);
    reduce='sum' is the true log-density of the transition."""
    s = _bcast(std, x_next)
    # log p = -(x - mu)^2 / (2 s^2) - log s - log sqrt(2 pi), per element
    lp = -((x_next.float() - mu) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    return lp.mean(1) if reduce == "mean" else lp.sum(1)


def opd_loss(mu_s, mu_t, std):
    """The closed-form per-step KL between student and teacher transitions, (B,).
    SDE (paper Eq. 11): KL(N(mu_S, s^2 I) || N(mu_T, s^2 I)) = ||mu_S - mu_T||^2 / (2 s^2).
    ODE (paper Eq. 12, std = 0): 1/2 ||mu_S - mu_T||^2.
    Reduction: the squared norm is averaged over latent elements (public code), i.e. the paper's
    KL divided by the number of elements D. The teacher target is cast to fp32."""
    d2 = (mu_s.float() - mu_t.float()).pow(2).flatten(1).mean(1)  # ||mu_S - mu_T||^2 / D
    std = std.float()
    # ODE rows (std = 0) use weight 1/2; SDE rows 1 / (2 s^2)
    w = torch.where(std > 0, 1 / (2 * std.clamp_min(1e-20) ** 2), torch.full_like(std, 0.5))
    return w * d2


def ppo_surrogate(delta, logp, logp_old):
    """PPO-style surrogate of the per-step teacher 'reward' Delta_j (paper section 3.3), (B,):
    L_PG = rho_j Delta_j,  rho_j = pi_theta(a_j | x_j) / pi_old(a_j | x_j).
    On-policy rho = 1 at the sampled a_j, but grad rho = rho grad log pi, so a single sample's
    gradient carries the extra term Delta_j grad log pi (zero mean, variance ~ 1/std)."""
    return torch.exp(logp - logp_old.detach()) * delta


def group_advantages(rewards, groups, clip=5.0, eps=1e-4):
    """Group-relative advantages (GRPO): A = (r - mean_group) / (std_group + 1e-4), clipped to
    [-clip, clip]. rewards (B,), groups (B,) integer group ids (one group per prompt)."""
    rewards = rewards.float()
    adv = torch.zeros_like(rewards)
    for g in groups.unique():
        m = groups == g
        r = rewards[m]
        adv[m] = (r - r.mean()) / (r.std(unbiased=False) + eps)
    return adv.clamp(-clip, clip)


def grpo_loss(mu, mu_old, x_next, std, dt, adv, clip_range, ratio_norm=True, dt_reweight=True):
    """GRPO-Guard's clipped policy loss for one denoising step, (B,). mu: the trained policy's
    mean (with grad); mu_old, x_next, std: stored from the rollout; dt: t_{j+1} - t_j.
    ratio_norm=False and dt_reweight=False give plain Flow-GRPO."""
    s = _bcast(std, mu)
    if ratio_norm:
        # RatioNorm: log r_hat = mean(eps * (mu_theta - mu_old)), eps = (x_{j+1} - mu_old) / s;
        # the left shift -mean(dmu^2)/(2 s^2) is removed and the 1/s scale undone, per sample
        eps = (x_next - mu_old) / s
        log_ratio = (eps * (mu.float() - mu_old)).flatten(1).mean(1)
    else:
        # Flow-GRPO: log r = log p_theta(x_{j+1}) - log p_old(x_{j+1}), element-mean convention
        log_ratio = gaussian_logp(x_next, mu, std) - gaussian_logp(x_next, mu_old, std)
    ratio = torch.exp(log_ratio)
    # L = max(-A r, -A clip(r, 1 - e, 1 + e))
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    if dt_reweight:
        # every timestep contributes equally: divide by |dt_j|
        loss = loss / abs(float(dt))
    return loss


# ----------------------------------------------------------------------------------------------
# trajectories: generic over a velocity function velocity(x, t) -> v, so the 2D toy in
# sanity.py and the SD3 transformer run the very same sampler and the very same OPD loss.
# ----------------------------------------------------------------------------------------------


def rollout(velocity, x, sigmas, noise_level, generator=None):
    """Sample one batch of trajectories, no grad. Returns a dict with
    states (B, N+1, ...) all states x_0..x_N (x_N is the sample), means (B, N, ...),
    stds (B, N) and logps (B, N) (element-mean log-density of each taken step; 0 for the ODE)."""
    states, means, stds, logps = [x.float()], [], [], []
    with torch.no_grad():
        for j in range(len(sigmas) - 1):
            x_next, mu, std = sde_step(x, velocity(x, sigmas[j]), sigmas[j], sigmas[j + 1],
                                       noise_level, generator=generator)
            lp = gaussian_logp(x_next, mu, std) if noise_level > 0 else torch.zeros_like(std)
            states.append(x_next); means.append(mu); stds.append(std); logps.append(lp)
            x = x_next
    return dict(states=torch.stack(states, 1), means=torch.stack(means, 1),
                stds=torch.stack(stds, 1), logps=torch.stack(logps, 1))


def step_loss(mu_s, mu_t, std, x_next, loss="closed"):
    """Per-sample loss of one step (B,): the closed-form KL, or its PPO-style surrogate, whose
    action a_j = x_{j+1} is the state the rollout actually took (true log-density: a sum)."""
    delta = opd_loss(mu_s, mu_t, std)
    if loss == "closed":
        return delta
    logp = gaussian_logp(x_next.detach(), mu_s, std, reduce="sum")
    return ppo_surrogate(delta, logp, logp.detach())


def distill_trajectory(student, teacher, x, sigmas, noise_level, train_steps, loss="closed",
                       backward=None, two_pass=False, generator=None):
    """On-policy distillation on one batch of student trajectories (paper Eq. 11/12).
    The student rolls out from x (B, ...); on every state x_j it visits with j in train_steps,
    the teacher's mean mu_T(x_j) (no grad, fp32) is the target of the closed-form loss.
    Fused (default): the step's loss is computed during the rollout (student forward with grad
    at x_j, then the state is detached); two_pass: roll out without grad first, then recompute
    the student's means on the stored states (the paper's code). Same gradient, since the
    parameters do not change inside a round. Each step's loss (mean over the batch, divided by
    the number of trained steps) goes to backward(loss) when given (freeing each step's graph),
    else is summed and returned (a tensor). Returns (x_N, loss)."""
    n, total, logged = len(train_steps), 0.0, 0.0
    traj = rollout(student, x, sigmas, noise_level, generator) if two_pass else None
    for j in range(len(sigmas) - 1):
        t, t_next, train = sigmas[j], sigmas[j + 1], j in train_steps
        if two_pass and not train:
            continue
        with torch.set_grad_enabled(train):
            if two_pass:  # recompute the student's mean on the stored state
                x, x_next = traj["states"][:, j], traj["states"][:, j + 1]
                mu_s, std = transition(x, student(x, t), t, t_next, noise_level)
            else:  # fused: the step taken is the one trained
                x_next, mu_s, std = sde_step(x, student(x, t), t, t_next, noise_level,
                                             generator=generator)
        if train:
            with torch.no_grad():
                mu_t, _ = transition(x, teacher(x, t), t, t_next, noise_level)
            l = step_loss(mu_s, mu_t, std, x_next, loss).mean() / n
            logged += float(l.detach())
            if backward is not None:
                backward(l)
            else:
                total = total + l
        x = x_next.detach()
    x_final = traj["states"][:, -1] if two_pass else x
    return x_final, (total if backward is None else logged)
