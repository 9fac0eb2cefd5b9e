"""
The machinery under opd.py, baselines.py and bench.py, none of it the method: processes and
their collectives, named random streams, logging, timers, the compute count, the EMA of the
weights, the guarded optimizer step, and the command-line wrapper that turns bad input into one
line.
"""
import contextlib
import dataclasses
import json
import os
import sys
import time

import torch

from opd_support.options import Stopped, UserError


# ------------------------------------------------------------------------------ processes
def dist_setup(device):
    """torchrun sets RANK/WORLD_SIZE; one process otherwise. gloo on CPU, nccl on GPU."""
    rank, world = rank_world()
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


def rank_world():
    """(this process's rank, the number of processes), as torchrun sets them."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def gather(x, world):
    """Concatenate a (b, ...) tensor from every rank in rank order."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def sum_over_ranks(x, world, op="sum"):
    """x summed (or its maximum, op='max') over the ranks, in place; returned."""
    if world > 1:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
        torch.distributed.all_reduce(x, op=ops[op])
    return x


def barrier(world):
    if world > 1:
        torch.distributed.barrier()


def check_in_sync(params, world, rank, what):
    """Every rank's weights against rank 0's: a UserError when they differ, which is what
    gradients that were never averaged over the ranks look like at the end of a run."""
    if world == 1:
        return
    d = torch.zeros((), device=params[0].device)
    for p in params:
        ref = p.detach().clone()
        torch.distributed.broadcast(ref, 0)
        d = torch.maximum(d, (p.detach() - ref).abs().max())
    sum_over_ranks(d, world, "max")
    if d.item() > 1e-6:
        raise UserError(f"ranks diverged (max weight difference {d.item():.3g}): gradients were "
                        f"not synchronised; nothing was saved beyond the last checkpoint")
    say(rank, f"{what}: {world} ranks in sync (max weight difference {d.item():.1g})")


def chunks(n, size):
    """Slices of range(n) of at most size elements (size 0: one slice): the micro-batches."""
    size = size or max(n, 1)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ------------------------------------------------------------------------------ random streams
# Every draw of a run comes from a generator seeded by (seed, stream, step, ...): a function of
# the step counter, so that a resumed run draws what an uninterrupted one would. The streams:
STREAMS = {"prompts": 0,     # the prompts of a step (the same on every rank)
           "rollout": 1,     # the noise of the training rollouts (per task and rank)
           "nft": 2,         # DiffusionNFT's trained times and fresh noise (per update)
           "shuffle": 3,     # the order of an RL epoch's samples (per rank)
           "dmd": 4,         # DMD's sampler step of a round
           "eval": 7}        # the noise of evaluation image i


def rng(seed, stream, *key, step=None):
    """A CPU generator for one named stream (STREAMS) at an optimizer step, for a task, a rank,
    an image... (key: ints)."""
    h = 0
    for k in (seed, *([] if step is None else [step]), STREAMS[stream], *key):
        h = (h * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(h)


# ------------------------------------------------------------------------------ logging
def say(rank, *a):
    if rank == 0:
        print(*a, flush=True)


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def flatten(row, prefix=""):
    """A metrics row's numbers as {name: float}, nested dicts as name/key (val/color)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


class Trackers:
    """--log_to: the rows of metrics.jsonl also to TensorBoard (<run>/tensorboard) and / or
    Weights & Biases (project $WANDB_PROJECT or diffusion-opd; WANDB_MODE=offline writes under
    <run>/wandb), each imported only when asked for; rank 0 only."""

    def __init__(self, kinds, run_dir, config):
        self.tb = self.wandb = None
        if "tensorboard" in kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError(f"--log_to tensorboard needs the tensorboard package "
                                f"(pip install tensorboard): {e}") from None
            self.tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))
        if "wandb" in kinds:
            try:
                import wandb
            except ImportError:
                raise UserError("--log_to wandb needs the wandb package (pip install wandb)"
                                ) from None
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "diffusion-opd"),
                                    name=os.path.basename(run_dir), dir=run_dir, config=config,
                                    reinit=True)

    def log(self, row):
        values, step = flatten(row), row.get("step", 0)
        values.pop("step", None)
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(values, step=step)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


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
    return "\n".join(["config:"] + ["  " + ln for ln in lines + [line]])


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


GRAD_PASS = 2  # a pass with grad, in forward passes: forward + backward through the frozen base
#                (activation gradients only: a LoRA needs no gradient of the base's weights)


def cost(passes):
    """A run's compute in forward passes of the transformer (one row each: an image, or one
    half of CFG), every pass it ran (rollouts, teachers, old and reference models, fake scores),
    a pass with grad counting GRAD_PASS; the text encoders and the VAE are not counted."""
    return passes["nograd"] + GRAD_PASS * passes["grad"]


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


def average_gradients(params, world):
    """Each parameter's gradient averaged over the ranks, by one all-reduce."""
    if world == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in params])
    torch.distributed.all_reduce(flat)
    for p, g in zip(params, (flat / world).split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def guarded_step(opt, params, grad_clip, max_bad, bad, rank):
    """Clip and step, unless the gradient is not finite: then drop it and skip (warn), and abort
    after max_bad such steps in a row. The loop zeroes the gradients before its next backward
    passes. Returns (grad norm, bad steps in a row)."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        bad += 1
        say(rank, f"warning: non-finite loss or gradient, step skipped ({bad} in a row)")
        if bad >= max_bad:
            raise UserError(f"{bad} non-finite steps in a row: aborted; the last good "
                            f"checkpoint is kept")
        return float(norm), bad
    opt.step()
    return float(norm), 0


# ------------------------------------------------------------------------------ entry points
def main(run, parse, argv=None):
    """run(parse(argv)) with bad input as one line on stderr and exit code 2 (nothing saved is lost:
    every check runs before a stage writes); the process ends through leave()."""
    import signal
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends quietly
    code, t0 = 0, time.time()
    try:
        run(parse(argv))
        say(rank_world()[0], f"done in {time.time() - t0:.0f}s")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except Stopped as e:  # a graceful stop (SIGTERM, SIGUSR1): the checkpoint is written
        if rank_world()[0] == 0:
            print(e, file=sys.stderr, flush=True)
        code = 75
    except OSError as e:  # a path the user gave that cannot be read or written
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr, flush=True)
        code = 2
    leave(code)


def leave(code=0):
    """End the process with exit code `code`. A multi-rank process closes its process group and
    ends without interpreter shutdown: gloo's worker threads stay alive to the end, and one still
    releasing the last collective's tensors during finalisation aborts the process ('terminate
    called without an active exception') after a good run."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
