"""The AMVLM / MGCA vision-language model (SPEC sections 2-4): architecture only.

Holds the image encoder (ViT), the text encoder (BERT), a global and a local
projection head per modality, the four PDT heads of AMVLM (word, word
context, patch, patch context: SPEC deviation 5 gives the patch context its
own head) and, for the 'mgca' objective, the bias-free prototype layer.
The losses live in ``amvlm_jax.losses`` and are combined by
``amvlm_jax.train.pretrain``.

Parameter tree (top level): image_encoder, text_encoder, image_global_head,
image_local_head, text_global_head, text_local_head, then pdt_word,
pdt_word_ctx, pdt_patch, pdt_patch_ctx (objective 'amvlm') or prototypes
(objective 'mgca', a Dense(K) without bias whose kernel (D, K) holds one
prototype per column).

Shapes: B batch, P patches, L tokens, W = L - 1 word slots, D embed_dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from amvlm_jax.losses.contrastive import PDTOutputs, cross_modal_contexts
from amvlm_jax.models.bert import Bert, BertConfig, aggregate_words
from amvlm_jax.models.heads import GlobalHead, LocalHead
from amvlm_jax.models.pdt import PDTHead
from amvlm_jax.models.vit import ViT

OBJECTIVES = ("amvlm", "mgca")
# Modules that make up the momentum encoders of ICL (SPEC 3.4).
ENCODER_MODULES = (
    "image_encoder",
    "text_encoder",
    "image_global_head",
    "image_local_head",
    "text_global_head",
    "text_local_head",
)
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "word_index", "word_mask")


class AMVLM(nn.Module):
    """Dual encoder with projection, PDT and prototype heads.

    Attributes:
      image_encoder: a ``ViT`` (its fields set width, depth, patch size ...).
      text_config: ``BertConfig`` of the text encoder.
      embed_dim: D, the shared embedding size (128).
      head_hidden: hidden width of the projection heads (2048).
      objective: 'amvlm' (PDT heads) or 'mgca' (prototype layer).
      num_prototypes: K of the prototype layer ('mgca').
      pdt_heads, pdt_dropout: attention heads and dropout of the PDT heads.
      temperature: tau of the word/patch context attention fed to the PDT heads.
      dtype: compute dtype; embeddings come out float32.
      remat: rematerialise the text encoder's layers.

    Dropout (BERT, PDT) is active when ``train`` is True and then needs a
    'dropout' rng; BatchNorm uses batch statistics when ``train`` is True
    (apply with ``mutable=['batch_stats']``).
    """

    image_encoder: ViT
    text_config: BertConfig
    embed_dim: int = 128
    head_hidden: int = 2048
    objective: str = "amvlm"
    num_prototypes: int = 500
    pdt_heads: int = 8
    pdt_dropout: float = 0.1
    temperature: float = 0.07
    dtype: Any = jnp.float32
    remat: bool = False
    one_hot_embedding_grad: bool = False  # Text embedding tables' gradients as one-hot matmuls (bert.Embedding).

    def setup(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        self.text_encoder = Bert(self.text_config, self.dtype, self.remat, self.one_hot_embedding_grad)
        head = dict(hidden=self.head_hidden, out=self.embed_dim, dtype=self.dtype)
        self.image_global_head = GlobalHead(**head)
        self.image_local_head = LocalHead(**head)
        self.text_global_head = GlobalHead(**head)
        self.text_local_head = LocalHead(**head)
        if self.objective == "amvlm":
            pdt = dict(dim=self.embed_dim, num_heads=self.pdt_heads, dropout=self.pdt_dropout, dtype=self.dtype)
            self.pdt_word = PDTHead(**pdt)
            self.pdt_word_ctx = PDTHead(**pdt)
            self.pdt_patch = PDTHead(**pdt)
            self.pdt_patch_ctx = PDTHead(**pdt)
        else:
            self.prototypes = nn.Dense(self.num_prototypes, use_bias=False, dtype=jnp.float32)

    def encode_image(self, images: jnp.ndarray, train: bool) -> dict:
        """images (B, H, W, 3) float in [0, 1] -> dict:
        v (B, D) unit-norm image (CLS) embedding, V (B, P, D) unit-norm patch
        embeddings, patch_attention (B, P) float32 CLS-to-patch attention,
        cls (B, F) the encoder's [CLS] features (linear probes)."""
        features = self.image_encoder(images, train)
        return {
            "cls": features["cls"],
            "v": self.image_global_head(features["cls"], train),
            "V": self.image_local_head(features["patches"], train),
            "patch_attention": features["cls_attention"].astype(jnp.float32),
        }

    def encode_text(self, tokens: dict, train: bool) -> dict:
        """tokens: ``ReportTokenizer`` arrays (input_ids, attention_mask,
        token_type_ids, word_index (B, L); word_mask (B, W)) -> dict:
        t (B, D) unit-norm report (CLS) embedding; T (B, W, D) unit-norm word
        embeddings, exactly zero at padding slots; T_unmasked (B, W, D) the same before
        the padding slots are zeroed (there: the head's output for their zero feature,
        MGCA's word-side candidates, SPEC 4); word_mask (B, W) float32;
        word_attention (B, W) float32 CLS attention summed over each word's pieces."""
        features = self.text_encoder(
            tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"], deterministic=not train
        )
        word_mask = tokens["word_mask"].astype(jnp.float32)
        num_words = word_mask.shape[1]
        words, word_attention = aggregate_words(
            features["hidden"], features["cls_attention"], tokens["word_index"], num_words
        )
        T_unmasked = self.text_local_head(words, train)
        return {
            "t": self.text_global_head(features["hidden"][:, 0], train),
            "T": T_unmasked * word_mask[..., None],
            "T_unmasked": T_unmasked,
            "word_mask": word_mask,
            "word_attention": word_attention.astype(jnp.float32) * word_mask,
        }

    def __call__(self, images: jnp.ndarray, tokens: dict, train: bool, with_pdt: bool = True) -> dict:
        """Both modalities plus the objective's heads.

        Returns the union of ``encode_image`` and ``encode_text`` and, for
        'amvlm': word_context (B, W, D) unit-norm and patch_context (B, P, D)
        unnormalised (``cross_modal_contexts`` at ``temperature``, SPEC 3.2;
        the patch context PDT head sees it as is) and, when ``with_pdt``,
        word_pdt / patch_pdt ``PDTOutputs`` (each field (B, W|P, D)); for
        'mgca': image_prototype_scores and text_prototype_scores (B, K).
        """
        outputs = self.encode_image(images, train) | self.encode_text(tokens, train)
        if self.objective == "amvlm":
            word_context, patch_context = cross_modal_contexts(
                outputs["T"], outputs["V"], outputs["word_mask"], self.temperature
            )
            outputs |= {"word_context": word_context, "patch_context": patch_context}
            if with_pdt:
                deterministic = not train
                word_mask = outputs["word_mask"]
                patch_mask = jnp.ones(outputs["V"].shape[:2], jnp.float32)
                outputs["word_pdt"] = PDTOutputs(
                    *self.pdt_word(outputs["T"], word_mask, deterministic),
                    *self.pdt_word_ctx(word_context, word_mask, deterministic),
                )
                outputs["patch_pdt"] = PDTOutputs(
                    *self.pdt_patch(outputs["V"], patch_mask, deterministic),
                    *self.pdt_patch_ctx(patch_context, patch_mask, deterministic),
                )
        else:
            outputs["image_prototype_scores"] = self.prototypes(outputs["v"])
            outputs["text_prototype_scores"] = self.prototypes(outputs["t"])
        return outputs
