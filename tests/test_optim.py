"""Optax schedules named in the config (`schedule.name = "optax.NAME"` with `schedule.kwargs`): the learning
rate they give, their overrides, their errors, and what they change for resuming and the run cache."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mat_jax import config as config_lib
from mat_jax.training import optim

PEAK, STEPS, WARMUP = 1e-3, 100, 10
STEPS_CHECKED = (0, 4, 9, 10, 11, 25, 60, 99)


def _write(tmp_path, schedule):
  path = tmp_path / "exp.py"
  path.write_text("def get_config(arg=None):\n"
                  f"  return dict(train=dict(steps={STEPS}), optimizer=dict(learning_rate={PEAK}),\n"
                  f"              schedule={schedule!r})\n")
  return path


def _rates(config):
  schedule = optim.make_schedule(config.schedule, config.optimizer.learning_rate, config.train.steps)
  return [float(schedule(step)) for step in STEPS_CHECKED]


def _shifted(main):
  """Linear warm-up from 0 to PEAK, then Optax's own schedule `main` counted from the end of the warm-up."""
  return [PEAK * step / WARMUP if step < WARMUP else float(main(step - WARMUP)) for step in STEPS_CHECKED]


# (name, kwargs, optax's own schedule): the required arguments left out are the peak and the steps after
# warm-up.
CASES = [
    ("optax.exponential_decay", dict(decay_rate=0.5, transition_steps=20, staircase=True),
     optax.exponential_decay(PEAK, 20, 0.5, staircase=True)),
    ("optax.exponential_decay", dict(decay_rate=0.1),
     optax.exponential_decay(PEAK, STEPS - WARMUP, 0.1)),
    ("optax.polynomial_schedule", dict(end_value=1e-5, power=2.0),
     optax.polynomial_schedule(PEAK, 1e-5, 2.0, STEPS - WARMUP)),
    ("optax.piecewise_constant_schedule", dict(boundaries_and_scales={20: 0.5, 50: 0.1}),
     optax.piecewise_constant_schedule(PEAK, {20: 0.5, 50: 0.1})),
    ("optax.cosine_onecycle_schedule", dict(pct_start=0.2),
     optax.cosine_onecycle_schedule(STEPS - WARMUP, PEAK, pct_start=0.2)),
]


@pytest.mark.parametrize("name, kwargs, main", CASES, ids=[f"{n}:{','.join(k)}" for n, k, _ in CASES])
def test_an_optax_schedule_follows_the_warmup(tmp_path, name, kwargs, main):
  config = config_lib.load(_write(tmp_path, dict(name=name, warmup_steps=WARMUP, kwargs=kwargs)))
  assert _rates(config) == pytest.approx(_shifted(main), rel=1e-6, abs=1e-12)
  # The run's config.json (int keys as strings) gives the same schedule.
  assert _rates(config_lib.build(json.loads(config_lib.to_json(config)))) == pytest.approx(_rates(config))


def test_without_warmup_it_is_optax_schedule_itself(tmp_path):
  config = config_lib.load(_write(tmp_path, dict(name="optax.linear_schedule", kwargs=dict(end_value=2e-4))))
  main = optax.linear_schedule(PEAK, 2e-4, STEPS)
  assert _rates(config) == pytest.approx([float(main(step)) for step in STEPS_CHECKED])


def test_an_optax_warmup_schedule_warms_up_from_zero(tmp_path):
  # Its init_value, left out, is the start of its own warm-up: 0 as the built-in warm-up's, not the peak,
  # which would make the warm-up flat; an init_value given is kept.
  config = config_lib.load(_write(tmp_path, dict(name="optax.warmup_cosine_decay_schedule",
                                                 kwargs=dict(warmup_steps=20))))
  main = optax.warmup_cosine_decay_schedule(0.0, PEAK, 20, STEPS)
  assert _rates(config) == pytest.approx([float(main(step)) for step in STEPS_CHECKED], abs=1e-12)
  assert _rates(config)[0] == 0.0 and _rates(config)[2] == pytest.approx(PEAK * 9 / 20)
  given = config_lib.load(_write(tmp_path, dict(name="optax.warmup_constant_schedule",
                                                kwargs=dict(warmup_steps=20, init_value=1e-4))))
  assert _rates(given)[0] == pytest.approx(1e-4) and _rates(given)[-1] == pytest.approx(PEAK)


def test_kwargs_overrides(tmp_path):
  path = _write(tmp_path, dict(name="optax.exponential_decay", warmup_steps=WARMUP, kwargs=dict(decay_rate=0.5)))
  config = config_lib.load(path, ["--config.schedule.kwargs.decay_rate=1/4"])
  assert config.schedule.kwargs.to_dict() == {"decay_rate": 0.25}
  # A parameter the file does not give is read by its default's type (staircase: a bool) or as a literal.
  config = config_lib.load(path, ["schedule.kwargs.staircase=true", "schedule.kwargs.transition_steps=30"])
  assert config.schedule.kwargs.to_dict() == {"decay_rate": 0.5, "staircase": True, "transition_steps": 30}
  assert _rates(config) == pytest.approx(_shifted(optax.exponential_decay(PEAK, 30, 0.5, staircase=True)))
  # A schedule switched by an override keeps the file's kwargs it takes; a built-in takes none.
  switched = config_lib.load(path, ["schedule.name=optax.warmup_exponential_decay_schedule",
                                    "schedule.kwargs.init_value=0", "schedule.kwargs.warmup_steps=5"])
  assert switched.schedule.kwargs.to_dict() == {"decay_rate": 0.5, "init_value": 0, "warmup_steps": 5}
  assert config_lib.load(path, ["schedule.name=cosine"]).schedule.kwargs.to_dict() == {}
  # From a file giving no kwargs, both on the command line.
  plain = _write(tmp_path, dict(name="cosine", warmup_steps=WARMUP))
  config = config_lib.load(plain, ["schedule.name=optax.exponential_decay", "schedule.kwargs.decay_rate=0.1"])
  assert _rates(config) == pytest.approx(_shifted(optax.exponential_decay(PEAK, STEPS - WARMUP, 0.1)))


@pytest.mark.parametrize("schedule, overrides, message", [
    (dict(name="optax.exponential_dacay"), [],
     r"schedule.name='optax.exponential_dacay' is not one of constant, cosine, linear or an Optax schedule "
     r"constructor. Did you mean 'optax.exponential_decay'\? Optax schedules: .*optax.cosine_decay_schedule, "
     r".*optax.polynomial_schedule"),
    (dict(name="exponential"), [], r"not one of .* Did you mean 'optax.exponential_decay'\?"),
    (dict(name="optax.join_schedules"), [], r"not one of .*Optax schedules: "),
    (dict(name="optax.exponential_decay", kwargs=dict(decay_rate=0.5, decay=2)), [],
     r"schedule.kwargs: optax.exponential_decay takes no 'decay'. Did you mean 'decay_rate'\? Its parameters: "
     r"init_value, transition_steps, decay_rate, transition_begin, staircase, end_value"),
    (dict(name="optax.exponential_decay"), ["schedule.kwargs.decay=2"], r"takes no 'decay'"),
    (dict(name="optax.exponential_decay"), [],
     r"optax.exponential_decay needs 'decay_rate' \(set schedule.kwargs.decay_rate\); its parameters: init_value"),
    (dict(name="cosine", kwargs=dict(decay_rate=0.5)), [],
     r"schedule.kwargs \(decay_rate\) are the arguments of an optax.\* schedule; 'cosine' takes warmup_steps"),
    (dict(name="optax.linear_schedule", kwargs=dict(end_value=-1e-3)), [],
     r"optax.linear_schedule\(end_value=-0.001\) gives the learning rate -.* at step \d+; it must be >= 0"),
    (dict(name="optax.exponential_decay", kwargs=dict(decay_rate="fast")), [],
     r"schedule: optax.exponential_decay\(decay_rate='fast'\) failed: TypeError"),
    (dict(name="optax.piecewise_constant_schedule", kwargs=dict(boundaries_and_scales=5)), [],
     r"schedule: optax.piecewise_constant_schedule\(boundaries_and_scales=5\) failed: AttributeError"),
    (dict(name="optax.exponential_decay", kwargs=dict(decay_rate=0.5)), ["schedule.kwargs.decay_rate=fast"],
     r"schedule.kwargs.decay_rate='fast' is not a number"),
    # The other keys of the section stay closed.
    (dict(name="optax.exponential_decay", decay_rate=0.5), [],
     r"unknown config key 'schedule.decay_rate'. Valid keys of schedule: end_factor, kwargs, name, warmup_steps"),
    (dict(name="optax.exponential_decay"), ["schedule.kwarg.decay_rate=0.5"],
     r"override: unknown config key 'schedule.kwarg'. Did you mean 'kwargs'\?"),
])
def test_schedule_errors(tmp_path, schedule, overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load(_write(tmp_path, schedule), overrides)


def test_kwargs_must_be_plain_values(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text("def get_config(arg=None):\n"
                  "  return dict(schedule=dict(name='optax.exponential_decay', kwargs=dict(decay_rate=abs)))\n")
  with pytest.raises(config_lib.ConfigError, match=r"schedule.kwargs=.*give plain values"):
    config_lib.load(path)


def test_kwargs_resume_like_the_other_schedule_settings_and_key_the_run_cache(tmp_path):
  path = _write(tmp_path, dict(name="optax.exponential_decay", warmup_steps=WARMUP, kwargs=dict(decay_rate=0.5)))
  base, other = config_lib.load(path), config_lib.load(path, ["schedule.kwargs.decay_rate=0.1"])
  cosine = config_lib.load(path, ["schedule.name=cosine"])
  # The learning-rate schedule may change between restarts (as warmup_steps and the built-in names): the
  # checkpoint fingerprint leaves it out, and the optimizer state has the same structure under any schedule.
  assert config_lib.fingerprint(base) == config_lib.fingerprint(other) == config_lib.fingerprint(cosine)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  states = [optim.make_optimizer(c.optimizer, optim.make_schedule(c.schedule, PEAK, STEPS)).init(params)
            for c in (base, cosine)]
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  # What a cached run is keyed by (`runs.cached_run_dir`) holds the kwargs: another decay is another run.
  assert config_lib.result_json(base) != config_lib.result_json(other)
  # Empty kwargs are no part of the key: a config that gives none is keyed as one without the section.
  assert "kwargs" not in json.loads(config_lib.result_json(cosine))["schedule"]


def _optimizer(**optimizer):
  config = config_lib.build({"optimizer": dict(dict(learning_rate=0.1, momentum=0.0), **optimizer)})
  return optim.make_optimizer(config.optimizer, optax.constant_schedule(config.optimizer.learning_rate))


def test_weight_decay_clipping_momentum_and_end_factor_reach_the_optimizer():
  # Settings a run would silently lose: decay of matrices only (never the biases, scales or temperature) in
  # each optimizer, the global-norm clip, SGD's Nesterov momentum, and end_factor as the last learning rate.
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  zero = jax.tree.map(jnp.zeros_like, params)
  decaying = {name: _optimizer(name=name, weight_decay=0.5) for name in ("adamw", "adam", "sgd")}
  clipping = _optimizer(name="sgd", learning_rate=1.0, grad_clip_norm=1.0)
  nesterov, reference = _optimizer(name="sgd", momentum=0.9, nesterov=True), optax.sgd(0.1, 0.9, nesterov=True)
  schedules = {name: optim.make_schedule(config_lib.build({"schedule": dict(name=name, end_factor=0.1)}).schedule, 1.0,
                                         10) for name in ("cosine", "linear")}

  def two_updates(tx, grads):
    state, out = tx.init(params), []
    for _ in range(2):
      updates, state = tx.update(grads, state, params)
      out.append(updates)
    return out

  @jax.jit  # one compilation for all of them
  def results():
    after = {name: optax.apply_updates(params, two_updates(tx, zero)[0]) for name, tx in decaying.items()}
    clip = optax.apply_updates(params, two_updates(clipping, {"w": zero["w"], "b": jnp.asarray([3.0, 4.0])})[0])
    last = {name: schedule(10) for name, schedule in schedules.items()}
    return after, clip, two_updates(nesterov, params), two_updates(reference, params), last

  after, clipped, ours, theirs, last = jax.tree.map(np.asarray, results())
  for name, w in (("adamw", 0.95), ("adam", 0.9), ("sgd", 0.95)):  # decoupled, L2 through Adam, L2 through SGD
    np.testing.assert_array_equal(after[name]["b"], [1.0, 1.0], err_msg=name)
    np.testing.assert_allclose(after[name]["w"], np.full((2, 2), w), rtol=1e-4, err_msg=name)
  np.testing.assert_allclose(clipped["b"], [0.4, 0.2], rtol=1e-6)  # the gradient scaled to norm 1: [0.6, 0.8]
  jax.tree.map(np.testing.assert_allclose, ours, theirs)
  assert last == pytest.approx({"cosine": 0.1, "linear": 0.1})  # the learning rate the main schedule ends at
