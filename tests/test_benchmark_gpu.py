"""benchmarks/gpu.py --tiny: every section of the GPU benchmark runs on the CPU in seconds, through the same code
paths as on a GPU (the compiled decode step under the aot_eager backend instead of inductor + CUDA graphs), and
writes what it promises."""

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
        torch._dynamo.reset()
    result = json.loads((tmp_path / "gpu.json").read_text())
    printed = capsys.readouterr().out
    for section in module.SECTIONS:
        assert f"## {section}" in printed and section in result
    assert result["mode"] == "tiny" and result["skipped"] == []

    kernels = {r["call"].split(",")[0]: r for r in result["kernels"]}
    assert set(kernels) == {"prefill", "decode step", "mask optimisation step (forward + backward into the mask)",
                            "training forward (sequence_logprobs)"}
    assert all("sdpa" in r["kernel"] for r in kernels.values())  # off CUDA, auto is the SDPA reference

    # The trainer's and the evaluations' own calls: rollout -> held-out eval (a call of 4 rows and a last chunk of
    # 2) -> Table 1 (16 rows) -> rollout -> eval -> rollout: graphs for the first rollout and eval only.
    assert [r["call"] for r in result["compile"]] == ["rollout", "held-out eval", "Table 1 batch", "rollout",
                                                      "held-out eval", "rollout"]
    compiled = [r["graphs_compiled"] for r in result["compile"]]
    assert compiled[0] >= 1 and compiled[1] >= 1 and compiled[2:] == [0] * 4
    assert result["compile"][-1]["caches"] == "16 x 256, 4 x 256"

    decode = result["decode"]
    assert [r["batch"] for r in decode] == [1, 8]
    assert all(r["compiled_tok_s"] > 0 and r["timed_call"]["graphs_compiled"] == 0 for r in decode)
    assert all(r["same_tokens_rows"] == f"{r['batch']}/{r['batch']}" for r in decode)

    rows = {(r["kernel"], r["batch"], r["cot"]): r for r in result["saliency"]}
    assert "backward on CPU" in rows[("flex", 2, 12)]["error"]  # eager flex has no CPU backward: reported
    assert all(rows[k]["s_per_step"] > 0 for k in rows if k[0] != "flex")
    assert all(r["auto_max_batch"] == r["batch"] for r in rows.values())

    u = result["update"]
    assert u["rollouts"] == 16 and u["rollout_s"] > 0 and u["update_s"] > 0 and u["saliency_s_per_step"] > 0
    assert 0.99 < u["first_pass_ratio_min"] <= u["first_pass_ratio_max"] < 1.01  # float32 model: ratio 1
    assert u["paper_run_hours_1gpu"] > 0 and u["paper_run_hours_8gpu"] > 0  # CPU timings: no ordering to expect

    assert result["eval1"]["rows"] == 16 and result["eval1"]["seconds"] > 0
    b = result["bf16"]
    rhos = b["saliency_spearman_bf16_vs_f32"]
    assert len(rhos) == 2 and all(-1 <= r <= 1 for r in rhos)
    assert [r["ok"] for r in b["masked_backward"]] == [True] * 3


def test_a_failing_section_is_reported_and_the_others_run(tmp_path, capsys):
    """A section that fails on a card (here decode, made to raise) is written as its error; later sections still run
    and the JSON is written."""
    spec = importlib.util.spec_from_file_location("gpu_benchmark_failing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this card")

    module.bench_decode = broken
    threads = torch.get_num_threads()
    try:
        module.main(["--tiny", "--sections", "decode", "eval1", "--out", str(tmp_path / "gpu.json")])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["decode"] == {"error": "RuntimeError: no kernel for this card"}
    assert result["eval1"]["seconds"] > 0
    assert "FAILED: RuntimeError: no kernel for this card" in capsys.readouterr().out
