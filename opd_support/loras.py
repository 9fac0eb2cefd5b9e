"""
LoRA files. A finished stage saves its adapter in diffusers' format (what
`StableDiffusion3Pipeline.load_lora_weights(dir)` loads); --teachers, --lora and the eval stage
read a LoRA in either common layout, from a folder or the hub:

  diffusers  <dir>/pytorch_lora_weights.safetensors, keys transformer.<module>.lora_A.weight
             (diffusers' older .lora.down / .lora.up keys are converted by diffusers' own
             converter), rank, alpha and targets in its lora_adapter_metadata (without it:
             the ranks of the weights and alpha = rank, as diffusers reads it)
  peft       <dir>/adapter_config.json + adapter_model.safetensors (peft's save_pretrained,
             what Flow-GRPO, DiffusionNFT and the official DiffusionOPD code write), keys
             base_model.model.<module>.lora_A.weight, rank, alpha and targets in the config
  hub        ORG/REPO or ORG/REPO/SUBFOLDER when no such local folder exists: fetched (or read
             from the cache) with huggingface_hub, as from_pretrained does

A LoRA that only half fits is refused before any training: every module the file's own
targets name on this model must have its weights, and every weight must name such a module.
"""
import collections
import json
import os
import re
import shutil
import warnings

from opd_support.checkpoints import (disk_errors, first_line, fsync_path, read_json,
                                     read_weights)
from opd_support.options import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' format (what a stage saves)
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's


def adapter_state(tr, name):
    """An adapter's weights, fp32 on the CPU, keyed as peft keys them (no adapter name)."""
    from peft.utils import get_peft_model_state_dict
    state = get_peft_model_state_dict(tr, adapter_name=name)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_lora(run_dir, tr, name):
    """The adapter as diffusers-format safetensors, alpha and targets in its metadata; written
    to a temporary folder, fsync'd, then renamed in place."""
    from diffusers import StableDiffusion3Pipeline
    tmp = os.path.join(run_dir, f".tmp-lora-{os.getpid()}")
    meta = tr.peft_config[name].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    state = adapter_state(tr, name)
    try:
        with disk_errors(run_dir, sum(v.numel() * 4 for v in state.values())):
            StableDiffusion3Pipeline.save_lora_weights(tmp, transformer_lora_layers=state,
                                                       transformer_lora_adapter_metadata=meta)
            fsync_path(os.path.join(tmp, LORA_FILE))
            os.replace(os.path.join(tmp, LORA_FILE), os.path.join(run_dir, LORA_FILE))
            fsync_path(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ reading
def layout(folder):
    """'diffusers', 'peft' or None: the LoRA layout a local folder holds."""
    if os.path.isfile(os.path.join(folder, LORA_FILE)):
        return "diffusers"
    if all(os.path.isfile(os.path.join(folder, f)) for f in (PEFT_CONFIG, PEFT_WEIGHTS)):
        return "peft"
    return None


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*")


def local_folder(source):
    """A LoRA source (a folder, or a hub id ORG/REPO[/SUBFOLDER] when no such folder exists) as
    a local folder holding one of the two layouts; one line when neither can be had."""
    both = f"{LORA_FILE} (diffusers), or {PEFT_CONFIG} + {PEFT_WEIGHTS} (peft)"
    if os.path.isdir(source):
        if layout(source) is None:
            raise UserError(f"{source} holds no LoRA: neither {both}")
        return source
    if not HUB_ID.fullmatch(source):
        raise UserError(f"no LoRA folder {source} (it should hold {both})")
    parts = source.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download
        root = snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as e:  # offline and not cached, no such repo, gated, ...
        get = f"huggingface-cli download {repo}" + (f" --include '{sub}/*'" if sub else "")
        raise UserError(f"no local folder {source}, and the hub id {repo} could not be read "
                        f"({type(e).__name__}): download it once with network access (`{get}`)"
                        ) from None
    folder = os.path.join(root, sub)
    if not os.path.isdir(folder) or layout(folder) is None:
        raise UserError(f"the hub repo {repo} has no LoRA in {sub or 'its root'}: neither {both}")
    return folder


def read_lora(folder):
    """A LoRA folder's weights, keyed as peft keys a model's adapter without its name
    (transformer_blocks.0.attn.to_q.lora_A.weight), and its LoraConfig's fields; every file
    checked as it is read (checkpoints.read_weights, read_json, lora_config): one line naming
    the file when it is cut short, not of its kind, or holds non-float or non-finite weights."""
    if layout(folder) == "peft":
        path = os.path.join(folder, PEFT_CONFIG)
        config = lora_config(read_json(path), path)
        weights, _ = read_weights(os.path.join(folder, PEFT_WEIGHTS))
        return {k.removeprefix("base_model.model."): v for k, v in weights.items()}, config
    path = os.path.join(folder, LORA_FILE)
    weights, meta = read_weights(path)
    other = sorted(k for k in weights if not k.startswith("transformer."))
    if other:
        raise UserError(f"the LoRA at {path} holds weights of other modules than the "
                        f"transformer (e.g. {other[0]}): not an SD3 transformer LoRA")
    weights = {k.removeprefix("transformer."): v for k, v in weights.items()}
    if not any(".lora_A." in k for k in weights):  # diffusers' older keys: its own converter
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
        weights = convert_unet_state_dict_to_peft(weights)
    if "lora_adapter_metadata" in meta:
        try:
            config = json.loads(meta["lora_adapter_metadata"])
        except ValueError:
            config = None
        if not isinstance(config, dict):
            raise UserError(f"{path}: its lora_adapter_metadata is not a JSON object")
        config = lora_config({k.removeprefix("transformer."): v for k, v in config.items()},
                             f"{path}'s lora_adapter_metadata")
    else:  # as diffusers reads it: each module's rank from its weights, alpha = rank
        from diffusers.utils.peft_utils import get_peft_kwargs
        ranks = {k: v.shape[1] for k, v in weights.items() if ".lora_B." in k and v.dim() == 2}
        if not ranks:
            raise UserError(f"{path} holds no LoRA weights (no lora_B or lora.up matrix)")
        config = get_peft_kwargs(ranks, None, weights)
    return weights, config


def lora_config(fields, where):
    """A LoRA's config as read (adapter_config.json, or our file's metadata), checked: a LoRA
    (peft_type LORA where it says), a rank r >= 1, a finite alpha > 0, target modules named,
    accepted by peft's LoraConfig. One UserError naming the file otherwise."""
    from peft import LoraConfig
    r, alpha, targets = (fields.get(k) for k in ("r", "lora_alpha", "target_modules"))
    why = ("it is a {} config, not a LoRA's".format(fields["peft_type"])
           if fields.get("peft_type", "LORA") != "LORA" else
           f"its rank r is {r!r}, not an integer >= 1" if type(r) is not int or r < 1 else
           f"its lora_alpha is {alpha!r}, not a number > 0"
           if type(alpha) not in (int, float) or not 0 < alpha < float("inf") else
           f"its target_modules is {targets!r}, not module names"
           if not (isinstance(targets, str) and targets or isinstance(targets, list) and targets
                   and all(isinstance(t, str) for t in targets)) else None)
    if why is None:
        try:
            LoraConfig(**{k: v for k, v in fields.items() if k in LoraConfig.__dataclass_fields__})
        except (TypeError, ValueError) as e:
            why = f"peft refuses it: {first_line(e)}"
    if why:
        raise UserError(f"{where} is not a usable LoRA config: {why}")
    return fields


def check_lora(source):
    """Read and check a LoRA source's files as load_lora will (its layout, weights, config, and
    run.json / config.json), before any model loads; returns its local folder."""
    folder = local_folder(source)
    read_lora(folder)
    run_info(folder, "guidance", None)
    return folder


def check_fit(tr, weights, config, where):
    """Refuse a LoRA that fits only part of the model, in one line: a module its targets name
    on this model without weights (peft would leave it at B = 0, the base model), or a weight
    that names no such module."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    cfg = LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__})
    targeted = {n for n, _ in tr.named_modules() if n and check_target_module_exists(cfg, n)}
    expected = {f"{n}.lora_{ab}.weight" for n in targeted for ab in "AB"}
    got = {k for k in weights if ".lora_A." in k or ".lora_B." in k}
    missing, unexpected = sorted(expected - got), sorted(set(weights) - expected)
    if missing or unexpected or not got:
        layers = collections.Counter(k.split(".lora_")[0] for k in missing)
        raise UserError(
            f"the LoRA at {where} does not fit this model: "
            + (f"{len(layers)} of the {len(targeted)} layers its targets name have no weights "
               f"(e.g. {missing[0]})" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"{len(unexpected)} of its {len(weights)} weights name no targeted layer "
               f"(e.g. {unexpected[0]})" if unexpected else "")
            + ("it holds no LoRA weights" if not got and not unexpected else ""))


def load_lora(tr, source, name, producer=None):
    """Load a LoRA (a folder in either layout, or a hub id) as adapter `name` of the
    transformer, after check_fit; one line for a missing folder (with the command that makes
    it, producer), a half fit, or weights of another model's shapes. Returns the folder."""
    if producer and not os.path.isdir(source):
        raise UserError(f"no LoRA at {os.path.join(source, LORA_FILE)}: make it with "
                        f"`{producer}`")
    folder = local_folder(source)
    weights, config = read_lora(folder)
    check_fit(tr, weights, config, folder)
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    fields.pop("peft_type", None)
    tr.add_adapter(LoraConfig(**fields), adapter_name=name)
    try:
        set_peft_model_state_dict(tr, weights, adapter_name=name)
    except RuntimeError as e:  # size mismatches: a LoRA of another model
        why = first_line(e)
        with warnings.catch_warnings():  # peft says which adapter is active now: not news
            warnings.simplefilter("ignore")
            tr.delete_adapters([name])
        raise UserError(f"the LoRA at {folder} does not fit this model ({why})") from None
    for mod in tr.modules():  # as sd3.add_lora: no fp32 copy of each input
        if hasattr(mod, "cast_input_dtype_enabled"):
            mod.cast_input_dtype_enabled = False
    return folder


def run_info(d, key, default):
    """A number from a LoRA folder's run.json or config.json (default when neither has it); one
    line naming the file when it is not a JSON object or its value is not a finite number."""
    for f in (os.path.join(d, n) for n in ("run.json", "config.json")):
        v = read_json(f).get(key) if os.path.isfile(f) else None
        if v is not None:
            if type(v) not in (int, float) or not abs(v) < float("inf"):
                raise UserError(f"{f}: its {key} is {v!r}, not a finite number")
            return v
    return default
