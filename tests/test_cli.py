"""The command line: help on every subcommand, readable errors with exit code 2."""
import subprocess
import sys

import pytest

from medvlp.cli import main

SUBCOMMANDS = ["synth", "pretrain", "evaluate", "demo", "list"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_for_each_subcommand(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        main([sub, "--help"])
    assert exc.value.code == 0
    assert "usage: medvlp " + sub in capsys.readouterr().out


def test_bad_config_value_exits_2_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "medvlp", "pretrain", "--config", "configs/experiments/demo.yaml", "train.precision=fp8"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "train.precision: invalid value 'fp8'; allowed values: 'auto', 'fp32', 'bf16', 'fp16'" in proc.stderr


def test_unknown_key_exits_2(capsys):
    assert main(["pretrain", "--config", "configs/experiments/demo.yaml", "data.batchsize=8"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'data.batchsize'" in err and "batch_size" in err


def test_missing_manifest_is_a_readable_error(tmp_path, capsys):
    code = main(["pretrain", "--config", "configs/experiments/demo.yaml", f"data.manifest={tmp_path / 'none'}",
                 f"train.output_dir={tmp_path / 'run'}"])
    assert code == 1
    assert "manifest not found" in capsys.readouterr().err


def test_list_names_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("methods:", "clip", "encoders:", "vit", "bert", "hf", "datasets:", "synthcxr"):
        assert word in out


def test_synth_writes_a_dataset_and_reports_its_version(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["synth", "--out", str(out), "--subjects", "10", "--image-size", "32", "--workers", "1",
                 "--shards", "--shard-size", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "images (" in printed and "benchmark: none (not a frozen preset); generator 2." in printed
    assert (out / "manifest.jsonl").is_file() and (out / "shards" / "shards.json").is_file()
    assert any((out / "masks").rglob("*.png"))
    assert main(["synth", "--out", str(out), "--subjects", "0", "--no-progress"]) == 2
    assert "synth subjects: got 0" in capsys.readouterr().err


def test_compared_checkpoints_must_share_the_evaluation_inputs():
    """Checkpoints evaluated side by side get the first one's preprocessing: a second one with a
    different normalisation or patch size is refused with the field and both paths named."""
    from pathlib import Path
    from types import SimpleNamespace

    from medvlp.cli import check_comparable
    from medvlp.config import load_config
    from medvlp.errors import ConfigError

    def bundle(name, *overrides):
        return SimpleNamespace(cfg=load_config("configs/methods/clip.yaml", list(overrides)), path=Path(name))

    check_comparable([bundle("a"), bundle("b", "train.lr=1e-3", "method.name=clip")])  # training-only differences pass
    with pytest.raises(ConfigError, match=r"data\.mean: a has 0\.5 but b has 0\.4"):
        check_comparable([bundle("a"), bundle("b", "data.mean=0.4")])
    with pytest.raises(ConfigError, match=r"model\.vision\.patch_size: .* c has 4; .*evaluate them separately"):
        check_comparable([bundle("a"), bundle("b"), bundle("c", "model.vision.patch_size=4")])
