"""Uni-Mlip: unified self-supervision (METHODS.md section 4) = SLIP + feature-level ITC + SimCSE + fusion.

One step, all samples paired, six terms besides the data-level ITC:

- cross-modality, data level: CLIP's symmetric InfoNCE (learned logit scale, identical reports
  not negatives) between the *augmented* view 1 of each image and its *augmented* report
  (:func:`augment_report` on the token ids: whole-word dropout ``txt_aug_word_drop`` that never
  drops a negation or uncertainty cue, a number or a ".", and a sentence-order shuffle
  ``txt_aug_shuffle_sentences``, "." ending a sentence unless it sits between two digits);
- cross-modality, feature level (``feat_weight``): the same loss on perturbed features before the
  projections, no extra encoder pass. ``feat_perturbation: noise``: Gaussian noise on the pooled
  features (:func:`medvlp.models.augment.feature_noise`, ``feat_noise_std`` times each row's
  feature std); ``token_dropout``: each last-layer token state but [CLS] is dropped with
  probability ``feat_token_drop`` and the kept ones are mean-pooled (:func:`token_dropout_pool`);
- image uni-modality, data level (``ssl_weight``, SLIP's key and head): NT-Xent between two
  medical-safe views (:func:`medvlp.models.augment.random_view`); view 1 is the one the ITC sees,
  so SLIP's third image pass is saved;
- image uni-modality, feature level (``ssl_feat_weight``): NT-Xent, through the same head, between
  view 1's pooled feature and its perturbed copy (the one the feature-level ITC uses);
- text uni-modality (``txt_ssl_weight``): SimCSE, NT-Xent between two dropout passes of the text
  encoder on the same (augmented) report (pooled features, ``txt_ssl_temperature``, identical
  reports not negatives). When the text tower has no dropout (``model.text.dropout: 0``) the
  second pass would be identical, so dropout ``txt_feat_dropout`` is applied to the pooled
  features instead;
- fused modality: the co-attention fusion encoder of M3AE (:class:`~medvlp.methods.m3ae.FusionHeads`)
  over view 1's [CLS] + patch tokens and the MLM-corrupted (un-augmented) report:
  image-conditioned MLM (``mlm_weight``, head tied to the text input embeddings) and ITM
  (``itm_weight``) with one hard negative per image and per report drawn from the detached ITC
  similarity (ALBEF-style).

L = L_ITC + feat_weight L_ITC~ + ssl_weight L_NT-Xent + ssl_feat_weight L_NT-Xent~ + txt_ssl_weight L_SimCSE
+ itm_weight L_ITM + mlm_weight L_MLM; a weight of 0 skips that branch's compute (and its parameters
are not built). Cost: two image passes (2B rows), one text pass over up to 3B rows (augmented
report, its dropout twin, the masked report), one depth-1 fusion pass plus a [CLS]-only one for
the ITM negatives; the report augmentation and the feature-level terms add only (B, L) index work
and one B-row head pass. Evaluation: a dual encoder like CLIP (``encode_image`` / ``encode_text`` /
``patch_embeddings`` inherited, never augmented); the fusion encoder is a pre-training device only
(and gives the VQA features).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from medvlp.errors import ConfigError
from medvlp.losses.knowledge import PhraseTable, find_mentions
from medvlp.losses.selfsup import nt_xent
from medvlp.methods.clip import text_hashes
from medvlp.methods.m3ae import FusionConfig, FusionHeads, MaskedViews
from medvlp.methods.slip import Slip, SlipConfig
from medvlp.models.augment import feature_noise, random_view
from medvlp.registry import METHODS

# Words the report augmentation never drops: removing a negation ("no effusion" -> "effusion"),
# an uncertainty hedge ("possible pneumonia" -> "pneumonia") or a resolution ("effusion has
# resolved") would turn the report into a claim the image contradicts. Matched as whole words.
PROTECTED_WORDS = (
    "no", "not", "without", "negative", "absent", "absence", "none", "neither", "nor", "never", "cannot",
    "free", "denies", "exclude", "excluded", "resolved", "resolution", "removed", "cleared",
    "possible", "possibly", "probable", "probably", "likely", "unlikely", "may", "might", "could",
    "questionable", "suspected", "suspicious", "versus", "vs", "uncertain", "concern", "differential",
)


def protected_spellings(tokenizer) -> list[list[int]]:
    """Token ids of every :data:`PROTECTED_WORDS` entry in each casing a report may use ("no",
    "No pneumothorax.", "NO"): a cased tokenizer gives each its own ids, a lowercasing one the
    same ids, kept once."""
    spellings = dict.fromkeys(tuple(tokenizer(v, add_special_tokens=False)["input_ids"])
                              for w in PROTECTED_WORDS for v in (w, w.capitalize(), w.upper()))
    return [list(ids) for ids in spellings if ids]


def text_tower_dropout(text) -> float:
    """The dropout probability of a text tower (``model.config`` of the Hugging Face model inside,
    BERT's ``hidden_dropout_prob`` and the like; 0 when it names none)."""
    conf = getattr(getattr(text, "model", None), "config", None)
    values = [getattr(conf, k, None) for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout",
                                                "attention_dropout")]
    return float(max((v for v in values if isinstance(v, (int, float))), default=0.0))


def token_dropout_pool(tokens: torch.Tensor, padding_mask: torch.Tensor | None, prob: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Feature-level token dropout: the mean over a random subset of token states.

    tokens: (B, N, D) last-layer token states, position 0 the [CLS] state (always kept).
    padding_mask: (B, N) bool, True = padding (never counted), or None.
    prob: the probability of dropping each other token, in [0, 1).
    Returns (B, D): per row, the mean of the kept non-padding tokens. Differentiable in ``tokens``
    (a dropped token gets no gradient); with ``prob`` 0 it is the plain masked mean.
    """
    b, n = tokens.shape[:2]
    keep = torch.rand(b, n, generator=generator).to(tokens.device) >= prob
    keep[:, 0] = True
    if padding_mask is not None:
        keep &= ~padding_mask
    weights = keep.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1)


def augment_report(input_ids: torch.Tensor, attention_mask: torch.Tensor, word_ids: torch.Tensor, *,
                   pad_id: int, word_drop: float = 0.0, protected: torch.Tensor | None = None,
                   boundaries: torch.Tensor | None = None, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A data-level view of tokenised reports: whole-word dropout, then a sentence-order shuffle.

    input_ids, attention_mask, word_ids: (B, L) as the collator makes them (``word_ids`` -1 for
    [CLS], [SEP] and padding; padding at the end).
    word_drop: each word is dropped with this probability (all its tokens together), except the
    words holding a token flagged in ``protected`` (B, L) bool; a row that would lose every word
    keeps them all.
    boundaries: (B, L) bool, True on the token that ends a sentence (e.g. "."); when given, the
    sentences of each row are put in a random order (the tokens after the last boundary form the
    last sentence). None: the order is kept.
    Returns (input_ids, attention_mask, word_ids), (B, L): the kept tokens packed to the left in
    the new order, the leading and trailing special tokens where they were relative to the words
    ([CLS] first, [SEP] right after the last word), then padding (``pad_id``, mask 0, word id -1).
    """
    b, length = input_ids.shape
    device = input_ids.device
    real = word_ids >= 0
    word = word_ids.clamp(min=0)
    valid = attention_mask.bool()
    drop = torch.zeros_like(real)
    if word_drop > 0:
        # the decision for word w of a row is draw[row, w]: every token of the word shares it
        drop_word = torch.rand(b, length, generator=generator).to(device) < word_drop
        if protected is not None:
            guarded = torch.zeros(b, length, device=device).scatter_reduce(
                1, word, (protected & real).float(), reduce="amax", include_self=True) > 0
            drop_word &= ~guarded
        drop = real & drop_word.gather(1, word)
        drop &= ~(drop.sum(dim=1, keepdim=True) == real.sum(dim=1, keepdim=True))
    keep = valid & ~drop
    # sort keys: leading specials 0, words 1 + their sentence's random rank, trailing specials
    # length + 1, dropped tokens and padding length + 2; a stable sort keeps each sentence's order
    sentence_rank = torch.zeros(b, length, dtype=torch.long, device=device)
    if boundaries is not None:
        ends = boundaries & real
        sentence = ends.long().cumsum(dim=1) - ends.long()  # a boundary token belongs to its sentence
        order = torch.rand(b, length, generator=generator).to(device).argsort(dim=1)  # a permutation per row
        sentence_rank = order.gather(1, sentence)
    leading = real.long().cumsum(dim=1) == 0
    key = torch.where(real, 1 + sentence_rank, torch.where(leading, 0, length + 1))
    key = torch.where(keep, key, length + 2)
    perm = key.argsort(dim=1, stable=True)
    kept = keep.gather(1, perm)
    ids = torch.where(kept, input_ids.gather(1, perm), pad_id)
    words = torch.where(kept, word_ids.gather(1, perm), -1)
    return ids, kept.to(attention_mask.dtype), words


@dataclass
class UniMlipConfig(SlipConfig, FusionConfig):
    name: str = "unimlip"
    txt_aug_word_drop: float = 0.1          # data-level report view: whole-word dropout (cues kept)
    txt_aug_shuffle_sentences: bool = True  # data-level report view: random sentence order
    feat_weight: float = 1.0                # feature-level ITC on perturbed features
    feat_perturbation: Literal["noise", "token_dropout"] = "noise"  # the feature-level perturbation
    feat_noise_std: float = 0.1             # noise std, relative to each feature row's std
    feat_token_drop: float = 0.25           # token_dropout: probability of dropping each token but [CLS]
    ssl_feat_weight: float = 0.5            # image NT-Xent: view 1 against its perturbed features
    txt_ssl_weight: float = 0.5             # SimCSE on the reports
    txt_ssl_temperature: float = 0.05       # SimCSE's temperature
    txt_feat_dropout: float = 0.1           # pooled-feature dropout for SimCSE when model.text.dropout is 0
    mlm_weight: float = 1.0                 # image-conditioned MLM through the fusion encoder

    def validate(self, prefix: str) -> None:
        SlipConfig.validate(self, prefix)
        FusionConfig.validate(self, prefix)
        for key in ("feat_weight", "ssl_feat_weight", "txt_ssl_weight", "mlm_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}: must be >= 0 (0 turns the branch off), got {getattr(self, key)}")
        if not 0.0 <= self.txt_aug_word_drop <= 0.5:
            raise ConfigError(f"{prefix}.txt_aug_word_drop: must be within [0, 0.5] (0 = no word dropout; "
                              f"0.1 drops one word in ten), got {self.txt_aug_word_drop}")
        if not self.feat_noise_std > 0:
            raise ConfigError(f"{prefix}.feat_noise_std: must be > 0 (set feat_weight and ssl_feat_weight to 0 to "
                              f"turn the feature-level terms off), got {self.feat_noise_std}")
        if not 0.0 < self.feat_token_drop < 1.0:
            raise ConfigError(f"{prefix}.feat_token_drop: must be within (0, 1) (the share of token states "
                              f"dropped before pooling), got {self.feat_token_drop}")
        if not self.txt_ssl_temperature > 0:
            raise ConfigError(f"{prefix}.txt_ssl_temperature: must be > 0 (SimCSE uses 0.05), got {self.txt_ssl_temperature}")
        if not 0.0 <= self.txt_feat_dropout < 1.0:
            raise ConfigError(f"{prefix}.txt_feat_dropout: must be within [0, 1), got {self.txt_feat_dropout}")


@METHODS.register("unimlip", UniMlipConfig,
                  "Uni-Mlip: cross-, uni- and fused-modality self-supervision at data and feature level")
class UniMlip(FusionHeads, Slip):
    # MLM predicts the words of the project's tokenizer
    needs_tokenizer = True

    def __init__(self, cfg, tokenizer, *, load_text_weights: bool = True):
        super().__init__(cfg, tokenizer, load_text_weights=load_text_weights)
        m: UniMlipConfig = self.cfg
        self.fusion = self.mlm_head = self.itm_head = None
        if m.itm_weight > 0 or m.mlm_weight > 0:
            self.build_fusion(m, tokenizer, mlm=m.mlm_weight > 0)
        else:  # no fusion encoder: VQA falls back to dual (image + question) features
            self.vqa_features = None
        tower_dropout = text_tower_dropout(self.text)
        if m.txt_ssl_weight > 0 and tower_dropout == 0 and m.txt_feat_dropout == 0:
            raise ConfigError("method.txt_feat_dropout: the text tower has no dropout (model.text.dropout is 0, or "
                              "the Hugging Face model's config sets none), so SimCSE's two views need "
                              "txt_feat_dropout > 0 (e.g. 0.1), or set method.txt_ssl_weight: 0")
        # two real dropout passes when the tower has dropout (an HF model's comes from its own config)
        self.text_dropout_passes = tower_dropout > 0
        self._build_report_augmentation(m, tokenizer)

    def uses_ssl_head(self) -> bool:
        # the data-level SimCLR term and the feature-level image term share the head
        return self.cfg.ssl_weight > 0 or self.cfg.ssl_feat_weight > 0

    def _build_report_augmentation(self, m: UniMlipConfig, tokenizer) -> None:
        """The tokenizer's ids the report augmentation needs: protected words, "." and digits."""
        vocab = tokenizer.get_vocab()
        self.pad_id = tokenizer.pad_token_id
        self.protected_words = PhraseTable.build([(ids, 0) for ids in protected_spellings(tokenizer)])
        self.period_id = vocab.get(".")
        if m.txt_aug_shuffle_sentences and self.period_id is None:
            raise ConfigError("method.txt_aug_shuffle_sentences: the tokenizer has no '.' token, so sentence "
                              "boundaries are unknown; set it to false")
        # digit pieces: never dropped (measurements), and a "." between two of them is a decimal point
        digits = sorted(i for t, i in vocab.items() if t.removeprefix("##").isdigit())
        self.register_buffer("digit_ids", torch.tensor(digits, dtype=torch.long), persistent=False)

    def augment_text(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The data-level view of the batch's reports (input_ids, attention_mask), see :func:`augment_report`."""
        m = self.cfg
        if m.txt_aug_word_drop == 0 and not m.txt_aug_shuffle_sentences:
            return batch.input_ids, batch.attention_mask
        if batch.word_ids is None:
            raise ValueError("the report augmentation needs batch.word_ids (the collator provides them for every "
                             "report); or set method.txt_aug_word_drop: 0 and txt_aug_shuffle_sentences: false")
        ids = batch.input_ids
        digit = torch.isin(ids, self.digit_ids)
        period = ids == (-1 if self.period_id is None else self.period_id)
        # cue words, numbers and sentence ends stay: a negation's scope never runs into the next sentence
        protected = (find_mentions(ids, batch.word_ids, self.protected_words) >= 0) | digit | period
        boundaries = None
        if m.txt_aug_shuffle_sentences:
            decimal = F.pad(digit, (1, 0))[:, :-1] & F.pad(digit, (0, 1))[:, 1:]
            boundaries = period & ~decimal
        aug_ids, aug_mask, _ = augment_report(ids, batch.attention_mask, batch.word_ids, pad_id=self.pad_id,
                                              word_drop=m.txt_aug_word_drop, protected=protected,
                                              boundaries=boundaries)
        return aug_ids, aug_mask

    def _perturb(self, pooled: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """The feature-level view of pooled features (B, D); ``tokens`` (B, N, D) start with [CLS]."""
        m = self.cfg
        if m.feat_perturbation == "noise":
            return feature_noise(pooled, m.feat_noise_std)
        return token_dropout_pool(tokens, padding, m.feat_token_drop)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        terms, scale = self.loss_terms(batch)
        loss = sum(weight * term for weight, term in terms.values())
        return {"loss": loss, **{f"loss_{k}": term.detach() for k, (_, term) in terms.items()},
                "logit_scale": scale.detach()}

    def loss_terms(self, batch) -> tuple[dict[str, tuple[float, torch.Tensor]], torch.Tensor]:
        """Every term as (weight, loss) by name, and the logit scale; :meth:`forward` sums them."""
        m, b = self.cfg, len(batch)
        if batch.has_text is not None and not bool(batch.has_text.all()):
            raise ValueError("UniMlip needs a report for every sample; filter image-only samples "
                             "(data.sources of kind 'paired' only) or use a semi-supervised method")
        n_views = 2 if m.ssl_weight > 0 else 1
        vis = self.vision(torch.cat([random_view(batch.images, self.views) for _ in range(n_views)]))

        # one text pass: the augmented report, its dropout twin (SimCSE) and the MLM-corrupted report
        aug_ids, aug_mask = self.augment_text(batch)
        ids, att = [aug_ids], [aug_mask]
        twin = m.txt_ssl_weight > 0 and self.text_dropout_passes
        if twin:
            ids.append(aug_ids)
            att.append(aug_mask)
        mlm_labels = None
        if self.mlm_head is not None:
            masked_ids, mlm_labels = self.mlm_spec.mask(batch.input_ids, batch.word_ids, m.text_mask_prob)
            ids.append(masked_ids)
            att.append(batch.attention_mask)
        txt = self.text(torch.cat(ids), torch.cat(att))
        pooled_v, pooled_t = vis.pooled[:b], txt.pooled[:b]

        keys = text_hashes(batch.texts, pooled_v.device) if m.mask_identical_texts else None
        scale = self.scale()
        img_e = F.normalize(self.image_proj(pooled_v), dim=-1)
        txt_e = F.normalize(self.text_proj(pooled_t), dim=-1)
        terms = {"clip": (1.0, self.loss_fn(img_e, txt_e, scale, pair_keys=keys))}
        perturbed_v = None
        if m.feat_weight > 0 or m.ssl_feat_weight > 0:
            perturbed_v = self._perturb(pooled_v, torch.cat([pooled_v[:, None], vis.tokens[:b]], dim=1), None)
        if m.feat_weight > 0:
            padding_t = None if txt.padding_mask is None else txt.padding_mask[:b]
            perturbed_t = self._perturb(pooled_t, txt.tokens[:b], padding_t)
            noisy_v = F.normalize(self.image_proj(perturbed_v), dim=-1)
            noisy_t = F.normalize(self.text_proj(perturbed_t), dim=-1)
            terms["feat"] = (m.feat_weight, self.loss_fn(noisy_v, noisy_t, scale, pair_keys=keys))
        if self.ssl_head is not None:
            z = self.ssl_head(torch.cat([vis.pooled] + ([perturbed_v] if m.ssl_feat_weight > 0 else [])))
            if m.ssl_weight > 0:
                terms["ssl"] = (m.ssl_weight, nt_xent(z[:b], z[b:2 * b], m.ssl_temperature))
            if m.ssl_feat_weight > 0:
                terms["ssl_feat"] = (m.ssl_feat_weight, nt_xent(z[:b], z[-b:], m.ssl_temperature))
        if m.txt_ssl_weight > 0:
            if twin:
                t1, t2 = pooled_t, txt.pooled[b:2 * b]
            else:  # a dropout-free tower: SimCSE's two views come from dropout on the pooled features
                t1, t2 = (F.dropout(pooled_t, m.txt_feat_dropout, training=True) for _ in range(2))
            terms["txt_ssl"] = (m.txt_ssl_weight, nt_xent(t1, t2, m.txt_ssl_temperature, pair_keys=keys))
        if self.fusion is not None:
            terms.update(self._fused_terms(batch, vis, txt, img_e, txt_e, scale, mlm_labels))
        return terms, scale

    def _fused_terms(self, batch, vis, txt, img_e, txt_e, scale, mlm_labels) -> dict:
        """MLM and ITM through the fusion encoder over view 1's tokens and the masked report (without
        MLM: the last text rows, the augmented report or its dropout twin)."""
        from medvlp.models.heads import masked_lm_loss
        from medvlp.models.output import EncoderOutput

        m, b = self.cfg, len(batch)
        rows = slice(txt.pooled.shape[0] - b, None)  # the masked copy is last
        text_out = EncoderOutput(txt.pooled[rows], txt.tokens[rows],
                                 None if txt.padding_mask is None else txt.padding_mask[rows])
        image_out = EncoderOutput(vis.pooled[:b], vis.tokens[:b])
        image_seq = self.image_to_fusion(torch.cat([image_out.pooled[:, None], image_out.tokens], dim=1))
        views = MaskedViews(image_out, text_out, mlm_labels, image_seq, self.text_to_fusion(text_out.tokens),
                            text_out.padding_mask)
        fused_img, fused_txt = self.fusion(views.image_seq, views.text_seq, views.text_padding)
        terms = {}
        if mlm_labels is not None:
            terms["mlm"] = (m.mlm_weight, masked_lm_loss(self.mlm_head, fused_txt, mlm_labels))
        if self.itm_head is not None:
            sim = (img_e.float() @ txt_e.float().t() * scale).detach()  # ALBEF: hard negatives by similarity
            terms["itm"] = (m.itm_weight, self._itm_loss(batch, views, fused_img, fused_txt, sim))
        return terms


__all__ = ["PROTECTED_WORDS", "UniMlip", "UniMlipConfig", "augment_report", "protected_spellings",
           "text_tower_dropout", "token_dropout_pool"]
