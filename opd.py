"""
DiffusionOPD: on-policy distillation of several RL-trained teachers into one flow-matching
text-to-image student (Stable Diffusion 3 / 3.5), after arXiv 2605.15055.

Run manual
    python opd.py                        # tiny, offline, 2 CPU cores: 3 teachers, distil, eval
    python opd.py --stage teacher --task color --algo nft      # one DiffusionNFT teacher
    torchrun --nproc_per_node=2 opd.py --stage all --out runs/two
    torchrun --nproc_per_node=8 opd.py --model stabilityai/stable-diffusion-3.5-medium \
        --stage teacher --task ocr --grad_checkpointing  # GRPO-Guard's public config, 8 GPUs
    torchrun --nproc_per_node=8 opd.py --model stabilityai/stable-diffusion-3.5-medium \
        --stage distill --tasks geneval,ocr,aesthetic     # the paper's stage 2
The baselines (joint and cascade RL, SFT, DanceOPD, FlowOPD, DMD, TDM, the comparison, the noise
ablation) run from baselines.py, the speed and memory bench from bench.py; README.md has the
numbers to expect.

Algorithm 1 (stage 2), step by step -> code
    given teachers pi_T^1..M (stage 1: train_rl) and the student pi_S = the base + a LoRA(B = 0)
    repeat for every round:                                              distill
        for every task m (prompt set D_m, teacher pi_T^m):               distill_round
            draw prompts c ~ D_m                                         draw_prompts
            roll out the student x_0 -> x_N (ODE, or SDE with a > 0)     distill_trajectory
            at every state x_j: mu_S(x_j) with grad, mu_T^m(x_j) without transition
            accumulate the gradient of sum_j KL_j (Eq. 11 SDE, 12 ODE)   opd_loss
        one optimizer step on the M accumulated gradients (G = M)        guarded_step
        EMA of the student's weights, log, checkpoint                    EMA.step, save_checkpoint

Simplifications (and why)
1. Teachers and student are LoRA adapters on ONE transformer (peft): M teachers cost one model's
   memory; switching adapters switches models.
2. Per-step losses average over latent elements (as the public code), where the paper's
   equations sum: a constant factor per resolution, absorbed by Adam.
3. Stage 1 is GRPO-Guard or DiffusionNFT (--algo nft, the paper's GenEval teacher), an epoch of
   --updates_per_epoch optimizer steps as their public configs; NFT samples with the Euler ODE
   where its public code uses a second-order solver.
4. Prompt embeddings are computed when first needed and kept in a bounded cache; the text
   encoders visit the GPU only to encode (--text_encoders).
5. The default model (tiny.py) is an SD3 built from configs and pretrained ~60 s on synthetic
   images, with toy rewards: it shows that the machinery works, not what SD3.5 reaches. Its
   student adapts the AdaLN and text projections too (one small adapter holds three tasks).
"""
import dataclasses
import json
import math
import os
import re
import textwrap
import time

import torch

import prompts as P
from machinery import (LORA_FILE, EMA, bar, barrier, check_in_sync, check_resume, checkpoints,
                       compile_model, config_text, dist_setup, gather, guarded_step,
                       load_checkpoint, load_lora, logger, prepare_run, rng, run_info,
                       save_checkpoint, save_lora, say, write_text, main as cli)
from sd3 import SD3, add_lora, drop_adapters, load_pipeline
from options import (FLAG, UserError, arg, check_fields, file, folder, names, num, one_of,
                     pairs, text)


# ---------------------------------------------------------------------------------------------
# config: one flat dataclass, one line a field; None = the stage's default (the table below)
# ---------------------------------------------------------------------------------------------
TASKS = P.TOY_TASKS + tuple(P.REAL_TASKS)
STAGES = ("all", "teacher", "distill", "eval")  # all = teacher, distill, eval


def _steps_ok(s):
    return bool(re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", s)) and bool(parse_steps(s, 0))


def _reward_ok(s):
    import rewards
    rewards.load(s)  # a bad name or weight raises ValueError; nothing is loaded yet


def _decay_ok(s):
    flat, rate, cap = (float(x) for x in s.split(","))
    return flat >= 0 and rate >= 0 and 0 <= cap < 1


@dataclasses.dataclass
class Config:
    # what to run, on which model, where
    stage: str = arg("all", one_of(*STAGES), "all = teacher, distill, eval; or one of them")
    task: str = arg("color", one_of(*TASKS), "the task of --stage teacher")
    tasks: str = arg("color,position,jpeg", names(TASKS), "the tasks of distill and eval")
    teachers: str = arg("", pairs(TASKS, text()), "distill: task=DIR,... (<out>/teacher-<task>)")
    lora: str = arg("", pairs(None, text()), "eval: more NAME=DIR LoRAs to evaluate")
    model: str = arg("tiny", text(), "tiny | sd35m-random | a hub id or folder of an SD3 pipeline")
    out: str = arg("runs/tiny", folder(), "output folder")
    prompts: str = arg("", file(), "real tasks: train prompts, txt or GenEval jsonl (built in)")
    test_prompts: str = arg("", file(), "real tasks: held-out prompts (built in)")
    reward: str = arg("", text(True, _reward_ok, "a reward spec (rewards.py --list)"),
                      "a reward spec in place of the task's")
    seed: int = arg(0, num(int, 0), "random seed (LoRA init, prompts, noise)")
    # sampling (Flow-GRPO's SDE; a = 0 is the ODE)
    steps: int = arg(None, num(int, 1), "optimizer steps of the stage")
    num_steps: int = arg(10, num(int, 2, 1000), "sampler steps of training rollouts")
    noise_level: float = arg(None, num(float, 0, 10), "SDE noise level a of training rollouts")
    guidance: float = arg(None, num(float, 0, 100), "classifier-free guidance (1 = off)")
    teacher_guidance: str = arg("", pairs(TASKS, num(float, 0, 100)), "distill: task=CFG,...")
    resolution: int = arg(None, num(int, 8, 4096), "image size in pixels")
    max_seq_len: int = arg(None, num(int, 1, 512), "T5 tokens")
    # LoRA and optimizer (AdamW, betas 0.9 / 0.999, eps 1e-8)
    lora_rank: int = arg(32, num(int, 1, 4096), "LoRA rank r")
    lora_alpha: float = arg(64, num(float, 0, lo_open=True), "LoRA alpha")
    lora_targets: str = arg(None, text(False, lambda v: bool(v.strip(", "))), "LoRA modules")
    lr: float = arg(None, num(float, 0, 1, lo_open=True), "learning rate")
    weight_decay: float = arg(1e-4, num(float, 0, 1), "AdamW weight decay")
    grad_clip: float = arg(1.0, num(float, 0, lo_open=True), "gradient norm clip")
    batch_size: int = arg(None, num(int, 1), "trajectories per optimizer step and task, all ranks")
    micro_batch: int = arg(None, num(int, 0), "trajectories per forward (0 = a rank's batch)")
    ema: float = arg(0.9, num(float, 0, 1, hi_open=True), "EMA decay of the saved LoRA (0 = off)")
    ema_every: int = arg(None, num(int, 1), "update the EMA every N optimizer steps")
    # stage 1: GRPO-Guard (Flow-GRPO + RatioNorm + 1/|dt|) or DiffusionNFT
    algo: str = arg("grpo_guard", one_of("grpo_guard", "nft"), "the teachers' RL")
    group_size: int = arg(None, num(int, 2), "RL: images per prompt (one group)")
    clip_range: float = arg(2e-6, num(float, 0, 1, lo_open=True, hi_open=True), "PPO clip range")
    updates_per_epoch: int = arg(None, num(int, 1, 100),
                                 "RL: an epoch samples this many batches, one optimizer step each")
    no_ratio_norm: bool = arg(False, FLAG, "plain Flow-GRPO ratio (no RatioNorm, no 1/|dt|)")
    nft_beta: float = arg(1.0, num(float, 0, 10, lo_open=True), "NFT: beta of v+ and v-")
    nft_decay: str = arg("0,0.001,0.5", text(False, _decay_ok, "FLAT,RATE,MAX with MAX < 1"),
                         "NFT: old adapter decay min(RATE (step - FLAT), MAX)")
    nft_kl: float = arg(1e-4, num(float, 0, 100), "NFT: weight of the velocity KL to the base")
    # stage 2: distillation
    loss: str = arg("closed", one_of("closed", "ppo"), "closed-form KL | its PPO-style surrogate")
    sde_weight: str = arg("kl", one_of("kl", "sigma"),
                          "SDE steps: 1/(2 std^2), Eq. 11 | 1/(2 sigma_t^2), the public code")
    two_pass: bool = arg(False, FLAG, "roll out, then recompute (the reference) instead of fused")
    train_steps: str = arg("", text(True, _steps_ok, "steps like 0-8 or 0,2,4"),
                           "sampler steps with a loss (all but the last)")
    eval_every: int = arg(0, num(int, 0), "held-out metrics of the EMA student every N rounds")
    # evaluation (ODE)
    eval_steps: int = arg(40, num(int, 1, 1000), "sampler steps of evaluation")
    eval_batch: int = arg(16, num(int, 1), "images per forward")
    eval_prompts: int = arg(0, num(int, 0), "at most this many test prompts per task (0 = all)")
    eval_seeds: int = arg(4, num(int, 1, 1000), "images per test prompt (GenEval uses 4)")
    export_geneval: bool = arg(False, FLAG, "also write <out>/geneval/<model>/ for GenEval")
    # runs, memory, speed
    save_every: int = arg(20, num(int, 1), "checkpoint every N optimizer steps (and at the end)")
    resume: bool = arg(False, FLAG, "continue from the latest checkpoint of each stage")
    overwrite: bool = arg(False, FLAG, "redo a stage whose output exists")
    max_bad_steps: int = arg(5, num(int, 1), "abort after this many non-finite steps in a row")
    grad_checkpointing: bool = arg(False, FLAG, "recompute each block in the backward pass")
    compile: bool = arg(False, FLAG, "torch.compile the transformer")
    text_encoders: str = arg("offload", one_of("offload", "gpu", "cpu"), "where they live")
    no_t5: bool = arg(False, FLAG, "load no T5 (its embeddings are zeros)")
    embed_cache_mb: float = arg(2048, num(float, 1), "host memory for prompt embeddings (MB)")
    device: str = arg("auto", one_of("auto", "cpu", "cuda"), "auto | cpu | cuda")

    def relations(self, stage):
        """(broken?, message) for every relation between fields; check() raises the first."""
        n, a, tiny = self.num_steps, self.noise_level, model_kind(self.model) == "tiny"
        factor, largest = (4, 128) if tiny else (16, 4096)
        tasks = list(parse_pairs(self.teachers)) if stage == "distill" and self.teachers else \
            self.tasks.split(",")
        rl = stage == "teacher"
        return [
            (rl and self.batch_size % self.group_size,
             f"--batch_size {self.batch_size} is not a multiple of --group_size {self.group_size}"),
            (rl and self.steps % self.updates_per_epoch,
             f"--steps {self.steps} is not a multiple of --updates_per_epoch "
             f"{self.updates_per_epoch}: an epoch's updates are not split by a checkpoint"),
            (rl and self.algo == "grpo_guard" and a == 0,
             "--algo grpo_guard needs --noise_level > 0: the ODE step has no density"),
            (stage == "distill" and self.loss == "ppo" and a == 0,
             "--loss ppo needs --noise_level > 0: the ODE step has no density"),
            (stage == "distill" and self.sde_weight != "kl" and a == 0,
             f"--sde_weight {self.sde_weight} weighs SDE steps: --noise_level 0 has none"),
            (max(parse_steps(self.train_steps, n)) >= n,
             f"--train_steps {self.train_steps!r} must lie in 0..{n - 1}"),
            (self.resume and self.overwrite, "--resume and --overwrite contradict each other"),
            (self.device == "cuda" and not torch.cuda.is_available(),
             "--device cuda: no CUDA device is available"),
            (self.resolution % factor or self.resolution > largest,
             f"--resolution {self.resolution} must be a multiple of {factor} up to {largest} "
             f"for --model {self.model}"),
            (any(k not in tasks for k in parse_pairs(self.teacher_guidance)),
             f"--teacher_guidance names a task not among {','.join(tasks)}"),
            (stage == "eval" and self.export_geneval and "geneval" not in tasks,
             "--export_geneval needs the geneval task in --tasks"),
        ]


# The defaults of the fields left at None. Per model: resolution, T5 tokens, RL group; per model,
# stage and algorithm (eval takes distill's row): the rest. Real rows = the public configs on 8
# GPUs (GRPO-Guard 48 x 24 an epoch in 2 steps, NFT 1 step, OPD 3 per task and GPU; README).
MODEL_DEFAULTS = {"tiny": dict(resolution=32, max_seq_len=8, group_size=12),
                  "real": dict(resolution=512, max_seq_len=128, group_size=24)}
ATTN = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"  # the paper's
TINY_MULTI = ATTN + ",norm1.linear,norm1_context.linear,norm_out.linear,context_embedder," \
                    "text_embedder.linear_1,text_embedder.linear_2"  # + AdaLN, text projections
COLUMNS = ("steps", "lr", "batch_size", "micro_batch", "noise_level", "guidance",
           "updates_per_epoch", "ema_every", "lora_targets")
STAGE_DEFAULTS = {
    # (model, stage, algo)            steps   lr   batch  micro  a   CFG   K  EMA  LoRA targets
    ("tiny", "teacher", "grpo_guard"): (60, 1e-3, 24, 0, 0.7, 4.5, 2, 1, ATTN),
    ("tiny", "teacher", "nft"):        (60, 1e-3, 24, 0, 0.0, 1.0, 1, 1, ATTN),
    ("tiny", "distill", None):         (60, 3e-3, 16, 0, 0.0, 4.5, 1, 1, TINY_MULTI),
    ("real", "teacher", "grpo_guard"): (1000, 1e-4, 576, 9, 0.7, 4.5, 2, 8, ATTN),
    ("real", "teacher", "nft"):        (1000, 3e-4, 1152, 9, 0.0, 1.0, 1, 1, ATTN),
    ("real", "distill", None):         (1000, 3e-4, 24, 3, 0.0, 4.5, 1, 8, ATTN),
}


# ---------------------------------------------------------------------------------------------
# maths: the flow-matching SDE/ODE step, log-densities, the closed-form OPD loss, PPO,
# GRPO-Guard, DiffusionNFT
# Paper symbols -> code: t_j -> t, t_{j+1} -> t_next, dt_j -> dt, a -> noise_level,
# sigma_t -> sigma, sigma-bar_j (full transition std) -> std, mu_j -> mu, x_j -> x.
# Convention: t = 1 is pure noise, t = 0 is data; x_t = (1 - t) x0 + t eps; v = eps - x0.
# ---------------------------------------------------------------------------------------------
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
    if noise is None:  # drawn on the generator's device (a CPU generator on a GPU run), then moved
        dev = generator.device if generator is not None else mu.device
        noise = torch.randn(mu.shape, generator=generator, device=dev).to(mu.device)
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


def opd_loss(mu_s, mu_t, std, dt=None, sde_weight="kl"):
    """The closed-form per-step KL between student and teacher transitions, (B,).
    SDE (paper Eq. 11): KL(N(mu_S, s^2 I) || N(mu_T, s^2 I)) = ||mu_S - mu_T||^2 / (2 s^2), with
    s = std_j = sigma_t sqrt(|dt|); sde_weight="sigma" is the public code's weight instead,
    1 / (2 sigma_t^2) = |dt| / (2 s^2) (needs dt): late steps (small |dt|) weigh relatively less.
    ODE (paper Eq. 12, std = 0): 1/2 ||mu_S - mu_T||^2.
    Reduction: the squared norm is averaged over latent elements (public code), i.e. the paper's
    KL divided by the number of elements D. The teacher target is cast to fp32."""
    d2 = (mu_s.float() - mu_t.float()).pow(2).flatten(1).mean(1)  # ||mu_S - mu_T||^2 / D
    std = std.float()
    kl = 1 / (2 * std.clamp_min(1e-20) ** 2)
    if sde_weight == "sigma":  # 1 / (2 sigma_t^2) = |dt| / (2 std^2)
        kl = kl * torch.as_tensor(dt, dtype=torch.float32, device=std.device).abs()
    # ODE rows (std = 0) use weight 1/2; SDE rows the KL's
    w = torch.where(std > 0, kl, torch.full_like(std, 0.5))
    return w * d2


def ppo_surrogate(delta, logp, logp_old):
    """PPO-style surrogate of the per-step teacher 'reward' Delta_j (paper section 3.3), (B,):
    L_PG = rho_j Delta_j,  rho_j = pi_theta(a_j | x_j) / pi_old(a_j | x_j).
    On-policy rho = 1 at the sampled a_j, but grad rho = rho grad log pi, so a single sample's
    gradient carries the extra term Delta_j grad log pi (zero mean, variance ~ 1/std)."""
    return torch.exp(logp - logp_old.detach()) * delta


def group_advantages(rewards, groups, clip=5.0, eps=1e-4, global_std=False):
    """Group-relative advantages (GRPO): A = (r - mean_group) / (std + 1e-4), clipped to
    [-clip, clip]; std per group, or over the whole batch (global_std, DiffusionNFT's choice).
    rewards (B,), groups (B,) integer group ids (one group per prompt)."""
    rewards = rewards.float()
    adv = torch.zeros_like(rewards)
    for g in groups.unique():
        m = groups == g
        r = rewards[m]
        adv[m] = (r - r.mean()) / ((rewards if global_std else r).std(unbiased=False) + eps)
    return adv.clamp(-clip, clip)


def grpo_loss(mu, mu_old, x_next, std, dt, adv, clip_range, ratio_norm=True, dt_reweight=True):
    """GRPO-Guard's clipped policy loss for one denoising step, (B,). mu: the trained policy's
    mean (with grad); mu_old, x_next, std: stored from the rollout; dt: t_{j+1} - t_j.
    ratio_norm=False and dt_reweight=False give plain Flow-GRPO. Returns (loss, ratio)."""
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
    return loss, ratio


def nft_r(adv, clip=5.0):
    """DiffusionNFT's optimality probability r in [0, 1] from an advantage:
    r = clip(0.5 + 0.5 clip(A, -5, 5) / 5, 0, 1)."""
    return (0.5 + 0.5 * adv.float().clamp(-clip, clip) / clip).clamp(0, 1)


def nft_loss(v, v_old, x0, x_t, t, r, beta, adv_clip=5.0):
    """DiffusionNFT's loss at noise level t (B,), the public code's x0-space form. With the
    implicit positive and negative policies
        v+ = beta v_theta + (1 - beta) v_old,   v- = (1 + beta) v_old - beta v_theta,
    their clean-image predictions x0+- = x_t - t v+- are pulled to x0 with weights r and 1 - r:
        L = (r ||x0+ - x0||^2 / w+ + (1 - r) ||x0- - x0||^2 / w-) / beta * 5,
    w+- = mean|x0+- - x0| (no grad; adaptive weighting). Since x0+ - x0 = t (v+ - (eps - x0)),
    this is the velocity form r ||v+ - v||^2 + (1 - r) ||v- - v||^2 with weights t^2 / w.
    v: v_theta (with grad); v_old, x0, x_t: (B, ...); t: float or (B,); r: (B,) from nft_r."""
    v, v_old, x0, x_t = v.float(), v_old.float(), x0.float(), x_t.float()
    tt = _bcast(t, x0)
    v_pos = beta * v + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v

    def term(v_hat):  # ||x0_hat - x0||^2 / mean|x0_hat - x0|, per sample (element means)
        err = (x_t - tt * v_hat - x0).flatten(1)
        return err.pow(2).mean(1) / err.abs().mean(1).detach().clamp_min(1e-5)
    return (r * term(v_pos) + (1 - r) * term(v_neg)) / beta * adv_clip


def rollout(velocity, x, sigmas, noise_level, generator=None):
    """Sample one batch of trajectories, no grad; velocity(x, t) -> v is any model (the 2D toy
    of sanity.py or the SD3 transformer). Returns a dict with states (B, N+1, ...) x_0..x_N,
    means (B, N, ...), stds (B, N) and logps (B, N) (element-mean log-density of each step taken;
    0 for the ODE)."""
    states, means, stds, logps = [x.float()], [], [], []
    with torch.no_grad():
        for j in range(len(sigmas) - 1):
            x_next, mu, std = sde_step(x, velocity(x, sigmas[j]), sigmas[j], sigmas[j + 1],
                                       noise_level, generator=generator)
            lp = gaussian_logp(x_next, mu, std) if noise_level > 0 else torch.zeros_like(std)
            states.append(x_next); means.append(mu); stds.append(std); logps.append(lp)
            x = x_next
    if not means:  # no step: only x_0
        return dict(states=states[0][:, None], means=states[0][:, None][:, :0],
                    stds=states[0].new_zeros(len(x), 0), logps=states[0].new_zeros(len(x), 0))
    return dict(states=torch.stack(states, 1), means=torch.stack(means, 1),
                stds=torch.stack(stds, 1), logps=torch.stack(logps, 1))


def step_loss(mu_s, mu_t, std, x_next, loss="closed", dt=None, sde_weight="kl"):
    """Per-sample loss of one step (B,): the closed-form KL, or its PPO-style surrogate, whose
    action a_j = x_{j+1} is the state the rollout actually took (true log-density: a sum)."""
    delta = opd_loss(mu_s, mu_t, std, dt, sde_weight)
    if loss == "closed":
        return delta
    logp = gaussian_logp(x_next.detach(), mu_s, std, reduce="sum")
    return ppo_surrogate(delta, logp, logp.detach())


# ---------------------------------------------------------------------------------------------
# stage 2, Algorithm 1: the student's own rollouts, every state supervised by the task's teacher
# ---------------------------------------------------------------------------------------------
def distill_trajectory(student, teacher, x, sigmas, noise_level, train_steps, loss="closed",
                       backward=None, two_pass=False, generator=None, sde_weight="kl"):
    """On-policy distillation on one batch of student trajectories (paper Eq. 11/12). The
    student rolls out from x (B, ...); on every state x_j it visits with j in train_steps, the
    teacher's mean mu_T(x_j) (no grad, fp32) is the target of the closed-form loss.
    Fused (default): each step's loss is computed during the rollout (the student's forward with
    grad at x_j; then the state is detached). two_pass: roll out without grad, then recompute
    the student's means on the stored states (the public code). The same gradient, since the
    weights do not change inside a round. Each step's loss (batch mean / number of trained
    steps) goes to backward(loss) when given (freeing its graph), else is summed and returned.
    Returns (x_N, loss)."""
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
            with torch.no_grad():  # the teacher's mean on the student's own state
                mu_t, _ = transition(x, teacher(x, t), t, t_next, noise_level)
            step = step_loss(mu_s, mu_t, std, x_next, loss, t_next - t, sde_weight).mean() / n
            logged += float(step.detach())
            if backward is None:
                total = total + step
            else:
                backward(step)
        x = x_next.detach()
    x_final = traj["states"][:, -1] if two_pass else x
    return x_final, (total if backward is None else logged)


def distill_round(cfg, m, tasks, step, rank, world, teacher_of, guidance_of, helpers=None,
                  trajectory=None):
    """Gradients of one round: for each task, its prompts, the student's rollouts from its own
    noise, each state supervised by that task's teacher (teacher_of(task) -> adapter name, with
    CFG guidance_of[task name]); the M tasks accumulate into one gradient (G = M). trajectory:
    distill_trajectory, or a baseline's function of the same signature. helpers: unused here
    (a baseline's own trained adapters). Returns {task: loss}."""
    trajectory = trajectory or distill_trajectory
    sigmas, train_steps = sd3_sigmas(cfg.num_steps), parse_steps(cfg.train_steps, cfg.num_steps)
    b, losses = cfg.batch_size // world, {}

    def backward(loss, share):  # recomputation under checkpointing uses the active adapter
        m.use("student")
        (loss * share).backward()
    for i, task in enumerate(tasks):  # round-robin over the tasks, one optimizer step a round
        mine = draw_prompts(cfg, task, step, i, cfg.batch_size)[rank * b:(rank + 1) * b]
        g, losses[task.name] = rng(cfg.seed, step, 1, i, rank), 0.0
        for s in chunks(b, cfg.micro_batch):
            ps, share = mine[s], len(mine[s]) / b
            student = m.velocity("student", ps, cfg.guidance)
            teacher = m.velocity(teacher_of(task), ps, guidance_of[task.name])
            _, loss = trajectory(student, teacher, m.noise(len(ps), g), sigmas, cfg.noise_level,
                                 train_steps, cfg.loss, lambda l: backward(l, share),
                                 cfg.two_pass, g, cfg.sde_weight)
            losses[task.name] += loss * share
    return losses


def distill(cfg, m, tasks, teacher_dirs, rank, world, name=None, round_fn=None, helpers=None):
    """Stage 2 into <out>/<name> (student, or student-<loss>): the M teachers as adapters, the
    student a new one; rounds of distill_round (or a baseline's round_fn of its signature),
    each one optimizer step of the student, EMA, log, checkpoint. helpers: {adapter: AdamW
    settings} of more trained adapters a baseline's round updates itself (start_training).
    With --eval_every the EMA student's held-out metrics every so many rounds go to
    metrics.jsonl (not timed)."""
    name = name or ("student" if cfg.loss == "closed" else f"student-{cfg.loss}")
    run_dir = os.path.join(cfg.out, name)
    if (mode := prepare_run(run_dir, cfg, rank, name)) == "done":
        return run_dir
    for t in tasks:  # M teachers: M adapters on the one transformer
        load_lora(m.tr, teacher_dirs[t.name], f"teacher-{t.name}",
                  f"python opd.py --stage teacher --task {t.name} --out {cfg.out}")
    given = parse_pairs(cfg.teacher_guidance)  # else the CFG each teacher trained with
    guidance = {k: float(given.get(k, run_info(d, "guidance", cfg.guidance)))
                for k, d in teacher_dirs.items()}
    params, opt, ema, start, elapsed, made = start_training(cfg, m, run_dir, "student", mode,
                                                            rank, helpers=helpers)
    log, bad, b = logger(run_dir, rank), 0, cfg.batch_size // world
    mine = lambda s, i, t: draw_prompts(cfg, t, s, i, cfg.batch_size)[rank * b:(rank + 1) * b]
    prompts_of = lambda s: [p for i, t in enumerate(tasks) for p in mine(s, i, t)]
    held = lambda: held_out(cfg, m, tasks, "student", cfg.guidance, rank, world)
    for step in bar(range(start, cfg.steps), rank, name):
        if cfg.eval_every and step % cfg.eval_every == 0:
            with ema.applied():
                log(step=step, elapsed=round(elapsed, 3), held_out=held())
        t0 = time.perf_counter()
        encode_ahead(cfg, m, step, prompts_of)
        losses = (round_fn or distill_round)(cfg, m, tasks, step, rank, world,
                                             lambda t: f"teacher-{t.name}", guidance, made)
        gnorm, bad = optimizer_step(cfg, opt, params, bad, rank, world)
        ema.step(step + 1)
        seconds = time.perf_counter() - t0
        elapsed += seconds
        log(step=step + 1, **{f"loss_{k}": v for k, v in losses.items()}, grad_norm=gnorm,
            elapsed=round(elapsed, 3), time_round=round(seconds, 4))
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(run_dir, step + 1, m.tr, ["student", *made],
                            [opt, *(o for _, o in made.values())], [ema], cfg, elapsed=elapsed)
    if cfg.eval_every:
        with ema.applied():
            log(step=cfg.steps, elapsed=round(elapsed, 3), held_out=held())
    for helper, (p, _) in made.items():  # a baseline's own adapters are averaged over ranks too
        check_in_sync(p, world, rank, f"{name} {helper}")
    return finish_run(run_dir, cfg, m, "student", ema, rank, world, elapsed,
                      cfg.steps * len(tasks) * cfg.batch_size)


# ---------------------------------------------------------------------------------------------
# stage 1: a specialist teacher per task by RL, GRPO-Guard or DiffusionNFT (one LoRA each).
# schedule(step) -> the tasks of a step: one for a teacher (baselines.py passes others).
# ---------------------------------------------------------------------------------------------
def rl_sample(cfg, m, tasks, step, rank, world):
    """The samples of one RL epoch: per task, updates_per_epoch x batch_size trajectories, G
    images for each of its prompts. GRPO-Guard: SDE rollouts of the policy, every state kept;
    NFT: ODE samples of the 'old' adapter, of which x0 and the reward are used. Each image is
    scored by its own task's reward and its advantage computed within its prompt's group (NFT:
    with the std of the task's batch), so the tasks' reward scales never mix. Returns
    ([(prompts, trajectories, advantages)] of this rank, {task: mean reward})."""
    G, nft = cfg.group_size, cfg.algo == "nft"
    n = cfg.updates_per_epoch * cfg.batch_size  # the epoch's trajectories per task, all ranks
    b, sigmas, batches, rewards = n // world, sd3_sigmas(cfg.num_steps), [], {}
    for i, task in enumerate(tasks):
        prompts = [p for p in draw_prompts(cfg, task, step, i, n // G) for _ in range(G)]
        mine, g = prompts[rank * b:(rank + 1) * b], rng(cfg.seed, step, 1, i, rank)
        parts = [rollout(m.velocity("old" if nft else "policy", mine[s], cfg.guidance),
                         m.noise(len(mine[s]), g), sigmas, cfg.noise_level, g)
                 for s in chunks(b, cfg.micro_batch)]
        traj = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # states (b, N+1, C, h, w)
        r_all = gather(score(task, m.decode(traj["states"][:, -1]), mine).to(m.device), world).cpu()
        adv = group_advantages(r_all, torch.arange(len(prompts)) // G, global_std=nft)
        rewards[task.name] = r_all.mean().item()
        batches.append((mine, traj, adv[rank * b:(rank + 1) * b].to(m.device)))
    return batches, rewards


def nft_timesteps(batch, num_steps, generator):
    """DiffusionNFT's trained times: per sample a random permutation of the sampler's N steps, of
    which the first int(0.99 N) (= N - 1 for N < 100) are trained, each with fresh noise.
    Returns (batch, N - 1) step indices, distinct within a row."""
    order = torch.rand(batch, num_steps, generator=generator).argsort(1)  # a permutation per row
    return order[:, :num_steps - 1]


def rl_backward(cfg, m, batches, rows, step, rank, world):
    """Gradient of one RL update on the samples `rows` (indices into each task's samples on this
    rank), at the sampler's steps but the last (timestep_fraction 0.99 of 10 steps):
    GRPO-Guard's clipped ratio on the stored steps 0..N-2 in order, or NFT's loss on a random
    N - 1 of the N times per sample with fresh noise around each x0. Returns the update's
    {clipfrac, ratio_dev, approx_kl} over all ranks (GRPO-Guard; empty for NFT): the fraction
    of ratios outside the clip range, mean |ratio - 1| and 0.5 mean (log ratio)^2 (Flow-GRPO)."""
    N, nft, b = cfg.num_steps, cfg.algo == "nft", len(rows)
    sigmas = sd3_sigmas(N)
    stats = torch.zeros(4, dtype=torch.float64, device=m.device)  # clipped, |r - 1|, log^2, n
    for i, (mine, traj, adv) in enumerate(batches):
        g = rng(cfg.seed, step, 2, i, rank)  # NFT's timesteps and fresh noise
        for s in chunks(b, cfg.micro_batch):
            idx = rows[s]
            ps, a, states = [mine[r] for r in idx], adv[idx.to(adv.device)], traj["states"][idx]
            v = m.velocity("policy", ps, cfg.guidance)
            if nft:
                v_old = m.velocity("old", ps, cfg.guidance)
                v_ref = m.velocity(None, ps, cfg.guidance)
                ts = nft_timesteps(len(idx), N, g)
            for k in range(N - 1):
                if nft:  # x_t = (1 - t) x0 + t eps at each sample's own t, eps fresh
                    x0 = states[:, -1]
                    t = sigmas[ts[:, k]].to(x0.device)  # (B,)
                    eps = torch.randn(x0.shape, generator=g).to(x0.device)
                    x_t = (1 - _bcast(t, x0)) * x0 + _bcast(t, x0) * eps
                    with torch.no_grad():
                        vo, vr = v_old(x_t, t), (v_ref(x_t, t) if cfg.nft_kl else None)
                    vt = v(x_t, t)
                    loss = nft_loss(vt, vo, x0, x_t, t, nft_r(a), cfg.nft_beta)
                    if cfg.nft_kl:  # + KL to the base model: mean (v_theta - v_ref)^2
                        loss = loss + cfg.nft_kl * (vt - vr).pow(2).flatten(1).mean(1)
                else:
                    t, t_next, x = sigmas[k], sigmas[k + 1], states[:, k]
                    mu, _ = transition(x, v(x, t), t, t_next, cfg.noise_level)
                    loss, ratio = grpo_loss(mu, traj["means"][idx, k], states[:, k + 1],
                                            traj["stds"][idx, k], t_next - t, a, cfg.clip_range,
                                            ratio_norm=not cfg.no_ratio_norm,
                                            dt_reweight=not cfg.no_ratio_norm)
                    r = ratio.detach().double()  # summed on the device: no sync per step
                    stats += torch.stack([((r - 1).abs() > cfg.clip_range).sum(),
                                          (r - 1).abs().sum(), r.log().pow(2).sum(),
                                          r.new_tensor(len(r))])
                m.use("policy")  # gradient checkpointing recomputes with the active adapter
                (loss.sum() / (b * len(batches) * (N - 1))).backward()
    if nft:
        return {}
    if world > 1:
        torch.distributed.all_reduce(stats)
    c, dev, kl, n = stats.tolist()
    return dict(clipfrac=c / n, ratio_dev=dev / n, approx_kl=0.5 * kl / n)


def nft_decay(cfg, step):
    """The old adapter's decay after optimizer step `step`: 0 before FLAT, then min(RATE (step -
    FLAT), MAX) (DiffusionNFT: GenEval 0,0.001,0.5; OCR 75,0.0075,0.999)."""
    flat, rate, cap = (float(x) for x in cfg.nft_decay.split(","))
    return 0.0 if step < flat else min(rate * (step - flat), cap)


def train_rl(cfg, m, tasks, name, rank, world, schedule=None):
    """Stage 1 (a teacher: one task). Each epoch samples K = updates_per_epoch batches, shuffles
    them on each rank and takes K optimizer steps, one per batch_size trajectories, as the public
    configs do: every update after the first trains on samples of an older policy, where the
    ratio, RatioNorm and the clip act. NFT's old adapter follows once per epoch. Writes
    <out>/<name>/: the LoRA (its EMA), config.json, run.json, metrics.jsonl, checkpoints."""
    run_dir = os.path.join(cfg.out, name)
    if (mode := prepare_run(run_dir, cfg, rank, name)) == "done":
        return run_dir
    schedule = schedule or (lambda step: tasks)
    old = []
    if cfg.algo == "nft":  # the sampling policy: a second adapter that follows the trained one
        add_lora(m.tr, "old", cfg)
        old = [p for n, p in m.tr.named_parameters() if ".old." in n]
    params, opt, ema, start, elapsed, _ = start_training(cfg, m, run_dir, "policy", mode, rank, old)
    log, bad, K, b = logger(run_dir, rank), 0, cfg.updates_per_epoch, cfg.batch_size // world
    prompts_of = lambda s: [p for i, t in enumerate(schedule(s)) for p in
                            draw_prompts(cfg, t, s, i, K * cfg.batch_size // cfg.group_size)]
    bar_ = bar(range(start, cfg.steps, K), rank, name)
    for first in bar_:  # one epoch: optimizer steps first .. first + K - 1
        t0 = time.perf_counter()
        encode_ahead(cfg, m, first, prompts_of, K)
        batches, rewards = rl_sample(cfg, m, schedule(first), first, rank, world)
        order = torch.randperm(K * b, generator=rng(cfg.seed, first, 3, rank))
        for u, step in enumerate(range(first, first + K)):
            stats = rl_backward(cfg, m, batches, order[u * b:(u + 1) * b], step, rank, world)
            gnorm, bad = optimizer_step(cfg, opt, params, bad, rank, world)
            ema.step(step + 1)
            now = time.perf_counter()
            elapsed, t0 = elapsed + now - t0, now
            sampled = {f"reward_{k}": v for k, v in rewards.items()} if u == 0 else {}
            log(step=step + 1, **sampled, grad_norm=gnorm, **stats, elapsed=round(elapsed, 3))
        with torch.no_grad():  # theta_old <- d theta_old + (1 - d) theta, once an epoch
            for po, p in zip(old, params):
                po.lerp_(p.detach(), 1 - nft_decay(cfg, first + K))
        bar_.set_postfix(reward=f"{sum(rewards.values()) / len(rewards):.3f}")
        end = first + K
        if rank == 0 and (end // cfg.save_every > first // cfg.save_every or end == cfg.steps):
            save_checkpoint(run_dir, end, m.tr, ["policy"], [opt], [ema], cfg, old, elapsed)
    return finish_run(run_dir, cfg, m, "policy", ema, rank, world, elapsed,
                      cfg.steps * len(schedule(0)) * cfg.batch_size)


# ---------------------------------------------------------------------------------------------
# training runs: what stage 1 and stage 2 share
# ---------------------------------------------------------------------------------------------
def start_training(cfg, m, run_dir, name, mode, rank, aux=(), helpers=None):
    """A new trained adapter `name` (fp32), its AdamW and EMA; helpers: {adapter: AdamW
    settings} of more trained adapters a baseline needs (DMD's fake score), each starting at the
    base, with no EMA. All restored from the latest checkpoint when resuming. Returns (params,
    optimizer, ema, first step, seconds so far, {helper: (params, optimizer)}); `name` is left
    the trainable adapter."""
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
    adamw = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    helpers = helpers or {}  # may also set the AdamW of `name` itself (TDM's betas)
    names, opts, made = [name, *(n for n in helpers if n != name)], [], {}
    for n in names:
        p = add_lora(m.tr, n, cfg)
        opts.append(torch.optim.AdamW(p, **{**adamw, **helpers.get(n, {})}))
        made[n] = (p, opts[-1])
    params, opt = made.pop(name)
    ema = EMA(params, cfg.ema, cfg.ema_every)
    m.trainable, m.active = params, "?"  # the next m.use sets which weights require grad
    start, elapsed = 0, 0.0
    if mode == "resume":
        start, elapsed = load_checkpoint(run_dir, m.tr, names, opts, [ema], cfg, aux)
        say(rank, f"resumed {run_dir} at step {start}")
    return params, opt, ema, start, elapsed, made


def optimizer_step(cfg, opt, params, bad, rank, world):
    """Average the gradients over the ranks, clip, step (a non-finite one is skipped)."""
    if world > 1:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in params])
        torch.distributed.all_reduce(flat)
        for p, g in zip(params, (flat / world).split([p.numel() for p in params])):
            p.grad = g.view_as(p)
    return guarded_step(opt, params, cfg.grad_clip, cfg.max_bad_steps, bad, rank)


def finish_run(run_dir, cfg, m, name, ema, rank, world, elapsed, trajectories):
    """The stage's final LoRA (its EMA; the file's existence marks the stage done), config.json
    and run.json (training seconds, sampled trajectories), after checking that every rank holds
    the same weights; the adapters are dropped."""
    check_in_sync(m.trainable, world, rank, os.path.basename(run_dir))
    ema.copy_to_params()
    if rank == 0:
        write_text(os.path.join(run_dir, "config.json"),
                   json.dumps(dataclasses.asdict(cfg), indent=1))
        write_text(os.path.join(run_dir, "run.json"),
                   json.dumps({"seconds": round(elapsed, 2), "trajectories": trajectories}))
        save_lora(run_dir, m.tr, name)
    barrier(world)
    drop_adapters(m)
    say(rank, f"{os.path.basename(run_dir)}: saved {run_dir}/{LORA_FILE}")
    return run_dir


def chunks(n, size):
    """Slices of range(n) of at most size elements (size 0: one slice)."""
    size = size or max(n, 1)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ---------------------------------------------------------------------------------------------
# tasks: prompts (prompts.py) and rewards (rewards.py)
# ---------------------------------------------------------------------------------------------
def score(task, images, prompts, evaluation=False):
    fn = task.eval_reward if evaluation and task.eval_reward is not None else task.reward
    return fn(images, prompts, [task.meta.get(p, {}) for p in prompts]).float().cpu()


def draw_prompts(cfg, task, step, index, n):
    """n train prompts of the task with this index at an optimizer step: the same on every rank,
    a function of (seed, step), so that a resumed run draws what an uninterrupted one would."""
    idx = torch.randint(len(task.train), (n,), generator=rng(cfg.seed, step, 0, index))
    return [task.train[i] for i in idx]


def encode_ahead(cfg, m, step, prompts_of, every=1):
    """Embed the prompts of the next steps at once (prompts_of(step) -> list; steps `every`
    apart: an RL epoch's first), as many steps as fill half the embedding cache: the text
    encoders then visit the GPU once per so many steps."""
    first = prompts_of(step)
    if any(p not in m.cache for p in first):  # else they were embedded ahead
        half = cfg.embed_cache_mb * 2**20 / 2
        ahead = max(1, min(64, int(half // (len(set(first)) * m.prompt_bytes()))))
        m.encode([p for s in range(step, min(step + ahead * every, cfg.steps), every)
                  for p in prompts_of(s)])


# ---------------------------------------------------------------------------------------------
# eval: ODE sampler, CFG, each task's metric on its test prompts, for every model of the run
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_images(m, adapter, prompts, seeds, cfg, guidance):
    """ODE samples (eval_steps, CFG) for prompts, the noise of each from its own seed."""
    sigmas, out = sd3_sigmas(cfg.eval_steps), []
    for i in range(0, len(prompts), cfg.eval_batch):
        ps, ss = prompts[i:i + cfg.eval_batch], seeds[i:i + cfg.eval_batch]
        x = torch.cat([m.noise(1, rng(cfg.seed, 7, s)) for s in ss])
        traj = rollout(m.velocity(adapter, ps, guidance), x, sigmas, 0.0)
        out.append(m.decode(traj["states"][:, -1]).cpu())
    return torch.cat(out)


def held_out(cfg, m, tasks, adapter, guidance, rank, world, grid=None, export=None):
    """{task: mean metric} of a model on each task's test prompts, eval_seeds images a prompt
    (image i has seed i), split across ranks. grid: a list that receives, per task, the first
    seed of two test prompts; export: a folder for GenEval's layout (geneval tasks)."""
    out = {}
    for t in tasks:
        test = t.test[: cfg.eval_prompts] if cfg.eval_prompts else t.test
        test = [p for p in test for _ in range(cfg.eval_seeds)]
        mine = list(range(rank, len(test), world))
        m.encode(list(dict.fromkeys(test[i] for i in mine)))  # one visit of the text encoders
        imgs = sample_images(m, adapter, [test[i] for i in mine], mine, cfg, guidance)
        r = score(t, imgs, [test[i] for i in mine], evaluation=True) if mine else torch.zeros(0)
        pad = torch.full((math.ceil(len(test) / world),), float("nan"))  # equal for all_gather
        pad[: len(r)] = r
        allr = gather(pad.to(m.device), world).cpu()
        out[t.name] = allr[~torch.isnan(allr)].mean().item()
        if export and t.name == "geneval":
            import rewards
            rewards.export_geneval(export, [t.meta[test[i]] for i in mine],
                                   [i // cfg.eval_seeds for i in mine],
                                   [i % cfg.eval_seeds for i in mine], imgs)
        if grid is not None:
            two = [0, cfg.eval_seeds][: len(test) // cfg.eval_seeds]
            grid.append((imgs[[mine.index(i) for i in two]] if world == 1 else
                         sample_images(m, adapter, [test[i] for i in two], two, cfg, guidance),
                         [test[i] for i in two]))
    return out


ORDER = ["teacher-", "joint-grpo_guard", "joint-nft", "cascade-grpo_guard", "cascade-nft",
         "student"]  # then the other students, by name


def discover(out, tasks, extra=None):
    """Every model of a run: the base, then each finished LoRA folder of <out> (teachers in
    --tasks order, then the others), then --lora extras. name -> folder (None: the base)."""
    found = sorted(d for d in (os.listdir(out) if os.path.isdir(out) else [])
                   if os.path.isfile(os.path.join(out, d, LORA_FILE)))
    teachers = [f"teacher-{t}" for t in tasks] + [d for d in found if d.startswith("teacher-")]
    rank_of = lambda d: (ORDER.index(d) if d in ORDER else len(ORDER), d)
    others = sorted((d for d in found if not d.startswith("teacher-")), key=rank_of)
    names = list(dict.fromkeys([d for d in teachers if d in found] + others))
    return {"base": None, **{n: os.path.join(out, n) for n in names}, **(extra or {})}


def evaluate(cfg, m, tasks, rank, world, loras=None):
    """Writes <out>/eval.json (model -> task -> metric, seconds), eval.md and samples.png. Each
    model samples with the CFG it was trained with (NFT models: 1)."""
    models = discover(cfg.out, [t.name for t in tasks], loras)
    for i, (name, d) in enumerate(models.items()):  # adapter names m0, m1, ... (any folder name)
        if d is not None:
            load_lora(m.tr, d, f"m{i}", f"python opd.py --stage all --out {cfg.out}")
    table, grid = {}, []
    for i, (name, d) in enumerate(models.items()):
        m.active = "?"
        g = cfg.guidance if d is None else float(run_info(d, "guidance", cfg.guidance))
        export = os.path.join(cfg.out, "geneval", name) if cfg.export_geneval else None
        table[name] = held_out(cfg, m, tasks, None if d is None else f"m{i}", g, rank, world,
                               grid, export)
        table[name]["seconds"] = 0.0 if d is None else float(run_info(d, "seconds", 0.0))
    drop_adapters(m)
    if rank == 0:
        write_eval(cfg.out, table, [t.name for t in tasks], grid)
    return table


def normalised_mean(table, tasks, ref=None):
    """Mean over tasks of min-max-normalised scores across the compared models (paper Table 1);
    the minima and maxima are those of ref (default: the table itself)."""
    ref = ref or table
    lo = {k: min(r[k] for r in ref.values()) for k in tasks}
    hi = {k: max(r[k] for r in ref.values()) for k in tasks}
    return {name: sum((r[k] - lo[k]) / (hi[k] - lo[k]) if hi[k] > lo[k] else 0.0
                      for k in tasks) / len(tasks) for name, r in table.items()}


def method_seconds(table):
    """Training seconds of each model's whole method: a student's include its teachers'."""
    teachers = sum(r["seconds"] for n, r in table.items() if n.startswith("teacher-"))
    return {n: r["seconds"] + (teachers if n.startswith("student") else 0.0)
            for n, r in table.items()}


def write_eval(out, table, tasks, grid):
    avg, secs = normalised_mean(table, tasks), method_seconds(table)
    lines = ["| model | " + " | ".join(tasks) + " | avg | train time |",
             "|---" * (len(tasks) + 3) + "|"]
    for name, r in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in tasks) +
                     f" | {avg[name]:.3f} | " + (f"{secs[name]:.0f} s |" if secs[name] else "- |"))
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


# ---------------------------------------------------------------------------------------------
# main: resolve and check every stage's config before any model loads, then run the stages
# ---------------------------------------------------------------------------------------------
def model_kind(model):
    return "tiny" if model == "tiny" else "real"


def parse_pairs(s):
    """'a=1,b=2' -> {'a': '1', 'b': '2'} (its Rule checked the form)."""
    items = (i.partition("=") for i in s.split(",") if i.strip())
    return {k.strip(): v.strip() for k, _, v in items}


def parse_steps(s, n):
    """'' -> all but the last step (the paper); '0-8' or '0,2,4' otherwise."""
    if not s:
        return list(range(n - 1))
    steps = set()
    for part in s.split(","):
        a, _, b = part.partition("-")
        steps.update(range(int(a), int(b or a) + 1))
    return sorted(steps)


def resolve(cfg, stage, **defaults):
    """A copy of cfg with the stage's defaults in the fields left at None (defaults first, then
    the tables), checked: every field against its Rule, then cfg.relations(stage)."""
    kind = model_kind(cfg.model)
    key = (kind, "teacher", cfg.algo) if stage == "teacher" else (kind, "distill", None)
    row = STAGE_DEFAULTS.get(key, STAGE_DEFAULTS[kind, "distill", None])  # a bad --algo: below
    table = {**MODEL_DEFAULTS[kind], **dict(zip(COLUMNS, row)), **defaults}
    c = dataclasses.replace(cfg, **{k: v for k, v in table.items() if getattr(cfg, k) is None})
    check_fields(c)
    for broken, message in c.relations(stage):
        if broken:
            raise UserError(message)
    return c


def default_words(name):
    """What --help says of a field whose default depends on the model and stage."""
    if name in MODEL_DEFAULTS["tiny"]:
        return ", ".join(f"{kind} {d[name]}" for kind, d in MODEL_DEFAULTS.items())
    by_value = {}
    for key, row in STAGE_DEFAULTS.items():
        by_value.setdefault(row[COLUMNS.index(name)], []).append(" ".join(filter(None, key)))
    return "; ".join(f"{v} ({', '.join(keys)})" for v, keys in by_value.items())


def parse_config(argv=None, cls=Config, description="DiffusionOPD: see the top of opd.py"):
    import options
    return options.parse(cls, argv, description, default_words)


def teacher_dirs(cfg, tasks):
    """task -> teacher folder: --teachers, else <out>/teacher-<task>."""
    return parse_pairs(cfg.teachers) if cfg.teachers else \
        {t: os.path.join(cfg.out, f"teacher-{t}") for t in tasks}


def task_names(cfg):
    if cfg.stage == "teacher":
        return [cfg.task]
    return list(parse_pairs(cfg.teachers)) if cfg.stage == "distill" and cfg.teachers else \
        cfg.tasks.split(",")


def preflight(cfg, stages):
    """Checks that need no model, before one loads: every stage's options, the ranks split the
    batch, the teachers exist, and --resume keeps the model and LoRA of the run it continues."""
    world, tasks = int(os.environ.get("WORLD_SIZE", 1)), task_names(cfg)
    for stage in stages:
        c = resolve(cfg, stage)
        if c.batch_size % world:
            raise UserError(f"--batch_size {c.batch_size} does not divide across {world} ranks")
        if stage == "distill" and "teacher" not in stages:  # the teachers must exist already
            for t, d in teacher_dirs(c, tasks).items():
                if not os.path.isfile(os.path.join(d, LORA_FILE)):
                    raise UserError(f"no LoRA at {os.path.join(d, LORA_FILE)}: make it with "
                                    f"`python opd.py --stage teacher --task {t} --out {cfg.out}`")
        runs = {"teacher": [f"teacher-{t}" for t in tasks], "distill": ["student"]}.get(stage, [])
        for d in (os.path.join(cfg.out, r) for r in runs):
            if cfg.resume and checkpoints(d) and not os.path.isfile(os.path.join(d, LORA_FILE)):
                check_resume(d, c)


def setup(cfg, first_stage):
    """Processes, tasks and the model, once every check has passed. Returns (m, tasks, rank,
    world), the resolved config of the first stage printed."""
    rank, world, device = dist_setup(cfg.device)
    torch.manual_seed(cfg.seed)
    first = resolve(cfg, first_stage)
    tasks = [P.make_task(n, first, device) for n in task_names(cfg)]
    say(rank, config_text(first))
    m = SD3(load_pipeline(first, device, rank, world), first, device)
    if cfg.compile:
        compile_model(m.tr)
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    return m, tasks, rank, world


def run(cfg):
    stages = ["teacher", "distill", "eval"] if cfg.stage == "all" else [cfg.stage]
    preflight(cfg, stages)
    m, tasks, rank, world = setup(cfg, stages[0])
    result = None
    for stage in stages:
        c = resolve(cfg, stage)
        if stage == "teacher":
            for t in tasks:
                train_rl(c, m, [t], f"teacher-{t.name}", rank, world)
        elif stage == "distill":
            distill(c, m, tasks, teacher_dirs(c, [t.name for t in tasks]), rank, world)
        else:
            result = evaluate(c, m, tasks, rank, world, parse_pairs(c.lora))
    return result


def main(argv=None):
    cli(lambda a: run(parse_config(a)), argv)


if __name__ == "__main__":
    main()
