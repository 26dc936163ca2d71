"""`python -m mat_jax.models`: the demo saves, reloads and compares; inspect reads what the demo saved."""

from __future__ import annotations

import pytest
from flax import nnx

from mat_jax.models import BLIP, PRESETS, blip_config, clip_config, save_blip
from mat_jax.models.__main__ import main
from mat_jax.models.clip import TextConfig, VisionConfig

# The demo's code path on a smaller model than the tiny preset (the suite's time is spent compiling).
MINI = clip_config(
    "tiny",
    vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32),
    text=TextConfig(vocab_size=50, context_length=8, width=16, layers=1, heads=2, mlp_dim=32,
                    eos_token_id=3, bos_token_id=2, pad_token_id=0),
    projection_dim=8)


def test_demo_then_inspect(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(PRESETS, "mini", MINI)
  assert main(["demo", "--preset", "mini", "--dir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "reload: parameters identical, embeddings max |diff| 0 -> OK" in out
  assert "cosine similarity" in out and "white" in out
  assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()

  assert main(["inspect", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"CLIP from {tmp_path}")
  assert '"context_length": 8' in out and "total" in out


def test_inspect_a_run_directory_reads_its_exported_model(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(PRESETS, "mini", MINI)
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text("{}")  # a run's own config, not a model's
  assert main(["inspect", str(run)]) == 2
  assert f"{run} is a training run without its exported model ({run / 'model'}); rerun" in capsys.readouterr().err
  assert main(["demo", "--preset", "mini", "--dir", str(run / "model")]) == 0
  capsys.readouterr()
  assert main(["inspect", str(run)]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"{run} is a training run: its exported model is {run / 'model'}\nCLIP from {run / 'model'}")


def test_inspect_a_blip_directory(tmp_path, capsys):
  save_blip(BLIP(blip_config("blip-tiny"), rngs=nnx.Rngs(0)), tmp_path)
  assert main(["inspect", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"BLIP from {tmp_path}")
  assert '"embed_dim": 128' in out and "itm_head" in out and "total" in out


@pytest.mark.parametrize("argv, message", [
    (["demo", "--preset", "tiyn"], "invalid choice: 'tiyn'"),
    (["demo", "--seed", "-1"], "argument --seed: use a seed in [0, 2147483647], got -1"),  # was a ValueError
])
def test_an_unknown_preset_or_a_bad_seed_is_one_line_and_exit_2(capsys, argv, message):
  try:
    code = main(argv)
  except SystemExit as exit_:  # argparse's own error
    code = exit_.code
  err = capsys.readouterr().err
  assert code == 2 and message in err and "Traceback" not in err
