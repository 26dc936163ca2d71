"""CLIP ViT-B/16 fine-tuned on COCO (Karpathy train split, 113k images): the settings of
experiments/flickr30k.py (same argument: mat, matplus, tecoa, fare, mmcoa, mava, clean; runlocal).

    python -m mat_jax.data build karpathy --annotations dataset_coco.json --images coco --name coco \
        --image-size 224
    python -m mat_jax.train --config experiments/coco.py:mat --mesh 8
"""

import importlib.util
from pathlib import Path

TRAIN_IMAGES = 113_287


def _flickr():
  spec = importlib.util.spec_from_file_location("mat_jax_experiment_flickr30k",
                                                Path(__file__).with_name("flickr30k.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  return _flickr().vitb16_config("coco", TRAIN_IMAGES, arg)
