"""mat_jax: multimodal adversarial training and robustness evaluation for vision-language models."""

__version__ = "0.1.0"
