"""
DiffusionOPD: on-policy distillation of several RL-trained teachers into one flow-matching
text-to-image student (Stable Diffusion 3 / 3.5). One file, read top to bottom:
config -> maths -> models -> tasks -> checkpoints -> stage 1 (teachers) -> stage 2 (distill)
-> eval -> main. The paper's baselines live in baselines.py, the speed and memory bench in
bench.py, the offline stand-in models in tiny.py, the built-in prompt sets in prompts.py; every
one of them is reached through this script's --stage.

Run manual
----------
Tiny, offline, CPU (an SD3 built from configs, pretrained ~60 s once on toy images, toy rewards):
    python opd.py                      # teachers for color/position/jpeg, distill, eval: ~4-6 min
    python opd.py --stage teacher --task color --out runs/x          # one teacher, ~35 s
    python opd.py --stage teacher --task color --algo nft            # a DiffusionNFT teacher
    python opd.py --stage compare      # the paper's Table 1 and distillation methods, tiny (<20 min)
    python opd.py --stage noise        # distillation rollouts at a = 0, 0.3, 0.7
    python opd.py --stage bench        # round time, FLOPs, saved bytes, peak memory
    torchrun --nproc_per_node=2 opd.py --stage teacher --task color --out runs/y
    python opd.py --stage eval --out runs/tiny          # eval.json, eval.md, samples.png
One GPU, the real SD3.5-Medium (weights from the hub or a local folder; prompts built in):
    python opd.py --model stabilityai/stable-diffusion-3.5-medium --stage teacher --task ocr \
        --grad_checkpointing
Eight GPUs (the paper's stage 2):
    torchrun --nproc_per_node=8 opd.py --model stabilityai/stable-diffusion-3.5-medium \
        --stage distill --teachers geneval=DIR,ocr=DIR,aesthetic=DIR ...
See README.md for the full ladder, the settings of the paper and the numbers to expect.

Simplifications (and why)
-------------------------
1. Teachers and student are LoRA adapters on ONE transformer (peft); switching adapters switches
   models, so M teachers cost one model's memory.
2. Stage 1 is GRPO-Guard (Flow-GRPO + RatioNorm + 1/|dt| reweighting) or DiffusionNFT (--algo
   nft, the paper's GenEval teacher). NFT samples with the Euler ODE where the public code uses
   a second-order deterministic solver. Any teacher LoRA can be passed to stage 2.
3. Per-step losses are averaged over latent elements (as the public code), not summed (as the
   paper's equations): a constant factor per resolution, absorbed by Adam.
4. Prompt embeddings are computed when first needed and kept in a cache of bounded size; the
   text encoders visit the GPU only to encode the prompts of the next steps (--text_encoders).
5. The tiny default model (tiny.py) is built from configs and pretrained for ~60 s on synthetic
   captioned images (cached); its tasks have toy rewards (colour, position, JPEG size). Its
   numbers show that the machinery works, not what SD3.5 reaches. There the student's LoRA also
   adapts the AdaLN and text-projection layers (the teachers' is the paper's, attention only):
   one adapter of a 2-block model must hold three prompt-dependent behaviours.
"""
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import textwrap
import time

import torch


# ----------------------------------------------------------------------------------------------
# config: one flat dataclass. Every field states what it accepts (a Rule of options.py); check()
# applies the rules and the relations between fields to the resolved config of every stage, before any
# model loads. None means "the stage's default" (STAGE_DEFAULTS), printed resolved.
# ----------------------------------------------------------------------------------------------
from options import FLAG, UserError, check_fields, field as _f, names, num, one_of, pairs, path, text
from checkpoint import (LORA_FILE, adapter_state, check_resume, checkpoints, load_checkpoint, prepare_run,
                        save_checkpoint, write_text)


TOY_TASKS = ("color", "position", "jpeg")
REAL_TASKS = {  # task -> (training reward, evaluation reward)
    "geneval": ("geneval_partial", "geneval"), "ocr": ("ocr", "ocr"),
    "aesthetic": ("pickscore:1,clipscore:1,hpsv2:1",) * 2}
TASKS = TOY_TASKS + tuple(REAL_TASKS)
STAGES = ("all", "teacher", "distill", "eval", "joint", "cascade", "compare", "noise", "bench")
LOSSES = ("closed", "ppo", "sft", "dance", "flow")


def _steps_spec(s):
    return bool(re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", s)) and bool(parse_steps(s, 0))


def _reward_spec(s):
    import rewards
    rewards.load(s)  # a bad name or weight raises ValueError; nothing is loaded yet


def _decay_spec(s):
    flat, rate, cap = (float(x) for x in s.split(","))
    return flat >= 0 and rate >= 0 and 0 <= cap < 1


@dataclasses.dataclass
class Config:
    stage: str = _f("all", one_of(*STAGES), "all (teacher, distill, eval) | teacher | distill | eval | joint | cascade | compare | noise | bench")
    algo: str = _f("grpo_guard", one_of("grpo_guard", "nft"), "stage-1 RL (teachers, joint, cascade): grpo_guard | nft (DiffusionNFT)")
    task: str = _f("color", one_of(*TASKS), "the task of --stage teacher")
    tasks: str = _f("color,position,jpeg", names(TASKS), "comma-separated tasks of the multi-task stages")
    teachers: str = _f("", pairs(TASKS, text()), "--stage distill: task=DIR,... (default: <out>/teacher-<task>)")
    lora: str = _f("", pairs(None, text()), "--stage eval: extra NAME=DIR LoRAs to evaluate")
    model: str = _f("tiny", text(), "tiny | sd35m-random | a hub id or local folder of an SD3 pipeline")
    out: str = _f("runs/tiny", path("out"), "output folder")
    prompts: str = _f("", path("file"), "real tasks: train prompts, txt or GenEval jsonl (default: built in, prompts.py)")
    test_prompts: str = _f("", path("file"), "real tasks: held-out prompts (default: built in, or every 10th of --prompts)")
    reward: str = _f("", text(True, _reward_spec, "a reward spec (rewards.py --list)", ("bogus", "color:-1")), "reward spec overriding the task's")
    steps: int = _f(None, num(int, 1), "optimizer steps of the stage (tiny: teacher 60, distill 60)")
    seed: int = _f(0, num(int, 0), "random seed (LoRA init, prompts and noise per step; the tiny model is fixed)")
    noise_level: float = _f(None, num(float, 0, 10), "SDE noise level a of training rollouts (GRPO-Guard 0.7; NFT, distill 0 = ODE)")
    num_steps: int = _f(10, num(int, 2, 1000), "sampler steps of training rollouts")
    eval_steps: int = _f(40, num(int, 1, 1000), "sampler steps of evaluation (ODE)")
    guidance: float = _f(None, num(float, 0, 100), "classifier-free guidance scale (1 = off; NFT 1, else 4.5)")
    teacher_guidance: str = _f("", pairs(TASKS, num(float, 0, 100)), "distill: per-teacher CFG, e.g. geneval=1.0 (default: its own)")
    resolution: int = _f(None, num(int, 8, 4096), "image size in pixels (tiny 32, others 512)")
    max_seq_len: int = _f(None, num(int, 1, 512), "T5 tokens (tiny 8, others 128)")
    lora_rank: int = _f(32, num(int, 1, 4096), "LoRA rank r")
    lora_alpha: float = _f(64, num(float, 0, lo_open=True), "LoRA alpha")
    lora_targets: str = _f(None, text(False, lambda v: bool(v.strip(", ")), bad=("", ",")), "LoRA target modules (see STAGE_DEFAULTS)")
    lr: float = _f(None, num(float, 0, 1, lo_open=True), "AdamW learning rate (GRPO-Guard 1e-4, NFT, distill 3e-4)")
    weight_decay: float = _f(1e-4, num(float, 0, 1), "AdamW weight decay")
    grad_clip: float = _f(1.0, num(float, 0, lo_open=True), "gradient norm clip")
    batch_size: int = _f(None, num(int, 1), "trajectories per optimizer step and task, all ranks (tiny: RL 24, distill 16)")
    micro_batch: int = _f(None, num(int, 0), "trajectories per forward (0 = a rank's batch; real: RL 9, distill 3)")
    group_size: int = _f(None, num(int, 2), "RL: images per prompt, one group (tiny 12, paper 24)")
    clip_range: float = _f(2e-6, num(float, 0, 1, lo_open=True, hi_open=True), "GRPO-Guard: PPO clip range")
    inner_epochs: int = _f(1, num(int, 1, 100), "RL: optimizer steps on each sampled batch")
    no_ratio_norm: bool = _f(False, FLAG, "GRPO-Guard: plain Flow-GRPO ratio (no RatioNorm, no 1/|dt|)")
    nft_beta: float = _f(1.0, num(float, 0, 10, lo_open=True), "NFT: beta of v+ and v- (GenEval 1.0, OCR 0.1)")
    nft_decay: str = _f("0,0.001,0.5", text(False, _decay_spec, "FLAT,RATE,MAX, MAX < 1", ("x", "1,2", "0,0.1,1.5")), "NFT: old adapter decay min(RATE (step - FLAT), MAX)")
    nft_kl: float = _f(1e-4, num(float, 0, 100), "NFT: weight of the velocity KL to the base model")
    loss: str = _f("closed", one_of(*LOSSES), "distill: closed (closed-form KL) | ppo | sft | dance | flow")
    two_pass: bool = _f(False, FLAG, "distill: roll out, then recompute (reference) instead of fused")
    train_steps: str = _f("", text(True, _steps_spec, "steps like 0-8 or 0,2,4", ("x", "9-3", "0,99")), "distill: sampler steps with a loss (default all but the last)")
    eval_every: int = _f(0, num(int, 0), "distill: held-out metrics of the saved (EMA) student every N rounds (0 = off)")
    eval_batch: int = _f(16, num(int, 1), "eval: images per forward")
    eval_prompts: int = _f(0, num(int, 0), "eval: at most this many test prompts per task (0 = all)")
    eval_seeds: int = _f(4, num(int, 1, 1000), "eval: images per test prompt (GenEval uses 4)")
    export_geneval: bool = _f(False, FLAG, "eval: also write <out>/geneval/<model>/ for GenEval's own evaluator")
    save_every: int = _f(20, num(int, 1), "save a checkpoint every N optimizer steps (and at the end)")
    resume: bool = _f(False, FLAG, "continue from the latest checkpoint in the stage's folder")
    overwrite: bool = _f(False, FLAG, "redo a stage whose output exists")
    max_bad_steps: int = _f(5, num(int, 1), "abort after this many non-finite steps in a row")
    ema: float = _f(None, num(float, 0, 1, hi_open=True), "EMA decay of the trained LoRA, saved and evaluated (0 = off; 0.9)")
    ema_every: int = _f(None, num(int, 1), "update the EMA every N optimizer steps (8 as Flow-GRPO; tiny 1)")
    grad_checkpointing: bool = _f(False, FLAG, "recompute each transformer block in the backward pass")
    compile: bool = _f(False, FLAG, "torch.compile the transformer")
    text_encoders: str = _f("offload", one_of("offload", "gpu", "cpu"), "offload (on the GPU only to encode) | gpu | cpu")
    no_t5: bool = _f(False, FLAG, "load the pipeline without T5 (its embeddings are zeros)")
    embed_cache_mb: float = _f(2048, num(float, 1), "host memory for cached prompt embeddings (MB)")
    peak_tflops: float = _f(0, num(float, 0), "bench: the device's peak bf16 TFLOP/s (0 = a known GPU's)")
    device: str = _f("auto", one_of("auto", "cpu", "cuda", "meta"), "auto | cpu | cuda | meta (--stage bench: count shapes only)")


# the paper's LoRA targets (peft matches name suffixes: attn and attn2 of dual-attention blocks)
ATTN_TARGETS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"
TINY_MULTI_TARGETS = ATTN_TARGETS + ",norm1.linear,norm1_context.linear,norm_out.linear,context_embedder," \
                                    "text_embedder.linear_1,text_embedder.linear_2"
RL_STAGES = ("teacher", "joint", "cascade")

# field -> {key: value}; keys, most specific first: (stage, kind), (class, kind, algo),
# (class, kind), (class, algo), stage, class, kind, "*"; class "rl" = teacher/joint/cascade
STAGE_DEFAULTS = {
    "noise_level": {("rl", "grpo_guard"): 0.7, "*": 0.0},
    "steps": {("teacher", "tiny"): 60, ("distill", "tiny"): 60, ("joint", "tiny"): 100, ("cascade", "tiny"): 300,
              "teacher": 1000, "distill": 1000, "joint": 2000, "cascade": 6000, "bench": 3, "*": 1},
    "lr": {("rl", "tiny"): 1e-3, ("distill", "tiny"): 3e-3,
           ("rl", "grpo_guard"): 1e-4, "*": 3e-4},
    "guidance": {("rl", "nft"): 1.0, "*": 4.5},
    "batch_size": {("rl", "tiny"): 24, ("distill", "tiny"): 16, "tiny": 32, "*": 24},
    "micro_batch": {("rl", "real"): 9, "tiny": 0, "*": 3},
    "group_size": {"tiny": 12, "*": 24},
    "resolution": {"tiny": 32, "*": 512},
    "max_seq_len": {"tiny": 8, "*": 128},
    # the paper's targets, the attention projections; on the tiny model (2 blocks of width 32) the
    # student, which must hold all M teachers in one adapter, also adapts the prompt's way in: the
    # AdaLN modulation (pooled prompt and time) and the text projections. With attention alone it
    # kept 79-82% of the jpeg teacher's gain, 99% when distilled from that teacher alone. Joint
    # and cascade RL, which also hold every task in one adapter, get the same.
    "lora_targets": {**{(s, "tiny"): TINY_MULTI_TARGETS for s in ("distill", "joint", "cascade")}, "*": ATTN_TARGETS},
    "ema": {"*": 0.9},
    "ema_every": {"tiny": 1, "*": 8},
}


def parse_config(argv=None):
    import options
    return options.parse(Config, argv, "DiffusionOPD (see the top of opd.py)")


def model_kind(model):
    return "tiny" if model == "tiny" else "real"


def resolve(cfg, stage):
    """A copy of cfg with the stage's defaults filled in, checked."""
    kind, cls = model_kind(cfg.model), ("rl" if stage in RL_STAGES else stage)
    algo = cfg.algo if cls == "rl" else None
    c = dataclasses.replace(cfg)
    for name, table in STAGE_DEFAULTS.items():
        if getattr(c, name) is None:
            keys = [(stage, kind), (cls, kind, algo), (cls, kind), (cls, algo), stage, cls, kind, "*"]
            setattr(c, name, next(table[k] for k in keys if k in table))
    check(c, stage)
    return c


def check(c, stage):
    """Every field against its Rule (options.py), then the relations between fields: one
    UserError naming the option, the value given and what is accepted."""
    check_fields(c)
    n, a = c.num_steps, c.noise_level
    factor, largest = (4, 128) if model_kind(c.model) == "tiny" else (16, 4096)
    tasks = list(parse_pairs(c.teachers)) if stage == "distill" and c.teachers else c.tasks.split(",")
    relations = [  # (broken?, message)
        (stage in RL_STAGES and c.batch_size % c.group_size,
         f"--batch_size {c.batch_size} is not a multiple of --group_size {c.group_size}"),
        (stage in RL_STAGES and c.algo == "grpo_guard" and a == 0,
         "--algo grpo_guard needs --noise_level > 0: the ODE step has no density"),
        (stage == "distill" and c.loss in ("ppo", "flow") and a == 0,
         f"--loss {c.loss} needs --noise_level > 0: the ODE step has no density"),
        (stage == "distill" and c.loss in ("sft", "dance") and a > 0,
         f"--loss {c.loss} rolls out with the ODE: --noise_level must be 0, got {a}"),
        (c.two_pass and c.loss not in ("closed", "ppo"), f"--two_pass applies to --loss closed or ppo, not {c.loss}"),
        (max(parse_steps(c.train_steps, n)) >= n, f"--train_steps {c.train_steps!r} must lie in 0..{n - 1}"),
        (c.resume and c.overwrite, "--resume and --overwrite contradict each other: pass one"),
        (c.device == "cuda" and not torch.cuda.is_available(), "--device cuda: no CUDA device is available"),
        (c.device == "meta" and c.stage != "bench", "--device meta counts shapes for --stage bench only"),
        (c.resolution % factor or c.resolution > largest,
         f"--resolution {c.resolution} must be a multiple of {factor} up to {largest} for --model {c.model}"),
        (any(k not in tasks for k in parse_pairs(c.teacher_guidance)),
         f"--teacher_guidance names a task not among {','.join(tasks)}"),
        (stage == "eval" and c.export_geneval and "geneval" not in tasks,
         "--export_geneval needs the geneval task in --tasks"),
    ]
    for broken, message in relations:
        if broken:
            raise UserError(message)


def parse_pairs(s):
    """'a=1,b=2' -> {'a': '1', 'b': '2'} (its Rule checked the form)."""
    return {k.strip(): v.strip() for k, _, v in (i.partition("=") for i in s.split(",") if i.strip())}


def parse_steps(s, n):
    """'' -> all but the last step (the paper); '0-8' or '0,2,4' otherwise."""
    if not s:
        return list(range(n - 1))
    steps = set()
    for part in s.split(","):
        a, _, b = part.partition("-")
        steps.update(range(int(a), int(b or a) + 1))
    return sorted(steps)

# ----------------------------------------------------------------------------------------------
# maths: the flow-matching SDE/ODE step, log-densities, the closed-form OPD loss, PPO, GRPO-Guard,
# DiffusionNFT
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
# models: the real SD3 pipeline from the hub / a folder, or the offline stand-ins of tiny.py
# ----------------------------------------------------------------------------------------------
def quiet_hf():
    import warnings
    from diffusers.utils import logging as dl
    from rewards import quiet
    quiet()  # transformers: errors only, no progress bars
    dl.set_verbosity_error(); dl.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")  # M adapters, on purpose


def load_pipeline(cfg, device, rank=0, world=1):
    """The pipeline named by --model: fp32 on CPU, bf16 on GPU. The transformer and the VAE go to
    the device; the text encoders too only with --text_encoders gpu (else they stay in host
    memory and visit the GPU to encode, see SD3.encode). --no_t5 loads no T5 (zeros instead)."""
    import tiny
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if cfg.model == "tiny":
        pipe = tiny.tiny_pipeline(rank, world)
    elif cfg.model == "sd35m-random":
        pipe = tiny.build_offline(cfg.model)
    else:
        quiet_hf()
        from diffusers import StableDiffusion3Pipeline
        import warnings
        no_t5 = dict(text_encoder_3=None, tokenizer_3=None) if cfg.no_t5 else {}
        try:
            with warnings.catch_warnings():  # newer diffusers renamed torch_dtype
                warnings.simplefilter("ignore", FutureWarning)
                pipe = StableDiffusion3Pipeline.from_pretrained(cfg.model, torch_dtype=dtype, **no_t5)
        except Exception as e:  # offline and not cached, bad folder, gated repo, ...
            raise UserError(f"cannot load model {cfg.model!r} ({type(e).__name__}): download it once "
                            f"with network access (huggingface-cli download {cfg.model}) or pass a "
                            f"local folder holding a StableDiffusion3Pipeline") from None
    pipe.set_progress_bar_config(disable=True)
    encoders_to = device if cfg.text_encoders == "gpu" else torch.device("cpu")
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if m is not None:
            m.requires_grad_(False).eval().to(device if m in (pipe.transformer, pipe.vae) else encoders_to, dtype)
    return pipe


class SD3:
    """The pipeline's pieces as the maths needs them: prompt embeddings (computed when first
    needed, kept in a least-recently-used cache of at most --embed_cache_mb), velocity closures
    (CFG included) for any adapter, latent noise and decoding to images."""

    def __init__(self, pipe, cfg, device):
        self.pipe, self.cfg, self.device = pipe, cfg, device
        self.tr = pipe.transformer
        self.dtype = self.tr.dtype
        self.cache, self.cache_bytes = collections.OrderedDict(), 0  # prompt -> (emb, pooled), CPU
        self.active, self.layers, self.layers_key = "?", [], None
        self.trainable = []  # the adapter weights being trained
        self.latent = (self.tr.config.in_channels, cfg.resolution // pipe.vae_scale_factor,
                       cfg.resolution // pipe.vae_scale_factor)
        if cfg.grad_checkpointing:
            self.tr.enable_gradient_checkpointing()

    @property
    def encoders(self):
        return [e for e in (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3) if e is not None]

    def encode(self, prompts, batch=64):
        """Embed the prompts not in the cache, then drop the least recently used others until the
        cache holds at most --embed_cache_mb (the prompts asked for now always stay). With
        --text_encoders offload on a GPU, the encoders visit it for this call only."""
        need = list(dict.fromkeys([""] + list(prompts)))
        todo = [p for p in need if p not in self.cache]
        visit = todo and self.device.type == "cuda" and self.cfg.text_encoders == "offload"
        where = self.device if self.cfg.text_encoders != "cpu" else torch.device("cpu")
        if visit:
            for e in self.encoders:
                e.to(self.device)
        with torch.no_grad():
            for i in range(0, len(todo), batch):
                chunk = todo[i:i + batch]
                emb, _, pooled, _ = self.pipe.encode_prompt(
                    chunk, None, None, device=where, do_classifier_free_guidance=False,
                    max_sequence_length=self.cfg.max_seq_len)
                for p, e, q in zip(chunk, emb.cpu(), pooled.cpu()):
                    self.cache[p] = (e.clone(), q.clone())
                    self.cache_bytes += e.nbytes + q.nbytes
        if visit:
            for e in self.encoders:
                e.to("cpu")
            torch.cuda.empty_cache()
        for p in need:
            self.cache.move_to_end(p)
        keep = set(need)
        while self.cache_bytes > self.cfg.embed_cache_mb * 2**20 and next(iter(self.cache)) not in keep:
            e, q = self.cache.popitem(last=False)[1]
            self.cache_bytes -= e.nbytes + q.nbytes

    def prompt_bytes(self):
        """Host bytes of one cached prompt's embeddings."""
        self.encode([])
        return sum(x.nbytes for x in self.cache[""])

    def use(self, adapter):
        """Make an adapter active (None = the base model) on every LoRA layer. peft's set_adapter
        would also walk each layer's weights to make the active adapter trainable (a quarter of a
        tiny distillation round went there); instead only self.trainable requires grad, set when
        it or the adapters change. (A leaf that stops requiring grad between forward and backward
        would get no gradient.)"""
        if adapter == self.active:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer
        key = (tuple(getattr(self.tr, "peft_config", {})), tuple(map(id, self.trainable)))
        if key != self.layers_key:
            self.layers = [mod for mod in self.tr.modules() if isinstance(mod, BaseTunerLayer)]
            for n, p in self.tr.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(False)
            for p in self.trainable:
                p.requires_grad_(True)
            self.layers_key = key
        for layer in self.layers:  # peft's own fields: the switch, and the adapters a layer applies
            layer._disable_adapters = adapter is None
            if adapter is not None:
                layer._active_adapter = [adapter]
        self.active = adapter

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
                out = module(hidden_states=xin.to(self.dtype), timestep=tt, encoder_hidden_states=emb.to(self.dtype),
                             pooled_projections=pooled.to(self.dtype), return_dict=False)[0].float()
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


def compile_transformer(tr):
    """torch.compile of the transformer. Each adapter and grad mode a loop switches between is
    another graph: room for them all (with dynamo's default of 8 a round fell back to eager)."""
    import torch._dynamo
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    tr.compile()


def chunks(n, size):
    """Slices of range(n) of at most size elements (size 0: one slice)."""
    size = size or max(n, 1)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


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
    for m in tr.modules():  # under autocast peft's cast of each input to fp32 stores a bf16 copy of it:
        if hasattr(m, "cast_input_dtype_enabled"):  # measured 13% of the saved bytes, same result without
            m.cast_input_dtype_enabled = False
    return params
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
# tasks: a name, train/test prompts (and GenEval metadata), its rewards from rewards.py
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Task:
    name: str
    train: list
    test: list
    reward: object  # fn(images (B,3,H,W) in [0,1], prompts, metadata) -> (B,): the training reward
    meta: dict = dataclasses.field(default_factory=dict)  # prompt -> GenEval metadata
    eval_reward: object = None  # the reported metric, when it is not the training reward


def make_task(name, cfg, device="cpu"):
    """A task's prompts (toy: tiny.py; real: --prompts/--test_prompts or prompts.py's built-in
    sets; a train prompt that is also a test prompt is dropped) and rewards, loaded now."""
    import prompts as P
    import rewards
    import tiny
    if name in TOY_TASKS:
        (train, test), meta = tiny.toy_prompts(name), {}
    elif cfg.prompts:
        train, meta = P.read(cfg.prompts)
        train, test = [p for i, p in enumerate(train) if i % 10], train[::10]
    else:
        train, test, meta = P.builtin(name)
    if name not in TOY_TASKS and cfg.test_prompts:
        test, m2 = P.read(cfg.test_prompts)
        meta.update(m2)
        held = set(test)
        train = [p for p in train if p not in held]
        if not train:
            raise UserError(f"every train prompt of {name} is among the test prompts of {cfg.test_prompts}")
    if name == "geneval" and not cfg.reward and any(p not in meta for p in train + test):
        raise UserError("--task geneval needs GenEval metadata: --prompts a jsonl with one "
                        '{"prompt": ..., "tag": ..., "include": [...]} a line')
    specs = (cfg.reward,) * 2 if cfg.reward else (name,) * 2 if name in TOY_TASKS else REAL_TASKS[name]
    try:
        reward = rewards.load(specs[0], device, eager=True)
        eval_reward = reward if specs[1] == specs[0] else rewards.load(specs[1], device, eager=True)
        if "ocr" in re.split(r"[,:=]", specs[0]):
            for p in train + test:
                rewards.ocr_target(p)  # every OCR prompt quotes the text to render
    except (ValueError, rewards.RewardError) as e:  # a bad spec, prompt or missing weights: before training
        raise UserError(str(e)) from None
    return Task(name, train, test, reward, meta, eval_reward)


def score(task, images, prompts, evaluation=False):
    fn = task.eval_reward if evaluation and task.eval_reward is not None else task.reward
    return fn(images, prompts, [task.meta.get(p, {}) for p in prompts]).float().cpu()


def draw_prompts(cfg, task, step, mi, n):
    """n train prompts of task number mi at an optimizer step: the same on every rank, and a
    function of (seed, step), so that a resumed run draws what an uninterrupted one would."""
    idx = torch.randint(len(task.train), (n,), generator=rng(cfg.seed, step, 0, mi))
    return [task.train[i] for i in idx]


def encode_ahead(cfg, m, step, prompts_of):
    """Embed the prompts of the next steps at once (prompts_of(step) -> list), as many steps as
    fill half the embedding cache: the text encoders then visit the GPU once per so many steps."""
    first = prompts_of(step)
    if any(p not in m.cache for p in first):  # else they were embedded ahead
        ahead = max(1, min(64, int(cfg.embed_cache_mb * 2**20 / 2 // (len(set(first)) * m.prompt_bytes()))))
        m.encode([p for s in range(step, min(step + ahead, cfg.steps)) for p in prompts_of(s)])
# ----------------------------------------------------------------------------------------------
# training utilities: logging, AdamW, the EMA of the weights, a guarded optimizer step, timers,
# DDP. Checkpoints (atomic, resumable; a finished stage is reused) are checkpoint.py's.
# ----------------------------------------------------------------------------------------------
def logger(run_dir, rank):
    """log(**row): a JSON line in <run>/metrics.jsonl, on rank 0."""
    def log(**row):
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
    return log


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

    @contextlib.contextmanager
    def applied(self):
        """The EMA weights in the parameters inside the block (what a save would write)."""
        saved = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)


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
# stage 1: specialist teachers by RL, GRPO-Guard or DiffusionNFT (one LoRA per task). The same
# loop trains the multi-task RL baselines of baselines.py: schedule(step) names the tasks of a step.
# ----------------------------------------------------------------------------------------------
def rl_sample(cfg, m, tasks, step, rank, world, tm):
    """The samples of one RL step on the tasks of this step (one for a teacher, all for joint
    RL). Per task: batch_size / G prompts, G images each. GRPO-Guard: SDE rollouts of the
    policy, every state kept; NFT: ODE samples of the 'old' adapter, of which x0 and the reward
    are used. Each image is scored by its own task's reward and its advantage computed within its
    prompt's group (for NFT with the std of the task's batch), so the tasks' reward scales never
    mix. Returns ([(prompts, trajectories, advantages) per task], {task: mean reward})."""
    G, b, nft = cfg.group_size, cfg.batch_size // world, cfg.algo == "nft"
    sigmas, batches, rewards = sd3_sigmas(cfg.num_steps), [], {}
    for mi, task in enumerate(tasks):
        prompts = [p for p in draw_prompts(cfg, task, step, mi, cfg.batch_size // G) for _ in range(G)]
        mine, g = prompts[rank * b:(rank + 1) * b], rng(cfg.seed, step, 1, mi, rank)
        with tm("sampling"):
            parts = [rollout(m.velocity("old" if nft else "policy", mine[s], cfg.guidance), m.noise(len(mine[s]), g),
                             sigmas, cfg.noise_level, g) for s in chunks(b, cfg.micro_batch)]
            traj = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # states (b, N+1, C, h, w)
            images = m.decode(traj["states"][:, -1])
        with tm("reward"):
            r_all = gather(score(task, images, mine).to(m.device), world).cpu()
            groups = torch.arange(len(prompts)) // G
            adv = group_advantages(r_all, groups, global_std=nft)[rank * b:(rank + 1) * b].to(m.device)
        rewards[task.name] = r_all.mean().item()
        batches.append((mine, traj, adv))
    return batches, rewards


def rl_backward(cfg, m, batches, step, epoch, rank, world, module, tm):
    """Backward of the RL loss on the sampled batches at the sampler's steps but the last (Flow-GRPO's
    timestep_fraction 0.99 of 10 steps): GRPO-Guard's clipped ratio on the stored steps, or NFT's
    loss at those times on fresh noise around each x0."""
    b, N, nft = cfg.batch_size // world, cfg.num_steps, cfg.algo == "nft"
    sigmas, steps = sd3_sigmas(N), range(N - 1)  # all but the last step, as both public codes train
    n_back, done = len(batches) * len(chunks(b, cfg.micro_batch)) * len(steps), 0
    with tm("training"):
        for mi, (mine, traj, adv) in enumerate(batches):
            g = rng(cfg.seed, step, 2, mi, rank, epoch)  # NFT's fresh noise
            for s in chunks(b, cfg.micro_batch):
                v = m.velocity("policy", mine[s], cfg.guidance, module=module)
                if nft:
                    v_old, v_ref = m.velocity("old", mine[s], cfg.guidance), m.velocity(None, mine[s], cfg.guidance)
                for j in steps:
                    done += 1
                    with sync_ctx(module, done == n_back):
                        if nft:  # x_t = (1 - t) x0 + t eps, eps fresh; v_old from the old adapter
                            x0, t = traj["states"][s, -1], sigmas[j]
                            x_t = (1 - t) * x0 + t * torch.randn(x0.shape, generator=g).to(x0.device)
                            with torch.no_grad():
                                vo, vr = v_old(x_t, t), (v_ref(x_t, t) if cfg.nft_kl else None)
                            vt = v(x_t, t)
                            loss = nft_loss(vt, vo, x0, x_t, t, nft_r(adv[s]), cfg.nft_beta)
                            if cfg.nft_kl:  # + KL to the base model: mean (v_theta - v_ref)^2
                                loss = loss + cfg.nft_kl * (vt - vr).pow(2).flatten(1).mean(1)
                        else:
                            x = traj["states"][s, j]
                            mu, _ = transition(x, v(x, sigmas[j]), sigmas[j], sigmas[j + 1], cfg.noise_level)
                            loss = grpo_loss(mu, traj["means"][s, j], traj["states"][s, j + 1], traj["stds"][s, j],
                                             sigmas[j + 1] - sigmas[j], adv[s], cfg.clip_range,
                                             ratio_norm=not cfg.no_ratio_norm, dt_reweight=not cfg.no_ratio_norm)
                        m.use("policy")  # gradient checkpointing recomputes with the active adapter
                        (loss.sum() / (b * len(batches) * len(steps))).backward()


def nft_decay(cfg, step):
    """The old adapter's decay after optimizer step `step`: 0 before FLAT, then min(RATE (step -
    FLAT), MAX) (DiffusionNFT: GenEval 0,0.001,0.5; OCR 75,0.0075,0.999)."""
    flat, rate, cap = (float(x) for x in cfg.nft_decay.split(","))
    return 0.0 if step < flat else min(rate * (step - flat), cap)


def train_rl(cfg, m, tasks, name, rank, world, schedule=None):
    """Stage 1 (a teacher: one task) and the RL baselines (schedule(step) -> tasks of the step).
    Writes <out>/<name>/: the LoRA (its EMA), config.json, run.json, metrics.jsonl, checkpoints."""
    run_dir = os.path.join(cfg.out, name)
    mode = prepare_run(run_dir, cfg, rank, world, name)
    if mode == "done":
        return run_dir
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
    schedule = schedule or (lambda step: tasks)
    tr = m.tr
    old = []
    if cfg.algo == "nft":  # the sampling policy: a second adapter that follows the trained one
        add_lora(tr, "old", cfg)
        old = [p for n, p in tr.named_parameters() if ".old." in n]
    params = m.trainable = add_lora(tr, "policy", cfg)
    m.active = "policy"
    opt, ema = make_optimizer(params, cfg), EMA(params, cfg)
    start, elapsed = load_checkpoint(run_dir, tr, "policy", opt, ema, cfg, old) if mode == "resume" else (0, 0.0)
    if start:
        say(rank, f"resumed {run_dir} at step {start}")
    ddp = wrap_ddp(tr, world, m.device)
    log, bad, b = logger(run_dir, rank), 0, cfg.batch_size // world
    prompts_of = lambda s: [p for mi, t in enumerate(schedule(s))
                            for p in draw_prompts(cfg, t, s, mi, cfg.batch_size // cfg.group_size)]
    bar = _bar(range(start, cfg.steps), rank, name)
    for step in bar:
        t0, tm = time.perf_counter(), Timer(m.device)
        encode_ahead(cfg, m, step, prompts_of)
        batches, rewards = rl_sample(cfg, m, schedule(step), step, rank, world, tm)
        for epoch in range(cfg.inner_epochs):
            rl_backward(cfg, m, batches, step, epoch, rank, world, ddp, tm)
            gnorm, bad = guarded_step(opt, params, cfg, bad, rank)
        ema.step(step + 1)
        if old:  # theta_old <- d theta_old + (1 - d) theta
            with torch.no_grad():
                for po, p in zip(old, params):
                    po.lerp_(p.detach(), 1 - nft_decay(cfg, step + 1))
        elapsed += time.perf_counter() - t0
        log(step=step + 1, **{f"reward_{k}": v for k, v in rewards.items()}, grad_norm=gnorm, elapsed=round(elapsed, 3),
            **{f"time_{k}": round(v, 4) for k, v in tm.t.items()})
        if rank == 0:
            bar.set_postfix(reward=f"{sum(rewards.values()) / len(rewards):.3f}")
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(run_dir, step + 1, tr, "policy", opt, ema, cfg, old, elapsed)
    return finish_run(run_dir, cfg, m, "policy", ema, rank, world, elapsed, cfg.steps * len(schedule(0)) * cfg.batch_size)


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


def finish_run(run_dir, cfg, m, name, ema, rank, world, elapsed, trajectories):
    """The stage's final LoRA, its EMA weights (the file's existence marks the stage done), its
    config and run.json (training seconds, sampled trajectories); adapters dropped. With several
    ranks, first check that they hold the same weights."""
    if world > 1:
        d = rank_divergence(m.trainable, world)
        if d > 1e-6:
            raise UserError(f"ranks diverged (max weight difference {d:.3g}): gradients were not "
                            f"synchronised; nothing was saved beyond the last checkpoint")
        say(rank, f"{os.path.basename(run_dir)}: {world} ranks in sync (max weight difference {d:.1g})")
    ema.copy_to_params()
    if rank == 0:
        write_text(os.path.join(run_dir, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
        write_text(os.path.join(run_dir, "run.json"), json.dumps({"seconds": round(elapsed, 2),
                                                                  "trajectories": trajectories}))
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
def distill_round(cfg, m, tasks, step, rank, world, module, tm, teacher_of, tg):
    """One round of stage 2 (METHOD.md section 5), gradients only: for each task m, its prompts,
    a student rollout, the teacher's means on the student's own states (no grad), the closed-form
    loss backpropagated step by step; the M tasks accumulate into one gradient (G = M).
    teacher_of(task) -> the teacher's adapter name; tg: task -> teacher CFG. --loss sft, dance
    and flow swap in another method of baselines.py on the same round. Returns {task: loss}."""
    trajectory = distill_trajectory
    if cfg.loss in ("sft", "dance", "flow"):
        import baselines
        trajectory = baselines.TRAJECTORIES[cfg.loss]
    sigmas = sd3_sigmas(cfg.num_steps)
    train_steps = parse_steps(cfg.train_steps, cfg.num_steps)
    b, parts = cfg.batch_size // world, chunks(cfg.batch_size // world, cfg.micro_batch)
    n_back = len(tasks) * len(parts) * (1 if cfg.loss == "dance" else len(train_steps))
    done, losses = [0], {}

    def timed(v, key):  # a velocity closure that adds its time to tm[key]
        def f(x, t):
            with tm(key if torch.is_grad_enabled() or key == "teacher" else "rollout"):
                return v(x, t)
        return f

    def backward(loss, w):  # one backward per trained step, weighted by the chunk's share; sync on the last
        done[0] += 1
        m.use("student")  # gradient checkpointing recomputes the blocks with the active adapter
        with tm("backward"), sync_ctx(module, done[0] == n_back):
            (loss * w).backward()
    for mi, task in enumerate(tasks):  # round-robin: G = M, one optimizer step per round
        mine = draw_prompts(cfg, task, step, mi, cfg.batch_size)[rank * b:(rank + 1) * b]
        g, losses[task.name] = rng(cfg.seed, step, 1, mi, rank), 0.0
        for s in parts:
            ps, w = mine[s], len(mine[s]) / b
            student = timed(m.velocity("student", ps, cfg.guidance, module=module), "student_fwd")
            teachers = [timed(m.velocity(teacher_of(t), ps, tg[t.name]), "teacher")
                        for t in (tasks if cfg.loss == "dance" else [task])]  # DanceOPD: all, averaged
            teacher = teachers[0] if len(teachers) == 1 else lambda x, t: sum(v(x, t) for v in teachers) / len(teachers)
            _, loss = trajectory(student, teacher, m.noise(len(ps), g), sigmas, cfg.noise_level, train_steps,
                                 cfg.loss, backward=lambda l: backward(l, w), two_pass=cfg.two_pass, generator=g)
            losses[task.name] += loss * w
    return losses


def teacher_guidance(cfg, teacher_dirs):
    """Each teacher's CFG for its targets: --teacher_guidance, else the one it was trained with."""
    given = parse_pairs(cfg.teacher_guidance)
    return {k: float(given.get(k, run_info(d, "guidance", cfg.guidance))) for k, d in teacher_dirs.items()}


def distill(cfg, m, tasks, teacher_dirs, rank, world, name=None):
    """Stage 2 into <out>/<name> (default: student, or student-<loss> for another --loss). With
    --eval_every, the saved (EMA) student's held-out rewards every so many rounds go to
    metrics.jsonl (eval time is not counted in the training seconds)."""
    name = name or ("student" if cfg.loss == "closed" else f"student-{cfg.loss}")
    run_dir = os.path.join(cfg.out, name)
    mode = prepare_run(run_dir, cfg, rank, world, name)
    if mode == "done":
        return run_dir
    tr = m.tr
    for t in tasks:  # M teachers: M adapters on the one transformer
        load_lora(tr, teacher_dirs[t.name], f"teacher-{t.name}",
                  f"python opd.py --stage teacher --task {t.name} --out {cfg.out}")
    tg = teacher_guidance(cfg, teacher_dirs)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
    params = m.trainable = add_lora(tr, "student", cfg)
    m.active = "student"
    opt, ema = make_optimizer(params, cfg), EMA(params, cfg)
    start, elapsed = load_checkpoint(run_dir, tr, "student", opt, ema, cfg) if mode == "resume" else (0, 0.0)
    if start:
        say(rank, f"resumed {run_dir} at step {start}")
    ddp = wrap_ddp(tr, world, m.device)
    log, bad, b = logger(run_dir, rank), 0, cfg.batch_size // world
    prompts_of = lambda s: [p for mi, t in enumerate(tasks) for p in draw_prompts(cfg, t, s, mi, cfg.batch_size)[rank * b:(rank + 1) * b]]
    bar = _bar(range(start, cfg.steps), rank, name)
    for step in bar:
        if cfg.eval_every and step % cfg.eval_every == 0:
            with ema.applied():
                log(step=step, elapsed=round(elapsed, 3), held_out=held_out(cfg, m, tasks, "student", cfg.guidance, rank, world))
        tm = Timer(m.device)
        t0 = time.perf_counter()
        encode_ahead(cfg, m, step, prompts_of)
        losses = distill_round(cfg, m, tasks, step, rank, world, ddp, tm, lambda t: f"teacher-{t.name}", tg)
        with tm("optimizer"):
            gnorm, bad = guarded_step(opt, params, cfg, bad, rank)
            ema.step(step + 1)
        total = time.perf_counter() - t0
        elapsed += total
        model_time = sum(v for k, v in tm.t.items() if k != "optimizer")
        log(step=step + 1, **{f"loss_{k}": v for k, v in losses.items()}, grad_norm=gnorm, elapsed=round(elapsed, 3),
            time_round=round(total, 4), **{f"time_{k}": round(v, 4) for k, v in tm.t.items()},
            model_share=round(model_time / total, 3))
        if rank == 0:
            bar.set_postfix(loss=f"{sum(losses.values()):.3g}")
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(run_dir, step + 1, tr, "student", opt, ema, cfg, elapsed=elapsed)
    if cfg.eval_every:
        with ema.applied():
            log(step=cfg.steps, elapsed=round(elapsed, 3), held_out=held_out(cfg, m, tasks, "student", cfg.guidance, rank, world))
    return finish_run(run_dir, cfg, m, "student", ema, rank, world, elapsed, cfg.steps * len(tasks) * cfg.batch_size)
# ----------------------------------------------------------------------------------------------
# eval: ODE sampler, CFG, each task's metric on its test prompts, for every model of the run
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_images(m, adapter, prompts, seeds, cfg, guidance):
    """ODE samples (eval_steps, CFG) for prompts, the noise of each from its own seed."""
    sigmas = sd3_sigmas(cfg.eval_steps)
    out = []
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
        m.encode(list(dict.fromkeys(test[i] for i in mine)))  # at once: one visit of the text encoders
        imgs = sample_images(m, adapter, [test[i] for i in mine], mine, cfg, guidance)
        r = score(t, imgs, [test[i] for i in mine], evaluation=True) if mine else torch.zeros(0)
        n = math.ceil(len(test) / world)  # pad to equal length for all_gather
        pad = torch.full((n,), float("nan")); pad[: len(r)] = r
        allr = gather(pad.to(m.device), world).cpu()
        out[t.name] = allr[~torch.isnan(allr)].mean().item()
        if export and t.name == "geneval":
            import rewards
            rewards.export_geneval(export, [t.meta[test[i]] for i in mine], [i // cfg.eval_seeds for i in mine],
                                   [i % cfg.eval_seeds for i in mine], imgs)
        if grid is not None:
            two = [0, cfg.eval_seeds][: len(test) // cfg.eval_seeds]
            grid.append((imgs[[mine.index(i) for i in two]] if world == 1 else
                         sample_images(m, adapter, [test[i] for i in two], two, cfg, guidance), [test[i] for i in two]))
    return out


ORDER = ["teacher-", "joint-grpo_guard", "joint-nft", "cascade-grpo_guard", "cascade-nft", "student",
         "student-sft", "student-ppo", "student-dance", "student-flow"]


def discover(out, tasks, extra=None):
    """Every model of a run: the base, then each finished LoRA folder of <out> (teachers in --tasks
    order, the baselines, the students), then --lora extras. name -> folder (None: the base)."""
    found = [d for d in sorted(os.listdir(out)) if os.path.isfile(os.path.join(out, d, LORA_FILE))] \
        if os.path.isdir(out) else []
    teachers = [f"teacher-{t}" for t in tasks] + [d for d in found if d.startswith("teacher-")]
    rank_of = lambda d: (ORDER.index(d) if d in ORDER else len(ORDER), d)
    names = list(dict.fromkeys([d for d in teachers if d in found] + sorted(
        (d for d in found if not d.startswith("teacher-")), key=rank_of)))
    return {"base": None, **{n: os.path.join(out, n) for n in names}, **(extra or {})}


def run_info(d, key, default):
    """A value from a LoRA folder's config.json or run.json (default when absent)."""
    for f in ("run.json", "config.json"):
        with contextlib.suppress(OSError, ValueError):
            v = json.load(open(os.path.join(d, f))).get(key)
            if v is not None:
                return v
    return default


def evaluate(cfg, m, tasks, rank, world, loras=None):
    """Writes <out>/eval.json (model -> task -> metric, seconds), eval.md and samples.png. Each
    model samples with the CFG it was trained with (NFT models: 1)."""
    models = discover(cfg.out, [t.name for t in tasks], loras)
    for i, (name, d) in enumerate(models.items()):  # adapter names: m0, m1, ... (any folder name)
        if d is not None:
            load_lora(m.tr, d, f"m{i}", f"python opd.py --stage all --out {cfg.out}")
    table, grid = {}, []
    for i, (name, d) in enumerate(models.items()):
        m.active = "?"
        g = cfg.guidance if d is None else float(run_info(d, "guidance", cfg.guidance))
        export = os.path.join(cfg.out, "geneval", name) if cfg.export_geneval else None
        table[name] = held_out(cfg, m, tasks, None if d is None else f"m{i}", g, rank, world, grid, export)
        table[name]["seconds"] = 0.0 if d is None else float(run_info(d, "seconds", 0.0))
    _drop_adapters(m)
    if rank == 0:
        write_eval(cfg.out, table, [t.name for t in tasks], grid)
    return table


def normalised_mean(table, tasks, ref=None):
    """Mean over tasks of min-max-normalised scores across the compared models (paper Table 1);
    the minima and maxima are those of ref (default: the table itself)."""
    ref = ref or table
    lo = {k: min(r[k] for r in ref.values()) for k in tasks}
    hi = {k: max(r[k] for r in ref.values()) for k in tasks}
    return {name: sum((r[k] - lo[k]) / (hi[k] - lo[k]) if hi[k] > lo[k] else 0.0 for k in tasks) / len(tasks)
            for name, r in table.items()}


def method_seconds(table):
    """Training seconds of each model's whole method: a student's includes its teachers'."""
    teachers = sum(r["seconds"] for n, r in table.items() if n.startswith("teacher-"))
    return {n: r["seconds"] + (teachers if n.startswith("student") else 0.0) for n, r in table.items()}


def write_eval(out, table, tasks, grid):
    avg, secs = normalised_mean(table, tasks), method_seconds(table)
    lines = ["| model | " + " | ".join(tasks) + " | avg | train time |", "|---" * (len(tasks) + 3) + "|"]
    for name, r in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in tasks) + f" | {avg[name]:.3f} | " +
                     (f"{secs[name]:.0f} s |" if secs[name] else "- |"))
    md = "\n".join(lines) + "\n\nMean metric on each task's test prompts (ODE sampler); avg = mean of min-max-" \
        "normalised scores across the models above; train time: training seconds (a student's include its teachers').\n"
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
    left, top = 150, 34
    font = ImageFont.load_default(size=11)
    canvas = Image.new("RGB", (left + cell * len(prompts), top + cell * len(models)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, p in enumerate(prompts):  # column labels: the prompt, on two lines at most
        draw.multiline_text((left + c * cell + 3, 2), "\n".join(textwrap.wrap(p, 22)[:2]), fill="black", font=font)
    for r, name in enumerate(models):
        draw.text((4, top + r * cell + cell // 2 - 6), name, fill="black", font=font)
        ims = torch.cat([g[0] for g in grid[r * n_tasks:(r + 1) * n_tasks]])
        for c, im in enumerate(rewards.uint8(ims)):
            canvas.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (left + c * cell, top + r * cell))
    canvas.save(path)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
SUBSTAGES = {"all": ["teacher", "distill", "eval"], "compare": ["teacher", "distill", "joint", "cascade", "eval"],
             "noise": ["distill", "eval"]}


def teacher_dirs(cfg, tasks):
    """task -> teacher folder: --teachers, else <out>/teacher-<task>."""
    return parse_pairs(cfg.teachers) if cfg.teachers else \
        {t: os.path.join(cfg.out, f"teacher-{t}") for t in tasks}


def preflight(cfg, stages, task_names):
    """Checks that need no model, before loading one: every option of every stage, the ranks
    split the batch, the teachers exist, and --resume does not change the model or the LoRA of
    any stage it would continue."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    for stage in stages:
        c = resolve(cfg, stage)
        if c.batch_size % world:
            raise UserError(f"--batch_size {c.batch_size} does not divide across {world} ranks")
        if stage == "distill" and cfg.stage == "distill":
            for t, d in teacher_dirs(c, task_names).items():
                if not os.path.isfile(os.path.join(d, LORA_FILE)):
                    raise UserError(f"no LoRA at {os.path.join(d, LORA_FILE)}: make it with "
                                    f"`python opd.py --stage teacher --task {t} --out {cfg.out}`")
        dirs = {"teacher": [f"teacher-{t}" for t in task_names], "distill": ["student"]}.get(stage, [])
        for d in dirs:
            run_dir = os.path.join(cfg.out, d)
            if cfg.resume and checkpoints(run_dir) and not os.path.isfile(os.path.join(run_dir, LORA_FILE)):
                check_resume(run_dir, c)


def run(cfg):
    stages = SUBSTAGES.get(cfg.stage, [cfg.stage])
    first = resolve(cfg, stages[0])
    task_names = [first.task] if cfg.stage == "teacher" else first.tasks.split(",")
    if cfg.stage == "distill" and cfg.teachers:
        task_names = list(parse_pairs(cfg.teachers))
    preflight(cfg, stages, task_names)
    if cfg.device == "meta":
        import bench
        return bench.count(cfg)
    rank, world, device = dist_setup(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(1)
    tasks = [make_task(n, first, device) for n in task_names]
    say(rank, "config: " + json.dumps(dataclasses.asdict(first)))
    m = SD3(load_pipeline(first, device, rank, world), first, device)
    if cfg.compile and cfg.stage != "bench":  # the bench times eager rounds first
        compile_transformer(m.tr)
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    if cfg.stage in ("joint", "cascade", "compare", "noise", "bench"):  # not the method: other files
        module = __import__("bench" if cfg.stage == "bench" else "baselines")
        return getattr(module, cfg.stage)(cfg, m, tasks, rank, world)
    result = None
    for stage in stages:
        c = resolve(cfg, stage)
        if stage == "teacher":
            for t in tasks:
                train_rl(c, m, [t], f"teacher-{t.name}", rank, world)
        elif stage == "distill":
            distill(c, m, tasks, teacher_dirs(c, task_names), rank, world)
        else:
            result = evaluate(c, m, tasks, rank, world, parse_pairs(c.lora))
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
    except OSError as e:  # a path the user gave that cannot be read or written (permissions, a full disk)
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr, flush=True)
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
