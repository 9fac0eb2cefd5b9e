"""LoRAs from every common layout (loras.py): peft's save_pretrained folders and diffusers'
older keys load with the same velocities as our own format; a LoRA that only half fits, a
folder of neither layout and an uncached hub id each stop with one line."""
import json
import os

import pytest
import torch

from conftest import SMALL, ok, one_line_error, randomise, run
from opd_support import loras, sd3, tiny
from opd_support.options import UserError

PROMPTS = ["a red cat", "a bright dog on the left"]


def velocity(m, adapter):
    x = m.noise(2, torch.Generator().manual_seed(0))
    m.active = "?"
    with torch.no_grad():
        return m.velocity(adapter, PROMPTS, 4.5)(x, torch.tensor(0.5))


def peft_folder(weights, config, folder):
    """A LoRA written by peft's own save_pretrained, as Flow-GRPO, DiffusionNFT and the
    official DiffusionOPD code write it: a fresh tiny transformer wrapped by get_peft_model,
    the weights set, save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import set_peft_model_state_dict
    pm = get_peft_model(tiny.build_offline("tiny").transformer, LoraConfig(
        r=config["r"], lora_alpha=config["lora_alpha"],
        target_modules=sorted({k.split(".lora_")[0] for k in weights})))
    result = set_peft_model_state_dict(pm, {f"base_model.model.{k}": v for k, v in weights.items()})
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    pm.save_pretrained(str(folder))
    assert sorted(os.listdir(folder)) == [loras.PEFT_CONFIG, loras.PEFT_WEIGHTS, "README.md"] or \
        {loras.PEFT_CONFIG, loras.PEFT_WEIGHTS} <= set(os.listdir(folder))
    return str(folder)


def test_peft_and_legacy_layouts_give_our_formats_velocities(tiny_sd3, tmp_path):
    m, cfg = tiny_sd3
    sd3.add_lora(m.tr, "x", cfg)
    randomise(m.tr, "x", 5)
    want = velocity(m, "x")
    weights = loras.adapter_state(m.tr, "x")
    ours = tmp_path / "ours"
    ours.mkdir()
    loras.save_lora(str(ours), m.tr, "x")
    sd3.drop_adapters(m)
    peft = peft_folder(weights, {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha},
                       tmp_path / "peft")
    legacy = tmp_path / "legacy"  # diffusers' older keys, alpha = rank (no metadata)
    legacy.mkdir()
    from safetensors.torch import save_file
    scale = cfg.lora_alpha / cfg.lora_rank  # folded into B, as alpha = rank reads it
    old_keys = {k: k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
                for k in weights}
    save_file({f"transformer.{old_keys[k]}": v * (scale if ".lora_B." in k else 1)
               for k, v in weights.items()}, str(legacy / loras.LORA_FILE))
    try:
        got = {}
        for name, folder in [("o", ours), ("p", peft), ("l", legacy)]:
            loras.load_lora(m.tr, str(folder), name)
            got[name] = velocity(m, name)
        base = velocity(m, None)
    finally:
        sd3.drop_adapters(m)
    assert (want - base).abs().max() > 1e-2  # the adapter matters
    for name, v in got.items():  # fp32 velocities up to ~35 through CFG 4.5: equal to 1e-4
        assert torch.allclose(v, want, atol=1e-4), name


def test_a_lora_that_half_fits_is_refused_and_a_partial_one_by_design_loads(tiny_sd3, tmp_path):
    m, cfg = tiny_sd3
    sd3.add_lora(m.tr, "x", cfg)
    randomise(m.tr, "x", 6)
    weights = loras.adapter_state(m.tr, "x")
    config = {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha}
    sd3.drop_adapters(m)
    half = dict(sorted(weights.items())[: len(weights) // 2])
    cut = peft_folder(weights, config, tmp_path / "cut")  # then half its weights removed
    from safetensors.torch import load_file, save_file
    file = os.path.join(cut, loras.PEFT_WEIGHTS)
    kept = dict(sorted(load_file(file).items())[: len(weights) // 2])
    save_file(kept, file)
    with pytest.raises(UserError, match=r"layers its targets name have no weights \(e\.g\."):
        loras.load_lora(m.tr, cut, "cut")
    assert "cut" not in (getattr(m.tr, "peft_config", None) or {})
    # a deliberate partial adapter: its own target list names exactly the layers it holds
    partial = peft_folder(half, config, tmp_path / "partial")
    try:
        loras.load_lora(m.tr, partial, "partial")
        assert "partial" in m.tr.peft_config
    finally:
        sd3.drop_adapters(m)
    r = run("--stage", "distill", "--teachers", f"color={cut}", *SMALL, "--optim_steps", "1",
            "--out", str(tmp_path / "o"))
    one_line_error(r, "does not fit this model")


def test_neither_layout_and_an_uncached_hub_id_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = run("--stage", "distill", "--teachers", f"color={empty}", *SMALL, "--out",
            str(tmp_path / "o"), env=env)
    one_line_error(r, "neither pytorch_lora_weights.safetensors (diffusers), or "
                      "adapter_config.json + adapter_model.safetensors (peft)")
    r = run("--stage", "distill", "--teachers", "color=someone/released-loras/teacher", *SMALL,
            "--out", str(tmp_path / "o"), env=env)
    one_line_error(r, "huggingface-cli download someone/released-loras --include 'teacher/*'")
    assert not os.path.exists(tmp_path / "o")


def test_a_hub_id_resolves_to_its_subfolder(monkeypatch, tmp_path):
    """ORG/REPO/SUB: snapshot_download of ORG/REPO limited to SUB/*, then SUB in it."""
    root = tmp_path / "snapshot"
    (root / "Teacher" / "lora").mkdir(parents=True)
    (root / "Teacher" / "lora" / loras.PEFT_CONFIG).write_text(json.dumps({}))
    (root / "Teacher" / "lora" / loras.PEFT_WEIGHTS).write_bytes(b"")
    asked = []

    def snapshot_download(repo, allow_patterns=None):
        asked.append((repo, allow_patterns))
        return str(root)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    folder = loras.local_folder("org/DiffusionOPD/Teacher/lora")
    assert folder == str(root / "Teacher" / "lora")
    assert asked == [("org/DiffusionOPD", ["Teacher/lora/*"])]


@pytest.mark.slow
def test_a_peft_teacher_distils_and_a_peft_lora_evaluates(tmp_path, teacher_dir):
    """The command line with a peft folder as --teachers and as --lora."""
    weights, config = loras.read_lora(teacher_dir)  # our format's, as the file says
    peft = peft_folder(weights, config, tmp_path / "peft")
    out = str(tmp_path / "o")
    ok(run("--stage", "distill", "--teachers", f"color={peft}", *SMALL, "--optim_steps", "1",
           "--out", out))
    r = ok(run("--stage", "eval", "--tasks", "color", "--eval_sampler_steps", "3",
               "--eval_prompts", "1", "--eval_seeds", "1", "--lora", f"released={peft}",
               "--out", out))
    assert "| released |" in r.stdout
