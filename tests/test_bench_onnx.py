"""tools/bench_onnx.py --parts layers: each whole-layer variant runs in its own process, is
checked against PyTorch, and reports time and peak RSS (or why onnxruntime could not run it)."""

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_onnx.py"


def test_layer_part_measures_opset_23_attention_and_fused_ort(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--parts", "layers", "--lengths", "512",
                           "--runs", "1", "--warmup", "0", "--opset", "18", "23",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["layers"]}
    assert rows["dense export, opset 23"]["attention_ops"] == ["Attention"]
    assert "Attention" not in rows["dense export, opset 18"]["attention_ops"]
    assert rows["onnxruntime MultiHeadAttention (fused)"]["attention_ops"] == [
        "MultiHeadAttention"]
    for name in ("dense export, opset 18", "dense export, opset 23",
                 "onnxruntime MultiHeadAttention (fused)", "sparsec gathered"):
        r = rows[name]
        assert r["max_rel_err"] <= 1e-4 and r["median_ms"] > 0, name
        assert r["peak_rss_bytes"] >= r["baseline_rss_bytes"] > 0, name
    contrib = rows["sparsec contrib (SparseAttention)"]
    assert "median_ms" in contrib or contrib["error"]  # a refusal says why


def test_bad_opset_exits_2():
    proc = subprocess.run([sys.executable, str(TOOL), "--parts", "layers", "--opset", "17"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "choose opsets 18 to 23" in proc.stderr
