"""The bench and the GPU check (bench.py): FLOP formula against torch's counter, saved bytes on
known graphs, and the scripts run tiny."""
import json

import pytest
import torch

import bench
from opd_support import tiny
from conftest import ok, run


@pytest.mark.slow
def test_bench_prints_flops_saved_bytes_and_memory(tmp_path):
    r = run("--rounds", "1", "--batch_size", "4", "--sampler_steps", "3", "--tasks", "color,jpeg",
            "--out", str(tmp_path), script="bench.py")
    assert r.returncode == 0, r.stderr[-2000:]
    b = json.load(open(tmp_path / "bench.json"))
    assert b["round_s_fused"] > 0 and b["round_s_two_pass"] > 0 and b["tasks"] == 2
    assert b["peak_mb_one_adapter"] > 0 and b["peak_mb_M_teachers"] > 0
    assert b["teacher_adapters_mb"] == pytest.approx(2 * b["adapter_mb"],
                                                     abs=2e-3)  # 2 teachers, 1 student shape
    assert b["round_tflop_two_pass"] > b["round_tflop_fused"] > 0 and b["tflops_fused"] > 0
    assert 0 < b["saved_mb_per_trained_step_checkpointing"] < b["saved_mb_per_trained_step"]
    assert "TFLOP/s" in r.stdout and "gradient checkpointing" in r.stdout
    r = run("--device", "meta", "--model", "sd35m-random", "--out", str(tmp_path / "meta"),
            script="bench.py")
    assert r.returncode == 0, r.stderr[-2000:]
    c = json.load(open(tmp_path / "meta" / "count.json"))
    d = c["distill"]  # SD3.5-M's transformer at 512 px, 3 trajectories x CFG: about 12 GB saved,
                      # 1 GB checkpointed
    assert (d["forward_batch"] == 6 and 5 < d["saved_gb"] < 30
            and 0.3 < d["saved_gb_checkpointing"] < 0.2 * d["saved_gb"])
    assert 4.4 < d["weights_gb"] < 4.9 and c["teacher"]["forward_batch"] == 18


def test_flop_formula_equals_flop_counter():
    """transformer_flops against torch's FlopCounterMode (meta device: shapes only) on the tiny
    transformer and on a 3-block SD3.5-M-width one with a dual-attention block: the matrix
    products exactly, attention (bmm of the decomposed SDPA) apart."""
    import bench
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode
    for c in [dict(tiny.build_offline("tiny").transformer.config),
              dict(tiny.SD35M_TRANSFORMER, num_layers=3, dual_attention_layers=(0, 1))]:
        c = {k: v for k, v in c.items() if not k.startswith("_")}
        with torch.device("meta"):
            tr = SD3Transformer2DModel(**c)
        B, side, n_txt = 2, 8, 13
        args = dict(hidden_states=torch.empty(B, 16, side, side, device="meta"),
                    timestep=torch.ones(B, device="meta"),
                    encoder_hidden_states=torch.empty(B, n_txt, c["joint_attention_dim"],
                                                      device="meta"),
                    pooled_projections=torch.empty(B, c["pooled_projection_dim"], device="meta"),
                    return_dict=False)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            tr(**args)
        counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
        lin, att = bench.transformer_flops(c, B, (side // c["patch_size"]) ** 2, n_txt)
        assert lin == (counts["aten.addmm"] + counts.get("aten.mm", 0)
                       + counts["aten.convolution"]), c["num_layers"]
        assert att == counts["aten.bmm"]


def test_saved_bytes_counts_what_backward_keeps():
    """saved_bytes on graphs whose saved tensors are known: y = x W^T (W frozen) keeps x; relu
    keeps its output; a parameter is not counted; a view of a counted storage is not counted
    twice."""
    import bench
    w = torch.nn.Parameter(torch.randn(8, 16))
    x = torch.randn(4, 16, requires_grad=True)
    with bench.saved_bytes([w]) as out:
        y = torch.relu(x @ w.t())  # mm keeps x (and w: a parameter); relu keeps y (4 x 8)
    assert out["bytes"] == x.nbytes + y.nbytes
    with bench.saved_bytes([]) as out:
        _z = (x[:2] * 2).sum() + (x[2:] * 3).sum()  # mul by a constant keeps nothing
        _q = x[:2] * x[2:]  # keeps both views of x's one storage
    assert out["bytes"] == x.nbytes


def test_counted_flops_equal_the_round_formula(tiny_sd3):
    """The per-forward count of the GPU check (a hook on the transformer) against round_flops's
    closed count of a distillation round, fused and two-pass (2 tasks, CFG 4.5)."""
    import dataclasses

    from opd_support import prompts, sd3
    m, cfg = tiny_sd3
    cfg = dataclasses.replace(cfg, tasks="color,jpeg", batch_size=2, micro_batch=0)
    tasks = [prompts.make_task(n, cfg) for n in ("color", "jpeg")]
    m.trainable = sd3.add_lora(m.tr, "student", cfg)
    try:
        for two_pass in (False, True):
            with bench.counted_flops(m.tr) as f:
                bench.one_round(dataclasses.replace(cfg, two_pass=two_pass), m, tasks,
                                lambda t: None)
            formula = bench.round_flops(cfg, dict(m.tr.config), m.pipe.vae_scale_factor, 2, 1)
            assert f["tflop"] * 1e12 == pytest.approx(formula[two_pass], rel=1e-9)
    finally:
        sd3.drop_adapters(m)


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_through_the_same_code(tmp_path):
    """`python bench.py --gpu_check`, here on the tiny model and the CPU: every stage measured,
    one JSON and one markdown table, and the round's operator profile."""
    ok(run("--gpu_check", "--model", "tiny", "--sampler_steps", "3", "--out", str(tmp_path),
           script="bench.py"))
    res = json.load(open(tmp_path / "gpu_check.json"))
    stages = [(s["stage"], s["checkpointing"]) for s in res["stages"]]
    assert stages == [("distill fused", False), ("distill two-pass", False),
                      ("distill fused", True), ("distill two-pass", True),
                      ("grpo_guard update", True), ("nft update", True)]
    for s in res["stages"]:
        assert (s["seconds"] > 0 and s["tflop"] > 0 and s["peak_allocated_gb"] > 0
                and s["samples_per_s"] > 0)
    fused, two = res["stages"][0]["tflop"], res["stages"][1]["tflop"]
    assert two > fused  # two-pass adds the no-grad rollout
    p = res["profile_fused_round"]
    assert p["operators"] > p["matmuls"] > 0 and p["casts"] >= 0 and len(p["top"]) > 0
    md = open(tmp_path / "gpu_check.md").read()
    assert md.count("| distill") == 4 and "| nft update |" in md and "MFU" in md
