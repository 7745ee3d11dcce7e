"""End to end through the CLI: synth -> pretrain -> evaluate (with a random-init baseline),
and evaluation's refusal to run on subjects seen in pre-training."""
from __future__ import annotations

import json

from medvlp.cli import main
from tests.conftest import TINY


def test_synth_pretrain_evaluate(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--subjects", "24", "--image-size", "32", "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "configs/experiments/demo.yaml", *TINY, f"data.manifest={data}",
                 f"train.output_dir={run}", "train.steps=6"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--random-init", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"run", "random-init"}
    for name in ("run", "random-init"):
        m = metrics[name]
        assert 0.0 <= m["zeroshot"]["mean"] <= 1.0
        assert set(m["retrieval"]["image_to_text"]) == {"R@1", "R@5", "R@10"}
        assert len(m["linear_probe"]["fractions"]) == 3
    assert (out / "report.md").is_file() and (out / "roc.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "random-init" in printed and "report:" in printed


def test_evaluate_refuses_subject_overlap(tmp_path, tiny_dataset, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "configs/experiments/demo.yaml", *TINY, f"data.manifest={tiny_dataset}",
                 f"train.output_dir={run}", "train.steps=1"]) == 0
    capsys.readouterr()
    code = main(["evaluate", str(run), "--out", str(tmp_path / "eval"), "--overrides", "eval.split=pretrain"])
    assert code == 1
    err = capsys.readouterr().err
    assert "also appear in the pre-training data" in err and "Fix:" in err
    assert not (tmp_path / "eval" / "metrics.json").exists()
