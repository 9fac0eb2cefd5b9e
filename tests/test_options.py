"""Options and bad input: every option's domain (values outside it derived from its Rule), the
relations between options, bad files, bad resumes: one line, exit code 2, nothing touched."""
import dataclasses
import math
import os

import pytest
import torch

import baselines
import bench
import opd
from conftest import SMALL, ok, one_line_error, run, tree
from opd_support import config, runs
from opd_support.loras import LORA_FILE


def _main(args, capsys, monkeypatch, script=opd):
    """script.main in this process, with the model loading replaced by a failure: input that
    passes every check would reach it (and fail the test) instead of training. Returns (exit
    code, stderr lines)."""
    def reached(*a, **k):
        raise AssertionError(f"the checks let {args} through to the model")
    monkeypatch.setattr(runs, "dist_setup", reached)
    monkeypatch.setattr(bench, "dist_setup", reached)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        script.main(args)
    return e.value.code, [l for l in capsys.readouterr().err.splitlines() if l.strip()]


# texts whose domain is a check function: values it must refuse (the other kinds' are derived)
MALFORMED = {"reward": ["bogus", "color:-1"], "loss_steps": ["x", "9-3", "0,99"],
             "nft_decay": ["x", "1,2", "0,0.1,1.5"], "lora_targets": [",", ""],
             "seeds": ["x", "0,0", "1,", "-1"],
             "plateau": ["x", "3", "0,0.1", "3,-1"], "lr_grid": ["x", "0", "1,-2"],
             "lr_choice": ["x", "[1]"]}


def outside(name, rule):
    """Values outside a Rule's domain, derived from the domain itself."""
    d = rule.domain
    if rule.kind == "num":
        vals = ["x", str(d["lo"] if d["lo_open"] else d["lo"] - 1)]
        vals += ["1.5"] if d["typ"] is int else ["nan", "inf"]
        return vals + ([str(d["hi"] if d["hi_open"] else d["hi"] + 1)]
                       if d["hi"] < math.inf else [])
    if rule.kind == "choice":
        return ["bogus", ""]
    if rule.kind == "names":
        return ([] if d["empty_ok"] else [""]) + [",", "bogus",
                                                  f"{d['choices'][0]},{d['choices'][0]}"]
    if rule.kind == "files":
        return ["/nonexistent", f"{d['keys'][0]}=/nonexistent", "bogus=" + __file__]
    if rule.kind == "pairs":
        key = (d["keys"] or ["a"])[0]
        return ["x", "=1", f"{key}="] + (["bogus=1"] if d["keys"] else []) + \
            ([f"{key}=x"] if d["value"].kind == "num" else [])
    if rule.kind == "text":
        return ([] if d["empty_ok"] else [""]) + (MALFORMED[name] if d["check"] else [])
    if rule.kind == "file":
        return ["/nonexistent", "/"]
    if rule.kind == "folder":
        return ["", os.path.abspath(__file__)]
    assert rule.kind == "flag", (name, rule.kind)
    return []


SCRIPTS = [(opd, config.Config), (baselines, baselines.Args), (bench, bench.Args)]


def _fields():
    """(script, field, value outside its domain): every field of opd.py, and the fields that
    baselines.py and bench.py declare anew."""
    base = {f.name: f for f in dataclasses.fields(config.Config)}
    return [pytest.param(script, f.name, bad, id=f"{script.__name__}-{f.name}-{bad}")
            for script, cls in SCRIPTS for f in dataclasses.fields(cls)
            if script is opd or f.name not in base or f is not base[f.name]
            for bad in outside(f.name, f.metadata["rule"])]


def test_every_default_is_inside_its_domain_and_help_shows_it():
    for script, cls in SCRIPTS:
        for f in dataclasses.fields(cls):
            if f.default is not None:
                assert f.metadata["rule"].ok(f.default), (f.name, f.default)
    r = ok(run("--help"))
    text = " ".join(r.stdout.split())
    assert "default 'color,position,jpeg'" in text and "default 60 (tiny teacher" in text


@pytest.mark.parametrize("script,name,bad", _fields())
def test_out_of_domain_value_is_one_line_exit_2(script, name, bad, tmp_path, capsys, monkeypatch):
    """Every field, every value outside its domain: one line on stderr that names the option,
    exit code 2, and --out untouched (here: not even made)."""
    out = str(tmp_path / "o")
    args = [f"--{name}", bad] + ([] if name == "out" else ["--out", out])
    code, lines = _main(args, capsys, monkeypatch, script)
    assert code == 2 and len(lines) == 1 and f"--{name}" in lines[0], lines
    assert not os.path.exists(out)


@pytest.mark.parametrize("script,args,needle", [
    (opd, ["--stage", "teacher", "--batch_size", "8", "--group_size", "3"],
     "not a multiple of --group_size"),
    (opd, ["--stage", "teacher", "--noise_level", "0"], "needs --noise_level > 0"),
    (opd, ["--stage", "distill", "--loss", "ppo"], "needs --noise_level > 0"),
    (baselines, ["--stage", "distill", "--loss", "flow"], "needs --noise_level > 0"),
    (baselines, ["--stage", "distill", "--loss", "sft", "--noise_level", "0.7"], "must be 0"),
    (baselines, ["--stage", "distill", "--loss", "dance", "--two_pass"], "--two_pass applies"),
    (baselines, ["--stage", "joint", "--batch_size", "8", "--group_size", "3"], "not a multiple"),
    (opd, ["--stage", "teacher", "--optim_steps", "3"], "not a multiple of --updates_per_epoch"),
    (opd, ["--stage", "distill", "--sde_weight", "sigma"], "--noise_level 0 has none"),
    (baselines, ["--stage", "distill", "--loss", "flow", "--noise_level", "0.7",
                 "--sde_weight", "sigma"], "--sde_weight applies"),
    (baselines, ["--stage", "distill", "--loss", "flow", "--noise_level", "0.7",
                 "--batch_size", "1"], "at least 2"),
    (baselines, ["--stage", "distill", "--seeds", "0,1"], "--seeds applies"),
    (opd, ["--stage", "distill", "--loss_steps", "3-12"], "must lie in 0..9"),
    (opd, ["--resume", "--overwrite"], "contradict"),
    (opd, ["--resolution", "30"], "multiple of 4"),
    (opd, ["--model", "sd35m-random", "--resolution", "520"], "multiple of 16"),
    (opd, ["--teacher_guidance", "ocr=1"], "not among"),
    (opd, ["--stage", "eval", "--export_geneval"], "needs the geneval task"),
    (opd, ["--stage", "distill", "--teachers", "color=/nonexistent"],
     "no LoRA folder /nonexistent"),
    (opd, ["--stage", "compare"], "--stage: got 'compare'"),
    (opd, ["--bogus_option", "1"], "unrecognized arguments"),
    (opd, ["--lr"], "expected one argument"),
])
def test_relations_between_options(script, args, needle, tmp_path, capsys, monkeypatch):
    code, lines = _main([*args, "--out", str(tmp_path / "o")], capsys, monkeypatch, script)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA accepts --device cuda")
def test_device_cuda_without_cuda(tmp_path, capsys, monkeypatch):
    code, lines = _main(["--device", "cuda", "--out", str(tmp_path / "o")], capsys, monkeypatch)
    assert code == 2 and lines == ["error: --device cuda: no CUDA device is available"]


def test_bad_files_are_one_line_naming_the_path(tmp_path):
    """Prompt files that are not UTF-8, a folder, empty, or not metadata: one line, exit 2,
    through the real command line (the model-free checks run before the model loads)."""
    (tmp_path / "latin1.txt").write_bytes('a sign that says "caf\xe9"\n'.encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    cases = [(["--prompts", str(tmp_path / "latin1.txt")], "latin1.txt"),
             (["--prompts", str(tmp_path)], "--prompts"),
             (["--prompts", str(tmp_path / "empty.txt")], "is empty"),
             (["--task", "geneval", "--prompts", str(tmp_path / "bad.jsonl")], "not a JSON object"),
             (["--task", "ocr", "--test_prompts", str(tmp_path / "latin1.txt")], "not UTF-8")]
    for args, needle in cases:
        r = run("--stage", "teacher", "--task", "ocr", *args, "--out", str(tmp_path / "o"),
                timeout=120)
        one_line_error(r, needle)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("args,needle", [
    (["--stage", "teacher", "--task", "ocr", "--prompts", "/nonexistent.txt"], "--prompts"),
    (["--stage", "teacher", "--reward", "nope"], "unknown reward"),
    # the slow ones load the model or a reward's libraries before they stop
    pytest.param(["--model", "/nonexistent/sd3-folder", "--stage", "teacher"],
                 "cannot load model", marks=pytest.mark.slow),
    pytest.param(["--stage", "teacher", "--reward", "clipscore"],
                 "openai/clip-vit-large-patch14", marks=pytest.mark.slow),
    pytest.param(["--stage", "teacher", "--reward", "imagereward"], "THUDM/ImageReward",
                 marks=pytest.mark.slow),
    (["--stage", "teacher", "--task", "geneval", "--prompts", "README.md"], "GenEval metadata"),
    (["--stage", "teacher", "--task", "ocr", "--prompts", "requirements.txt"], "no quoted text"),
    pytest.param(["--stage", "teacher", "--lora_targets", "to_q,nope"], "'nope'",
                 marks=pytest.mark.slow),
    (["--stage", "teacher", "--lr", "-1"], "--lr: got -1.0, accepts a finite number in (0, 1]"),
])
def test_bad_input_through_the_command_line(args, needle, tmp_path):
    r = run(*args, "--out", str(tmp_path / "o"),
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    one_line_error(r, needle)


@pytest.mark.slow
def test_bad_resume_and_foreign_checkpoint_touch_nothing(tmp_path):
    out = str(tmp_path / "o")
    assert run("--stage", "teacher", "--optim_steps", "2", *SMALL, "--out", out).returncode == 0
    os.remove(os.path.join(out, "teacher-color", LORA_FILE))  # now an unfinished run
    before = tree(out)
    for extra, needle in [(["--resume", "--lora_rank", "8"], "--lora_rank 32"),
                          (["--resume", "--lora_alpha", "16"], "--lora_alpha 64"),
                          (["--resume", "--lora_targets", "to_q,to_v"],
                           "was trained with --lora_targets to_q,to_k"),
                          (["--resume", "--model", "sd35m-random"], "--model tiny"),
                          ([], "--resume")]:
        r = run("--stage", "teacher", "--optim_steps", "2", *SMALL, "--out", out, *extra)
        one_line_error(r, needle)
    assert tree(out) == before


@pytest.mark.slow
def test_more_bad_inputs(tmp_path, teacher_dir):
    from safetensors.torch import save_file
    bad = tmp_path / "other-model"
    bad.mkdir()  # a LoRA whose shapes fit another model
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 96),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(96, 4)},
              str(bad / LORA_FILE))
    out = str(tmp_path / "o")
    cases = [(["--stage", "distill", "--teachers", f"color={bad}"], "does not fit"),
             (["--stage", "teacher", "--batch_size", "8", "--group_size", "4"],
              "does not divide across 3 ranks")]
    for args, needle in cases:
        env = {"WORLD_SIZE": "3"} if "ranks" in needle else None
        r = run(*args, "--out", out, env=env, timeout=120)
        one_line_error(r, needle)


def test_noise_without_teachers_stops_before_the_model(tmp_path):
    """--stage noise (with or without --seeds) trains no teachers: a missing one is named, with
    the command that makes it into the folder it is looked for in, before any model loads."""
    out = str(tmp_path / "o")
    for seeds in ([], ["--seeds", "0,1"]):
        r = run("--stage", "noise", *seeds, "--out", out, script="baselines.py", timeout=120)
        one_line_error(r, f"no LoRA at {os.path.join(out, 'teacher-color', LORA_FILE)}")
        assert f"--out {out}`" in r.stderr and "config:" not in r.stdout
    assert not os.path.exists(out)
