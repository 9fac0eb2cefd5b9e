"""The committed results and the tables made from them: the statistics against hand
computations on made-up seeds, the documents' blocks filled and checked, and the repository's
own tables equal to what its data make."""
import json
import os
import subprocess
import sys

import pytest

from conftest import HERE
from opd_support import results

TASKS = ["a", "b"]


def made_up_seed(root, s, student_b=0.6):
    """A seed folder as collect() writes it: base, two teachers, joint RL and OPD on tasks a, b
    (2 test prompts x 2 images each); validation curves with compute; meter rows."""
    d = os.path.join(root, "control", f"seed-{s}")
    os.makedirs(os.path.join(d, "runs"))
    images = {"base": ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),
              "teacher-a": ([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]),
              "teacher-b": ([0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]),
              "joint-grpo_guard": ([0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.4]),
              "student": ([1.0, 1.0, 0.0, 1.0], [student_b] * 4)}
    cost = {"teacher-a": 100, "teacher-b": 300, "joint-grpo_guard": 1000, "student": 200}
    ev = {n: {"a": sum(a) / 4, "b": sum(b) / 4, "seconds": 10.0 * (n != "base"),
              "cost": cost.get(n, 0), "steps": 4 * (n != "base")} for n, (a, b) in images.items()}
    per = {"prompts": {t: ["p0", "p0", "p1", "p1"] for t in TASKS},
           "scores": {n: {"a": a, "b": b} for n, (a, b) in images.items()}}
    json.dump(ev, open(os.path.join(d, "eval.json"), "w"))
    json.dump(per, open(os.path.join(d, "eval_images.json"), "w"))
    json.dump({"process": {"eval_seconds": 60, "cpu_seconds": 600}}, open(
        os.path.join(d, "budget.json"), "w"))
    curves = {"teacher-a": [(0, {"a": 0.0, "b": 0.0}), (100, {"a": 1.0, "b": 0.0})],
              "teacher-b": [(0, {"a": 0.0, "b": 0.0}), (300, {"a": 0.0, "b": 1.0})],
              # share of the gains: 0.25 at 500, 0.5 at 700, 0.95 at 1000
              "joint-grpo_guard": [(0, {"a": 0, "b": 0}), (500, {"a": 0.5, "b": 0.0}),
                                   (700, {"a": 0.5, "b": 0.5}), (1000, {"a": 0.9, "b": 1.0})],
              # after its teachers' 400 (total) or 300 (critical path): 0.5, then 0.92
              "student": [(0, {"a": 0, "b": 0}), (100, {"a": 1.0, "b": 0.0}),
                          (200, {"a": 0.84, "b": 1.0})]}
    for n, c in curves.items():
        rows = [{"step": i, "cost": x, "val": v} for i, (x, v) in enumerate(c)]
        if n == "joint-grpo_guard":  # two training rows of the meter
            rows += [{"step": 1, "grad_norm": 1, "cos_a_b": -0.02, "cos_half_a": 0.2,
                      "cos_half_b": 0.2, "flat_groups_a": 0.5, "flat_groups_b": 0.0},
                     {"step": 2, "grad_norm": 1, "cos_a_b": -0.04, "cos_half_a": 0.2,
                      "cos_half_b": 0.2, "flat_groups_a": 0.25, "flat_groups_b": 0.0}]
        with open(os.path.join(d, "runs", n + ".jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        json.dump({"run": {"passes": {"grad": 1, "nograd": 2}}}, open(
            os.path.join(d, "runs", n + ".json"), "w"))


def test_scores_and_costs_by_hand(tmp_path):
    made_up_seed(str(tmp_path), 0)
    d = results.load("control", 0, str(tmp_path))
    sc = results.scores(d, TASKS)
    # share of each teacher's gain (1 on each task): student a 0.75, b 0.6
    assert sc["student"]["share"] == pytest.approx((0.75 + 0.6) / 2)
    assert sc["joint-grpo_guard"]["share"] == pytest.approx((0.5 + 0.1) / 2)
    assert results.compute(d, "student", TASKS) == 200 + 100 + 300
    assert results.compute(d, "student", TASKS, "critical") == 200 + 300
    curve = results.val_curve(d, "student", TASKS, results.lead(d, "student", TASKS, "total"))
    assert curve == [(400, 0.0), (500, 0.5), (600, pytest.approx(0.92))]
    assert results.at(curve, 550) == (0.5, False) and results.at(curve, 700)[1]
    joint = results.val_curve(d, "joint-grpo_guard", TASKS)
    assert results.at(joint, 600) == (0.25, False) and results.at(joint, 500) == (0.25, False)
    table = results.equal_cost_table([d], TASKS)
    # joint at OPD's total compute 600 -> 0.25, at its critical path 500 -> 0.25; 90% at 1000
    assert "| joint GRPO-Guard | 1 | 0.250 ± 0.000 | 0.250 ± 0.000 | 1,000 |" in table
    assert "| **OPD** | 1 | 0.920 ± 0.000 | 0.920 ± 0.000 | 600 |" in table


def test_bootstrap_over_prompts():
    same = {"p0": [1.0, 0.0], "p1": [0.5, 0.5]}
    assert results.bootstrap(same, same) == (0.0, 0.0, 0.0)
    shifted = {k: [x + 0.1 for x in v] for k, v in same.items()}
    mean, lo, hi = results.bootstrap(shifted, same)
    assert mean == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    a, b = {"p0": [1.0, 1.0], "p1": [0.0, 0.0]}, {"p0": [0.0, 0.0], "p1": [0.0, 0.0]}
    mean, lo, hi = results.bootstrap(a, b)  # prompt diffs 1 and 0: resampled means 0, .5, 1
    assert mean == 0.5 and lo == 0.0 and hi == 1.0


def test_tables_from_made_up_seeds(tmp_path):
    for s, b in ((0, 0.6), (1, 0.8), (2, 0.7)):
        made_up_seed(str(tmp_path), s, b)
    made = results.tables(str(tmp_path))
    summary = made["control-summary"]
    # OPD's share per seed: (0.75 + b) / 2 = 0.675, 0.775, 0.725; joint's 0.3 each
    assert "| **OPD** | 3 | " in summary and "0.725 ± 0.050 | - |" in summary
    assert "+0.425 ± 0.050 **" in summary  # OPD minus joint, paired: t-interval excludes 0
    tasks = made["control-tasks"]
    assert "| **OPD** | 0.750 ± 0.000 | 0.700 ± 0.100 |" in tasks
    boot = made["control-bootstrap"]
    # task a, OPD minus joint: prompt p0 +0.5 (every seed), p1 0: 0.25 [0, 0.5]
    assert "| joint GRPO-Guard | 3 | +0.250 [+0.000, +0.500] |" in boot
    head = made["control-headline"].splitlines()  # the summary without the teachers' rows
    assert head == [r for r in made["control-summary"].splitlines() if "| teacher-" not in r]
    assert len(head) < len(made["control-summary"].splitlines())
    meter = made["control-meter"]
    # raw -0.03, split halves 0.2 each: reliability 2 (0.2) / 1.2 = 1/3, corrected -0.03 x 3
    assert "| joint GRPO-Guard | a-b | -0.030 ± 0.000 | +0.20 / +0.20 | -0.09 [-0.09, -0.09] **" \
        " (n 3) | - |" in meter and "OPD" not in meter  # OPD logged no meter rows
    assert "| joint GRPO-Guard | 0.38 | 0.00 |" in made["control-flat"]


def test_documents_blocks_filled_and_checked(tmp_path, monkeypatch):
    made_up_seed(str(tmp_path), 0)
    doc = tmp_path / "doc.md"
    doc.write_text("x\n<!-- results: control-tasks -->\nold\n<!-- /results -->\ny\n")
    monkeypatch.setattr(results, "ROOT", str(tmp_path))
    root = str(tmp_path)
    assert results.write_docs(True, root, ["doc.md"]) == [
        "doc.md: table 'control-tasks' differs from the one the data make"]
    assert results.write_docs(False, root, ["doc.md"]) == []  # written
    assert results.write_docs(True, root, ["doc.md"]) == []
    text = doc.read_text()
    assert text.startswith("x\n<!-- results: control-tasks -->\n| model | a | b |")
    assert text.endswith("|\n<!-- /results -->\ny\n")
    doc.write_text(text.replace("control-tasks", "control-nothing"))
    assert "names no table" in results.write_docs(True, root, ["doc.md"])[0]
    # an empty block is filled in place, the next block left as it is
    doc.write_text("<!-- results: control-tasks -->\n<!-- /results -->\nz\n"
                   "<!-- results: control-flat -->\nold\n<!-- /results -->\n")
    assert results.write_docs(False, root, ["doc.md"]) == []
    text = doc.read_text()
    assert text.count("<!-- /results -->") == 2 and "\nz\n<!-- results: control-flat" in text
    assert text.startswith("<!-- results: control-tasks -->\n| model | a | b |")


def test_the_repositorys_tables_are_its_datas():
    """`python -m opd_support.reports --check` on this repository: every results table of
    README.md and docs/results.md equals the one its committed data make."""
    r = subprocess.run([sys.executable, "-m", "opd_support.reports", "--check"], cwd=HERE,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
