"""Every file the program reads from a user, a download or an earlier run, fuzzed: LoRAs in each
layout (ours, peft's adapter_config.json + adapter_model.safetensors, diffusers' older keys),
checkpoints (their files and manifest), prompt files and GenEval metadata, the cached tiny model.
Each is cut short at several points, replaced by random bytes, emptied, swapped for a valid file
of another kind, given wrong shapes or dtypes, NaN or Inf weights: one line naming the file and
what is wrong (a UserError in-process; exit code 2 through the command line, before any
training, nothing in --out changed); a cached tiny model is built again instead."""
import json
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SMALL, one_line_error, randomise, run, tree
from opd_support import checkpoints as ck
from opd_support import loras, prompts, sd3, tiny
from opd_support.options import UserError


def damaged(data):
    """(case, bytes): a file's bytes cut short at several points, random bytes, empty."""
    n = len(data)
    for k in sorted({1, 8, 100, n // 3, n // 2, n - 1} - {0, n}):
        yield f"cut to {k} of {n} bytes", data[:k]
    yield "random bytes", random.Random(n).randbytes(max(n, 500))
    yield "empty", b""


def refused(fn, path, case, needle=""):
    """fn() raises one UserError of one line that names the file (and says needle)."""
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and needle in msg, (case, msg)
    return msg


def rewrite(path, change):
    """A safetensors file with its tensors changed by change({name: tensor}) -> {name: tensor};
    its metadata kept."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(change(load_file(str(path))), str(path), metadata=meta)


def first(weights, fn):
    """The weights with fn applied to the first lora_A matrix."""
    k = sorted(x for x in weights if "lora_A" in x or "lora.down" in x)[0]
    return {**weights, k: fn(weights[k])}


WEIGHT_CASES = {  # name -> a change of a LoRA's tensors
    "NaN": lambda w: first(w, lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
    "Inf": lambda w: first(w, lambda t: t.index_fill(0, torch.tensor([0]), float("inf"))),
    "int32 weights": lambda w: first(w, lambda t: (t * 100).to(torch.int32)),
    "a wrong shape": lambda w: first(w, lambda t: torch.zeros(t.shape[0], t.shape[1] + 3)),
    "a 1-D weight": lambda w: first(w, lambda t: t.flatten()),
}


@pytest.fixture(scope="module")
def lora_layouts(tiny_sd3, tmp_path_factory):
    """One random adapter in each layout: ours, peft's folder, diffusers' older keys."""
    from test_loras import peft_folder
    m, cfg = tiny_sd3
    root = tmp_path_factory.mktemp("layouts")
    sd3.add_lora(m.tr, "x", cfg)
    randomise(m.tr, "x", 3)
    weights = loras.adapter_state(m.tr, "x")
    (root / "ours").mkdir()
    loras.save_lora(str(root / "ours"), m.tr, "x")
    sd3.drop_adapters(m)
    peft_folder(weights, {"r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha}, root / "peft")
    (root / "legacy").mkdir()
    save_file({"transformer." + k.replace(".lora_A.", ".lora.down.").replace(".lora_B.",
                                                                            ".lora.up."): v
               for k, v in weights.items()}, str(root / "legacy" / loras.LORA_FILE))
    return {n: str(root / n) for n in ("ours", "peft", "legacy")}


def test_the_good_layouts_load(tiny_sd3, lora_layouts):
    """The fixture's three folders load: the fuzzed copies below differ from them by one fault."""
    m, _ = tiny_sd3
    try:
        for name, folder in lora_layouts.items():
            loras.load_lora(m.tr, folder, name)
    finally:
        sd3.drop_adapters(m)


@pytest.mark.parametrize("layout,file", [("ours", loras.LORA_FILE),
                                         ("peft", loras.PEFT_WEIGHTS),
                                         ("legacy", loras.LORA_FILE)])
def test_a_damaged_lora_weights_file_is_one_line(layout, file, tiny_sd3, lora_layouts, tmp_path):
    """Each layout's weights file, cut short, random, empty, with NaN, Inf or integer weights
    (one line naming the file), misshapen weights, or swapped for a safetensors file of another
    kind: the tiny model's own weights, the other layout's file (one line naming the folder), and
    no adapter left behind."""
    m, _ = tiny_sd3
    good = os.path.join(lora_layouts[layout], file)
    other = (os.path.join(lora_layouts["ours"], loras.LORA_FILE) if layout == "peft" else
             os.path.join(lora_layouts["peft"], loras.PEFT_WEIGHTS))
    cache = os.environ.get("OPD_CACHE") or os.path.expanduser("~/.cache/diffusion-opd")
    model = os.path.join(cache, tiny.RECIPES["tiny"] + ".safetensors")
    folder = tmp_path / "lora"
    names_the_file = [*damaged(open(good, "rb").read()),
                      *((n, WEIGHT_CASES[n]) for n in ("NaN", "Inf", "int32 weights"))]
    names_the_folder = [(n, WEIGHT_CASES[n]) for n in ("a wrong shape", "a 1-D weight")]
    names_the_folder += [("the tiny model's weights", model), ("the other layout's file", other)]
    for case, what in names_the_file + names_the_folder:
        shutil.copytree(lora_layouts[layout], folder, dirs_exist_ok=True)
        path = folder / file
        if isinstance(what, bytes):
            path.write_bytes(what)
        elif callable(what):
            rewrite(path, what)
        else:
            shutil.copy(what, path)
        where = path if (case, what) in names_the_file else folder
        refused(lambda: loras.load_lora(m.tr, str(folder), "fuzz"), where, case)
        assert "fuzz" not in (getattr(m.tr, "peft_config", None) or {}), case


def test_a_damaged_adapter_config_is_one_line(lora_layouts, tmp_path):
    """peft's adapter_config.json cut short, random, empty, JSON of another kind (a list, a
    model's config.json, another peft method's config) or with a bad rank, alpha or target list:
    one line naming the file."""
    good = os.path.join(lora_layouts["peft"], loras.PEFT_CONFIG)
    config = json.load(open(good))
    cases = list(damaged(open(good, "rb").read()))
    cases += [(case, json.dumps(value).encode()) for case, value in [
        ("a JSON list", [config]),
        ("a model's config.json", {"_class_name": "SD3Transformer2DModel", "num_layers": 2}),
        ("another peft method's", {**config, "peft_type": "IA3"}),
        ("rank 0", {**config, "r": 0}), ("rank a string", {**config, "r": "32"}),
        ("alpha negative", {**config, "lora_alpha": -1}),
        ("alpha NaN", {**config, "lora_alpha": float("nan")}),
        ("no targets", {**config, "target_modules": []}),
        ("targets a number", {**config, "target_modules": 5})]]
    folder = tmp_path / "peft"
    for case, data in cases:
        shutil.copytree(lora_layouts["peft"], folder, dirs_exist_ok=True)
        (folder / loras.PEFT_CONFIG).write_bytes(data)
        refused(lambda: loras.read_lora(str(folder)), folder / loras.PEFT_CONFIG, case)


def test_a_bad_lora_metadata_and_run_json_are_one_line(lora_layouts, tmp_path):
    """Our file's lora_adapter_metadata that is not JSON or not a LoRA's config; a teacher
    folder's run.json cut short, or with a guidance that is not a number."""
    folder = tmp_path / "ours"
    for case, meta in [("not JSON", "{'r': 32"), ("a list", "[32]"),
                       ("rank -1", json.dumps({"r": -1, "lora_alpha": 4,
                                               "target_modules": ["to_q"]}))]:
        shutil.copytree(lora_layouts["ours"], folder, dirs_exist_ok=True)
        path = folder / loras.LORA_FILE
        save_file(load_file(str(path)), str(path), metadata={"lora_adapter_metadata": meta})
        refused(lambda: loras.read_lora(str(folder)), path, case)
    shutil.copytree(lora_layouts["ours"], folder, dirs_exist_ok=True)
    for case, text in [("cut short", '{"guidance": 4'), ("guidance a string",
                                                         '{"guidance": "4.5"}')]:
        (folder / "run.json").write_text(text)
        refused(lambda: loras.check_lora(str(folder)), folder / "run.json", case)


@pytest.mark.slow
def test_damaged_teachers_are_one_line_before_the_model_loads(lora_layouts, tmp_path):
    """Through the command line, both layouts: a 500-byte random weights file in a --teachers
    folder (an interrupted download) stops distillation with one line naming the file, exit 2,
    and --out keeps what it held."""
    out = tmp_path / "o"
    (out / "student").mkdir(parents=True)
    (out / "student" / "notes.txt").write_text("kept")
    before = tree(str(out))
    for layout, file in [("ours", loras.LORA_FILE), ("peft", loras.PEFT_WEIGHTS)]:
        folder = tmp_path / layout
        shutil.copytree(lora_layouts[layout], folder)
        (folder / file).write_bytes(random.Random(0).randbytes(500))
        r = run("--stage", "distill", "--teachers", f"color={folder}", *SMALL, "--optim_steps",
                "1", "--out", str(out), timeout=120)
        one_line_error(r, f"{folder / file} is not a readable safetensors file")
    r = run("--stage", "eval", "--tasks", "color", "--lora", f"x={tmp_path / 'peft'}", "--out",
            str(out), timeout=120)
    one_line_error(r, f"{tmp_path / 'peft' / loras.PEFT_WEIGHTS} is not a readable safetensors")
    assert tree(str(out)) == before


# ------------------------------------------------------------------------------ checkpoints
@pytest.fixture()
def checkpoint(tmp_path):
    """A run folder with one checkpoint as runs.save writes it: an adapter, AdamW, an EMA."""
    from opd_support.config import Config
    from opd_support.machinery import EMA
    w = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3, 4))]
    opt = torch.optim.AdamW(w, lr=1e-3)
    sum(p.sum() for p in w).backward()
    opt.step()
    counters = {"elapsed": 1.0, "passes": {"grad": 8, "nograd": 0}}
    state = ck.checkpoint_state(Config(), 2, [opt], [EMA(w, 0.9, 1)], [], counters)
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    ck.save_checkpoint(run_dir, 2, [{"a.lora_A.weight": w[0].detach(),
                                     "a.lora_B.weight": w[1].detach()}], state)
    assert ck.verify(os.path.join(run_dir, "ckpt-0000002")) is None
    return run_dir, state


def test_a_damaged_checkpoint_is_one_line(checkpoint):
    """Each file of a checkpoint damaged, both with its manifest (the sha256 finds it) and with
    the manifest gone (an older version's checkpoint: reading the file finds it), and contents of
    another kind in a checkpoint whose manifest matches: with no intact checkpoint left, --resume
    stops with one line naming the run and the fault."""
    run_dir, state = checkpoint
    ckpt = os.path.join(run_dir, "ckpt-0000002")
    keep = tree(ckpt)
    cases = []
    for f in ("adapter.safetensors", "state.pt", ck.MANIFEST):
        cases += [(f, case, data, manifest) for case, data in damaged(keep[f])
                  for manifest in ([True, False] if f != ck.MANIFEST else [True])]
    wrong = {"a list": [state], "no optimizers": {k: v for k, v in state.items()
                                                  if k != "optimizers"},
             "NaN in the EMA": {**state, "emas": [[torch.full((4, 3), float("nan"))]]},
             "step a string": {**state, "step": "2"}}
    for case, value in wrong.items():
        torch.save(value, os.path.join(run_dir, "wrong.pt"))
        cases.append(("state.pt", case, open(os.path.join(run_dir, "wrong.pt"), "rb").read(),
                      "rewritten"))
    adapter = os.path.join(run_dir, "wrong.safetensors")
    for case, tensors in [("NaN", {"a": torch.full((2,), float("nan"))}),
                          ("int64", {"a": torch.ones(2, dtype=torch.int64)})]:
        save_file(tensors, adapter)
        cases.append(("adapter.safetensors", case, open(adapter, "rb").read(), "rewritten"))
    manifest = json.loads(keep[ck.MANIFEST])
    cases += [(ck.MANIFEST, case, json.dumps(value).encode(), True) for case, value in [
        ("a list", [manifest]), ("an empty object", {}),
        ("an entry of another kind", {**manifest, "state.pt": "ok"}),
        ("a path outside", {**manifest, "../x": {"bytes": 1, "sha256": "0"}})]]
    for f, case, data, manifest_kept in cases:
        for name, data_kept in keep.items():
            open(os.path.join(ckpt, name), "wb").write(data_kept)
        open(os.path.join(ckpt, f), "wb").write(data)
        if manifest_kept == "rewritten":  # a manifest that matches the wrong contents
            m = {n: {"bytes": os.path.getsize(os.path.join(ckpt, n)),
                     "sha256": ck.sha256(os.path.join(ckpt, n))}
                 for n in ("adapter.safetensors", "state.pt")}
            open(os.path.join(ckpt, ck.MANIFEST), "w").write(json.dumps(m))
        elif not manifest_kept:
            os.remove(os.path.join(ckpt, ck.MANIFEST))
        assert ck.verify(ckpt), (f, case)
        refused(lambda: ck.latest_good(run_dir), run_dir, (f, case), "is intact")


def test_a_checkpoint_of_other_shapes_does_not_restore(checkpoint, tiny_sd3):
    """Weights whose shapes fit no layer of this run's adapter, and AdamW moments or an EMA of
    other shapes: one line naming the checkpoint."""
    m, cfg = tiny_sd3
    run_dir, _ = checkpoint
    ckpt = os.path.join(run_dir, "ckpt-0000002")
    params = sd3.add_lora(m.tr, "x", cfg)
    try:
        from opd_support.machinery import EMA
        opt, ema = torch.optim.AdamW(params, lr=1e-3), EMA(params, 0.9, 1)
        weights = loras.adapter_state(m.tr, "x")
        good = ck.checkpoint_state(cfg, 2, [opt], [ema], [],
                                   {"elapsed": 0, "passes": {"grad": 0, "nograd": 0}})
        for case, w, state in [
                ("another model's weights", None, good),
                ("a misshapen weight", first(weights, lambda t: torch.zeros(3, 3)), good),
                ("an EMA of other shapes", weights,
                 {**good, "emas": [[e[:1] for e in good["emas"][0]]]})]:
            if w is not None:
                save_file(w, os.path.join(ckpt, "adapter.safetensors"))
            refused(lambda: ck.restore(ckpt, state, m.tr, ["x"], [opt], [ema], []), ckpt, case,
                    "does not fit this run")
        p = params[0]  # AdamW's moments of another shape for one parameter
        p.grad = torch.ones_like(p)
        opt.step()
        bad = opt.state_dict()
        bad["state"][0]["exp_avg"] = bad["state"][0]["exp_avg"][:1]
        refused(lambda: ck.restore(ckpt, {**good, "optimizers": [bad]}, m.tr, ["x"], [opt],
                                   [ema], []), ckpt, "AdamW moments", "does not fit this run")
    finally:
        sd3.drop_adapters(m)


def test_a_damaged_checkpoint_through_the_command_line(teacher_dir, tmp_path):
    """A finished teacher asked to continue (--resume --optim_steps 4) from a checkpoint whose
    state.pt was cut short: one line, exit 2, the folder as it was."""
    out = tmp_path / "o"
    shutil.copytree(os.path.dirname(teacher_dir), out)
    run_dir = out / "teacher-color"
    for c in ck.checkpoints(str(run_dir)):
        state = run_dir / c / "state.pt"
        state.write_bytes(state.read_bytes()[:1000])
    before = tree(str(out))
    r = run("--stage", "teacher", "--optim_steps", "4", *SMALL, "--resume", "--out", str(out),
            timeout=120)
    one_line_error(r, f"--resume: no checkpoint in {run_dir} is intact")
    assert tree(str(out)) == before


def test_metrics_jsonl_on_resume(tmp_path):
    """A run's metrics.jsonl as --resume reads it back: a last row cut off by a kill is dropped
    with the rows after the checkpoint; any other row that is not a metrics row (cut short,
    random bytes, not an object, no integer step, a val of another kind) is one line naming the
    file and line, and the file stays as it was."""
    import types
    from opd_support import runs
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "val": {"color": 0.5}}, {"step": 1, "grad_norm": 0.1},
            {"step": 2, "grad_norm": 0.2}, {"step": 3, "grad_norm": 0.3}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    run_ = types.SimpleNamespace(dir=str(tmp_path), start=2, rank=0)
    path.write_text(text + '{"step": 4, "grad_')
    assert runs.resumed_metrics(run_) == [(0, 0.5)]
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:3])
    for case, line in [("cut short", '{"step": 1, "grad'), ("random", "\x97\x00\xff"),
                       ("a list", "[1, 2]"), ("a string step", '{"step": "1"}'),
                       ("val a number", '{"step": 1, "val": 0.5}')]:
        path.write_text(line + "\n" + text)
        refused(lambda: runs.resumed_metrics(run_), f"{path}:1", case)
        assert path.read_text() == line + "\n" + text


# ------------------------------------------------------------------------------ prompt files
def test_damaged_prompt_files_and_geneval_metadata_are_one_line(tmp_path):
    """A prompt file (text, or GenEval metadata jsonl) cut short, random, empty, of another kind
    (a weights file, metadata in a .txt, plain text in a .jsonl), and GenEval metadata with a tag,
    class, count, colour or position GenEval's reward cannot read: one line naming the file (and
    the line). The built-in GenEval metadata, written out, reads back as it was."""
    metas = prompts.geneval(n=5)
    jsonl = tmp_path / "meta.jsonl"
    jsonl.write_text("".join(json.dumps(m) + "\n" for m in metas))
    got, meta = prompts.read(str(jsonl))
    assert got == [m["prompt"] for m in metas] and meta[got[-1]] == metas[-1]
    txt = tmp_path / "p.txt"
    txt.write_text("a red cat\na blue dog\n")
    assert prompts.read(str(txt))[0] == ["a red cat", "a blue dog"]
    cases = [(jsonl, case, data) for case, data in damaged(jsonl.read_bytes())
             if not data.endswith(b"}") and not data.endswith(b"}\n")]  # whole lines are valid
    cases += [(txt, case, data) for case, data in damaged(txt.read_bytes())
              if case in ("random bytes", "empty")]  # a text cut short is shorter text
    weights = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, generator=torch.Generator().manual_seed(0))}, str(weights))
    cases += [(txt, "a weights file", weights.read_bytes()),
              (txt, "metadata in a .txt", jsonl.read_bytes()),
              (jsonl, "plain text in a .jsonl", b"a red cat\n")]
    single = {"tag": "single_object", "include": [{"class": "cat", "count": 1}],
              "prompt": "a photo of a cat"}
    for case, change in [("tag", {"tag": "animals"}), ("no include", {"include": []}),
                         ("class", {"include": [{"class": "unicorn", "count": 1}]}),
                         ("count", {"include": [{"class": "cat", "count": 0}]}),
                         ("colour", {"include": [{"class": "cat", "count": 1, "color": "teal"}]}),
                         ("position", {"include": [{"class": "cat", "count": 1,
                                                    "position": ["left of", 0]}]}),
                         ("exclude", {"exclude": {"class": "cat"}})]:
        cases.append((jsonl, f"GenEval metadata: {case}", json.dumps({**single, **change})
                      .encode()))
    for path, case, data in cases:
        path.write_bytes(data)
        refused(lambda: prompts.read(str(path)), path, case)


# ------------------------------------------------------------------------------ the tiny cache
def test_a_damaged_tiny_model_cache_is_built_again(tmp_path, monkeypatch, capsys):
    """The cached tiny model cut short, random, empty, a file of another kind (a LoRA), fp16
    weights, a reshaped or missing tensor, NaN, no VAE scale: one warning line naming the fault,
    then built again (pretraining stubbed here: it takes minutes), the new file usable."""
    monkeypatch.setenv("OPD_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny, "pretrain_tiny", lambda pipe, kind: 0.0)
    path = tmp_path / (tiny.RECIPES["tiny"] + ".safetensors")
    tiny.tiny_pipeline("tiny")
    good = path.read_bytes()
    state = load_file(str(path))
    meta = {"scaling_factor": "1.5", "shift_factor": "0.1"}
    key = sorted(k for k in state if k.startswith("transformer.") and state[k].dim() == 2)[0]
    cases = list(damaged(good))
    for case, tensors, m in [
            ("a LoRA", {"transformer.a.lora_A.weight": torch.ones(2, 2)}, meta),
            ("fp16", {k: v.half() for k, v in state.items()}, meta),
            ("reshaped", {**state, key: state[key].flatten()}, meta),
            ("missing", {k: v for k, v in state.items() if k != key}, meta),
            ("extra", {**state, "unet.x": torch.ones(1)}, meta),
            ("NaN", {**state, key: torch.full_like(state[key], float("nan"))}, meta),
            ("no VAE scale", state, {}), ("VAE scale 0", state, {**meta, "scaling_factor": "0"})]:
        save_file(tensors, str(tmp_path / "x"), metadata=m)
        cases.append((case, (tmp_path / "x").read_bytes()))
    capsys.readouterr()
    for case, data in cases:
        path.write_bytes(data)
        tiny.tiny_pipeline("tiny")
        out = capsys.readouterr().out.splitlines()
        warn = [line for line in out if line.startswith("warning:")]
        assert len(warn) == 1 and "the cached tiny model is unusable" in warn[0], (case, out)
        assert tiny.load_cached(tiny.build_offline("tiny"), str(path)) is None, case
