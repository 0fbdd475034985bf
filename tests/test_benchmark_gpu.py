"""benchmarks/gpu.py --tiny: the GPU benchmark's every section runs on the CPU in seconds and writes what it
promises (the same code paths the GPU run takes, except the compiled step, which test_generate covers)."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_tiny_run_writes_every_section(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        module.main(["--tiny", "--out", str(tmp_path / "gpu.json")])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "gpu.json").read_text())
    printed = capsys.readouterr().out
    assert "## decode" in printed and "## saliency" in printed and "## one trainer update" in printed
    assert [r["batch"] for r in result["decode"]] == [1, 8]
    assert all(r["eager_tok_s"] > 0 and r["transformers_tok_s"] > 0 for r in result["decode"])
    assert [r["batch"] for r in result["saliency"]] == [2, 8]
    assert all(r["s_per_step"] > 0 and r["auto_max_batch"] == r["batch"] for r in result["saliency"])
    b = result["bf16"]
    rhos = b["saliency_spearman_bf16_vs_f32"]
    assert len(rhos) == 2 and all(-1 <= r <= 1 for r in rhos)
    assert 0.99 < b["first_pass_ratio_min"] <= b["first_pass_ratio_max"] < 1.01  # float32 model: ratio 1
    assert [r["ok"] for r in b["masked_backward"]] == [True] * 3
    u = result["update"]
    assert u["rollouts"] == 64 and u["rollout_s"] > 0 and u["update_s"] > 0
    assert u["paper_run_hours_1gpu"] > u["paper_run_hours_8gpu"] > 0
