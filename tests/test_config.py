"""Config loading, includes, dotted overrides and validation messages."""
import pytest

from medvlp.config import apply_overrides, build_config, load_config, load_yaml
from medvlp.errors import ConfigError
from medvlp.methods.clip import ClipConfig


def test_demo_config_loads_with_include_and_overrides():
    cfg = load_config("configs/experiments/demo.yaml", ["train.lr=2e-3", "model.vision.depth=2", "method.local_loss=true"])
    assert cfg.name == "demo"
    assert isinstance(cfg.method, ClipConfig)
    assert cfg.method.local_loss is True
    assert cfg.train.lr == pytest.approx(2e-3)
    assert cfg.model.vision.depth == 2
    # from the included method recipe, not overridden by the experiment
    assert cfg.model.vision.patch_size == 8
    assert cfg.model.vision.image_size // cfg.model.vision.patch_size >= 8


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.bogus=1", "unknown config key 'train.bogus'; allowed keys in train: steps, lr"),
        ("train.precision=fp8", "train.precision: invalid value 'fp8'; allowed values: 'auto', 'fp32', 'bf16', 'fp16'"),
        ("method.name=nonexistent", "method.name: invalid value 'nonexistent'; allowed values: clip"),
        ("method.projection=conv", "method.projection: invalid value 'conv'; allowed values: 'linear', 'mlp'"),
        ("model.vision.patch_size=7", "model.vision.image_size (64) must be a multiple of model.vision.patch_size (7)"),
        ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
        ("model.text.name=hf", "model.text.path: required"),
        ("eval.tasks=[zeroshot,captioning]", "eval.tasks[1]: invalid value 'captioning'"),
        ("eval.segmentation_encoder=tuned", "eval.segmentation_encoder: invalid value 'tuned'"),
        ("method.init_temperature=2", "method.init_temperature: must be within (0, 1)"),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(override, expected):
    with pytest.raises(ConfigError) as exc:
        load_config("configs/experiments/demo.yaml", [override])
    assert expected in str(exc.value)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_overrides({}, ["train.lr"])


def test_include_cycle_detected(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml(tmp_path / "a.yaml")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_defaults_build_without_file():
    cfg = build_config({})
    assert cfg.method.name == "clip" and cfg.train.steps > 0
