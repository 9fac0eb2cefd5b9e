"""
DiffusionOPD: on-policy distillation of several RL-trained teachers into one flow-matching
text-to-image student (Stable Diffusion 3 / 3.5). One file, read top to bottom:
config -> maths -> models -> tasks -> checkpoints -> stage 1 (teachers) -> stage 2 (distill)
-> eval -> main.

Run manual
----------
Tiny, offline, CPU (an SD3 built from configs, pretrained ~60 s once on toy images, toy rewards):
    python opd.py                      # teachers for color/position/jpeg, distill, eval: ~4-5 min
    python opd.py --stage teacher --task color --out runs/x          # one teacher, ~35 s
    python opd.py --stage bench        # fused vs --two_pass round time, memory of M teachers
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
4. The tiny default model is built from configs and pretrained for ~60 s on synthetic captioned
   images (cached); its tasks have toy rewards (colour, position, JPEG size). Its numbers show
   that the machinery works, not what SD3.5 reaches. There the student's LoRA also adapts the
   AdaLN and text-projection layers (the teachers' is the paper's, attention only): one adapter of a
   2-block model must hold three prompt-dependent behaviours (STAGE_DEFAULTS says what it bought).
"""
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time

import torch


# ----------------------------------------------------------------------------------------------
# config: one flat dataclass; None means "the stage's default" (STAGE_DEFAULTS, printed resolved)
# ----------------------------------------------------------------------------------------------
def _f(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Config:
    stage: str = _f("all", "teacher | distill | eval | all (teachers for --tasks, distill, eval) | bench")
    task: str = _f("color", "the task of --stage teacher")
    tasks: str = _f("color,position,jpeg", "comma-separated tasks of --stage all / eval")
    teachers: str = _f("", "--stage distill: task=DIR,... (default: <out>/teacher-<task> for --tasks)")
    lora: str = _f("", "--stage eval: extra NAME=DIR LoRAs to evaluate")
    model: str = _f("tiny", "tiny | sd35m-random | a hub id or local folder of an SD3 pipeline")
    out: str = _f("runs/tiny", "output folder")
    prompts: str = _f("", "real tasks: train prompts (txt, one a line, or GenEval metadata jsonl)")
    test_prompts: str = _f("", "real tasks: held-out prompts (default: every 10th of --prompts)")
    reward: str = _f("", "reward spec overriding the task's (see rewards.py --list)")
    steps: int = _f(None, "optimizer steps of the stage (teacher 60, distill 60 on tiny)")
    seed: int = _f(0, "random seed (LoRA init, prompts and noise per step; the tiny model is fixed)")
    noise_level: float = _f(None, "SDE noise level a (teacher 0.7, distill 0 = ODE)")
    num_steps: int = _f(10, "sampler steps of training rollouts")
    eval_steps: int = _f(40, "sampler steps of evaluation (ODE)")
    guidance: float = _f(4.5, "classifier-free guidance scale (1 = off)")
    teacher_guidance: str = _f("", "per-teacher CFG for distill targets, e.g. geneval=1.0")
    resolution: int = _f(None, "image size in pixels (tiny 32, others 512)")
    max_seq_len: int = _f(None, "T5 tokens (tiny 8, others 128)")
    lora_rank: int = _f(32, "LoRA rank r")
    lora_targets: str = _f(None, "LoRA target modules, comma-separated (the paper's: attention projections; "
                                 "tiny distill adds the AdaLN and text projections)")
    lora_alpha: int = _f(64, "LoRA alpha")
    lr: float = _f(None, "AdamW learning rate (teacher 1e-4, distill 3e-4; tiny: 1e-3, 3e-3)")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    grad_clip: float = _f(1.0, "gradient norm clip")
    batch_size: int = _f(None, "images per optimizer step and task, over all ranks (tiny: teacher 24, distill 16)")
    group_size: int = _f(None, "teacher: images per prompt, one GRPO group (tiny 12, paper 24)")
    clip_range: float = _f(2e-6, "teacher: PPO clip range on the (normalised) ratio")
    inner_epochs: int = _f(1, "teacher: optimizer steps on each sampled batch")
    no_ratio_norm: bool = _f(False, "teacher: plain Flow-GRPO ratio (no RatioNorm, no 1/|dt|)")
    loss: str = _f("closed", "distill: closed (closed-form KL) | ppo (PPO-style surrogate)")
    two_pass: bool = _f(False, "distill: roll out, then recompute (reference) instead of fused")
    train_steps: str = _f("", "distill: sampler steps with a loss, e.g. 0-8 or 0,2,4 (default all but last)")
    eval_batch: int = _f(16, "eval: images per forward")
    eval_prompts: int = _f(0, "eval: use at most this many test prompts per task (0 = all)")
    eval_seeds: int = _f(4, "eval: images per test prompt (GenEval uses 4)")
    save_every: int = _f(20, "save a checkpoint every N optimizer steps (and at the end)")
    resume: bool = _f(False, "continue from the latest checkpoint in the stage's folder")
    overwrite: bool = _f(False, "redo a stage whose output exists")
    max_bad_steps: int = _f(5, "abort after this many non-finite steps in a row")
    ema: float = _f(None, "EMA decay of the trained LoRA, which is what gets saved and evaluated (0 = off; 0.9)")
    ema_every: int = _f(None, "update the EMA every N optimizer steps (8 as Flow-GRPO; tiny 1)")
    device: str = _f("auto", "auto | cpu | cuda")


# the paper's LoRA targets (peft matches name suffixes: attn and attn2 of dual-attention blocks)
ATTN_TARGETS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"

STAGE_DEFAULTS = {  # field -> {stage or (stage, model kind): value}; "*" for any stage
    "noise_level": {"teacher": 0.7, "distill": 0.0, "*": 0.0},
    "steps": {("teacher", "tiny"): 60, ("distill", "tiny"): 60, "teacher": 1000, "distill": 1000, "bench": 3, "*": 0},
    "lr": {("teacher", "tiny"): 1e-3, ("distill", "tiny"): 3e-3, "teacher": 1e-4, "distill": 3e-4, "*": 0.0},
    "batch_size": {("teacher", "tiny"): 24, ("distill", "tiny"): 16, "tiny": 32, "*": 24},
    "group_size": {"tiny": 12, "*": 24},
    "resolution": {"tiny": 32, "*": 512},
    "max_seq_len": {"tiny": 8, "*": 128},
    # the paper's targets, the attention projections; on the tiny model (2 blocks of width 32) the
    # student, which must hold all M teachers in one adapter, also adapts the prompt's way in: the
    # AdaLN modulation (pooled prompt and time) and the text projections. With attention alone it
    # kept 79-82% of the jpeg teacher's gain, 99% when distilled from that teacher alone.
    "lora_targets": {("distill", "tiny"): ATTN_TARGETS + ",norm1.linear,norm1_context.linear,norm_out.linear,"
                                                         "context_embedder,text_embedder.linear_1,text_embedder.linear_2",
                     "*": ATTN_TARGETS},
    "ema": {"*": 0.9},
    "ema_every": {"tiny": 1, "*": 8},
}


class UserError(Exception):
    """Bad input: main() prints the message as one line and exits with code 2."""


def parse_config(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="DiffusionOPD (see the top of opd.py)")
    for f in dataclasses.fields(Config):
        if f.type in (bool, "bool"):
            ap.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            ap.add_argument(f"--{f.name}", type=typ, default=f.default, help=f.metadata["help"])
    return Config(**vars(ap.parse_args(argv)))


def resolve(cfg, stage):
    """A copy of cfg with the stage's defaults filled in, checked."""
    kind = "tiny" if cfg.model == "tiny" else "real"
    c = dataclasses.replace(cfg)
    for name, table in STAGE_DEFAULTS.items():
        if getattr(c, name) is None:
            for key in [(stage, kind), stage, kind, "*"]:
                if key in table:
                    setattr(c, name, table[key]); break
    if c.stage not in ("teacher", "distill", "eval", "all", "bench"):
        raise UserError(f"unknown stage {c.stage!r} (teacher, distill, eval, all or bench)")
    if c.noise_level < 0:
        raise UserError(f"--noise_level must be >= 0, got {c.noise_level}")
    if c.loss not in ("closed", "ppo"):
        raise UserError(f"unknown --loss {c.loss!r} (closed or ppo)")
    if stage == "distill" and c.loss == "ppo" and c.noise_level == 0:
        raise UserError("--loss ppo needs --noise_level > 0: the ODE step has no density")
    if min(c.num_steps, c.eval_steps, c.eval_seeds, c.batch_size, c.group_size, c.lora_rank, c.ema_every) < 1:
        raise UserError("--num_steps, --eval_steps, --eval_seeds, --batch_size, --group_size, --lora_rank, "
                        "--ema_every must be >= 1")
    if not c.lora_targets.strip(", "):
        raise UserError("--lora_targets is empty")
    if not 0 <= c.ema < 1:
        raise UserError(f"--ema must be in [0, 1), got {c.ema}")
    if stage == "teacher" and c.batch_size % c.group_size:
        raise UserError(f"--batch_size {c.batch_size} is not a multiple of --group_size {c.group_size}")
    return c

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
        dev = generator.device if generator is not None else mu.device  # a CPU generator on a GPU run
        noise = torch.randn(mu.shape, generator=generator, device=dev, dtype=torch.float32).to(mu.device)
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


# ----------------------------------------------------------------------------------------------
# distributed: torchrun sets RANK/WORLD_SIZE; one process otherwise. gloo on CPU, nccl on GPU.
# ----------------------------------------------------------------------------------------------
def dist_setup(device):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def gather(x, world):
    """Concatenate a (b, ...) tensor from every rank in rank order."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def rng(*key):
    """A CPU generator seeded from (seed, step, purpose, rank): every step's randomness is a
    function of the step counter, so a resumed run draws exactly what an uninterrupted one would."""
    h = 0
    for k in key:
        h = (h * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(h)


# ----------------------------------------------------------------------------------------------
# models: the real SD3 pipeline from the hub / a folder, or the same classes built from configs
# ----------------------------------------------------------------------------------------------
LORA_FILE = "pytorch_lora_weights.safetensors"


def _quiet_hf():
    import warnings
    from diffusers.utils import logging as dl
    from rewards import _quiet
    _quiet()  # transformers: errors only, no progress bars
    dl.set_verbosity_error(); dl.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")  # M adapters, on purpose


def _toy_tokenizer():
    """A real CLIPTokenizer without files: a byte-level vocab (2 specials, 256 byte chars, the
    same with </w>) plus BPE merges that make each word of the toy prompts one token, as a
    trained CLIP vocab does for common words ('left' and 'right' are then not mostly the same
    bytes)."""
    from transformers import CLIPTokenizer
    from rewards import COLORS, SIDES, SUBJECTS
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in bs] + [chr(256 + n) for n in range(256 - len(bs))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ["", "</w>"]:
        for c in chars:
            vocab[c + suffix] = len(vocab)
    merges = []
    words = [*COLORS, *SIDES, *SUBJECTS, *TOY_ADJECTIVES, "a", "bright", "on", "the", "picture", "of"]
    for w in sorted(words, key=len, reverse=True):  # longer first: 'bright' must not end in 'right'
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_offline(kind, seed=0):
    """A StableDiffusion3Pipeline with random weights, built from configs (nothing downloaded).
    kind 'tiny': ~0.1M-param transformer, 2x-downsampling VAE (runs on CPU in seconds).
    kind 'sd35m-random': SD3.5-Medium's published transformer config (~2.5B params) with tiny
    text encoders of the real widths and a tiny VAE: speed and memory of the real transformer."""
    _quiet_hf()
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    tok = _toy_tokenizer()
    if kind == "tiny":
        widths, tcfg = [(32, 32), (32, 32)], dict(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
            caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32,
            dual_attention_layers=(0,), qk_norm="rms_norm")
        blocks, vae_ch = 2, 16
    else:  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
        widths, tcfg = [(64, 768), (64, 1280)], dict(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
            caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
        blocks, vae_ch = 4, 16  # VAE scale factor 8 as the real one
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=p, bos_token_id=0,
        eos_token_id=1, pad_token_id=1, dropout=0.0, attention_dropout=0.0)).eval()
        for h, p in widths]
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(vae_ch,) * blocks,
                        layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=32,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**tcfg).eval(), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=encoders[0],
        tokenizer=tok, text_encoder_2=encoders[1], tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)


def toy_images(n, g):
    """n captioned 32x32 images for pretraining the tiny model: a flat background that is half
    the colour the caption names, the side it names brighter, a little pixel noise. The toy
    tasks ask for more than this data shows (the pure colour, a strong contrast, no noise)."""
    from rewards import COLORS, SIDES, SUBJECTS
    u = lambda: torch.rand((), generator=g).item()
    pick = lambda xs: xs[int(u() * len(xs))]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    ramp = {"left": -xx, "right": xx, "top": -yy, "bottom": yy}
    ims, caps = [], []
    for _ in range(n):
        c, s, side, adj = pick(list(COLORS)), pick(SUBJECTS), pick(SIDES), pick(TOY_ADJECTIVES)
        form = pick(["{c} {s}", "bright {s} on the {side}", "{adj} picture of a {s}", "{c} {s} on the {side}", ""])
        caps.append(("a " + form.format(c=c, s=s, side=side, adj=adj)) if form else "")
        col = torch.tensor(COLORS[c] if "{c}" in form else [u(), u(), u()], dtype=torch.float32)
        im = 0.5 * (0.2 + 0.6 * torch.rand(3, 1, 1, generator=g)) + 0.5 * col.view(3, 1, 1)
        im = im + (0.4 if "{side}" in form else 0.1 * u()) * ramp[side]
        ims.append((im + 0.05 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1))
    return torch.stack(ims), caps


def pretrain_tiny(pipe, vae_steps=150, steps=500, seed=0):
    """About 60 s on 2 CPU cores: the VAE as an autoencoder on toy_images, its latent scale and
    shift from data, then the transformer and both CLIP text encoders together by flow matching
    (v = eps - x0, logit-normal t, 10% empty captions for CFG). Without this, a random tiny SD3
    barely reacts to its prompt (1% of the velocity between 'left' and 'right') and its VAE
    cannot change an image's mean colour; with the text encoders frozen at random, 500 steps
    teach colour but not the side (a position reward of 0.04 against 0.44 when they train)."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    vae, tr, encoders = pipe.vae, pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2]
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for _ in range(vae_steps):
        x = toy_images(32, g)[0] * 2 - 1
        z = vae.encode(x).latent_dist.mean
        loss = F.mse_loss(vae.decode(z + 0.1 * torch.randn(z.shape, generator=g)).sample, x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(toy_images(256, g)[0] * 2 - 1).latent_dist.mean
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1 / z.std().item())
    models = [tr, *encoders]
    params = [p for mod in models for p in mod.parameters()]
    for mod in models:
        mod.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        ims, caps = toy_images(64, g)
        caps = [c if keep else "" for c, keep in zip(caps, (torch.rand(64, generator=g) > 0.1).tolist())]
        uniq = list(dict.fromkeys(caps))
        e, _, p, _ = pipe.encode_prompt(uniq, None, None, device="cpu", do_classifier_free_guidance=False,
                                        max_sequence_length=8)  # with grad: the encoders learn too
        row = {c: i for i, c in enumerate(uniq)}
        pick = torch.tensor([row[c] for c in caps])
        with torch.no_grad():
            x0 = (vae.encode(ims * 2 - 1).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        t = torch.sigmoid(torch.randn(64, generator=g)).view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=g)
        v = tr(hidden_states=(1 - t) * x0 + t * eps, timestep=t.flatten() * 1000, encoder_hidden_states=e[pick],
               pooled_projections=p[pick], return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    for mod in models:
        mod.eval().requires_grad_(False)
    return loss.item()


TINY_RECIPE = "tiny-v4"  # bump when build_offline("tiny") or pretrain_tiny change


def tiny_pipeline(rank=0, world=1):
    """The tiny default: build_offline("tiny") pretrained once by pretrain_tiny, then cached as
    safetensors (in $OPD_CACHE, default ~/.cache/diffusion-opd) and loaded by every later run
    and every rank, so all of them use the same weights."""
    from safetensors.torch import load_file, save_file
    cache = os.environ.get("OPD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "diffusion-opd")
    path = os.path.join(cache, TINY_RECIPE + ".safetensors")
    pipe = build_offline("tiny")
    parts = {"transformer": pipe.transformer, "vae": pipe.vae, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2}
    if rank == 0 and not os.path.isfile(path):
        say(0, f"pretraining the tiny model once (~60 s), cached at {path}")
        t0 = time.time()
        with torch.random.fork_rng():
            loss = pretrain_tiny(pipe)
        state = {f"{k}.{n}": v.detach().contiguous() for k, mod in parts.items() for n, v in mod.state_dict().items()}
        meta = {"scaling_factor": str(pipe.vae.config.scaling_factor), "shift_factor": str(pipe.vae.config.shift_factor)}
        os.makedirs(cache, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
        say(0, f"tiny model pretrained in {time.time() - t0:.0f}s (flow-matching loss {loss:.3f})")
    _barrier(world)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    state = load_file(path)
    for k, mod in parts.items():
        mod.load_state_dict({n[len(k) + 1:]: v for n, v in state.items() if n.startswith(k + ".")})
    pipe.vae.register_to_config(scaling_factor=float(meta["scaling_factor"]), shift_factor=float(meta["shift_factor"]))
    return pipe


def load_pipeline(cfg, device, rank=0, world=1):
    """The pipeline named by --model, on device: fp32 on CPU, bf16 on GPU."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if cfg.model == "tiny":
        pipe = tiny_pipeline(rank, world)
    elif cfg.model == "sd35m-random":
        pipe = build_offline(cfg.model)
    else:
        _quiet_hf()
        from diffusers import StableDiffusion3Pipeline
        import warnings
        try:
            with warnings.catch_warnings():  # newer diffusers renamed torch_dtype
                warnings.simplefilter("ignore", FutureWarning)
                pipe = StableDiffusion3Pipeline.from_pretrained(cfg.model, torch_dtype=dtype)
        except Exception as e:  # offline and not cached, bad folder, gated repo, ...
            raise UserError(f"cannot load model {cfg.model!r} ({type(e).__name__}): download it once "
                            f"with network access (huggingface-cli download {cfg.model}) or pass a "
                            f"local folder holding a StableDiffusion3Pipeline") from None
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if m is not None:
            m.requires_grad_(False).eval().to(device, dtype)
    return pipe


class SD3:
    """The pipeline's pieces as the maths needs them: cached prompt embeddings, velocity
    closures (CFG included) for any adapter, latent noise and decoding to images."""

    def __init__(self, pipe, cfg, device):
        self.pipe, self.cfg, self.device = pipe, cfg, device
        self.tr = pipe.transformer
        self.dtype = self.tr.dtype
        self.cache = {}
        self.active = "?"
        self.trainable = []  # the adapter weights being trained
        self.latent = (self.tr.config.in_channels, cfg.resolution // pipe.vae_scale_factor,
                       cfg.resolution // pipe.vae_scale_factor)

    def encode(self, prompts, batch=64):
        """Encode prompts not yet cached (the text encoders are frozen): kept on CPU."""
        todo = [p for p in dict.fromkeys([""] + list(prompts)) if p not in self.cache]
        with torch.no_grad():
            for i in range(0, len(todo), batch):
                chunk = todo[i:i + batch]
                emb, _, pooled, _ = self.pipe.encode_prompt(
                    chunk, None, None, device=self.device, do_classifier_free_guidance=False,
                    max_sequence_length=self.cfg.max_seq_len)
                for p, e, q in zip(chunk, emb.cpu(), pooled.cpu()):
                    self.cache[p] = (e, q)

    def offload_text_encoders(self):
        """After encoding, the text encoders leave the GPU."""
        if self.device.type == "cuda":
            for m in (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3):
                if m is not None:
                    m.to("cpu")
            torch.cuda.empty_cache()

    def use(self, adapter):
        """Make an adapter active (None = the base model). peft makes the active adapter's
        weights, and only those, require grad; we undo that: only self.trainable does. (A
        leaf that stops requiring grad between forward and backward gets no gradient.)"""
        if adapter == self.active:
            return
        if adapter is None:
            self.tr.disable_adapters()
        else:
            self.tr.enable_adapters()
            self.tr.set_adapter(adapter)
        self.active = adapter
        for n, p in self.tr.named_parameters():
            if "lora_" in n:
                p.requires_grad_(False)
        for p in self.trainable:
            p.requires_grad_(True)

    def velocity(self, adapter, prompts, guidance, module=None):
        """velocity(x, t) of the model with this adapter on these prompts, CFG with the empty
        negative prompt. module: the forward to call (a DDP wrapper of the transformer)."""
        self.encode(prompts)
        emb = torch.stack([self.cache[p][0] for p in prompts]).to(self.device)   # (B, L, D)
        pooled = torch.stack([self.cache[p][1] for p in prompts]).to(self.device)  # (B, P)
        if guidance != 1:
            ne, npool = self.cache[""]
            emb = torch.cat([ne.to(self.device).expand_as(emb), emb])  # (2B, L, D) [uncond; cond]
            pooled = torch.cat([npool.to(self.device).expand_as(pooled), pooled])
        module = module or self.tr
        autocast = (torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())

        def v(x, t):
            self.use(adapter)
            xin = torch.cat([x, x]) if guidance != 1 else x
            tt = (torch.as_tensor(t, dtype=torch.float32) * 1000).to(self.device).expand(len(xin))
            with autocast:  # transformer timestep input = 1000 t
                out = module(hidden_states=xin.to(self.dtype), timestep=tt, encoder_hidden_states=emb,
                             pooled_projections=pooled, return_dict=False)[0].float()
            if guidance == 1:
                return out
            # v = v_u + w (v_c - v_u)
            vu, vc = out.chunk(2)
            return vu + guidance * (vc - vu)
        return v

    def noise(self, n, generator):
        """x at t = 1: (n, C, h, w) standard normal latents, drawn on CPU for reproducibility."""
        return torch.randn((n, *self.latent), generator=generator).to(self.device)

    @torch.no_grad()
    def decode(self, x, batch=16):
        """Latents -> images (B, 3, H, W) in [0, 1], fp32."""
        vae = self.pipe.vae
        out = []
        for i in range(0, len(x), batch):
            z = x[i:i + batch] / vae.config.scaling_factor + vae.config.shift_factor
            out.append((vae.decode(z.to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)


def add_lora(tr, name, cfg):
    """A LoRA adapter (r, alpha, targets; B = 0 so it starts at the base), active, its weights
    fp32 and trainable."""
    from peft import LoraConfig
    torch.manual_seed(cfg.seed)  # A's init
    targets = [t for t in cfg.lora_targets.split(",") if t]
    names = [n for n, _ in tr.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:  # peft would ignore a wrong name as long as another one matches
        raise UserError(f"--lora_targets: no module of the transformer is named {', '.join(map(repr, missing))}")
    tr.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights=True,
                              target_modules=targets), adapter_name=name)
    tr.set_adapter(name)
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def adapter_state(tr, name):
    from peft.utils import get_peft_model_state_dict
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(tr, adapter_name=name).items()}


def save_lora(run_dir, tr, name):
    """The adapter as diffusers-format safetensors (pipe.load_lora_weights(run_dir) loads it),
    alpha and targets in its metadata; written to a temporary folder, then renamed in place."""
    from diffusers import StableDiffusion3Pipeline
    tmp = os.path.join(run_dir, f".tmp-lora-{os.getpid()}")
    meta = tr.peft_config[name].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    StableDiffusion3Pipeline.save_lora_weights(tmp, transformer_lora_layers=adapter_state(tr, name),
                                               transformer_lora_adapter_metadata=meta)
    os.replace(os.path.join(tmp, LORA_FILE), os.path.join(run_dir, LORA_FILE))
    shutil.rmtree(tmp, ignore_errors=True)


def load_lora(tr, run_dir, name, producer):
    """Load a saved LoRA as adapter `name`; clear errors for a missing folder or another model."""
    path = os.path.join(run_dir, LORA_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no LoRA at {path}: make it with `{producer}`")
    from diffusers.utils import logging as dl
    level = dl.get_verbosity()
    dl.set_verbosity(dl.CRITICAL)  # diffusers logs the failure too; one line is enough
    try:
        tr.load_lora_adapter(run_dir, weight_name=LORA_FILE, adapter_name=name, prefix="transformer")
    except Exception as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [""]
        why = next((l for l in lines if "mismatch" in l), lines[0])[:160]
        raise UserError(f"the LoRA at {path} does not fit this model ({type(e).__name__}: {why})") from None
    finally:
        dl.set_verbosity(level)
    if name not in tr.peft_config:
        raise UserError(f"the LoRA at {path} matched no layer of this model")


# ----------------------------------------------------------------------------------------------
# tasks: a name, train/test prompts (and GenEval metadata), a reward from rewards.py
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Task:
    name: str
    train: list
    test: list
    reward: object  # fn(images (B,3,H,W) in [0,1], prompts, metadata) -> (B,)
    meta: dict = dataclasses.field(default_factory=dict)  # prompt -> GenEval metadata


TOY_TASKS = ("color", "position", "jpeg")
REAL_TASKS = {"geneval": "geneval", "ocr": "ocr", "aesthetic": "pickscore:1,clipscore:1,hpsv2:1"}


TOY_ADJECTIVES = ("plain", "simple", "smooth", "clean")


def toy_prompts(name):
    """The toy tasks' prompts, generated; a fixed split: every 4th prompt is held out."""
    from rewards import COLORS, SUBJECTS
    if name == "color":
        ps = [f"a {c} {s}" for c in COLORS for s in SUBJECTS]
    elif name == "position":  # left/right only: with top/bottom too, a teacher traded one for the other
        ps = [f"a {w} {s} on the {side}" for side in ("left", "right") for s in SUBJECTS
              for w in ("bright", "red", "green", "blue")]
    else:
        ps = [f"a {adj} picture of a {s}" for adj in TOY_ADJECTIVES for s in SUBJECTS]
    return [p for i, p in enumerate(ps) if i % 4], ps[::4]


def read_prompts(path):
    """Text (one prompt a line) or GenEval metadata jsonl ({"prompt": ..., ...} a line)."""
    if not path or not os.path.isfile(path):
        raise UserError(f"prompt file {path!r} not found (pass --prompts PATH)")
    prompts, meta = [], {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if path.endswith(".jsonl"):
                try:
                    m = json.loads(line)
                except json.JSONDecodeError:
                    m = None
                if not isinstance(m, dict) or not isinstance(m.get("prompt"), str):
                    raise UserError(f'{path}: a line is not a JSON object with a "prompt": {line[:60]!r}')
                prompts.append(m["prompt"]); meta[m["prompt"]] = m
            else:
                prompts.append(line)
    if not prompts:
        raise UserError(f"prompt file {path} is empty")
    return prompts, meta


def make_task(name, cfg, device="cpu"):
    import rewards
    if name in TOY_TASKS:
        train, test = toy_prompts(name)
        meta = {}
    elif name in REAL_TASKS:
        train, meta = read_prompts(cfg.prompts)
        if cfg.test_prompts:
            test, m2 = read_prompts(cfg.test_prompts); meta.update(m2)
        else:
            train, test = [p for i, p in enumerate(train) if i % 10], train[::10]
    else:
        raise UserError(f"unknown task {name!r} (toy: {', '.join(TOY_TASKS)}; real: {', '.join(REAL_TASKS)})")
    if name == "geneval" and not cfg.reward and any(p not in meta for p in train + test):
        raise UserError("--task geneval needs GenEval metadata: --prompts a jsonl with one "
                        '{"prompt": ..., "tag": ..., "include": [...]} a line')
    spec = cfg.reward or (name if name in TOY_TASKS else REAL_TASKS[name])
    try:
        reward = rewards.load(spec, device, eager=True)
        if "ocr" in re.split(r"[,:=]", spec):
            for p in train + test:
                rewards.ocr_target(p)  # every OCR prompt quotes the text to render
    except (ValueError, rewards.RewardError) as e:  # a bad spec, prompt or missing weights: before training
        raise UserError(str(e)) from None
    return Task(name, train, test, reward, meta)


def score(task, images, prompts):
    return task.reward(images, prompts, [task.meta.get(p, {}) for p in prompts]).float().cpu()


# ----------------------------------------------------------------------------------------------
# checkpoints: <run>/ckpt-<step>/{adapter.safetensors, state.pt}, written to a temporary folder
# and renamed (atomic); the final LoRA <run>/pytorch_lora_weights.safetensors marks a done stage.
# ----------------------------------------------------------------------------------------------


def checkpoints(run_dir):
    if not os.path.isdir(run_dir):
        return []
    return sorted(d for d in os.listdir(run_dir) if d.startswith("ckpt-") and
                  os.path.isfile(os.path.join(run_dir, d, "state.pt")))


def save_checkpoint(run_dir, step, tr, name, opt, ema, cfg, keep=2):
    from safetensors.torch import save_file
    final = os.path.join(run_dir, f"ckpt-{step:07d}")
    if os.path.isdir(final):
        return
    tmp = os.path.join(run_dir, f".tmp-ckpt-{step:07d}-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    save_file(adapter_state(tr, name), os.path.join(tmp, "adapter.safetensors"))
    torch.save({"step": step, "optimizer": opt.state_dict(), "config": dataclasses.asdict(cfg),
                "ema": [e.cpu() for e in ema.shadow],
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               os.path.join(tmp, "state.pt"))
    os.rename(tmp, final)  # the checkpoint exists only once complete
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)


def check_resume(run_dir, cfg):
    """The latest complete checkpoint's state, if it was made for this model and LoRA shape."""
    state = torch.load(os.path.join(run_dir, checkpoints(run_dir)[-1], "state.pt"), weights_only=True)
    for k in ("model", "lora_rank", "lora_alpha", "lora_targets"):
        if state["config"][k] != getattr(cfg, k):
            raise UserError(f"--resume: {run_dir} was trained with --{k} {state['config'][k]}, not {getattr(cfg, k)}")
    return state


def load_checkpoint(run_dir, tr, name, opt, ema, cfg):
    """Restore the latest complete checkpoint; returns the step to continue from."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    state = check_resume(run_dir, cfg)
    ck = os.path.join(run_dir, checkpoints(run_dir)[-1])
    set_peft_model_state_dict(tr, load_file(os.path.join(ck, "adapter.safetensors")), adapter_name=name)
    opt.load_state_dict(state["optimizer"])
    for e, saved in zip(ema.shadow, state["ema"]):
        e.copy_(saved)
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def prepare_run(run_dir, cfg, rank, world, what):
    """Decide what to do with a stage's folder: 'done' (reuse), 'resume', or 'fresh'."""
    done = os.path.isfile(os.path.join(run_dir, LORA_FILE))
    if done and not cfg.overwrite:
        say(rank, f"{what}: {run_dir}/{LORA_FILE} exists, reused (--overwrite to redo)")
        return "done"
    if cfg.overwrite:
        if rank == 0 and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)
        return "fresh"
    if cfg.resume and checkpoints(run_dir):
        return "resume"
    if checkpoints(run_dir):
        raise UserError(f"{run_dir} holds a checkpoint of an unfinished {what} run: pass --resume to "
                        f"continue it or --overwrite to start again")
    return "fresh"


class Logger:
    """stdout and <run>/metrics.jsonl on rank 0."""

    def __init__(self, run_dir, rank):
        self.rank, self.path = rank, os.path.join(run_dir, "metrics.jsonl")

    def __call__(self, **row):
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def say(rank, *a):
    if rank == 0:
        print(*a, flush=True)


def make_optimizer(params, cfg):
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)


class EMA:
    """Exponential moving average of the trained weights, as Flow-GRPO keeps it: after optimizer
    step s (s % every == 0), e <- d e + (1 - d) p with d = min((1 + s) / (10 + s), decay), so the
    first updates follow p closely. The stage saves (and eval uses) e; decay 0 saves p itself."""

    def __init__(self, params, cfg):
        self.params, self.decay, self.every = params, cfg.ema, cfg.ema_every
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def step(self, s):
        if self.decay > 0 and s % self.every == 0:
            d = min((1 + s) / (10 + s), self.decay)
            for e, p in zip(self.shadow, self.params):
                e.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to_params(self):
        if self.decay > 0:
            for e, p in zip(self.shadow, self.params):
                p.copy_(e)


def guarded_step(opt, params, cfg, bad, rank):
    """Clip and step, unless the gradient is not finite: then skip (warn); abort after
    cfg.max_bad_steps in a row. Returns (grad norm, bad-in-a-row)."""
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        bad += 1
        say(rank, f"warning: non-finite loss or gradient, step skipped ({bad} in a row)")
        if bad >= cfg.max_bad_steps:
            raise UserError(f"{bad} non-finite steps in a row: aborted; the last good checkpoint is kept")
        return float(norm), bad
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm), 0


class Timer:
    """Accumulates wall time per key (synchronising CUDA so the split is true)."""

    def __init__(self, device):
        self.t, self.cuda = {}, device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, key):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - t0


def wrap_ddp(tr, world, device):
    """DDP over the trainable adapter: built while it is the active adapter (DDP registers the
    parameters that require grad when it is built)."""
    if world == 1 or os.environ.get("OPD_TEST_NO_GRAD_SYNC"):  # the latter: a test of rank_divergence
        return tr
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(tr, device_ids=[device.index] if device.type == "cuda" else None)


def sync_ctx(ddp, last):
    """All-reduce gradients only on the last backward of an accumulation."""
    return contextlib.nullcontext() if last or not hasattr(ddp, "no_sync") else ddp.no_sync()


# ----------------------------------------------------------------------------------------------
# stage 1: GRPO-Guard specialist teachers (one LoRA per task)
# ----------------------------------------------------------------------------------------------
def train_teacher(cfg, m, task, rank, world):
    run_dir = os.path.join(cfg.out, f"teacher-{task.name}")
    mode = prepare_run(run_dir, cfg, rank, world, f"teacher-{task.name}")
    if mode == "done":
        return run_dir
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
    tr, name = m.tr, "policy"
    m.encode(task.train + task.test)
    params = m.trainable = add_lora(tr, name, cfg)
    m.active = name
    opt, ema = make_optimizer(params, cfg), EMA(params, cfg)
    start = load_checkpoint(run_dir, tr, name, opt, ema, cfg) if mode == "resume" else 0
    if start:
        say(rank, f"resumed {run_dir} at step {start}")
    ddp = wrap_ddp(tr, world, m.device)
    sigmas = sd3_sigmas(cfg.num_steps)
    N, G, b = cfg.num_steps, cfg.group_size, cfg.batch_size // world
    log, bad = Logger(run_dir, rank), 0
    bar = _bar(range(start, cfg.steps), rank, f"teacher-{task.name}")
    for step in bar:
        tm = Timer(m.device)
        # the same prompts on every rank; each rank rolls out its slice of the batch
        P = cfg.batch_size // G
        idx = torch.randint(len(task.train), (P,), generator=rng(cfg.seed, step, 0))
        prompts = [task.train[i] for i in idx for _ in range(G)]
        groups = torch.arange(P).repeat_interleave(G)
        mine = prompts[rank * b:(rank + 1) * b]
        g = rng(cfg.seed, step, 1, rank)
        with tm("sampling"):
            traj = rollout(m.velocity(name, mine, cfg.guidance), m.noise(b, g), sigmas, cfg.noise_level, g)
            images = m.decode(traj["states"][:, -1])
        with tm("reward"):
            r_all = gather(score(task, images, mine).to(m.device), world).cpu()
            adv = group_advantages(r_all, groups)[rank * b:(rank + 1) * b].to(m.device)
        with tm("training"):
            for _ in range(cfg.inner_epochs):
                v = m.velocity(name, mine, cfg.guidance, module=ddp)
                for j in range(N):
                    with sync_ctx(ddp, j == N - 1):
                        x = traj["states"][:, j]
                        mu, _ = transition(x, v(x, sigmas[j]), sigmas[j], sigmas[j + 1], cfg.noise_level)
                        loss = grpo_loss(mu, traj["means"][:, j], traj["states"][:, j + 1], traj["stds"][:, j],
                                         sigmas[j + 1] - sigmas[j], adv, cfg.clip_range,
                                         ratio_norm=not cfg.no_ratio_norm, dt_reweight=not cfg.no_ratio_norm)
                        (loss.mean() / N).backward()
                gnorm, bad = guarded_step(opt, params, cfg, bad, rank)
        ema.step(step + 1)
        log(step=step + 1, reward=r_all.mean().item(), grad_norm=gnorm, **{f"time_{k}": round(v, 4) for k, v in tm.t.items()})
        if rank == 0:
            bar.set_postfix(reward=f"{r_all.mean():.3f}")
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(run_dir, step + 1, tr, name, opt, ema, cfg)
    return finish_run(run_dir, cfg, m, name, ema, rank, world)


def rank_divergence(params, world):
    """The largest difference between this rank's weights and rank 0's, over all ranks: 0 when
    DDP kept them in sync (it is the check that catches the DDP trap of NOTES in README)."""
    if world == 1:
        return 0.0
    d = torch.zeros((), device=params[0].device)
    for p in params:
        ref = p.detach().clone()
        torch.distributed.broadcast(ref, 0)
        d = torch.maximum(d, (p.detach() - ref).abs().max())
    torch.distributed.all_reduce(d, op=torch.distributed.ReduceOp.MAX)
    return d.item()


def write_text(path, text):
    """Write to a temporary file, then rename: a reader sees the old file or the new one."""
    with open(f"{path}.tmp-{os.getpid()}", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp-{os.getpid()}", path)


def finish_run(run_dir, cfg, m, name, ema, rank, world):
    """The stage's final LoRA, its EMA weights (the file's existence marks the stage done), and
    config; adapters dropped. With several ranks, first check that they hold the same weights."""
    if world > 1:
        d = rank_divergence(m.trainable, world)
        if d > 1e-6:
            raise UserError(f"ranks diverged (max weight difference {d:.3g}): gradients were not "
                            f"synchronised; nothing was saved beyond the last checkpoint")
        say(rank, f"{os.path.basename(run_dir)}: {world} ranks in sync (max weight difference {d:.1g})")
    ema.copy_to_params()
    if rank == 0:
        write_text(os.path.join(run_dir, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
        save_lora(run_dir, m.tr, name)
    _barrier(world)
    _drop_adapters(m)
    say(rank, f"{os.path.basename(run_dir)}: saved {run_dir}/{LORA_FILE}")
    return run_dir


def _bar(it, rank, desc):
    from tqdm import tqdm
    return tqdm(it, desc=desc, disable=rank != 0, dynamic_ncols=True, file=sys.stdout)


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


def _drop_adapters(m):
    tr = m.tr.module if hasattr(m.tr, "module") else m.tr
    if getattr(tr, "peft_config", None):
        tr.delete_adapters(list(tr.peft_config))
    m.active, m.trainable = "?", []


# ----------------------------------------------------------------------------------------------
# stage 2: on-policy distillation of every teacher into one student (closed-form per-step KL)
# ----------------------------------------------------------------------------------------------
def parse_pairs(s, what):
    out = {}
    for item in [x for x in s.split(",") if x.strip()]:
        k, sep, v = item.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise UserError(f"{what}: expected NAME=VALUE, got {item!r}")
        out[k.strip()] = v.strip()
    return out


def parse_steps(s, n):
    """'' -> all but the last step (the paper); '0-8' or '0,2,4' otherwise."""
    if not s:
        return list(range(n - 1))
    steps = set()
    for part in s.split(","):
        a, _, b = part.partition("-")
        try:
            steps.update(range(int(a), int(b or a) + 1))
        except ValueError:
            raise UserError(f"bad --train_steps {s!r}") from None
    if not steps or min(steps) < 0 or max(steps) >= n:
        raise UserError(f"--train_steps {s!r} must lie in 0..{n - 1}")
    return sorted(steps)


def distill_round(cfg, m, tasks, step, rank, world, module, tm, teacher_of, tg):
    """One round of stage 2 (METHOD.md section 5), gradients only: for each task m, its prompts,
    a student rollout, the teacher's means on the student's own states (no grad), the closed-form
    loss backpropagated step by step; the M tasks accumulate into one gradient (G = M).
    teacher_of(task) -> the teacher's adapter name; tg: per-task teacher CFG. Returns {task: loss}."""
    sigmas = sd3_sigmas(cfg.num_steps)
    train_steps = parse_steps(cfg.train_steps, cfg.num_steps)
    b, n_back = cfg.batch_size // world, len(tasks) * len(train_steps)
    done, losses = [0], {}

    def timed(v, key):  # a velocity closure that adds its time to tm[key]
        def f(x, t):
            with tm(key if torch.is_grad_enabled() or key == "teacher" else "rollout"):
                return v(x, t)
        return f

    def backward(loss):  # one backward per trained step; sync on the round's last
        done[0] += 1
        with tm("backward"), sync_ctx(module, done[0] == n_back):
            loss.backward()
    for mi, task in enumerate(tasks):  # round-robin: G = M, one optimizer step per round
        idx = torch.randint(len(task.train), (cfg.batch_size,), generator=rng(cfg.seed, step, 0, mi))
        mine = [task.train[i] for i in idx[rank * b:(rank + 1) * b]]
        g = rng(cfg.seed, step, 1, mi, rank)
        student = timed(m.velocity("student", mine, cfg.guidance, module=module), "student_fwd")
        teacher = timed(m.velocity(teacher_of(task), mine, tg.get(task.name, cfg.guidance)), "teacher")
        _, loss = distill_trajectory(student, teacher, m.noise(b, g), sigmas, cfg.noise_level, train_steps,
                                     cfg.loss, backward=backward, two_pass=cfg.two_pass, generator=g)
        losses[task.name] = loss
    return losses


def distill(cfg, m, tasks, teacher_dirs, rank, world):
    run_dir = os.path.join(cfg.out, "student")
    mode = prepare_run(run_dir, cfg, rank, world, "student")
    if mode == "done":
        return run_dir
    tr = m.tr
    for t in tasks:  # M teachers: M adapters on the one transformer
        load_lora(tr, teacher_dirs[t.name], f"teacher-{t.name}",
                  f"python opd.py --stage teacher --task {t.name} --out {cfg.out}")
    tg = {k: float(v) for k, v in parse_pairs(cfg.teacher_guidance, "--teacher_guidance").items()}
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
    for t in tasks:
        m.encode(t.train + t.test)
    params = m.trainable = add_lora(tr, "student", cfg)
    m.active = "student"
    opt, ema = make_optimizer(params, cfg), EMA(params, cfg)
    start = load_checkpoint(run_dir, tr, "student", opt, ema, cfg) if mode == "resume" else 0
    if start:
        say(rank, f"resumed {run_dir} at step {start}")
    ddp = wrap_ddp(tr, world, m.device)
    log, bad = Logger(run_dir, rank), 0
    bar = _bar(range(start, cfg.steps), rank, "distill")
    for step in bar:
        tm = Timer(m.device)
        t0 = time.perf_counter()
        losses = distill_round(cfg, m, tasks, step, rank, world, ddp, tm, lambda t: f"teacher-{t.name}", tg)
        with tm("optimizer"):
            gnorm, bad = guarded_step(opt, params, cfg, bad, rank)
            ema.step(step + 1)
        total = time.perf_counter() - t0
        model_time = sum(v for k, v in tm.t.items() if k != "optimizer")
        log(step=step + 1, **{f"loss_{k}": v for k, v in losses.items()}, grad_norm=gnorm,
            time_round=round(total, 4), **{f"time_{k}": round(v, 4) for k, v in tm.t.items()},
            model_share=round(model_time / total, 3))
        if rank == 0:
            bar.set_postfix(loss=f"{sum(losses.values()):.3g}")
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(run_dir, step + 1, tr, "student", opt, ema, cfg)
    return finish_run(run_dir, cfg, m, "student", ema, rank, world)


# ----------------------------------------------------------------------------------------------
# eval: ODE sampler, CFG, each task's reward on its test prompts, for every model
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_images(m, adapter, prompts, seeds, cfg):
    """ODE samples (eval_steps, CFG) for prompts, the noise of each from its own seed."""
    sigmas = sd3_sigmas(cfg.eval_steps)
    out = []
    for i in range(0, len(prompts), cfg.eval_batch):
        ps, ss = prompts[i:i + cfg.eval_batch], seeds[i:i + cfg.eval_batch]
        x = torch.cat([m.noise(1, rng(cfg.seed, 7, s)) for s in ss])
        traj = rollout(m.velocity(adapter, ps, cfg.guidance), x, sigmas, 0.0)
        out.append(m.decode(traj["states"][:, -1]).cpu())
    return torch.cat(out)


def evaluate(cfg, m, tasks, rank, world, loras=None):
    """Writes <out>/eval.json (model -> task -> mean reward), eval.md and samples.png."""
    loras = dict(loras or {})
    models = {"base": None}
    for t in tasks:
        d = os.path.join(cfg.out, f"teacher-{t.name}")
        if os.path.isfile(os.path.join(d, LORA_FILE)):
            models[f"teacher-{t.name}"] = d
    if os.path.isfile(os.path.join(cfg.out, "student", LORA_FILE)):
        models["student"] = os.path.join(cfg.out, "student")
    models.update(loras)
    for name, d in models.items():
        if d is not None:
            load_lora(m.tr, d, name, f"python opd.py --stage all --out {cfg.out}")
    table, grid = {}, []
    for name in models:
        m.active = "?"
        adapter = None if models[name] is None else name
        table[name] = {}
        for t in tasks:
            test = t.test[: cfg.eval_prompts] if cfg.eval_prompts else t.test
            test = [p for p in test for _ in range(cfg.eval_seeds)]  # image i has seed i
            mine = list(range(rank, len(test), world))  # images split across ranks
            imgs = sample_images(m, adapter, [test[i] for i in mine], mine, cfg)
            r = score(t, imgs, [test[i] for i in mine]) if mine else torch.zeros(0)
            # gather (pad to equal length for all_gather)
            n = math.ceil(len(test) / world)
            pad = torch.full((n,), float("nan")); pad[: len(r)] = r
            allr = gather(pad.to(m.device), world).cpu()
            table[name][t.name] = allr[~torch.isnan(allr)].mean().item()
            if rank == 0:  # two test prompts, their first seed
                two = [0, cfg.eval_seeds][: len(test) // cfg.eval_seeds]
                grid.append(imgs[[mine.index(i) for i in two]] if world == 1 else
                            sample_images(m, adapter, [test[i] for i in two], two, cfg))
    _drop_adapters(m)
    if rank == 0:
        write_eval(cfg.out, table, [t.name for t in tasks], grid, len(models))
    return table


def normalised_mean(table, tasks):
    """Mean over tasks of min-max-normalised scores across the compared models (paper Table 1)."""
    lo = {k: min(r[k] for r in table.values()) for k in tasks}
    hi = {k: max(r[k] for r in table.values()) for k in tasks}
    return {name: sum((r[k] - lo[k]) / (hi[k] - lo[k]) if hi[k] > lo[k] else 0.0 for k in tasks) / len(tasks)
            for name, r in table.items()}


def write_eval(out, table, tasks, grid, n_models):
    avg = normalised_mean(table, tasks)
    lines = ["| model | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
    for name, r in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in tasks) + f" | {avg[name]:.3f} |")
    md = "\n".join(lines) + "\n\nMean reward on each task's test prompts (ODE sampler); avg = mean of " \
        "min-max-normalised scores across the models above.\n"
    write_text(os.path.join(out, "eval.json"), json.dumps(table, indent=1))
    write_text(os.path.join(out, "eval.md"), md)
    print(md, flush=True)
    # samples.png: one row per model, the same prompts and seeds in every row
    from PIL import Image
    rows = [torch.cat(list(grid[i * len(tasks):(i + 1) * len(tasks)])) for i in range(n_models)]
    img = torch.stack([torch.cat(list(r), 2) for r in rows])  # (models, 3, H, W * k)
    img = torch.cat(list(img), 1)
    arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    scale = max(1, 128 // grid[0].shape[-1])
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(
        os.path.join(out, "samples.png"))


# ----------------------------------------------------------------------------------------------
# bench: what the fused rollout saves, and what M teachers as adapters cost
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def peak_memory(device):
    """out["peak"]: peak bytes inside the block. GPU: the CUDA allocator's peak. CPU: the
    process's resident set, sampled every millisecond from /proc (Linux)."""
    out = {}
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(); out["peak"] = torch.cuda.max_memory_allocated(device)
        return
    import threading
    page, stop = os.sysconf("SC_PAGE_SIZE"), threading.Event()

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    out["peak"] = rss()

    def poll():
        while not stop.wait(0.001):
            out["peak"] = max(out["peak"], rss())
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        yield out
    finally:
        stop.set(); th.join()
        out["peak"] = max(out["peak"], rss())


def bench(cfg, m, tasks, rank, world):
    """--stage bench (one process): the peak memory of a distillation round with one adapter
    trained alone (its teacher = the base) against the same round distilling from M teacher
    adapters (random, B != 0); then seconds per round, fused against --two_pass, alternating
    rounds after one warm-up each. Prints a table and writes <out>/bench.json."""
    mb = lambda b: b / 2**20
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)
    params = m.trainable = add_lora(m.tr, "student", cfg)

    def round_s(teacher_of, two_pass=False, step=0):  # one round, gradients dropped; seconds
        for p in params:
            p.grad = None
        m.active, tm = "?", Timer(m.device)
        with tm("round"):
            distill_round(dataclasses.replace(cfg, two_pass=two_pass), m, tasks, step, rank, world, m.tr, tm,
                          teacher_of, {})
        return tm.t["round"]
    with peak_memory(m.device) as alone:
        round_s(lambda t: None)
    teachers = []
    for t in tasks:  # M teachers: adapters on the same transformer, B randomised
        add_lora(m.tr, f"teacher-{t.name}", cfg)
        teachers += [p for n, p in m.tr.named_parameters() if f"teacher-{t.name}" in n]
    for n, p in m.tr.named_parameters():
        if "lora_B.teacher-" in n:
            torch.nn.init.normal_(p.data, std=0.01)
    with peak_memory(m.device) as multi:
        round_s(lambda t: f"teacher-{t.name}")
    times = {False: [], True: []}
    for r in range(2 * cfg.steps + 2):  # alternate; the first round of each is a warm-up
        dt = round_s(lambda t: f"teacher-{t.name}", bool(r % 2), step=r)
        if r >= 2:
            times[bool(r % 2)].append(dt)
    fused, two = (sum(v) / len(v) for v in (times[False], times[True]))
    teacher_bytes = nbytes(teachers)
    base_bytes = nbytes(p for n, p in m.tr.named_parameters() if "lora_" not in n)
    res = {"model": cfg.model, "resolution": cfg.resolution, "batch_size": cfg.batch_size, "tasks": len(tasks),
           "rounds_each": cfg.steps, "device": str(m.device),
           "round_s_fused": round(fused, 4), "round_s_two_pass": round(two, 4), "two_pass_over_fused": round(two / fused, 3),
           "peak_mb_one_adapter": round(mb(alone["peak"]), 1), "peak_mb_M_teachers": round(mb(multi["peak"]), 1),
           "adapter_mb": round(mb(nbytes(params)), 3),
           "teacher_adapters_mb": round(mb(teacher_bytes), 3), "transformer_mb": round(mb(base_bytes), 3)}
    if rank == 0:
        say(0, f"{cfg.model} {cfg.resolution}px, batch {cfg.batch_size}, {len(tasks)} tasks, {cfg.num_steps} steps "
               f"({m.device}): round fused {fused:.3f}s, two-pass {two:.3f}s (x{two / fused:.2f}); peak memory "
               f"{mb(alone['peak']):.0f} MB one adapter alone, {mb(multi['peak']):.0f} MB with {len(tasks)} teacher "
               f"adapters ({mb(teacher_bytes):.2f} MB of adapter weights; a transformer copy is {mb(base_bytes):.2f} MB)")
        os.makedirs(cfg.out, exist_ok=True)
        write_text(os.path.join(cfg.out, "bench.json"), json.dumps(res, indent=1))
    return res


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def preflight(cfg, stages, task_names):
    """Checks that need no model, before loading one: the ranks split the batch, and --resume
    does not change the model or the LoRA of any stage it would continue."""
    world, batch = int(os.environ.get("WORLD_SIZE", 1)), resolve(cfg, stages[0]).batch_size
    if batch % world:
        raise UserError(f"--batch_size {batch} does not divide across {world} ranks")
    dirs = {"teacher": [f"teacher-{t}" for t in task_names], "distill": ["student"]}
    for stage in stages:
        for d in dirs.get(stage, []):
            run_dir = os.path.join(cfg.out, d)
            if cfg.resume and checkpoints(run_dir) and not os.path.isfile(os.path.join(run_dir, LORA_FILE)):
                check_resume(run_dir, resolve(cfg, stage))


def run(cfg):
    stages = ["teacher", "distill", "eval"] if cfg.stage == "all" else [cfg.stage]
    preflight(cfg, stages, [cfg.task] if cfg.stage == "teacher" else [t for t in cfg.tasks.split(",") if t])
    rank, world, device = dist_setup(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(1)
    base = resolve(cfg, stages[0])
    task_names = [base.task] if cfg.stage == "teacher" else [t for t in base.tasks.split(",") if t]
    if cfg.stage == "distill" and cfg.teachers:
        task_names = list(parse_pairs(cfg.teachers, "--teachers"))
    tasks = [make_task(n, base, device) for n in task_names]
    say(rank, "config: " + json.dumps(dataclasses.asdict(base)))
    m = SD3(load_pipeline(base, device, rank, world), base, device)
    for t in tasks:
        m.encode(t.train + t.test)
    m.offload_text_encoders()
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    result = None
    for stage in stages:
        c = resolve(cfg, stage)
        if stage == "teacher":
            for t in tasks:
                train_teacher(c, m, t, rank, world)
        elif stage == "distill":
            dirs = parse_pairs(c.teachers, "--teachers") if c.teachers else \
                {t.name: os.path.join(c.out, f"teacher-{t.name}") for t in tasks}
            distill(c, m, tasks, dirs, rank, world)
        elif stage == "bench":
            result = bench(c, m, tasks, rank, world)
        else:
            result = evaluate(c, m, tasks, rank, world, parse_pairs(c.lora, "--lora"))
    return result


def main(argv=None):
    code = 0
    try:
        cfg = parse_config(argv)
        t0 = time.time()
        run(cfg)
        say(int(os.environ.get("RANK", 0)), f"done in {time.time() - t0:.0f}s")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    if torch.distributed.is_initialized():
        # Leave without interpreter shutdown. DDP's reducer keeps the process group (and gloo's
        # worker threads) alive to the end; a worker still releasing the last collective's
        # tensors needs the GIL, and during shutdown that aborts the process after a good run
        # (1 in 40 tiny 2-rank CPU runs). Every output is written and closed by now.
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
