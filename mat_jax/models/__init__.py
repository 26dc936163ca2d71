"""Model ports: CLIP dual encoders and a BERT masked LM, in Flax NNX, with transformers-layout weights."""

from mat_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig, clip_config, l2_normalize, PRESETS
from mat_jax.models.dual_encoder import DualEncoder, split
