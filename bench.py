"""
What a distillation round and the teachers' RL cost, measured in one process:

    python bench.py                      # tiny: rounds, FLOPs, saved bytes, memory
    python bench.py --device meta --model sd35m-random   # SD3.5-M's counts without a GPU
    python bench.py --gpu_check          # one GPU: every stage at the paper's per-GPU batch

  memory     peak of one round with one adapter trained alone (its teacher the base), then with
             M teacher adapters (GPU: the CUDA allocator's peak; CPU: sampled resident memory)
  time       fused rounds against --two_pass rounds, alternating, after a warm-up each
  FLOPs      the model FLOPs of a round from the transformer's config and the token counts
             (transformer_flops), the achieved TFLOP/s, and on a GPU the share of its bf16 peak
  saved      the bytes that one trained step keeps for its backward pass, counted exactly with
             saved-tensor hooks, with and without gradient checkpointing
  compile    with --compile: the same rounds through torch.compile, and the largest difference
             of the velocities

--device meta counts FLOPs and saved bytes on PyTorch's meta device (shapes, no data):
SD3.5-Medium's transformer at 512 px on a machine without a GPU. --gpu_check: see gpu_check.
"""
import contextlib
import dataclasses
import json
import os
import time

import torch

import opd
from opd_support import prompts, runs, sd3
from opd_support.checkpoints import write_text
from opd_support.config import Config, parse_config, parse_steps, resolve
from opd_support.machinery import (Timer, chunks, compile_model, dist_setup, main as cli, quiet_hf,
                                   rng, say)
from opd_support.options import FLAG, arg, num, one_of


@dataclasses.dataclass
class Args(Config):
    stage: str = arg("bench", one_of("bench"), "bench")
    rounds: int = arg(3, num(int, 1), "timed rounds of each kind")
    device: str = arg("auto", one_of("auto", "cpu", "cuda", "meta"), "meta: count shapes only")
    peak_tflops: float = arg(0, num(float, 0), "the device's peak bf16 TFLOP/s (0: a known GPU's)")
    gpu_check: bool = arg(False, FLAG, "every stage at the paper's per-GPU batch (gpu_check)")

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of GPUs by name; --peak_tflops for others
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("H20", 148), ("GH200", 989),
               ("B200", 2250), ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181),
               ("L4", 121), ("A10G", 70), ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71),
               ("RTX A6000", 155), ("A6000 Ada", 364)]


def transformer_flops(c, batch, n_img, n_txt):
    """Model FLOPs of one forward of an SD3 transformer (diffusers' SD3Transformer2DModel config
    c) on batch samples of n_img image tokens and n_txt text tokens, matrix products only (2 per
    multiply-add), as (linear, attention). With d = heads x head_dim, N = n_img + n_txt, per block:
      image stream   q, k, v, out 4 (2 n_img d^2); feed-forward (d -> 4d -> d) 16 n_img d^2
      text stream    add_q, add_k, add_v 3 (2 n_txt d^2); to_add_out 2 n_txt d^2 and the
                     feed-forward 16 n_txt d^2, except in the last block (context_pre_only)
      joint attention Q K^T and P V: 2 (2 N^2 d)
      dual attention (SD3.5 blocks in dual_attention_layers) q, k, v, out 8 n_img d^2 and its
                     image-only attention 4 n_img^2 d
      AdaLN          2 d 6d per stream (9d image side of a dual block; 2d text side of the last)
    and once: patch embedding 2 n_img p^2 C d, context embedder 2 n_txt J d, time and pooled-text
    embedders 2 (256 d + P d + 2 d^2), final AdaLN 2 d 2d and projection 2 n_img d p^2 C."""
    d, L, p = c["num_attention_heads"] * c["attention_head_dim"], c["num_layers"], c["patch_size"]
    dual = set(c.get("dual_attention_layers") or ())
    ni, nt, n = n_img, n_txt, n_img + n_txt
    lin, att = 0, 0
    for i in range(L):
        last = i == L - 1
        lin += 24 * ni * d * d + (6 if last else 24) * nt * d * d
        lin += 2 * d * (9 if i in dual else 6) * d + 2 * d * (2 if last else 6) * d
        att += 4 * n * n * d
        if i in dual:
            lin += 8 * ni * d * d
            att += 4 * ni * ni * d
    lin += 2 * ni * p * p * c["in_channels"] * d + 2 * nt * c["joint_attention_dim"] * d
    lin += (2 * (256 * d + c["pooled_projection_dim"] * d + 2 * d * d) + 2 * d * 2 * d +
            2 * ni * d * p * p * c["out_channels"])
    return batch * lin, batch * att


def round_flops(cfg, tr_config, vae_scale, n_tasks, world):
    """Model FLOPs of one distillation round on this rank: per task and trajectory, N student
    forwards (fused: N - 1 of them trained; two-pass: N no-grad plus T trained), T teacher forwards
    and T backward passes, T = trained steps. A backward through frozen weights computes input
    gradients only: its linear FLOPs equal the forward's, its attention's are twice (dQ, dK, dV).
    LoRA's own products (about 2 r / d of the projections) are not counted."""
    c, b = tr_config, cfg.batch_size // world
    cfg_x = 2 if cfg.guidance != 1 else 1
    n_img = (cfg.resolution // vae_scale // c["patch_size"]) ** 2
    lin, att = transformer_flops(c, b * cfg_x, n_img, 77 + cfg.max_seq_len)
    T, N = len(parse_steps(cfg.loss_steps, cfg.sampler_steps)), cfg.sampler_steps
    fwd, bwd = lin + att, lin + 2 * att
    per_task = {False: N * fwd + T * fwd + T * bwd, True: (N + T) * fwd + T * fwd + T * bwd}
    return {k: v * n_tasks for k, v in per_task.items()}


@contextlib.contextmanager
def saved_bytes(params):
    """out['bytes']: bytes held for the backward pass by the autograd graph built inside the
    block, each storage once, the model's own parameters excluded (they exist anyway); with
    gradient checkpointing, the inputs a checkpointed block keeps for its recomputation (see
    count_checkpoint) are added. Works on any device, the meta device included."""
    seen, out = {}, {"bytes": 0}
    skip = {p.untyped_storage()._cdata for p in params}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in skip and s._cdata not in seen:
            seen[s._cdata] = t  # keep it referenced: its storage's identity stays unique
            out["bytes"] += s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


def count_checkpoint(tr, out):
    """Gradient checkpointing whose recomputation inputs are counted into out['bytes'] (the
    non-reentrant checkpoint keeps them outside the saved-tensor hooks)."""
    import torch.utils.checkpoint as ckpt
    seen = set()

    def fn(module, *args):
        for a in args:
            if torch.is_tensor(a) and a.untyped_storage()._cdata not in seen:
                seen.add(a.untyped_storage()._cdata)
                out["bytes"] += a.untyped_storage().nbytes()
        return ckpt.checkpoint(module.__call__, *args, use_reentrant=False)
    tr.enable_gradient_checkpointing(gradient_checkpointing_func=fn)


def trained_step_bytes(m, cfg, prompts, checkpointing):
    """Bytes saved for backward by one trained student forward (CFG included) at this batch."""
    tr = m.tr
    params = [p for p in tr.parameters()]
    x = m.noise(len(prompts), torch.Generator().manual_seed(0))
    v = m.velocity("student", prompts, cfg.guidance)
    with saved_bytes(params) as out:
        if checkpointing:
            count_checkpoint(tr, out)
        y = v(x, 0.5)
    tr.disable_gradient_checkpointing()
    if cfg.grad_checkpointing:
        tr.enable_gradient_checkpointing()
    del y
    return out["bytes"]


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


def peak_tflops(cfg, device):
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS if k in name), None)
    return None


def one_round(cfg, model, tasks, teacher_of, r=0):
    """One distillation round as opd.distill runs it (every task, its micro-batches, fused or
    --two_pass), its gradient left in the student's weights; teacher_of(task) -> the adapter
    supervising it (None: the base)."""
    sampler, world = opd.sampler_of(cfg), runs.rank_world()[1]
    trajectory = opd.distill_trajectory if cfg.two_pass else opd.distill_trajectory_fused
    for i, task in enumerate(tasks):  # rank 0's share of the round's prompts
        prompts_ = prompts.draw_prompts(cfg, task, r, i, cfg.batch_size)[:cfg.batch_size // world]
        g = rng(cfg.seed, "rollout", i, 0, step=r)
        for s in chunks(len(prompts_), cfg.micro_batch):
            ps = prompts_[s]
            student = model.velocity("student", ps, cfg.guidance)
            teacher = model.velocity(teacher_of(task), ps, cfg.guidance)
            trajectory(student, teacher, model.noise(len(ps), g), sampler, g,
                       len(ps) / len(prompts_))


def bench(cfg, m, tasks, world):
    """`python bench.py` (one process): peak memory of a round with one adapter alone and with M
    teacher adapters; seconds per round, fused against --two_pass, alternating after a warm-up
    each; model FLOPs and TFLOP/s (MFU on a GPU); bytes saved for backward by one trained step,
    with and without gradient checkpointing. Prints a table and writes <out>/bench.json."""
    mb = lambda b: b / 2**20
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)
    params = m.trainable = sd3.add_lora(m.tr, "student", cfg)
    b = cfg.batch_size // world
    mb_prompts = [tasks[0].train[0]] * (cfg.micro_batch or b)
    saved = {ck: trained_step_bytes(m, cfg, mb_prompts, ck) for ck in (False, True)}

    def round_s(teacher_of, two_pass=False, step=0):  # one round, gradients dropped; seconds
        for p in params:
            p.grad = None
        m.active, tm = "?", Timer(m.device)
        with tm("round"):
            one_round(dataclasses.replace(cfg, two_pass=two_pass), m, tasks, teacher_of, step)
        return tm.t["round"]
    with peak_memory(m.device) as alone:
        round_s(lambda t: None)
    teachers = []
    for t in tasks:  # M teachers: adapters on the same transformer, B randomised
        sd3.add_lora(m.tr, f"teacher-{t.name}", cfg)
        teachers += [p for n, p in m.tr.named_parameters() if f"teacher-{t.name}" in n]
    for n, p in m.tr.named_parameters():
        if "lora_B.teacher-" in n:
            torch.nn.init.normal_(p.data, std=0.01)
    m.trainable = params
    with peak_memory(m.device) as multi:
        round_s(lambda t: f"teacher-{t.name}")
    times = {False: [], True: []}
    for r in range(2 * cfg.rounds + 2):  # alternate; the first round of each is a warm-up
        dt = round_s(lambda t: f"teacher-{t.name}", bool(r % 2), step=r)
        if r >= 2:
            times[bool(r % 2)].append(dt)
    fused, two = (sum(v) / len(v) for v in (times[False], times[True]))
    flops = round_flops(cfg, m.tr.config, m.pipe.vae_scale_factor, len(tasks), world)
    peak = peak_tflops(cfg, m.device)
    res = {"model": cfg.model, "resolution": cfg.resolution, "batch_size": cfg.batch_size,
           "tasks": len(tasks), "rounds_each": cfg.rounds,
           "device": (str(m.device) if m.device.type == "cpu"
                      else torch.cuda.get_device_name(m.device)),
           "round_s_fused": round(fused, 4), "round_s_two_pass": round(two, 4),
           "two_pass_over_fused": round(two / fused, 3),
           "round_tflop_fused": flops[False] / 1e12, "round_tflop_two_pass": flops[True] / 1e12,
           "tflops_fused": flops[False] / fused / 1e12, "tflops_two_pass": flops[True] / two / 1e12,
           "mfu_fused": peak and flops[False] / fused / 1e12 / peak, "peak_tflops": peak,
           "saved_mb_per_trained_step": round(mb(saved[False]), 2),
           "saved_mb_per_trained_step_checkpointing": round(mb(saved[True]), 2),
           "trained_step_batch": len(mb_prompts),
           "peak_mb_one_adapter": round(mb(alone["peak"]), 1),
           "peak_mb_M_teachers": round(mb(multi["peak"]), 1),
           "adapter_mb": round(mb(nbytes(params)), 3),
           "teacher_adapters_mb": round(mb(nbytes(teachers)), 3),
           "transformer_mb": round(mb(nbytes(p for n, p in m.tr.named_parameters()
                                             if "lora_" not in n)), 3)}
    if cfg.compile:
        res.update(compiled(cfg, m, tasks, round_s))
    sd3.drop_adapters(m)
    if runs.rank_world()[0] == 0:
        say(0, f"{cfg.model} {cfg.resolution}px, batch {cfg.batch_size}, {len(tasks)} tasks, "
                   f"{cfg.sampler_steps} steps ({res['device']}): round fused {fused:.3f}s, "
                   f"two-pass {two:.3f}s (x{two / fused:.2f}); "
                   f"{flops[False] / 1e12:.3g} TFLOP a fused round = "
                   f"{res['tflops_fused']:.3g} TFLOP/s" +
                (f" = {100 * res['mfu_fused']:.1f}% of {peak} (MFU)" if peak else "") +
                f"; saved for backward per trained step (batch {len(mb_prompts)}): "
                f"{mb(saved[False]):.1f} MB, {mb(saved[True]):.1f} MB with gradient "
                f"checkpointing; peak memory {mb(alone['peak']):.0f} MB one adapter, "
                f"{mb(multi['peak']):.0f} MB with {len(tasks)} teacher adapters "
                f"({mb(nbytes(teachers)):.2f} MB of adapter weights; a transformer copy is "
                f"{res['transformer_mb']:.2f} MB)")
        write_json(cfg.out, "bench.json", res)
    return res


def write_json(out, name, res):
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, name), json.dumps(res, indent=1))


def compiled(cfg, m, tasks, round_s):
    """The same rounds with the transformer compiled: seconds (after the compile's warm-up
    rounds) and the largest velocity difference from the eager model on one batch."""
    x = m.noise(2, torch.Generator().manual_seed(0))
    prompts = [tasks[0].train[0]] * 2
    with torch.no_grad():
        eager = m.velocity("student", prompts, cfg.guidance)(x, 0.5)
    t0 = time.perf_counter()
    compile_model(m.tr)
    round_s(lambda t: f"teacher-{t.name}")  # compiles
    round_s(lambda t: f"teacher-{t.name}", True)
    warm = time.perf_counter() - t0
    times = [round_s(lambda t: f"teacher-{t.name}", step=r) for r in range(cfg.rounds)]
    with torch.no_grad():
        diff = (m.velocity("student", prompts, cfg.guidance)(x, 0.5) - eager).abs().max().item()
    return {"compile_warmup_s": round(warm, 2),
            "round_s_fused_compiled": round(sum(times) / len(times), 4),
            "compiled_max_velocity_diff": diff}


# ------------------------------------------------------------------------------ meta-device count
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, latent_channels=16, use_quant_conv=False,
               use_post_quant_conv=False)  # SD3.5's VAE config
T5_XXL_PARAMS, CLIP_PARAMS = 4.76e9, 0.12e9 + 0.69e9  # encoder parameters: T5-XXL; CLIP-L + CLIP-G


def flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    """SDPA through the flash kernel, which saves q, k, v, out and the log-sum-exp as GPU flash
    attention does (on the meta device PyTorch would decompose it and save the attention matrix)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[0]


def meta_step(tr, batch, n_img_side, n_txt, checkpointing):
    """(bytes saved for backward, largest bytes of one block) of one trained forward on meta."""
    import torch.nn.functional as F
    dt, dev = torch.bfloat16, "meta"
    c = tr.config
    x = torch.empty(batch, c.in_channels, n_img_side, n_img_side, device=dev, dtype=dt)
    e = torch.empty(batch, n_txt, c.joint_attention_dim, device=dev, dtype=dt)
    p = torch.empty(batch, c.pooled_projection_dim, device=dev, dtype=dt)
    marks, sdpa = [], F.scaled_dot_product_attention
    F.scaled_dot_product_attention = flash_sdpa
    try:
        with saved_bytes(list(tr.parameters())) as out:
            hooks = [b.register_forward_pre_hook(lambda mod, a: marks.append(out["bytes"]))
                     for b in tr.transformer_blocks]
            hooks += [b.register_forward_hook(lambda mod, a, o: marks.append(out["bytes"]))
                      for b in tr.transformer_blocks]
            if checkpointing:
                count_checkpoint(tr, out)
            tr(hidden_states=x, timestep=torch.ones(batch, device=dev), encoder_hidden_states=e,
               pooled_projections=p, return_dict=False)
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
        tr.disable_gradient_checkpointing()
    return out["bytes"], max(b - a for a, b in zip(marks[::2], marks[1::2]))


def count(cfg, rank=0):
    """`python bench.py --device meta`: shapes only. For the distillation round and the RL step at
    their micro-batches, the model FLOPs and the bytes one trained step saves for backward, with
    and without gradient checkpointing, and an estimate of the GPU's peak memory (bf16 weights,
    fp32 LoRA with its gradient, Adam moments and EMA; the recomputed block's activations under
    checkpointing; without the CUDA context and allocator slack). Writes <out>/count.json."""
    from opd_support import tiny
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from peft import LoraConfig
    quiet_hf()
    if cfg.model == "sd35m-random":
        tcfg, vae_cfg = tiny.SD35M_TRANSFORMER, SD3_VAE
    elif cfg.model in tiny.TOY_MODELS:
        pipe = tiny.build_offline(cfg.model)
        tcfg, vae_cfg = dict(pipe.transformer.config), dict(pipe.vae.config)
    else:
        with open(os.path.join(cfg.model, "transformer", "config.json")) as f:
            tcfg, vae_cfg = json.load(f), SD3_VAE
    with torch.device("meta"):
        tr = SD3Transformer2DModel(**{k: v for k, v in tcfg.items()
                                      if not k.startswith("_")}).to(torch.bfloat16)
        vae = AutoencoderKL(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")})
    tr.requires_grad_(False)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    rows, M = {}, len(cfg.tasks.split(","))
    for stage in ("distill", "teacher"):
        c = resolve(dataclasses.replace(cfg, device="cpu", optim_steps=None), stage)
        with torch.device("meta"):
            tr.add_adapter(LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha,
                                      target_modules=c.lora_targets.split(",")),
                           adapter_name=stage)
        tr.set_adapter(stage)
        lora = sum(p.numel() for p in tr.parameters() if p.requires_grad) * 4  # fp32 on a GPU
        for m in tr.modules():  # as opd.add_lora
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = False
        micro = c.micro_batch or c.batch_size
        batch = micro * (2 if c.guidance != 1 else 1)
        side = c.resolution // scale
        (plain, block), (ckpt, _) = (meta_step(tr, batch, side, 77 + c.max_seq_len, ck)
                                     for ck in (False, True))
        extra = (M * lora if stage == "distill"
                 else (lora if c.algo == "nft" else 0))  # teachers / NFT's old adapter
        weights = sum(p.numel() for n, p in tr.named_parameters() if "lora_" not in n) * 2 + \
            sum(p.numel() for p in vae.parameters()) * 2
        fixed = weights + 5 * lora + extra
        rows[stage] = {"resolution": c.resolution, "micro_batch": micro, "forward_batch": batch,
                       "algo": c.algo if stage == "teacher" else None,
                       "weights_gb": weights / 1e9, "lora_states_gb": (5 * lora + extra) / 1e9,
                       "saved_gb": plain / 1e9, "saved_gb_checkpointing": ckpt / 1e9,
                       "largest_block_gb": block / 1e9,
                       "peak_gb_estimate": (fixed + plain) / 1e9,
                       "peak_gb_estimate_checkpointing": (fixed + ckpt + block) / 1e9}
        if stage == "distill":
            f = round_flops(c, tr.config, scale, M, 1)
            rows[stage].update(round_tflop_fused=f[False] / 1e12,
                               round_tflop_two_pass=f[True] / 1e12)
        tr.delete_adapters([stage])
    rows["text_encoders_gb"] = {"t5_xxl": T5_XXL_PARAMS * 2 / 1e9,
                                "clip_l_g": CLIP_PARAMS * 2 / 1e9}
    for stage in ("distill", "teacher"):
        r = rows[stage]
        say(rank, f"{cfg.model} {r['resolution']}px {stage} (micro-batch {r['micro_batch']}, "
                      f"forward batch {r['forward_batch']}): saved for backward "
                      f"{r['saved_gb']:.2f} GB, {r['saved_gb_checkpointing']:.2f} GB with "
                      f"checkpointing; estimated peak {r['peak_gb_estimate']:.1f} GB, "
                      f"{r['peak_gb_estimate_checkpointing']:.1f} GB with checkpointing "
                      f"(weights {r['weights_gb']:.2f} GB)")
    if rank == 0:
        write_json(cfg.out, "count.json", rows)
    return rows


# ------------------------------------------------------------------------------ the GPU check
@contextlib.contextmanager
def counted_flops(tr):
    """out['tflop']: the model FLOPs of every transformer forward inside the block, from its
    input shapes (transformer_flops), plus its backward when grad is enabled (a backward through
    frozen weights: the forward's linear FLOPs, twice its attention's). Recomputation under
    gradient checkpointing is not model work and is not counted."""
    c, out = dict(tr.config), {"tflop": 0.0}

    def hook(module, args, kwargs, output):
        x, e = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        n_img = (x.shape[-2] // c["patch_size"]) * (x.shape[-1] // c["patch_size"])
        lin, att = transformer_flops(c, x.shape[0], n_img, e.shape[1])
        out["tflop"] += (lin + att + (lin + 2 * att if torch.is_grad_enabled() else 0)) / 1e12
    handle = tr.register_forward_hook(hook, with_kwargs=True)
    try:
        yield out
    finally:
        handle.remove()


@contextlib.contextmanager
def measured(m, peak):
    """out: seconds, peak allocated / reserved GB (CPU: peak resident set), TFLOP, TFLOP/s, MFU."""
    out, cuda = {}, m.device.type == "cuda"
    with counted_flops(m.tr) as f, peak_memory(m.device) as mem:
        t0 = time.perf_counter()
        yield out
        if cuda:
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t0
    out["peak_allocated_gb"] = mem["peak"] / 1e9
    out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(m.device) / 1e9 if cuda else None
    out["tflop"] = f["tflop"]
    out["tflops"] = f["tflop"] / out["seconds"]
    out["mfu"] = out["tflops"] / peak if peak else None


def profile_round(m, cfg, tasks, teacher_of):
    """One fused round under torch.profiler: how many operators it launches, how many are dtype
    casts and how many matrix products, and the operators that take the most time (GPU time on
    a GPU, CPU time otherwise)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = m.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        one_round(cfg, m, tasks, teacher_of)
    rows = prof.key_averages()
    key = (lambda r: r.self_device_time_total) if cuda else (lambda r: r.self_cpu_time_total)
    count = lambda names: sum(r.count for r in rows if r.key in names)
    return {"operators": sum(r.count for r in rows if r.key.startswith("aten::")),
            "casts": count({"aten::_to_copy"}),
            "matmuls": count({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}),
            "attention": sum(r.count for r in rows if "scaled_dot_product" in r.key
                             and r.key.startswith("aten::_")),
            "top": [(r.key, r.count, round(key(r) / 1e3, 2)) for r in
                    sorted(rows, key=key, reverse=True)[:12]]}


def gpu_check(cfg):
    """The GPU check, one command: `python bench.py --gpu_check --model sd35m-random` (bf16 on
    a GPU; it runs on the CPU with --model tiny through the same code). Each stage at the
    paper's per-GPU batch, after one warm-up:
      distill    3 trajectories per task, 3 tasks (3 teacher adapters), student CFG 4.5, 10 steps:
                 a fused and a two-pass round, each with and without gradient checkpointing
      grpo_guard one teacher update: 9 SDE rollouts with CFG (a = 0.7), 9 steps trained,
                 checkpointing
      nft        one NFT update: 9 CFG-free ODE samples of the old adapter, 9 times trained,
                 checkpointing
    Per stage: seconds, samples/s, peak allocated and reserved memory, model TFLOP (counted_flops),
    TFLOP/s and MFU; then a profile of one fused round. Writes <out>/gpu_check.json and .md."""
    import platform
    rank, world, device = dist_setup(cfg.device)
    base = dataclasses.replace(cfg, tasks="color,position,jpeg", compile=False, optim_steps=None)
    c = resolve(dataclasses.replace(base, batch_size=3, micro_batch=3), "distill")
    tasks = [prompts.make_task(n, c, device) for n in c.tasks.split(",")]
    m = sd3.SD3(sd3.load_pipeline(c, device), c, device)
    peak, rows = peak_tflops(cfg, device), []
    teacher_of = lambda t: f"teacher-{t.name}"
    for t in tasks:  # three teacher adapters with B randomised, then the student
        sd3.add_lora(m.tr, teacher_of(t), c)
    for n, p in m.tr.named_parameters():
        if "lora_B.teacher-" in n:
            torch.nn.init.normal_(p.data, std=0.01)
    params = m.trainable = sd3.add_lora(m.tr, "student", c)
    for ckpt in (False, True):
        (m.tr.enable_gradient_checkpointing if ckpt else m.tr.disable_gradient_checkpointing)()
        for two_pass in (False, True):
            rc = dataclasses.replace(c, two_pass=two_pass)
            for _ in range(2):  # a warm-up, then the measured round
                for p in params:
                    p.grad = None
                m.active = "?"
                with measured(m, peak) as r:
                    one_round(rc, m, tasks, teacher_of)
            rows.append({"stage": "distill " + ("two-pass" if two_pass else "fused"),
                         "checkpointing": ckpt, "batch": f"3 x {len(tasks)} tasks, CFG",
                         "samples": 3 * len(tasks), **r})
    profile = profile_round(m, dataclasses.replace(c, two_pass=False), tasks, teacher_of)
    sd3.drop_adapters(m)
    m.tr.enable_gradient_checkpointing()
    for algo in ("grpo_guard", "nft"):
        rc = resolve(dataclasses.replace(base, algo=algo, batch_size=9, micro_batch=9,
                                             updates_per_epoch=1, group_size=9,
                                             grad_checkpointing=True), "teacher")
        if algo == "nft":
            sd3.add_lora(m.tr, "old", rc)
        params = m.trainable = sd3.add_lora(m.tr, "policy", rc)
        opt = torch.optim.AdamW(params, lr=rc.lr)
        for _ in range(2):  # a warm-up, then the measured update
            m.active = "?"
            with measured(m, peak) as r:
                one = runs.single_process()
                samples, _ = opd.rl_sample(rc, m, tasks[:1], 0, one)
                if algo == "grpo_guard":
                    opd.grpo_guard_update(rc, m, samples, torch.arange(9), one)
                else:
                    opd.nft_update(rc, m, samples, torch.arange(9), 0, one)
                opt.step(); opt.zero_grad(set_to_none=True)
        rows.append({"stage": f"{algo} update", "checkpointing": True,
                     "batch": "9" + (", CFG" if rc.guidance != 1 else ", CFG-free"),
                     "samples": 9, **r})
        sd3.drop_adapters(m)
    for r in rows:
        r["samples_per_s"] = r["samples"] / r["seconds"]
    res = {"model": c.model, "resolution": c.resolution,
           "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
           "dtype": str(m.dtype), "peak_tflops": peak, "stages": rows,
           "profile_fused_round": profile}
    fmt = lambda v, f: "-" if v is None else format(v, f)
    md = [f"GPU check: {res['model']} {res['resolution']} px, {res['dtype']}, {res['device']}, "
          f"torch {res['torch']}, CUDA {res['cuda']}, {res['date']}", "",
          "| stage | batch | checkpointing | seconds | samples/s | model TFLOP | TFLOP/s | MFU | "
          "peak allocated GB | peak reserved GB |", "|---" * 10 + "|"]
    for r in rows:
        md.append(f"| {r['stage']} | {r['batch']} | {'yes' if r['checkpointing'] else 'no'} | "
                  f"{r['seconds']:.3f} | {r['samples_per_s']:.3f} | {r['tflop']:.3g} | "
                  f"{r['tflops']:.3g} | "
                  f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
                  f"{r['peak_allocated_gb']:.2f} | {fmt(r['peak_reserved_gb'], '.2f')} |")
    md += ["", f"One fused round launches {profile['operators']} operators: "
           f"{profile['casts']} dtype casts, {profile['matmuls']} matrix products, "
           f"{profile['attention']} attention calls. "
           "Most time (ms):", ""] + [f"- {k}: {n} calls, {ms} ms" for k, n, ms in profile["top"]]
    write_json(cfg.out, "gpu_check.json", res)
    write_text(os.path.join(cfg.out, "gpu_check.md"), "\n".join(md) + "\n")
    say(rank, "\n".join(md))
    return res


# ------------------------------------------------------------------------------ main
def run(cfg):
    # every option against its rule and the relations, before anything runs
    resolve(dataclasses.replace(cfg, device="cpu" if cfg.device == "meta" else cfg.device),
            "distill")
    if cfg.device == "meta":  # these resolve each stage's config themselves
        return count(cfg)
    if cfg.gpu_check:
        return gpu_check(cfg)
    c = resolve(cfg, "distill")
    m, tasks = runs.setup(dataclasses.replace(c, compile=False), "distill")
    return bench(c, m, tasks, runs.rank_world()[1])


def parse_args(argv=None):
    return parse_config(argv, Args, "the bench: see bench.py")


def main(argv=None):
    cli(run, parse_args, argv)


if __name__ == "__main__":
    main()
