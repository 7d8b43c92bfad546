"""`mom demo` end to end with a few steps per stage: every architecture with a converter, the comparison table,
routing pictures, samples, and every checkpoint reloaded with trust_remote_code in a fresh process.

Tolerances: function-preserving conversions equal GPT-2 within 1e-5 (fp32, sums in another order); the
trust_remote_code reload gives the package model's logits within 1e-6 (the same code and weights).
"""

import json

from modeling_mom.workflows import demo
from modeling_mom.workflows.convert import converters, offers_exact


def test_demo_runs_end_to_end(tmp_path):
    steps = ["--gpt2-steps", "2", "--pretrain-steps", "2", "--glue-steps", "2", "--summarize-steps", "2"]
    rows = demo.main(["--out", str(tmp_path), *steps, "--eval-summaries", "2"])
    available = converters()
    assert [row["model"] for row in rows] == ["gpt2", *available]
    for row in rows[1:]:
        if offers_exact(available[row["model"]]):
            assert row["exact_difference"] <= 1e-5
        assert row["remote_difference"] <= 1e-6
        assert 0 < row["active_params"] < row["params"]
        for picture in ("routing.png", "routing_usage.png"):  # the heat map and the usage map
            assert (tmp_path / row["model"] / picture).is_file()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["table"].count("\n") == 1 + len(rows)  # header, rule, one line per model
    assert all(row["sample"].startswith(demo.PROBE) for row in rows)
