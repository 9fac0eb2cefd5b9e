"""
The machinery under opd.py, baselines.py and bench.py, none of it the method: processes and
their collectives, random streams, logging, timers, the EMA of the weights, the guarded optimizer step,
checkpoints and LoRA files, and the command-line wrapper that turns bad input into one line.

Run folders: <out>/<stage>/ckpt-<step>/{adapter.safetensors, state.pt} are written to a
temporary folder and renamed (a checkpoint exists only once complete; the two latest are kept);
--resume continues from the latest complete one; the final LoRA
<out>/<stage>/pytorch_lora_weights.safetensors marks a finished stage. Weights are read from
safetensors only, the rest with torch.load(weights_only=True).
"""
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time

import torch

from options import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"


# ------------------------------------------------------------------------------ processes
def dist_setup(device):
    """torchrun sets RANK/WORLD_SIZE; one process otherwise. gloo on CPU, nccl on GPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cpu" and world > 1:
        torch.set_num_threads(1)
    return rank, world, torch.device(device)


def gather(x, world):
    """Concatenate a (b, ...) tensor from every rank in rank order."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def barrier(world):
    if world > 1:
        torch.distributed.barrier()


def check_in_sync(params, world, rank, what):
    """Every rank's weights against rank 0's: a UserError when they differ, which is what the
    DDP trap (gradients never all-reduced) looks like at the end of a run."""
    if world == 1:
        return
    d = torch.zeros((), device=params[0].device)
    for p in params:
        ref = p.detach().clone()
        torch.distributed.broadcast(ref, 0)
        d = torch.maximum(d, (p.detach() - ref).abs().max())
    torch.distributed.all_reduce(d, op=torch.distributed.ReduceOp.MAX)
    if d.item() > 1e-6:
        raise UserError(f"ranks diverged (max weight difference {d.item():.3g}): gradients were not "
                        f"synchronised; nothing was saved beyond the last checkpoint")
    say(rank, f"{what}: {world} ranks in sync (max weight difference {d.item():.1g})")


def rng(*key):
    """A CPU generator seeded from (seed, step, purpose, rank, ...): every step's randomness is a
    function of the step counter, so a resumed run draws what an uninterrupted one would."""
    h = 0
    for k in key:
        h = (h * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(h)


# ------------------------------------------------------------------------------ logging
def say(rank, *a):
    if rank == 0:
        print(*a, flush=True)


def logger(run_dir, rank):
    """log(**row): a JSON line in <run>/metrics.jsonl, on rank 0."""
    def log(**row):
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
    return log


def bar(it, rank, desc):
    from tqdm import tqdm
    return tqdm(it, desc=desc, disable=rank != 0, dynamic_ncols=True, file=sys.stdout)


def config_text(cfg, width=100):
    """The resolved config for a person: name=value, as many to a line as fit."""
    lines, line = [], ""
    for f in dataclasses.fields(cfg):
        item = f"{f.name}={getattr(cfg, f.name)}"
        if line and len(line) + 2 + len(item) > width:
            lines.append(line)
            line = ""
        line = f"{line}  {item}" if line else item
    return "\n".join(["config:"] + ["  " + l for l in lines + [line]])


def quiet_hf():
    """diffusers and transformers: errors only, no progress bars."""
    import warnings
    from diffusers.utils import logging as dl
    from rewards import quiet
    quiet()  # transformers
    dl.set_verbosity_error()
    dl.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")  # M adapters


def compile_model(tr):
    """torch.compile of the transformer, with room for the graph of every adapter and grad mode
    that a loop switches between (dynamo's default of 8 fell back to eager within a round)."""
    import torch._dynamo
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    tr.compile()


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


# ------------------------------------------------------------------------------ optimisation
class EMA:
    """Exponential moving average of the trained weights, as Flow-GRPO keeps it: after optimizer
    step s (s % every == 0), e <- d e + (1 - d) p with d = min((1 + s) / (10 + s), decay), so the
    first updates follow p closely. The stage saves (and eval uses) e; decay 0 saves p itself."""

    def __init__(self, params, decay, every):
        self.params, self.decay, self.every = params, decay, every
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


def guarded_step(opt, params, grad_clip, max_bad, bad, rank):
    """Clip and step, unless the gradient is not finite: then skip (warn), and abort after
    max_bad such steps in a row. Returns (grad norm, bad steps in a row)."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        bad += 1
        say(rank, f"warning: non-finite loss or gradient, step skipped ({bad} in a row)")
        if bad >= max_bad:
            raise UserError(f"{bad} non-finite steps in a row: aborted; the last good checkpoint is kept")
        return float(norm), bad
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm), 0


# ------------------------------------------------------------------------------ files
def write_text(path, text):
    """Write to a temporary file, then rename: a reader sees the old file or the new one."""
    with open(f"{path}.tmp-{os.getpid()}", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp-{os.getpid()}", path)


def adapter_state(tr, name):
    from peft.utils import get_peft_model_state_dict
    state = get_peft_model_state_dict(tr, adapter_name=name)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


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
    """Load a saved LoRA as adapter `name`; one line for a missing folder or another model."""
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


def run_info(d, key, default):
    """A value from a LoRA folder's run.json or config.json (default when absent)."""
    for f in ("run.json", "config.json"):
        with contextlib.suppress(OSError, ValueError):
            v = json.load(open(os.path.join(d, f))).get(key)
            if v is not None:
                return v
    return default


def checkpoints(run_dir):
    if not os.path.isdir(run_dir):
        return []
    return sorted(d for d in os.listdir(run_dir) if d.startswith("ckpt-") and
                  os.path.isfile(os.path.join(run_dir, d, "state.pt")))


def save_checkpoint(run_dir, step, tr, names, opts, emas, cfg, aux=(), elapsed=0.0, keep=2):
    """names, opts: the trained adapters and their optimizers; emas: the EMAs of the first ones;
    aux: more tensors to restore exactly (NFT's old adapter); elapsed: training seconds."""
    from safetensors.torch import save_file
    final = os.path.join(run_dir, f"ckpt-{step:07d}")
    if os.path.isdir(final):
        return
    tmp = os.path.join(run_dir, f".tmp-ckpt-{step:07d}-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    for i, name in enumerate(names):
        save_file(adapter_state(tr, name), os.path.join(tmp, f"adapter{i or ''}.safetensors"))
    torch.save({"step": step, "optimizers": [o.state_dict() for o in opts],
                "config": dataclasses.asdict(cfg), "emas": [[e.cpu() for e in m.shadow] for m in emas],
                "aux": [a.detach().cpu() for a in aux], "elapsed": elapsed,
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
            raise UserError(f"--resume: {run_dir} was trained with --{k} {state['config'][k]}, "
                            f"not {getattr(cfg, k)}")
    return state


def load_checkpoint(run_dir, tr, names, opts, emas, cfg, aux=()):
    """Restore the latest complete checkpoint; returns (the step to continue from, seconds)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    state = check_resume(run_dir, cfg)
    ck = os.path.join(run_dir, checkpoints(run_dir)[-1])
    for i, (name, opt) in enumerate(zip(names, opts)):
        weights = load_file(os.path.join(ck, f"adapter{i or ''}.safetensors"))
        set_peft_model_state_dict(tr, weights, adapter_name=name)
        opt.load_state_dict(state["optimizers"][i])
    for ema, saved in zip(emas, state["emas"]):  # the first adapters' (a helper keeps none)
        for e, s in zip(ema.shadow, saved):
            e.data.copy_(s)
    for a, saved in zip(aux, state["aux"]):
        a.data.copy_(saved)
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["elapsed"]


def prepare_run(run_dir, cfg, rank, what):
    """What to do with a stage's folder: 'done' (reuse), 'resume', or 'fresh'."""
    done = os.path.isfile(os.path.join(run_dir, LORA_FILE))
    if done and not cfg.overwrite:
        say(rank, f"{what}: {run_dir}/{LORA_FILE} exists, reused (--overwrite to redo)")
        return "done"
    if cfg.overwrite:
        if rank == 0 and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)
        return "fresh"
    if checkpoints(run_dir):
        if cfg.resume:
            return "resume"
        raise UserError(f"{run_dir} holds a checkpoint of an unfinished {what} run: pass --resume "
                        f"to continue it or --overwrite to start again")
    if cfg.resume:
        say(rank, f"{what}: --resume, but {run_dir} holds no checkpoint: starting at step 0")
    return "fresh"


# ------------------------------------------------------------------------------ entry points
def main(run, argv=None):
    """run(argv) with bad input as one line on stderr and exit code 2 (nothing saved is lost:
    every check runs before a stage writes). Multi-rank runs leave without interpreter shutdown:
    DDP's reducer keeps gloo's worker threads alive to the end, and one still releasing the last
    collective's tensors during finalisation aborts the process after a good run."""
    import signal
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends quietly
    code, t0 = 0, time.time()
    try:
        run(argv)
        say(int(os.environ.get("RANK", 0)), f"done in {time.time() - t0:.0f}s")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except OSError as e:  # a path the user gave that cannot be read or written
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr, flush=True)
        code = 2
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
