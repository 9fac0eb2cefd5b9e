"""One step of every stage, in this process on the session's tiny model: the quick tier's check
that each stage's code runs end to end and writes what it should. The whole runs, as a user
types them, are the slow tier (`python -m pytest -q -m slow`)."""
import json
import os

import pytest

import baselines
import opd
from opd_support import config, evaluation, loras, prompts, sd3

ONE_STEP = ["--optim_steps", "1", "--updates_per_epoch", "1", "--batch_size", "4",
            "--group_size", "2", "--sampler_steps", "2", "--eval_sampler_steps", "2",
            "--eval_prompts", "1", "--eval_seeds", "1", "--val_seeds", "1"]


def rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def done(run_dir):
    """A finished stage: its LoRA loads as an adapter, run.json counts its one step."""
    assert json.load(open(os.path.join(run_dir, "run.json")))["steps"] >= 1, run_dir
    return loras.read_lora(run_dir)


@pytest.fixture
def model(tiny_sd3):
    """The session's tiny model, its adapters dropped after the test whatever happened."""
    m, _ = tiny_sd3
    try:
        yield m
    finally:
        sd3.drop_adapters(m)


def test_every_stage_of_opd_one_step(model, tmp_path):
    """opd.py's stages: a GRPO-Guard and a DiffusionNFT teacher, a student of the first (fused
    with --log_conflict's halves, two-pass with --loss ppo), and the eval of all."""
    argv = [*ONE_STEP, "--tasks", "color", "--out", str(tmp_path), "--eval_every", "1"]
    teacher = config.resolve(config.parse_config(argv + ["--stage", "teacher"]), "teacher")
    task = prompts.make_task("color", teacher)
    opd.train_rl(teacher, model, [[task]], "teacher-color")
    nft = config.resolve(config.parse_config(argv + ["--stage", "teacher", "--algo", "nft"]),
                         "teacher")
    opd.train_rl(nft, model, [[task]], "teacher-nft")
    dirs = {"color": str(tmp_path / "teacher-color")}
    closed = config.resolve(config.parse_config(argv + ["--stage", "distill", "--micro_batch", "2",
                                                        "--log_conflict"]), "distill")
    opd.distill(closed, model, [task], dirs)
    ppo = config.resolve(config.parse_config(argv + ["--stage", "distill", "--loss", "ppo",
                                                     "--noise_level", "0.7", "--two_pass"]),
                         "distill")
    opd.distill(ppo, model, [task], dirs, "student-ppo")
    table = evaluation.evaluate(config.resolve(config.parse_config(argv), "eval"), model, [task])
    for name in ("teacher-color", "teacher-nft", "student", "student-ppo"):
        done(tmp_path / name)
    assert {"reward_color", "grad_norm", "clipfrac"} <= set(rows(tmp_path / "teacher-color")[1])
    assert {"reward_color", "grad_norm"} <= set(rows(tmp_path / "teacher-nft")[1])
    student = [r for r in rows(tmp_path / "student") if "loss_color" in r]
    assert len(student) == 1 and student[0]["cos_half_color"] is not None
    assert [r["step"] for r in rows(tmp_path / "student") if "val" in r] == [0, 1]
    assert set(table) == {"base", "teacher-color", "teacher-nft", "student", "student-ppo"}


def test_every_stage_of_baselines_one_step(model, tmp_path):
    """baselines.py's stages: joint and cascade RL, each distillation baseline of one teacher,
    the noise ablation, and the comparison (every method, the table and its figures)."""
    argv = [*ONE_STEP, "--tasks", "color", "--out", str(tmp_path)]
    tasks = [prompts.make_task("color", config.resolve(config.parse_config(argv), "teacher"))]
    args = baselines.parse_args(argv + ["--stage", "joint"])
    baselines.joint(baselines.rl_config(args, "joint"), model, tasks)
    args = baselines.parse_args(argv + ["--stage", "cascade", "--algo", "nft"])
    baselines.cascade(baselines.rl_config(args, "cascade"), model, tasks)
    dirs = {"color": str(tmp_path / "joint-grpo_guard")}  # any LoRA serves as the teacher
    for loss, a in baselines.STUDENTS.items():
        args = baselines.parse_args(argv + ["--stage", "distill", "--loss", loss,
                                            "--noise_level", str(a)])
        baselines.student(args, model, tasks, dirs)
        assert "loss_color" in rows(tmp_path / f"student-{loss}")[-1], loss
    baselines.noise(baselines.parse_args(argv + ["--stage", "noise", "--eval_every", "1"]),
                    model, tasks, dirs)
    for name in ("joint-grpo_guard", "cascade-nft", *(f"student-{s}" for s in baselines.STUDENTS),
                 *(f"noise/student-{baselines.noise_label(a, w)}" for a, w in
                   baselines.NOISE_RUNS)):
        done(tmp_path / name)
    assert json.load(open(tmp_path / "noise.json"))["levels"]["a0.7-sigma"]["rounds"] == [0, 1]
    out = tmp_path / "compare"
    table = baselines.compare(baselines.parse_args(ONE_STEP + [
        "--tasks", "color", "--stage", "compare", "--out", str(out)]), model, tasks)
    assert list(table) == ["base", "teacher-color", "joint-grpo_guard", "joint-nft", "cascade-nft",
                           "student", *sorted(f"student-{s}" for s in baselines.STUDENTS)]
    assert (out / "budget.md").is_file() and (out / "anytime.png").is_file()
