"""Model ports in Flax NNX with transformers-layout weights: CLIP dual encoders, BLIP retrieval, a BERT
masked LM."""

from mat_jax.checks import check_token_ids
from mat_jax.models.bert import BERT_PRESETS, BertConfig, BertForMaskedLM, bert_config
from mat_jax.models.blip import BLIP, BLIP_PRESETS, BlipConfig, blip_config, load_blip, save_blip
from mat_jax.models.clip import (CLIP, PRESETS, CLIPConfig, TextConfig, VisionConfig, check_pixels, check_text,
                                 clip_config, feature_products, l2_normalize)
from mat_jax.models.dual_encoder import DualEncoder, split
from mat_jax.models.tokenizers import TokenBatch, Tokenizer, load_tokenizer
from mat_jax.models.weights import load_bert_mlm, load_clip, save_bert_mlm, save_clip

__all__ = [
    "BERT_PRESETS", "BertConfig", "BertForMaskedLM", "bert_config",
    "BLIP", "BLIP_PRESETS", "BlipConfig", "blip_config", "load_blip", "save_blip",
    "CLIP", "PRESETS", "CLIPConfig", "TextConfig", "VisionConfig", "check_pixels", "check_text", "check_token_ids",
    "clip_config", "feature_products", "l2_normalize",
    "DualEncoder", "split", "TokenBatch", "Tokenizer", "load_tokenizer",
    "load_bert_mlm", "load_clip", "save_bert_mlm", "save_clip",
]
