"""
The run folders of opd.py: <out>/<stage>/ckpt-<step>/{adapter.safetensors, state.pt} written to
a temporary folder and renamed (a checkpoint exists only once complete; the two latest are
kept), --resume from the latest complete one, and the final LoRA
<out>/<stage>/pytorch_lora_weights.safetensors, whose existence marks a finished stage.
Weights are read from safetensors only, the rest with torch.load(weights_only=True).
"""
import dataclasses
import os
import shutil

import torch

from options import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"


def adapter_state(tr, name):
    from peft.utils import get_peft_model_state_dict
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(tr, adapter_name=name).items()}


def write_text(path, text):
    """Write to a temporary file, then rename: a reader sees the old file or the new one."""
    with open(f"{path}.tmp-{os.getpid()}", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp-{os.getpid()}", path)


def checkpoints(run_dir):
    if not os.path.isdir(run_dir):
        return []
    return sorted(d for d in os.listdir(run_dir) if d.startswith("ckpt-") and
                  os.path.isfile(os.path.join(run_dir, d, "state.pt")))


def save_checkpoint(run_dir, step, tr, name, opt, ema, cfg, aux=(), elapsed=0.0, keep=2):
    """aux: more tensors to restore exactly (NFT's old adapter); elapsed: training seconds."""
    from safetensors.torch import save_file
    final = os.path.join(run_dir, f"ckpt-{step:07d}")
    if os.path.isdir(final):
        return
    tmp = os.path.join(run_dir, f".tmp-ckpt-{step:07d}-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    save_file(adapter_state(tr, name), os.path.join(tmp, "adapter.safetensors"))
    torch.save({"step": step, "optimizer": opt.state_dict(), "config": dataclasses.asdict(cfg),
                "ema": [e.cpu() for e in ema.shadow], "aux": [a.detach().cpu() for a in aux], "elapsed": elapsed,
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


def load_checkpoint(run_dir, tr, name, opt, ema, cfg, aux=()):
    """Restore the latest complete checkpoint; returns (the step to continue from, seconds)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    state = check_resume(run_dir, cfg)
    ck = os.path.join(run_dir, checkpoints(run_dir)[-1])
    set_peft_model_state_dict(tr, load_file(os.path.join(ck, "adapter.safetensors")), adapter_name=name)
    opt.load_state_dict(state["optimizer"])
    for e, saved in zip([*ema.shadow, *aux], state["ema"] + state["aux"]):
        e.data.copy_(saved)
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["elapsed"]


def prepare_run(run_dir, cfg, rank, world, what):
    """Decide what to do with a stage's folder: 'done' (reuse), 'resume', or 'fresh'."""
    done = os.path.isfile(os.path.join(run_dir, LORA_FILE))
    if done and not cfg.overwrite:
        if rank == 0:
            print(f"{what}: {run_dir}/{LORA_FILE} exists, reused (--overwrite to redo)", flush=True)
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
