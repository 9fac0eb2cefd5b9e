"""
The files of a run folder, written so that a crash, a kill or a full disk never leaves a half
file where a whole one was: everything is written to a temporary name, fsync'd, then renamed.

    <out>/<stage>/ckpt-<step>/   adapter.safetensors (adapter1, ... for more trained adapters),
                                 state.pt (optimizers, EMAs, random states, config),
                                 manifest.json (each file's bytes and sha256)
    <out>/<stage>/pytorch_lora_weights.safetensors   the finished stage's LoRA (loras.py)

The two latest checkpoints are kept. --resume verifies the latest against its manifest and its
contents and falls back to the one before when it is corrupt, saying so in one line; it refuses a
command whose options contradict the saved run's (RESUMABLE lists those that may change).

Every file the program reads from a user, a download or an earlier run goes through one checked
reader of its kind: read_weights (safetensors: LoRAs, checkpoints, the cached tiny model),
read_json (adapter_config.json, manifests, run.json / config.json), read_state (state.pt, with
torch.load(weights_only=True)); prompt files through prompts.read. A file cut short, random bytes,
an empty file, a file of another kind, non-float or non-finite weights: one line naming the file.
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


# ------------------------------------------------------------------------------ checked reads
def first_line(e):
    """An exception as a one-line reason: the line of its message that says a size mismatches
    (torch's load_state_dict), else its first line; its class when it has no message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return next((ln for ln in lines if "mismatch" in ln), lines[0])[:160] if lines else \
        type(e).__name__


def check_values(path, named_tensors):
    """Every floating-point tensor finite: one UserError naming the file and the tensor."""
    for k, v in named_tensors:
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(f"{path}: tensor {k} holds NaN or Inf values")


def read_weights(path):
    """A safetensors file's tensors and metadata, checked whole: one UserError naming the file
    when it cannot be read, is not a complete safetensors file (cut short, random bytes, empty,
    another format), holds no tensor, or a tensor that is not floating point or not finite.
    Returns ({name: tensor}, {metadata})."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            meta, weights = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error (a Rust one), an OSError, ...
        why = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise UserError(f"{path} is not a readable safetensors file ({why})") from None
    if not weights:
        raise UserError(f"{path} holds no tensors")
    for k, v in weights.items():
        if not v.is_floating_point():
            raise UserError(f"{path}: tensor {k} is {str(v.dtype).removeprefix('torch.')}, not "
                            f"floating point")
    check_values(path, weights.items())
    return weights, meta


def read_json(path):
    """A file's JSON object; one UserError naming the file when it cannot be read, is not JSON
    (cut short, random bytes, empty) or holds JSON that is not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path} is not JSON ({first_line(e)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


STATE_KEYS = {"step": int, "optimizers": list, "config": dict, "emas": list, "aux": list,
              "torch_rng": torch.Tensor}


def read_state(path):
    """A checkpoint's state.pt (torch.load, weights_only): one UserError naming the file when
    it does not load, is not a checkpoint's state (STATE_KEYS) or holds non-finite values."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # pickle's, zipfile's, torch's errors
        raise UserError(f"{path} does not load ({first_line(e)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a checkpoint's state")
    wrong = [k for k, kind in STATE_KEYS.items() if not isinstance(state.get(k), kind)]
    if wrong:
        raise UserError(f"{path} is not a checkpoint's state (no {wrong[0]} of the right kind)")
    check_values(path, tensors(state))
    return state


# ------------------------------------------------------------------------------ checkpoints
def checkpoints(run_dir):
    """The run's complete checkpoint folders, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(d for d in os.listdir(run_dir) if d.startswith("ckpt-") and
                  os.path.isfile(os.path.join(run_dir, d, "state.pt")))


def tensors(obj, name=""):
    """(name, tensor) of every tensor in a nested structure of dicts, lists and tuples."""
    if torch.is_tensor(obj):
        yield name, obj
    elif isinstance(obj, (dict, list, tuple)):
        for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            yield from tensors(v, f"{name}.{k}" if name else str(k))


def tensor_bytes(obj):
    """Bytes of every tensor in a nested structure (what a checkpoint of it needs on disk)."""
    return sum(t.numel() * t.element_size() for _, t in tensors(obj))


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
    """None when the checkpoint is whole, else the reason: its files match its manifest (sizes
    and sha256; without a manifest, an older version's checkpoint, this part is skipped) and
    read back as a checkpoint's (read_state, read_weights)."""
    path = os.path.join(ckpt_dir, MANIFEST)
    try:
        if os.path.isfile(path):
            manifest = read_json(path)
            for f in ("state.pt", "adapter.safetensors"):
                if f not in manifest:
                    return f"{MANIFEST} does not list {f}"
            for f, want in manifest.items():
                p = os.path.join(ckpt_dir, f)
                if not (isinstance(want, dict) and type(want.get("bytes")) is int
                        and isinstance(want.get("sha256"), str)) or os.sep in f:
                    return f"{MANIFEST} is not a manifest (its entry {f!r})"
                if not os.path.isfile(p):
                    return f"{f} is missing"
                if os.path.getsize(p) != want["bytes"]:
                    return f"{f} has {os.path.getsize(p)} bytes, not {want['bytes']}"
                if sha256(p) != want["sha256"]:
                    return f"{f} does not match its sha256"
        read_state(os.path.join(ckpt_dir, "state.pt"))
        for f in sorted(os.listdir(ckpt_dir)):
            if f.startswith("adapter") and f.endswith(".safetensors"):
                read_weights(os.path.join(ckpt_dir, f))
    except UserError as e:
        return str(e)
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
    """The latest intact checkpoint's folder and state, once its run is known to be the one cfg
    asks to continue (same_run)."""
    ck = os.path.join(run_dir, latest_good(run_dir, say))
    state = read_state(os.path.join(ck, "state.pt"))
    same_run(state["config"], cfg, run_dir)
    return ck, state


def same_run(saved, cfg, run_dir):
    """A run's saved config (a checkpoint's, or a finished run's config.json) against the
    command's: every option outside cfg.resumable (config.RESUMABLE and a subclass's; a
    teacher's: outside cfg.teacher_resumable too) must be equal, else one UserError listing
    each difference."""
    teacher = os.path.basename(run_dir).startswith("teacher-")
    free = cfg.resumable | (cfg.teacher_resumable if teacher else set())
    differ = [f"--{f.name} {saved[f.name]} (now {getattr(cfg, f.name)})"
              for f in dataclasses.fields(cfg)
              if f.name not in free and f.name in saved and saved[f.name] != getattr(cfg, f.name)]
    if differ:
        raise UserError(f"--resume: {run_dir} was trained with {', '.join(differ)}: give the "
                        f"same values to continue it, or --overwrite to start again (what may "
                        f"change on resume: --help)")


def checkpoint_state(cfg, step, opts, emas, aux, counters, epoch_start=()):
    """What state.pt holds besides the adapters' weights; counters: {name: number} to restore
    (training seconds, transformer passes); epoch_start: a stop inside an RL epoch, the trained
    adapter's weights when the epoch began (its samples are drawn again from them on resume)."""
    return {"step": step, "optimizers": [o.state_dict() for o in opts],
            "config": dataclasses.asdict(cfg), "emas": [[e.cpu() for e in m.shadow] for m in emas],
            "aux": [a.detach().cpu() for a in aux], "counters": counters,
            "epoch_start": [w.detach().cpu() for w in epoch_start],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def same_shapes(mine, saved):
    """ValueError unless the saved tensors are as many as the run's and of the same shapes."""
    if len(mine) != len(saved):
        raise ValueError(f"{len(saved)} tensors where the run has {len(mine)}")
    for m, s in zip(mine, saved):
        if tuple(m.shape) != tuple(s.shape):
            raise ValueError(f"a tensor of shape {tuple(s.shape)} where the run has "
                             f"{tuple(m.shape)}")


def restore(ck, state, tr, names, opts, emas, aux):
    """Load a checkpoint (check_resume's folder and state) into the adapters `names` of the
    transformer, their optimizers, the EMAs and the aux tensors; the random states too. One
    UserError when its weights or optimizer state do not fit (another model, another LoRA).
    Returns the counters."""
    from peft.utils import set_peft_model_state_dict
    try:
        for i, (name, opt) in enumerate(zip(names, opts)):
            weights, _ = read_weights(os.path.join(ck, f"adapter{i or ''}.safetensors"))
            result = set_peft_model_state_dict(tr, weights, adapter_name=name)
            unexpected = [k for k in result.unexpected_keys if "lora_" in k]
            missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
            if unexpected or missing:
                raise ValueError(f"weights of no layer of the adapter, e.g. {unexpected[0]}"
                                 if unexpected else f"no weights for {missing[0]}")
            opt.load_state_dict(state["optimizers"][i])
            moments = [(p, v) for g in opt.param_groups for p in g["params"]
                       for v in opt.state.get(p, {}).values() if torch.is_tensor(v) and v.dim()]
            same_shapes(*zip(*moments) if moments else ([], []))  # AdamW's moments
        for mine, saved in [*zip([e.shadow for e in emas], state["emas"]), (aux, state["aux"])]:
            same_shapes(mine, saved)
            for m, s in zip(mine, saved):
                m.data.copy_(s)
        if state.get("epoch_start"):  # the trained adapter's weights (runs.py keeps them)
            same_shapes(emas[0].shadow, state["epoch_start"])
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UserError(f"checkpoint {ck} does not fit this run ({first_line(e)})") from None
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return {"elapsed": 0.0, "passes": {"grad": 0, "nograd": 0}, **state.get("counters", {})}
