"""Experiment files: defaults, validation with helpful errors, overrides, schedules."""

from pathlib import Path

import pytest

from mat_jax import config as config_lib
from mat_jax.training import optim

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.py"))


def _write(tmp_path, body):
  path = tmp_path / "exp.py"
  path.write_text("import ml_collections\n\ndef get_config(arg=None):\n" +
                  "".join(f"  {line}\n" for line in body.splitlines()))
  return path


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_file_loads(path):
  config = config_lib.load(path)
  assert config.train.steps >= 1
  assert config.objective.name
  # The runlocal shrink, where a file offers it, keeps the config valid.
  if "runlocal" in path.read_text():
    small = config_lib.load(f"{path}:runlocal")
    assert small.train.steps <= config.train.steps


def test_file_values_fill_defaults(tmp_path):
  path = _write(tmp_path, "return dict(name='x', train=dict(steps=7))")
  config = config_lib.load(path)
  assert config.train.steps == 7
  assert config.train.batch_size == config_lib.defaults().train.batch_size
  assert config.objective.name == "contrastive"


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
  path = _write(tmp_path, "return dict(train=dict(batchsize=8))")
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.load(path)
  message = str(err.value)
  assert "train.batchsize" in message and "Did you mean 'batch_size'" in message
  assert "steps" in message and "log_every" in message  # the valid keys are listed


def test_unknown_override_key_fails(tmp_path):
  path = _write(tmp_path, "return dict()")
  with pytest.raises(config_lib.ConfigError, match="Did you mean 'steps'"):
    config_lib.load(path, ["--config.train.stpes=3"])
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'trian'"):
    config_lib.load(path, ["trian.steps=3"])


def test_types_are_checked(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="train.steps must be int"):
    config_lib.load(_write(tmp_path, "return dict(train=dict(steps='10'))"))
  path = _write(tmp_path, "return dict()")
  with pytest.raises(config_lib.ConfigError, match="as an integer"):
    config_lib.load(path, ["train.steps=ten"])
  with pytest.raises(config_lib.ConfigError, match="not one of"):
    config_lib.load(path, ["schedule.name=exponential"])


def test_override_values_are_parsed_by_type(tmp_path):
  path = _write(tmp_path, "return dict()")
  config = config_lib.load(path, ["eval.eps=4/255", "train.export=false", "data.augmentations=hflip,eda",
                                  "train.steps=12", "optimizer.learning_rate=3e-4"])
  assert config.eval.eps == pytest.approx(4 / 255)
  assert config.train.export is False
  assert tuple(config.data.augmentations) == ("hflip", "eda")
  assert config.train.steps == 12 and config.optimizer.learning_rate == 3e-4


def test_objective_fields_follow_the_objective(tmp_path):
  path = _write(tmp_path, "return dict(objective=dict(name='contrastive', eps=0.1))")
  with pytest.raises(config_lib.ConfigError, match=r"objective \(contrastive\)"):
    config_lib.load(path)
  with pytest.raises(ValueError, match="unknown objective"):
    config_lib.load(_write(tmp_path, "return dict(objective=dict(name='nope'))"))


def test_objective_switched_by_override(tmp_path):
  path = _write(tmp_path, "return dict(objective=dict(name='mat', eps=4/255, text_changes=2))")
  config = config_lib.load(path, ["objective.name=tecoa", "objective.steps=3"])
  assert config.objective.name == "tecoa" and config.objective.steps == 3
  assert config.objective.eps == pytest.approx(4 / 255)  # shared keys kept
  assert "text_changes" not in config.objective            # MAT-only keys dropped
  with pytest.raises(config_lib.ConfigError, match="text_changes"):
    config_lib.load(path, ["objective.name=tecoa", "objective.text_changes=1"])


def test_schedule_swapped_by_override(tmp_path):
  path = _write(tmp_path, "return dict(train=dict(steps=100), schedule=dict(name='constant', warmup_steps=10))")
  rates = {}
  for name in ("constant", "cosine", "linear"):
    config = config_lib.load(path, [f"--config.schedule.name={name}"])
    schedule = optim.make_schedule(config.schedule, 1.0, config.train.steps)
    rates[name] = [float(schedule(s)) for s in (0, 5, 10, 55, 99)]
  for values in rates.values():  # the same linear warmup from 0
    assert values[0] == 0.0 and values[1] == pytest.approx(0.5)
  assert rates["constant"][3] == pytest.approx(1.0)
  assert rates["cosine"][3] == pytest.approx(0.5, abs=0.02)
  assert rates["linear"][3] == pytest.approx(0.5, abs=0.02)
  assert rates["cosine"][4] < 0.01 and rates["linear"][4] < 0.02


def test_fingerprint_tracks_shapes_relevant_settings(tmp_path):
  path = _write(tmp_path, "return dict()")
  base = config_lib.fingerprint(config_lib.load(path))
  assert base == config_lib.fingerprint(config_lib.load(path, ["optimizer.learning_rate=0.5"]))
  assert base != config_lib.fingerprint(config_lib.load(path, ["train.towers=vision"]))


def test_cli_reports_config_errors(tmp_path, capsys):
  from mat_jax import train
  path = _write(tmp_path, "return dict()")
  assert train.main(["--config", str(path), "--config.train.stpes=3"]) == 2
  assert "Did you mean 'steps'" in capsys.readouterr().err
