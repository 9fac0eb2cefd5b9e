"""
The files of a run folder, written so that a crash, a kill or a full disk never leaves a half
file where a whole one was: everything is written to a temporary name, fsync'd, then renamed.

    <out>/<stage>/ckpt-<step>/   adapter.safetensors (adapter1, ... for more trained adapters),
                                 state.pt (optimizers, EMAs, random states, config),
                                 manifest.json (each file's bytes and sha256)
    <out>/<stage>/pytorch_lora_weights.safetensors   the finished stage's LoRA (loras.py)

The two latest checkpoints are kept. --resume verifies the latest against its manifest and
falls back to the one before when it is corrupt, saying so in one line. Weights are read from
safetensors only, the rest with torch.load(weights_only=True).
"""
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil

import torch

from opd_support.options import UserError

MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------ safe writes
def fsync_path(path):
    """Flush a file's or a folder's entry to the disk (a rename is durable once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def disk_errors(where, need_bytes=0):
    """A write error (a full disk, a quota) inside the block as one UserError naming the folder
    and the space needed."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            raise
        free = shutil.disk_usage(where).free if os.path.isdir(where) else 0
        need = f"about {need_bytes / 2**20:.0f} MB needed, " if need_bytes else ""
        raise UserError(f"cannot write to {where}: {e.strerror} ({need}{free / 2**20:.0f} MB "
                        f"free); what was saved before is intact") from None


def write_text(path, text):
    """Write to a temporary file, fsync, rename: a reader sees the old file or the new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with disk_errors(os.path.dirname(path) or "."):
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def publish(tmp, final):
    """Make a folder written under a temporary name visible under its final one, durably: its
    files and itself fsync'd, renamed, its parent fsync'd."""
    for f in os.listdir(tmp):
        fsync_path(os.path.join(tmp, f))
    fsync_path(tmp)
    os.rename(tmp, final)
    fsync_path(os.path.dirname(final) or ".")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------ checkpoints
def checkpoints(run_dir):
    """The run's complete checkpoint folders, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(d for d in os.listdir(run_dir) if d.startswith("ckpt-") and
                  os.path.isfile(os.path.join(run_dir, d, "state.pt")))


def tensor_bytes(obj):
    """Bytes of every tensor in a nested structure (what a checkpoint of it needs on disk)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(run_dir, step, adapters, state, keep=2):
    """adapters: [{key: tensor}] of the trained adapters; state: the rest (optimizers, EMAs, ...).
    Written to a temporary folder with a manifest of sha256 sums, fsync'd, then renamed: a
    checkpoint exists only once complete. A full disk: one line, the folder removed, the
    earlier checkpoints untouched."""
    from safetensors.torch import save_file
    final = os.path.join(run_dir, f"ckpt-{step:07d}")
    if os.path.isdir(final):
        return
    tmp = os.path.join(run_dir, f".tmp-ckpt-{step:07d}-{os.getpid()}")
    need = tensor_bytes(adapters) + tensor_bytes(state)
    try:
        with disk_errors(run_dir, need):
            if shutil.disk_usage(run_dir).free < need:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.makedirs(tmp, exist_ok=True)
            files = [f"adapter{i or ''}.safetensors" for i in range(len(adapters))]
            for f, weights in zip(files, adapters):
                save_file(weights, os.path.join(tmp, f))
            torch.save(state, os.path.join(tmp, "state.pt"))
            manifest = {f: {"bytes": os.path.getsize(os.path.join(tmp, f)),
                            "sha256": sha256(os.path.join(tmp, f))} for f in files + ["state.pt"]}
            with open(os.path.join(tmp, MANIFEST), "w") as fh:
                json.dump(manifest, fh, indent=1)
            publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)


def verify(ckpt_dir):
    """None when the checkpoint's files match its manifest (sizes and sha256), else the reason.
    A checkpoint without a manifest (an older version's) is checked by reading it."""
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        try:
            torch.load(os.path.join(ckpt_dir, "state.pt"), weights_only=True)
            return None
        except Exception as e:
            return f"state.pt does not load ({type(e).__name__})"
    try:
        manifest = json.load(open(path))
    except ValueError:
        return f"{MANIFEST} is not JSON"
    for f, want in manifest.items():
        p = os.path.join(ckpt_dir, f)
        if not os.path.isfile(p):
            return f"{f} is missing"
        if os.path.getsize(p) != want["bytes"]:
            return f"{f} has {os.path.getsize(p)} bytes, not {want['bytes']}"
        if sha256(p) != want["sha256"]:
            return f"{f} does not match its sha256"
    return None


def latest_good(run_dir, say=None):
    """The newest checkpoint that verifies; every newer corrupt one is named in one line through
    say(text) (None: quiet). A UserError when none verifies."""
    found = checkpoints(run_dir)
    for i, name in enumerate(reversed(found)):
        why = verify(os.path.join(run_dir, name))
        if why is None:
            return name
        older = found[-2 - i] if i + 1 < len(found) else None
        if say and older:
            say(f"warning: checkpoint {run_dir}/{name} is corrupt ({why}): resuming from "
                f"{older} instead")
    raise UserError(f"--resume: no checkpoint in {run_dir} is intact (the latest, {found[-1]}: "
                    f"{verify(os.path.join(run_dir, found[-1]))}); --overwrite starts again")


def check_resume(run_dir, cfg, say=None):
    """The state of the latest intact checkpoint, if it was made for this model and LoRA shape;
    returns (its folder, its state)."""
    ck = os.path.join(run_dir, latest_good(run_dir, say))
    state = torch.load(os.path.join(ck, "state.pt"), weights_only=True)
    for k in ("model", "lora_rank", "lora_alpha", "lora_targets"):
        if state["config"][k] != getattr(cfg, k):
            raise UserError(f"--resume: {run_dir} was trained with --{k} {state['config'][k]}, "
                            f"not {getattr(cfg, k)}")
    return ck, state


def checkpoint_state(cfg, step, opts, emas, aux, counters):
    """What state.pt holds besides the adapters' weights; counters: {name: number} to restore
    (training seconds, transformer passes)."""
    return {"step": step, "optimizers": [o.state_dict() for o in opts],
            "config": dataclasses.asdict(cfg), "emas": [[e.cpu() for e in m.shadow] for m in emas],
            "aux": [a.detach().cpu() for a in aux], "counters": counters,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore(ck, state, tr, names, opts, emas, aux):
    """Load a checkpoint (check_resume's folder and state) into the adapters `names` of the
    transformer, their optimizers, the EMAs and the aux tensors; the random states too.
    Returns the counters."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
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
    return {"elapsed": 0.0, "passes": {"grad": 0, "nograd": 0}, **state.get("counters", {})}
