"""When does OPD win: the conflicting toy tasks' rewards by hand, the gradient-conflict meter
against a hand computation, the plateau rule on made-up curves, the new tasks run tiny."""
import json
import os

import pytest
import torch

import rewards
from conftest import ok, run
from opd_support import conflict, evaluation, tiny


def test_conflicting_rewards_by_hand():
    """vivid = max - min of the mean colour, faded = 1 - that, exact = 1 within 0.15 of the
    named colour: on flat made images, and pixel noise does not move the first two."""
    im = torch.zeros(4, 3, 8, 8)
    im[0] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # pure red
    im[1] = 0.5  # grey
    im[2] = torch.tensor([0.8, 0.3, 0.1]).view(3, 1, 1)
    im[3] = torch.tensor([0.9, 0.05, 0.1]).view(3, 1, 1)
    prompts = ["a vivid red cat"] * 4
    assert torch.allclose(rewards.vivid(im, prompts), torch.tensor([1.0, 0.0, 0.7, 0.85]))
    assert torch.allclose(rewards.faded(im, prompts), torch.tensor([0.0, 1.0, 0.3, 0.15]))
    # distances to red: 0, 0.866, sqrt(0.04 + 0.09 + 0.01) = 0.374, sqrt(0.01 + 0.0025 + 0.01)
    assert rewards.EXACT_TOL == 0.15
    assert torch.equal(rewards.exact(im, ["a red cat"] * 4), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    g = torch.Generator().manual_seed(0)
    noisy = im + 0.05 * torch.randn(im.shape, generator=g)  # zero-mean noise: the mean stays
    assert torch.allclose(rewards.vivid(noisy, prompts), rewards.vivid(im, prompts), atol=0.03)
    assert rewards.load("vivid:1,faded:1")(im, prompts).eq(0.5).all()  # they oppose exactly


def test_toy_splits_share_no_prompt_and_wording_sets_the_gap():
    for name in ("color", "position", "jpeg", "vivid", "faded", "exact"):
        train, val, test = tiny.toy_prompts(name)
        assert train and val and test and not (set(train) & set(val) | set(train) & set(test)
                                               | set(val) & set(test)), name
    vivid, faded = tiny.toy_prompts("vivid")[0], tiny.toy_prompts("faded", "word")[0]
    apart = [sum(a != b for a, b in zip(v.split(), f.split())) for v, f in zip(vivid, faded)]
    assert apart == [1] * len(vivid)  # one word apart
    far = tiny.toy_prompts("faded", "template")[0]
    assert all(len(set(v.split()) ^ set(f.split())) > 4 for v, f in zip(vivid, far))


def test_meter_against_gradients_known_by_hand():
    """Two tasks whose halves' gradients are fixed vectors (loss = h . w): the cosines, the
    noise floor, Adam's preconditioned cosine from its own state, and the first-order change of
    each task's loss under the step taken, each against a direct computation."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, generator=g))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.01)
    meter = conflict.Meter([w])
    h = {(t, k): torch.randn(6, generator=g, dtype=torch.float64) for t in "ab" for k in (0, 1)}
    for step in range(3):  # the third step's row, with Adam's state from the two before
        meter.start()
        for (t, k), v in h.items():
            ((v.float() * (step + 1)) @ w / 2).backward()  # each task's share: 1/M of its loss
            meter.mark(t, k)
        meter.before_step()
        before = w.detach().double().clone()
        opt.step()
        row = meter.row(opt)
        opt.zero_grad(set_to_none=True)
    ga, gb = [(h[t, 0] + h[t, 1]) * 3 / 2 for t in "ab"]

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))
    v = opt.state[w]["exp_avg_sq"].double() / (1 - 0.999 ** 3)
    p = 1 / (v.sqrt() + 1e-8)
    assert row["cos_a_b"] == pytest.approx(cos(ga, gb), abs=1e-6)
    assert row["cos_adam_a_b"] == pytest.approx(cos(p * ga, p * gb), abs=1e-6)
    assert row["cos_half_a"] == pytest.approx(cos(h["a", 0], h["a", 1]), abs=1e-6)
    step_taken = w.detach().double() - before
    assert row["dloss_b"] == pytest.approx(float(2 * gb @ step_taken), rel=1e-5)  # fp32 grads


def test_plateau_rule_on_made_up_curves():
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    flat = [0.1, 0.3, 0.5, 0.501, 0.499, 0.502]
    noisy_peak = [0.1, 0.5, 0.3, 0.4, 0.45, 0.49]
    assert not evaluation.plateaued(rising, 3, 0.005)
    assert evaluation.plateaued(flat, 3, 0.005)  # best of the last 3 beats 0.5 by 0.002
    assert evaluation.plateaued(noisy_peak, 3, 0.005)  # nothing beat the early best
    assert not evaluation.plateaued(flat[:3], 3, 0.005)  # too few evaluations to judge


def test_conflict_tasks_run_and_joint_rl_logs_cosines_and_the_floor(tmp_path):
    """The three new tasks from the command line, `baselines.py --stage joint --model
    tiny-conflict --tasks vivid,faded,exact --log_conflict`, tiny: every
    training row of metrics.jsonl has each pair's raw and preconditioned cosine, each task's
    split-half cosine and first-order loss change; validation rows by --eval_every."""
    out = str(tmp_path / "o")
    ok(run("--stage", "joint", "--model", "tiny-conflict", "--tasks", "vivid,faded,exact",
           "--log_conflict",
           "--optim_steps", "2", "--batch_size", "8", "--group_size", "4", "--sampler_steps", "3",
           "--eval_every", "2", "--eval_sampler_steps", "3", "--eval_prompts", "1",
           "--eval_seeds", "1", "--out", out, script="baselines.py"))
    rows = [json.loads(line) for line in open(os.path.join(out, "joint-grpo_guard",
                                                            "metrics.jsonl"))]
    train = [r for r in rows if "grad_norm" in r]
    pairs = ["vivid_faded", "vivid_exact", "faded_exact"]
    assert len(train) == 2 and all(f"cos_{p}" in r for r in train for p in pairs)
    assert all(f"cos_adam_{p}" in train[1] for p in pairs)  # Adam's state exists after a step
    assert all(f"cos_half_{t}" in r and f"dloss_{t}" in r for r in train
               for t in ("vivid", "faded")) and train[0]["lr"] > 0
    assert [r["step"] for r in rows if "val" in r] == [0, 2]
    assert set(rows[0]["val"]) == {"vivid", "faded", "exact"}
