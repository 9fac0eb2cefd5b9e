"""The 2D toy (sanity.py): its quick run and what it must show, its cost accounting, that it runs
with torch and matplotlib alone, and (slow) the whole run behind the README's toy numbers."""
import os
import subprocess
import sys
import textwrap

import pytest

import sanity
from conftest import HERE


def gains_kept(seed_rows, model):
    """Per task: the share of the teacher's gain over the base that `model` keeps, seed mean."""
    out = {}
    for k in sanity.TASKS:
        gain = [t[f"teacher-{k}"]["rewards"][k] - t["base"]["rewards"][k] for t in seed_rows]
        got = [t[model]["rewards"][k] - t["base"]["rewards"][k] for t in seed_rows]
        assert min(gain) > 0.3, (k, gain)  # every teacher learns its task
        out[k] = sum(got) / sum(gain)
    return out


def mean_avg(seed_rows, model):
    avgs = [sanity.normalised_avg({m: r["rewards"] for m, r in t.items()})[model]
            for t in seed_rows]
    return sum(avgs) / len(avgs)


def mean_reward(rows):
    return sum(sum(r.values()) / len(r) for r in rows["rewards"]) / len(rows["rewards"])


@pytest.mark.slow
def test_sanity_quick(tmp_path):
    out = sanity.main(["--quick", "--out", str(tmp_path)])
    n_fixed = 4
    for a, rel, se, _ in out["grad"][:n_fixed]:
        assert rel < 4 * se + 0.02  # PPO is unbiased ...
    rel_var = [row[3] for row in out["grad"][:n_fixed]]
    assert rel_var[-1] > 5 * rel_var[0]  # ... with a variance that grows as a shrinks (1 -> 0.1)
    traj = out["grad"][n_fixed:]
    assert (all(vp > vc for _, vc, vp in traj)
            and traj[-1][2] / traj[-1][1] > traj[0][2] / traj[0][1])
    assert all(h is not None for h in out["noise"][0.0])  # the ODE closes 90% of the gap

    rows = out["multitask"]  # short runs: OPD keeps part of every teacher's gain, more of the
    kept = gains_kept(rows, "OPD")  # sparse task's than joint or cascade RL, and leads on avg
    assert min(kept.values()) > 0.4, kept
    rl_rows = [m for m in rows[0] if m.startswith(("joint", "cascade"))]
    assert kept["mode"] > max(gains_kept(rows, m)["mode"] for m in rl_rows)
    assert mean_avg(rows, "OPD") > max(mean_avg(rows, m) for m in rl_rows)
    for lr in sanity.JOINT_LRS:  # zero-advantage shares logged per update, in [0, 1]
        log = out["res"]["joint", 0, lr]["log"]
        assert len(log) == sanity.QUICK.teacher + sanity.QUICK.rounds
        assert all(0 <= row[f"zero_adv_{k}"] <= 1 for row in log for k in sanity.TASKS)

    # costs, counted as the forwards happen: per trajectory, 9 trained states (steps 0..8) ...
    v = out["variants"]
    n = sanity.QUICK.rounds * 64 * len(sanity.TASKS)
    ours, dance, avg, off, ppo = (v[k]["count"] for k in sanity.VARIANTS)
    assert ours == {"trajectories": n, "student": n, "student with grad": 9 * n, "teacher": 9 * n}
    assert ppo == ours
    assert dance["student with grad"] == dance["teacher"] == n  # one queried state each
    assert n < dance["student"] <= 9 * n  # its rollout, without grad, to the deepest query
    assert avg["teacher"] == 3 * 9 * n  # every teacher at every state
    assert off == {"trajectories": n, "student with grad": 9 * n, "teacher": 10 * n}
    joint = out["res"]["joint", 0, sanity.JOINT_LRS[0]]["count"]  # RL: every step trained
    m = (sanity.QUICK.teacher + sanity.QUICK.rounds) * 64 * len(sanity.TASKS)
    assert joint == {"trajectories": m, "student": 10 * m, "student with grad": 10 * m}
    assert mean_reward(v["OPD (ours)"]) > mean_reward(v["teachers averaged"]) + 0.2
    assert mean_reward(v["OPD (ours)"]) > mean_reward(v["PPO-style (a=0.7)"])
    for name in ("sanity-opd.png", "sanity-multitask.png", "tables.md"):
        assert (tmp_path / name).stat().st_size > 1000, name


BLOCKER = textwrap.dedent("""
    import sys
    HEAVY = ("diffusers", "transformers", "peft", "safetensors", "scipy", "accelerate")

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError(f"{name} is not installed here")

    sys.meta_path.insert(0, Block())
""")


def test_sanity_needs_only_torch_and_matplotlib(tmp_path):
    """With diffusers, transformers, peft, safetensors, scipy and accelerate unimportable (in
    the worker processes too, through sitecustomize), sanity.py imports, runs a part on two
    workers and draws its figures."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    code = textwrap.dedent(f"""
        import sys, sanity
        from sanity import TASKS, figure_multitask, figure_opd, pretrain_base, pyplot
        sanity.main(["--part", "grad", "--quick", "--workers", "2",
                     "--out", {str(tmp_path)!r}])
        base, plt = pretrain_base(20), pyplot()
        figure_opd({str(tmp_path / "opd.png")!r}, plt, base, {{k: base for k in TASKS}}, base)
        figure_multitask({{"base": base, "other": base}},
                         {{m: {{k: 0.5 for k in TASKS}} for m in ("base", "other")}},
                         {str(tmp_path / "grid.png")!r}, plt)
        assert "matplotlib" in sys.modules
        print(sorted(m for m in sys.modules if m.split(".")[0] in
                     ("diffusers", "transformers", "peft", "safetensors", "scipy")))
    """)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{HERE}", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert "whole rollouts: var PPO / var closed" in (tmp_path / "tables.md").read_text()
    assert (tmp_path / "opd.png").exists() and (tmp_path / "grid.png").exists()


@pytest.mark.slow
def test_sanity_whole_run_shows_the_readmes_claims(tmp_path):
    """`python sanity.py` as the README runs it (5 seeds, 2 workers): the claims of its toy
    section."""
    out = sanity.main(["--out", str(tmp_path)])
    rows = out["multitask"]
    kept = gains_kept(rows, "OPD")
    assert min(kept.values()) > 0.9, kept
    assert mean_avg(rows, "OPD") > max(mean_avg(rows, m) for m in rows[0] if m != "OPD")
    v = out["variants"]
    assert mean_reward(v["OPD (ours)"]) > max(mean_reward(v[k]) for k in v if k != "OPD (ours)")
