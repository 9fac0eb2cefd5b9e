"""
The configuration of opd.py, cleanrl-style: one flat dataclass, one line a field (its default,
the values it accepts, a help line). A field left at None takes its stage's default from one
table, STAGE_DEFAULTS, which `--help` prints per stage. `resolve(cfg, stage)` fills those in and
checks every field against its domain and every relation between fields, so that bad input
stops the run with one line before any model loads.
"""
import dataclasses
import re
import typing

import torch

from opd_support import prompts
from opd_support.machinery import rank_world
from opd_support.options import (FLAG, UserError, arg, check_fields, folder, names, num, one_of,
                                 pairs, parse, task_files, text)

TASKS = prompts.TOY_TASKS + tuple(prompts.REAL_TASKS)
STAGES = ("all", "teacher", "distill", "eval")  # all = teacher, distill, eval
# options renamed for clarity: the old name stops with one line that names the new one
RENAMED = {"steps": "optim_steps", "num_steps": "sampler_steps", "train_steps": "loss_steps",
           "eval_steps": "eval_sampler_steps"}


def _steps_ok(s):
    return bool(re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", s)) and bool(parse_steps(s, 0))


def _reward_ok(s):
    import rewards
    rewards.load(s)  # a bad name or weight raises ValueError; nothing is loaded yet


def _plateau_ok(s):
    k, d, *least = s.split(",")
    return int(k) >= 1 and float(d) >= 0 and len(least) <= 1 and all(int(m) >= 0 for m in least)


def _decay_ok(s):
    flat, rate, cap = (float(x) for x in s.split(","))
    return flat >= 0 and rate >= 0 and 0 <= cap < 1


# The options that may differ when --resume continues a run: how far it trains and when it
# stops early (--plateau and the validation behind it), how often it saves and logs, where it runs
# and how it spends memory and time, and what else the command does (its stages, evaluation). None
# changes the numbers of an optimizer step beyond float rounding (--device: a GPU computes in bf16).
# Every other field, a new one too, must equal the saved run's (checkpoints.check_resume), even
# --micro_batch: it changes which noise each SDE trajectory draws, not only float rounding.
RESUMABLE = {"stage", "task", "out", "optim_steps", "plateau", "min_cost", "eval_every",
             "val_seeds", "eval_sampler_steps", "eval_batch", "eval_prompts", "eval_seeds",
             "export_geneval", "lora", "log_to", "log_conflict", "save_every", "resume",
             "overwrite", "max_bad_steps", "grad_checkpointing", "compile", "text_encoders",
             "embed_cache_mb", "device"}
TEACHER_RESUMABLE = {"tasks", "teachers", "teacher_guidance", "loss", "sde_weight", "two_pass",
                     "loss_steps"}  # stage 2's alone: a teacher's task is its folder's name


@dataclasses.dataclass
class Config:
    resumable: typing.ClassVar[set] = RESUMABLE  # a subclass adds its own (baselines.py)
    teacher_resumable: typing.ClassVar[set] = TEACHER_RESUMABLE
    # what to run, on which model, where
    stage: str = arg("all", one_of(*STAGES), "all = teacher, distill, eval; or one of them")
    task: str = arg("color", one_of(*TASKS), "the task of --stage teacher")
    tasks: str = arg("color,position,jpeg", names(TASKS), "the tasks of distill and eval")
    teachers: str = arg("", pairs(TASKS, text()), "distill: task=DIR,... (<out>/teacher-<task>)")
    lora: str = arg("", pairs(None, text()), "eval: more NAME=DIR LoRAs to evaluate")
    model: str = arg("tiny", text(),
                     "tiny | tiny-conflict | sd35m-random | a hub id or folder of an SD3 pipeline")
    out: str = arg("runs/tiny", folder(), "output folder")
    prompts: str = arg("", task_files(TASKS),
                       "real tasks: train prompts, txt or GenEval jsonl (default: built in)")
    test_prompts: str = arg("", task_files(TASKS), "real tasks: test prompts (built in)")
    toy_wording: str = arg("word", one_of("word", "template", "shared"),
                           "tiny: faded's prompts one word apart from vivid's, another "
                           "template, or exact's own prompts (shared)")
    reward: str = arg("", text(True, _reward_ok, "a reward spec (rewards.py --list)"),
                      "a reward spec in place of the task's")
    seed: int = arg(0, num(int, 0), "random seed (LoRA init, prompts, noise)")
    # how long, and how the training rollouts sample (Flow-GRPO's SDE; a = 0 is the ODE)
    optim_steps: int = arg(None, num(int, 1), "optimizer steps of the stage (stage 2: rounds)")
    plateau: str = arg("", text(True, _plateau_ok, "K,D or K,D,MIN like 3,0.005,40"),
                       "stop once the best of the last K validation averages beats the best "
                       "before them by less than D, not before step MIN (--optim_steps: the cap)")
    min_cost: float = arg(0, num(float, 0), "--plateau: no stop before the run's compute "
                          "(transformer passes, one with grad counting 2) reaches this")
    sampler_steps: int = arg(10, num(int, 2, 1000), "sampler steps N of a training rollout")
    loss_steps: str = arg("", text(True, _steps_ok, "steps like 0-8 or 0,2,4"),
                          "sampler steps with a loss (default: all but the last)")
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
    clip_range: float = arg(None, num(float, 0, 1, lo_open=True, hi_open=True), "PPO clip range")
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
    eval_every: int = arg(0, num(int, 0),
                          "validation metrics of the EMA model every N optimizer steps (0: off)")
    log_conflict: bool = arg(False, FLAG, "each task pair's gradient cosines every step "
                             "(conflict.py), in metrics.jsonl")
    # evaluation (ODE)
    eval_sampler_steps: int = arg(40, num(int, 1, 1000), "sampler steps of evaluation")
    eval_batch: int = arg(16, num(int, 1), "images per forward")
    eval_prompts: int = arg(0, num(int, 0), "at most this many test prompts per task (0 = all)")
    eval_seeds: int = arg(4, num(int, 1, 1000), "images per test prompt (GenEval uses 4)")
    val_seeds: int = arg(8, num(int, 1, 1000), "images per validation prompt (--eval_every)")
    export_geneval: bool = arg(False, FLAG, "also write <out>/geneval/<model>/ for GenEval")
    # runs, memory, speed
    log_to: str = arg("", names(("tensorboard", "wandb"), empty_ok=True),
                      "also log metrics.jsonl's rows there (WANDB_MODE=offline works offline)")
    save_every: int = arg(20, num(int, 1), "checkpoint every N optimizer steps (and at the end)")
    resume: bool = arg(False, FLAG, "continue each stage from its latest checkpoint to "
                       "--optim_steps (a finished one too); options other than "
                       + ", ".join(sorted(RESUMABLE)) + " must be as saved")
    overwrite: bool = arg(False, FLAG, "redo a stage whose output exists")
    max_bad_steps: int = arg(5, num(int, 1), "abort after this many non-finite steps in a row")
    grad_checkpointing: bool = arg(False, FLAG, "recompute each block in the backward pass")
    compile: bool = arg(False, FLAG, "torch.compile the transformer")
    text_encoders: str = arg("offload", one_of("offload", "gpu", "cpu"), "where they live")
    no_t5: bool = arg(False, FLAG, "load no T5 (its embeddings are zeros)")
    embed_cache_mb: float = arg(2048, num(float, 1), "host memory for prompt embeddings (MB)")
    device: str = arg("auto", one_of("auto", "cpu", "cuda"), "auto | cpu | cuda")

    def relations(self, stage):
        """(broken?, message) for every relation between fields; resolve() raises the first."""
        n, a, tiny = self.sampler_steps, self.noise_level, model_kind(self.model) == "tiny"
        factor, largest = (4, 128) if tiny else (16, 4096)
        tasks = list(parse_pairs(self.teachers)) if stage == "distill" and self.teachers else \
            self.tasks.split(",")
        rl = stage == "teacher"
        trained = [self.task] if rl and self.stage == "teacher" else tasks
        return [
            (rl and self.batch_size % self.group_size,
             f"--batch_size {self.batch_size} is not a multiple of --group_size {self.group_size}"),
            (rl and self.optim_steps % self.updates_per_epoch,
             f"--optim_steps {self.optim_steps} is not a multiple of --updates_per_epoch "
             f"{self.updates_per_epoch}: an epoch's updates are not split by a checkpoint"),
            (rl and self.algo == "grpo_guard" and a == 0,
             "--algo grpo_guard needs --noise_level > 0: the ODE step has no density"),
            (rl and self.algo == "nft" and a > 0,
             f"--algo nft samples with the ODE (its stored images are clean samples): "
             f"--noise_level must be 0, got {a}"),
            (stage == "distill" and self.loss == "ppo" and a == 0,
             "--loss ppo needs --noise_level > 0: the ODE step has no density"),
            (stage == "distill" and self.sde_weight != "kl" and a == 0,
             f"--sde_weight {self.sde_weight} weighs SDE steps: --noise_level 0 has none"),
            (max(parse_steps(self.loss_steps, n)) >= n,
             f"--loss_steps {self.loss_steps!r} must lie in 0..{n - 1}"),
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
            (bool({"vivid", "faded"} & set(trained)) and self.model != "tiny-conflict",
             "the tasks vivid and faded need --model tiny-conflict (its pretraining knows "
             "their words)"),
            (self.plateau and not self.eval_every,
             "--plateau stops on the validation metrics: set --eval_every"),
        ]


# ---------------------------------------------------------------------------------------------
# The defaults of the fields left at None. Per model: resolution, T5 tokens, RL group size. Per
# model, stage and algorithm (eval takes distill's row): the rest. The real rows are the public
# configs on 8 GPUs (GRPO-Guard 48 x 24 images an epoch in 2 steps, NFT in 1, OPD 3 per task and
# GPU; README).
# ---------------------------------------------------------------------------------------------
MODEL_DEFAULTS = {"tiny": dict(resolution=32, max_seq_len=8, group_size=12, clip_range=1e-4),
                  "real": dict(resolution=512, max_seq_len=128, group_size=24, clip_range=2e-6)}
ATTN = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"  # the paper's
TINY_TARGETS = ATTN + ",norm1.linear,norm1_context.linear,norm_out.linear,context_embedder," \
                    "text_embedder.linear_1,text_embedder.linear_2"  # + AdaLN, text projections


class Defaults(typing.NamedTuple):
    optim_steps: int
    lr: float
    batch_size: int
    micro_batch: int
    noise_level: float
    guidance: float
    updates_per_epoch: int
    ema_every: int
    lora_targets: str


STAGE_DEFAULTS = {
    # (model, stage, algo)           optim   lr   batch micro  a   CFG   K  EMA  LoRA targets
    ("tiny", "teacher", "grpo_guard"): Defaults(60, 1e-3, 24, 0, 0.7, 4.5, 2, 1, TINY_TARGETS),
    ("tiny", "teacher", "nft"):        Defaults(60, 1e-3, 24, 0, 0.0, 1.0, 1, 1, TINY_TARGETS),
    ("tiny", "distill", None):         Defaults(60, 3e-3, 16, 0, 0.0, 4.5, 1, 1, TINY_TARGETS),
    ("real", "teacher", "grpo_guard"): Defaults(1000, 1e-4, 576, 9, 0.7, 4.5, 2, 8, ATTN),
    ("real", "teacher", "nft"):        Defaults(1000, 3e-4, 1152, 9, 0.0, 1.0, 1, 1, ATTN),
    ("real", "distill", None):         Defaults(1000, 3e-4, 24, 3, 0.0, 4.5, 1, 8, ATTN),
}


def model_kind(model):
    return "tiny" if model in ("tiny", "tiny-conflict") else "real"


def parse_pairs(s):
    """'a=1,b=2' -> {'a': '1', 'b': '2'} (its Rule checked the form)."""
    items = (i.partition("=") for i in s.split(",") if i.strip())
    return {k.strip(): v.strip() for k, _, v in items}


def parse_steps(s, n):
    """'' -> all but the last of n sampler steps (the paper); '0-8' or '0,2,4' otherwise."""
    if not s:
        return list(range(n - 1))
    steps = set()
    for part in s.split(","):
        a, _, b = part.partition("-")
        steps.update(range(int(a), int(b or a) + 1))
    return sorted(steps)


def resolve(cfg, stage, **defaults):
    """A copy of cfg with the stage's defaults in the fields left at None (the given defaults
    first, then the tables), checked: every field against its domain, then the relations."""
    kind = model_kind(cfg.model)
    key = (kind, "teacher", cfg.algo) if stage == "teacher" else (kind, "distill", None)
    row = STAGE_DEFAULTS.get(key, STAGE_DEFAULTS[kind, "distill", None])  # a bad --algo: below
    table = {**MODEL_DEFAULTS[kind], **row._asdict(), **defaults}
    c = dataclasses.replace(cfg, **{k: v for k, v in table.items() if getattr(cfg, k) is None})
    if c.log_conflict and c.micro_batch == 0 and isinstance(c.batch_size, int):
        # two micro-batches of each task at least: two halves, the noise floor (conflict.py)
        c.micro_batch = max(1, -(-c.batch_size // rank_world()[1] // 2))
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
        by_value.setdefault(getattr(row, name), []).append(" ".join(filter(None, key)))
    return "; ".join(f"{v} ({', '.join(keys)})" for v, keys in by_value.items())


def parse_config(argv=None, cls=Config, description="DiffusionOPD: see the top of opd.py"):
    return parse(cls, argv, description, default_words, RENAMED)
