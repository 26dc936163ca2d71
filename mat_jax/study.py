"""`python -m mat_jax.study`: methods x seeds x attacks under one training budget, with intervals and claims.

    python -m mat_jax.study [--config experiments/study_shapes.py] [--quick] [--study-dir DIR] [--out DIR]

A study file (experiments/study_shapes.py) names arms (a method of `mat_jax.recipes.METHODS`, an optional
variant of its method-defining keys, the attacks it is evaluated under), the seeds and the evaluation.
Every arm is fine-tuned with `recipes.finetune` (the shared budget) from the same clean checkpoint, once per
seed; seed s fixes the data order, the fine-tuning randomness and the attack randomness.

Resumable: each run trains in its own workdir (STUDY_DIR/runs/ARM-sSEED, resumed from its checkpoints),
each evaluation is written to STUDY_DIR/runs/ARM-sSEED/eval/test-N/ATTACK.{json,npz} as it finishes (N: the
test images evaluated, or "all"), and a rerun reuses everything finished. A study directory remembers its
study file's settings (study.json) and refuses other training settings, naming the difference; more seeds,
more arms, other attacks or another test subset join the dir and reuse its trained runs. One progress
line per run.

Outputs (OUT: default docs/results for the shapes study, docs/results/REST for a study named
shapes_study_REST, the study dir with --quick): shapes_study.json ({"runs": [...], "claims": [...], ...}),
shapes_study_table.md and two PNG plots. Intervals: 95% intervals over training seeds and test images
(`interval`: seeds and images as crossed random factors, Student's t; a recall's also never narrower than
Wilson's score interval, `recall_interval`), a difference between two arms paired by seed and image; an
image counts with all its captions (IR).

Attacks: clean, pgd, bert (BERT-Attack with the study's text threat, the shapes-world MLM), sep, co, sga
(at eps_255), paraphrase (BERT-Attack with the meaning-preserving synonym lexicon: a control), and
bert_filtered, co_filtered, sga_filtered: the threat's substitutes kept only where the caption still
describes its image (`candidates.MeaningFilteredSource`, as `python -m mat_jax.evaluate --meaning-filter`),
so every change they make is a true adversarial caption. An attack with an image budget (pgd, sep, co,
sga and the filtered co and sga) may name another budget than eps_255: ATTACK@E runs it at E/255 ("co@4"),
an evaluation beside the study's own, and every claim on such attacks is also tested at E.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mat_jax import errors, recipes, runs, runtime
from mat_jax import mesh as mesh_lib
from mat_jax import paths as paths_lib
from mat_jax import config as config_lib
from mat_jax import evaluate as evaluate_lib
from mat_jax.attacks.candidates import LexiconSource, MeaningFilteredSource
from mat_jax.data import corpora, pipeline, shapes
from mat_jax.errors import MatJaxError
from mat_jax.intervals import hits, interval, per_image, recall_interval
from mat_jax.training import inputs, loop, mlm, setup
from mat_jax.workdir import WorkdirLock

# The meaning-filtered attacks: the named attack with the threat's substitutes that keep the caption true.
FILTERED = "_filtered"
FILTERED_ATTACKS = tuple(a + FILTERED for a in ("bert", "co", "sga"))
STUDY_ATTACKS = ("clean", "pgd", "bert", "sep", "co", "sga", "paraphrase", *FILTERED_ATTACKS)
TEXT_ONLY = ("bert", "paraphrase", "bert" + FILTERED)
# ATTACK@E: the attack at E/255 instead of the study's eps_255 (an attack with an image budget only).
AT = "@"
METRICS = evaluate_lib.SUMMARY_KEYS  # the recalls the report and the claims read
STUDY_FILE = "study.json"
DEFAULT_STUDY = Path(__file__).resolve().parents[1] / "experiments" / "study_shapes.py"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
_KEYS = ("name", "seeds", "eps_255", "eval_images", "eval_batch", "budget", "data", "model_source",
         "model_overrides", "text_source", "arms")


class StudyError(MatJaxError, ValueError):
  """A study file, study directory or threat that cannot run; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  method: str
  variant: Mapping[str, Any]
  attacks: tuple[str, ...]
  steps_factor: int = 1  # > 1: a compute-matched control, k times the shared steps (recipes.finetune)
  train_eps_255: float | None = None  # the whole budget at another ε (recipes.finetune's eps_255); None: shared


# What an arm of a study file may say: the fields of Arm but its name (the key it is filed under).
# steps_factor and train_eps_255 are written only where they depart from the shared budget, so the study dirs
# of arms without them compare as before.
_ARM_KEYS = tuple(field.name for field in dataclasses.fields(Arm) if field.name != "name")


# ----------------------------------------------------------------------------------------------------
# The study file.


def load(path: str | Path = DEFAULT_STUDY, quick: bool = False) -> dict[str, Any]:
  """The study file's settings as plain data, checked (unknown method or attack, seeds < 1 -> StudyError).
  `path` may name an argument of the file's get_config: "experiments/study_shapes.py:augmentation"."""

  path, _, arg = str(path).partition(":")
  if quick and arg:
    raise StudyError(f"--quick and the study-file argument {arg!r} exclude each other; give one")
  try:
    raw = config_lib.read_experiment_file(Path(path), "quick" if quick else (arg or None))
  except config_lib.ConfigError as err:
    raise StudyError(str(err)) from None
  if "bootstrap" in raw:
    raise StudyError(f"{path}: the study key 'bootstrap' is not used: the intervals are computed, not resampled "
                     "(docs/study.md#intervals); remove it")
  unknown = sorted(set(raw) - set(_KEYS))
  if unknown:
    raise StudyError(f"{path}: unknown study key(s) {unknown}; valid keys: {', '.join(_KEYS)}")
  study = {k: raw.get(k) for k in _KEYS}
  for key, least in (("seeds", 1), ("eval_batch", 1), ("eval_images", 0)):
    if not isinstance(study[key], int) or isinstance(study[key], bool) or study[key] < least:
      raise StudyError(f"{path}: {key}={study[key]!r} must be an integer >= {least}")
  if study["eval_images"] == 1:
    raise StudyError(f"{path}: eval_images=1: an interval over test images needs at least 2 (0: the whole split)")
  if not isinstance(study["eps_255"], (int, float)) or isinstance(study["eps_255"], bool):
    raise StudyError(f"{path}: eps_255={study['eps_255']!r} must be a number >= 0")
  try:  # NaN, inf or above 255 would fail only at the first evaluation, after the first arm trained
    evaluate_lib.check_eps_255([study["eps_255"]])
  except errors.InputError as err:
    raise StudyError(f"{path}: {err}") from None
  if not study["arms"]:
    raise StudyError(f"{path}: the study names no arms")
  for name, arm in study["arms"].items():
    if arm.get("method") not in recipes.METHODS:
      close = difflib.get_close_matches(str(arm.get("method")), list(recipes.METHODS), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise StudyError(f"{path}: arm {name!r} names unknown method {arm.get('method')!r}{hint}; methods: "
                       f"{', '.join(recipes.METHODS)}")
    bad = [a for a in arm.get("attacks", ()) if split_budget(a)[0] not in STUDY_ATTACKS]
    if bad:
      raise StudyError(f"{path}: arm {name!r} names unknown attack(s) {bad}; attacks: {', '.join(STUDY_ATTACKS)}"
                       f" (an attack with an image budget also as ATTACK{AT}E, at E/255: co{AT}4)")
    for attack in arm.get("attacks", ()):
      _check_budget(f"{path}: arm {name!r}", attack, study["eps_255"])
    if "clean" not in arm.get("attacks", ()):
      raise StudyError(f"{path}: arm {name!r} must be evaluated clean too (add 'clean' to its attacks)")
    unknown = sorted(set(arm) - set(_ARM_KEYS))
    if unknown:
      raise StudyError(f"{path}: arm {name!r} has unknown key(s) {unknown}; an arm's keys: {', '.join(_ARM_KEYS)}")
    if "train_eps_255" in arm:
      _check_train_eps(f"{path}: arm {name!r}", arm["method"], arm["train_eps_255"])
    arm.setdefault("variant", {})  # as arm_of reads it, so a study dir compares like with like
  for name in study["arms"]:
    run_config(study, arm_of(study, name), 0)  # every arm's training config is valid before anything runs
  return json.loads(json.dumps(study, default=list))


def arm_of(study: Mapping[str, Any], name: str) -> Arm:
  spec = study["arms"][name]
  return Arm(name, spec["method"], spec.get("variant", {}), tuple(spec["attacks"]), spec.get("steps_factor", 1),
             spec.get("train_eps_255"))


def run_config(study: Mapping[str, Any], arm: Arm, seed: int):
  """The training config of `arm` at `seed`: the shared budget (recipes.finetune) + the study's changes."""

  try:
    c = recipes.finetune(arm.method, seed, arm.variant, name=f"{study['name']}_{arm.name}",
                         text_attack=text_threat(study), steps_factor=arm.steps_factor,
                         eps_255=recipes.EPS_255 if arm.train_eps_255 is None else arm.train_eps_255)
  except ValueError as err:
    raise StudyError(f"arm {arm.name!r}: {err}") from None
  c = c.to_dict()
  if study["model_source"]:
    c["model"] = {"source": study["model_source"], "tokenizer": "shapes",
                  "overrides": study["model_overrides"] or ""}
  for section, values in (study["budget"] or {}).items():
    if section not in ("train", "schedule"):
      raise StudyError(f"budget.{section}: a study may shrink only the shared train and schedule sections")
    values = dict(values)
    # The shrunk shared steps; a compute-matched control keeps its multiple of them.
    stretched = {"train": "steps", "schedule": "warmup_steps"}[section]
    if stretched in values:
      values[stretched] = values[stretched] * arm.steps_factor
    c[section].update(values)
  c["data"].update(study["data"] or {})
  c["train"]["export"] = True
  try:
    return config_lib.build(c, origin=f"study arm {arm.name!r}")
  except config_lib.ConfigError as err:
    raise StudyError(str(err)) from None


# What a study may change in a study dir without touching a trained run: more seeds add runs, another
# evaluation subset is evaluated beside the old one (runs/ARM-sSEED/eval/test-N/), and an arm's attacks
# choose only what is evaluated and reported.
EVALUATION_KEYS = ("seeds", "eval_images")


def _training_settings(study: Mapping[str, Any]) -> dict[str, Any]:
  """What must agree for a study dir to be reused: every key but EVALUATION_KEYS (eps_255 and eval_batch
  stay, since an evaluation's file does not name them), and every arm's method and variant. A key the
  settings lack (a dir's file written before the key existed) and an empty value ("", {}) read as None."""
  kept = {k: None if study.get(k) in ("", {}) else study.get(k) for k in _KEYS
          if k not in EVALUATION_KEYS and k != "arms"}
  return {**kept, "arms": {name: {k: v for k, v in arm.items() if k != "attacks"}
                           for name, arm in study["arms"].items()}}


# study.json's record of what each arm's runs were trained under (see `trained_as`).
TRAINED_AS = "trained_as"


def trained_as(study: Mapping[str, Any]) -> dict[str, str]:
  """Per arm, a digest of what its runs' results depend on as this code resolves them
  (`runs.result_parts` of its training config): the shared budget of mat_jax/recipes.py, the cached
  clean model it starts from, the shapes world's version. The study file's settings alone do not show
  a change there."""
  return {name: config_lib.digest(runs.result_parts(run_config(study, arm_of(study, name), 0)))
          for name in study["arms"]}


# study.json's record of what its evaluations were made with beyond the study file (see `evaluated_with`).
EVALUATED_WITH = "evaluated_with"


def evaluated_with(study: Mapping[str, Any]) -> dict[str, Any]:
  """What every evaluation in a study dir, and every run trained against the text threat, depends on
  beyond the study file: the text threat as this code resolves it (recipes.TEXT_ATTACK, and for the
  shapes world's MLM its cache directory, whose name changes with the MLM's settings and recipe version)
  and the attacks' settings (`evaluate.AttackSettings`)."""
  threat = text_threat(study)
  return {"text_threat": threat, "text_mlm": mlm.resolved_name(threat),
          "attack_settings": dataclasses.asdict(evaluate_lib.AttackSettings())}


def check_study_dir(study_dir: Path, study: Mapping[str, Any], *, reading: bool = False, log: loop.Log = print) -> None:
  """`_check_study_dir`, one process at a time when it may write: a study's shards start together, and
  each merges its arms into STUDY_FILE (read, merged and written whole, so none is lost)."""
  if reading:
    return _check_study_dir(study_dir, study, reading=True, log=log)
  study_dir.mkdir(parents=True, exist_ok=True)
  with WorkdirLock(study_dir, wait=True, flag="the study directory", on_wait=log):
    _check_study_dir(study_dir, study, log=log)


def _check_study_dir(study_dir: Path, study: Mapping[str, Any], *, reading: bool = False,
                     log: loop.Log = print) -> None:
  """Write the study's settings into a new study dir; refuse a dir made by other training settings.

  A study may add arms to (or leave out arms of) the study in the dir, add seeds, evaluate another test
  subset or other attacks (EVALUATION_KEYS, an arm's attacks): the arms both name, and every other
  setting, must agree. The dir then remembers every arm it has held and the latest evaluation settings.
  The dir also records what this code resolved its runs (`trained_as`) and evaluations (`evaluated_with`)
  to; a run or evaluation made under another resolution is refused, not mixed into one table with new
  ones. `reading` (--report-only: nothing is trained, evaluated or written) only says such differences:
  the report shows what the dir holds, on whatever host or code reads it."""
  path = study_dir / STUDY_FILE
  resolved, evaluation = trained_as(study), evaluated_with(study)
  if reading and not path.exists():
    raise StudyError(f"--report-only: {study_dir} holds no study ({STUDY_FILE} is missing); run the study first")
  if path.exists():
    old = json.loads(path.read_text())
    for arm in old["arms"].values():
      arm.setdefault("variant", {})
    shared = set(old["arms"]) & set(study["arms"])
    comparable_old = _training_settings({**old, "arms": {a: old["arms"][a] for a in shared}})
    comparable_new = _training_settings({**study, "arms": {a: study["arms"][a] for a in shared}})
    if comparable_old != comparable_new:
      diff = _differences(comparable_old, comparable_new)
      raise StudyError(f"{study_dir} holds another study ({old.get('name')!r}); it differs in "
                       f"{'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}. Use another --study-dir, or "
                       "delete that directory to start over")
    # A dir written before a record existed is compared on what it records.
    recorded = old.get(TRAINED_AS, {})
    stale = sorted(a for a in shared if a in recorded and recorded[a] != resolved[a])
    problems = []
    if stale:
      problems.append(f"the runs of arm(s) {', '.join(stale)} were trained under settings this code no longer "
                      "resolves them to (the shared budget in mat_jax/recipes.py, the inner attack of the registry, "
                      "the cached clean model they start from, or the shapes world changed)")
    old_evaluation = old.get(EVALUATED_WITH, evaluation)
    threat_changed = any(old_evaluation.get(k) != evaluation[k] for k in ("text_threat", "text_mlm"))
    # Other attack settings only matter to the evaluations the dir holds: once they are deleted (as the
    # refusal below advises), the runs are evaluated afresh under the new settings, which the dir records.
    if old_evaluation != evaluation and (threat_changed or _holds_evaluations(study_dir)):
      diff = "; ".join(_differences(old_evaluation, evaluation)[:4])
      problems.append(f"its evaluations were made with another {'text threat' if threat_changed else 'attack setting'}"
                      f" ({diff})" + (", which the runs of arms with a text attack also trained against"
                                      if threat_changed else
                                      "; delete its runs/*/eval directories to evaluate again (the trained runs "
                                      "stay valid)"))
    if problems and reading:
      log(f"note: {study_dir}: " + "; ".join(problems) + ". The report shows the runs and evaluations it holds")
    elif problems:
      raise StudyError(f"{study_dir}: " + "; ".join(problems) + ". Use another --study-dir, or delete that "
                       "directory to start over")
    if not reading:
      _file_flat_evaluations(study_dir, old)
    merged = {**study, "arms": {**old["arms"], **study["arms"]}, TRAINED_AS: {**recorded, **resolved},
              EVALUATED_WITH: evaluation}
    if merged != old and not reading:
      paths_lib.write_text_atomically(path, json.dumps(merged, indent=1, sort_keys=True))
    return
  if any((study_dir / "runs").glob("*")):
    # Its runs' settings are unknown: reusing them would report them as this study's.
    raise StudyError(f"{study_dir} holds runs but no {STUDY_FILE}, which records the settings they were trained "
                     "and evaluated under, so they cannot be checked against this study's. Use another "
                     "--study-dir, or delete that directory to start over")
  study_dir.mkdir(parents=True, exist_ok=True)
  paths_lib.write_text_atomically(
      path, json.dumps({**study, TRAINED_AS: resolved, EVALUATED_WITH: evaluation}, indent=1, sort_keys=True))


def _holds_evaluations(study_dir: Path) -> bool:
  """Whether any run in the dir holds a finished evaluation (either layout: eval/ or eval/test-N/)."""
  return any(study_dir.glob("runs/*/eval/**/*.npz"))


def _file_flat_evaluations(study_dir: Path, settings: Mapping[str, Any]) -> None:
  """Evaluations in the older layout, straight in runs/ARM-sSEED/eval/, move to the test subset the dir's
  settings name, so they are reused, not recomputed (`_eval_dir_to_read` finds them unmoved)."""
  for flat in study_dir.glob("runs/*/eval"):
    files = [f for f in flat.iterdir() if f.is_file() and f.suffix in (".json", ".npz")]
    if files:
      subset = _eval_dir(flat.parent, settings)
      subset.mkdir(exist_ok=True)
      for f in files:
        f.replace(subset / f.name)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      where = f"{prefix}.{key}" if prefix else key
      if key not in old:
        out.append(f"{where} is new")
      elif key not in new:
        out.append(f"{where} is gone")
      else:
        out += _differences(old[key], new[key], where)
    return out
  return [] if old == new else [f"{prefix}: {old!r} there, {new!r} here"]


# ----------------------------------------------------------------------------------------------------
# Text sources.


def text_threat(study: Mapping[str, Any]) -> dict[str, Any]:
  """The study's text threat, in training (an arm's variant may change it) and in evaluation: the shared
  one (recipes.TEXT_ATTACK) with the study's `text_source`, if any."""
  threat = dict(recipes.TEXT_ATTACK)
  if study["text_source"]:
    threat["source"] = study["text_source"]
  return threat


def text_sources(study: Mapping[str, Any], eval_set) -> dict[str, Any]:
  """{"bert": the threat, "paraphrase": the synonym lexicon, "filtered": the threat's substitutes that keep
  the caption true of `eval_set`'s scenes}; a threat `inputs.make_source` refuses (an MLM whose vocabulary
  is not its tokenizer's, ...) is refused in one line."""
  spec = text_threat(study)
  paraphrase = LexiconSource(shapes.substitution_table())
  if spec["source"] == "paraphrase":
    threat = paraphrase
  else:
    try:
      threat = inputs.make_source(spec["source"], bert=spec.get("bert", ""), top_k=spec.get("top_k", 10),
                                  log=lambda _: None)
    except (ValueError, OSError) as err:
      raise StudyError(f"text threat {spec}: {err}") from None
  filtered = MeaningFilteredSource(threat, evaluate_lib.shapes_meaning_filter(eval_set))
  return {"bert": threat, "paraphrase": paraphrase, "filtered": filtered}


# ----------------------------------------------------------------------------------------------------
# Running.


class CompileCounter:
  """Counts XLA compilations (and persistent-cache hits) through jax.monitoring."""

  def __init__(self):
    import jax
    self.compiles = 0
    self.cache_hits = 0
    jax.monitoring.register_event_duration_secs_listener(self._duration)
    jax.monitoring.register_event_listener(self._event)

  def _duration(self, event: str, duration: float, **_: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      self.compiles += 1

  def _event(self, event: str, **_: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits":
      self.cache_hits += 1


def check_mesh(study: Mapping[str, Any], mesh_spec: str) -> None:
  """A --mesh that does not fit the devices, an arm's batch or the clean model's fails now, not after the
  data is built and the clean model trained."""
  mesh_lib.make_mesh(mesh_spec)
  for name in study["arms"]:
    config = run_config(study, arm_of(study, name), 0)
    try:
      loop.run_mesh(config, mesh_spec)
    except mesh_lib.MeshError as err:
      raise mesh_lib.MeshError(f"arm {name!r} of the study: {err}") from None
    cached = runs.cached_name(config.model.source)
    if cached is not None:
      path, source_config = runs.cached_experiment(cached)
      try:
        loop.run_mesh(source_config, mesh_spec)
      except mesh_lib.MeshError as err:
        raise mesh_lib.MeshError(f"the study's clean model ({path}), trained on the same mesh if it is not in the "
                                 f"cache yet: {err}") from None


def run(study: Mapping[str, Any], study_dir: Path, *, shard: tuple[int, int] = (0, 1),
        mesh_spec: str | None = None, log: loop.Log = print) -> dict[str, Any]:
  """Train and evaluate every arm x seed (reusing what is finished); returns the collected results.

  `shard=(i, n)` runs only the runs whose index is i modulo n, so n processes (or machines sharing the
  study dir) split a study; a last run without a shard collects everything and writes the report."""

  study_dir = Path(study_dir).absolute()
  check_study_dir(study_dir, study)
  counter = CompileCounter()
  start = time.perf_counter()
  arms = [arm_of(study, name) for name in study["arms"]]
  first = run_config(study, arms[0], 0)
  builder = setup.data_builder(first, first.data.image_size, log=lambda _: None)
  collected: dict[tuple[str, int], dict[str, Any]] = {}
  eval_set = sources = None
  index, shards = shard
  planned = [(arm, seed, number) for number, (arm, seed) in
             enumerate(((arm, seed) for arm in arms for seed in range(study["seeds"])), start=1)
             if (number - 1) % shards == index]
  # Runs still to train first, so a study cut short has trained every arm before it refreshes the
  # evaluations of finished runs (`_is_current`); the order changes no result.
  planned.sort(key=lambda job: runs.is_trained(_run_dir(study_dir, job[0].name, job[1])))
  total = len(arms) * study["seeds"]
  for arm, seed, number in planned:
    t0 = time.perf_counter()
    run_dir = _run_dir(study_dir, arm.name, seed)
    cfg = run_config(study, arm, seed)
    trained = runs.is_trained(run_dir)
    if not trained:
      # the shared clean model, once
      loop.ensure_cached_source(cfg.model.source, log=lambda _: None, mesh_spec=mesh_spec)
      loop.train(cfg, run_dir, mesh_spec=mesh_spec, log=lambda _: None, progress=False, evaluate=False)
    t_train = time.perf_counter() - t0
    t_eval = time.perf_counter()
    eval_dir = _eval_dir(run_dir, study)
    missing = [a for a in arm.attacks if not _is_current(eval_dir, a)]
    model = tokenizer = None
    if missing:
      model, tokenizer = runs.restore_model(run_dir)
      if eval_set is None:
        eval_set = pipeline.load_eval_set(corpora.data_source(builder, "test"), tokenizer,
                                          max_images=study["eval_images"] or None)
        sources = text_sources(study, eval_set)
    for group in evaluation_groups(missing, study["eps_255"]):
      _evaluate_group(model, tokenizer, eval_set, sources, group, study, seed, eval_dir)
    collected[(arm.name, seed)] = {a: _read_eval(eval_dir, a) for a in arm.attacks}
    summary = " ".join(f"{a} {collected[(arm.name, seed)][a]['recall']['tr@1']:.1f}/"
                       f"{collected[(arm.name, seed)][a]['recall']['ir@1']:.1f}" for a in arm.attacks)
    evaluated = f"evaluated {len(missing)} attack(s) in {time.perf_counter() - t_eval:.0f}s" if missing \
        else "evaluations reused"
    log(f"[{number}/{total}] {arm.name} seed {seed}: {'reused' if trained else f'trained in {t_train:.0f}s'}, "
        f"{evaluated} | TR@1/IR@1 {summary}")
  wall = time.perf_counter() - start
  log(f"study {study['name']}: {total} runs in {wall:.0f}s, {counter.compiles} XLA compilations "
      f"({counter.cache_hits} persistent-cache hits)")
  return {"collected": collected, "wall_seconds": wall, "compilations": counter.compiles,
          "cache_hits": counter.cache_hits}


def _run_dir(study_dir: Path, arm: str, seed: int) -> Path:
  return study_dir / "runs" / f"{arm}-s{seed}"


def _eval_dir(run_dir: Path, study: Mapping[str, Any]) -> Path:
  """Where a run's evaluations on the study's test subset go: eval/test-all (the whole split) or
  eval/test-N (its first N images), so evaluations on another subset are kept beside them."""
  return run_dir / "eval" / f"test-{study['eval_images'] or 'all'}"


def _eval_dir_to_read(run_dir: Path, study: Mapping[str, Any], recorded: Mapping[str, Any]) -> Path:
  """`_eval_dir`, or for a dir in the older layout, which a report does not rearrange, the flat eval/ whose
  files belong to the subset the dir recorded (`_file_flat_evaluations` files them there when it runs)."""
  subset = _eval_dir(run_dir, study)
  if not subset.is_dir() and subset == _eval_dir(run_dir, recorded):
    return run_dir / "eval"
  return subset


def split_budget(attack: str) -> tuple[str, float | None]:
  """("co", 4.0) for "co@4"; (attack, None) for an attack at the study's own budget. A budget that does
  not read as a number stays in the name, which `load` then refuses as unknown."""
  base, sep, budget = attack.partition(AT)
  if not sep:
    return attack, None
  try:
    return base, float(budget)
  except ValueError:
    return attack, None


def has_image_budget(attack: str) -> bool:
  """Whether an attack (at the study's budget) perturbs the image, so that it may run at another budget."""
  return attack != "clean" and attack not in TEXT_ONLY


def at_budget(attack: str, budget: float) -> str:
  """The study's name of `attack` at `budget` (1/255 units), as E prints: at_budget("co", 4.0) == "co@4"."""
  return f"{attack}{AT}{evaluate_lib.eps_key(budget)}"


def _check_budget(where: str, attack: str, eps_255: float) -> None:
  """ATTACK@E is an attack with an image budget at a valid E other than the study's, written as `eps_key`
  writes it (one name per evaluation: co@4, never co@4.0 beside it)."""
  base, budget = split_budget(attack)
  if budget is None:
    return
  if not has_image_budget(base):
    raise StudyError(f"{where}: {attack}: {base} has no image budget; write {base}")
  try:
    evaluate_lib.check_eps_255([budget])
  except errors.InputError as err:
    raise StudyError(f"{where}: {attack}: {err}") from None
  if budget == float(eps_255):
    raise StudyError(f"{where}: {attack} is {base} at the study's own budget (eps_255={eps_255:g}); write {base}")
  canonical = at_budget(base, budget)
  if attack != canonical:
    raise StudyError(f"{where}: {attack}: write {canonical}")


def _check_train_eps(where: str, method: str, train_eps_255: Any) -> None:
  """An arm's training ε: a valid budget other than the shared one, for a method that trains against an
  image attack."""
  try:
    recipes.check_train_eps_255(train_eps_255, name="train_eps_255")
  except config_lib.ConfigError as err:
    raise StudyError(f"{where}: {err}") from None
  if float(train_eps_255) == recipes.EPS_255:
    raise StudyError(f"{where}: train_eps_255={train_eps_255:g} is the shared budget's ε; leave the key out")
  if not recipes.has_image_attack(method):
    raise StudyError(f"{where}: {method} trains without an image attack, so train_eps_255 changes nothing; "
                     "leave the key out")


def _base(attack: str) -> str:
  return split_budget(attack)[0]


def _budget_of(attack: str, eps_255: float) -> float:
  """The budget (1/255 units) an attack runs at: its own (ATTACK@E) or the study's eps_255."""
  budget = split_budget(attack)[1]
  return float(eps_255) if budget is None else budget


def _evaluated_as(attack: str) -> str:
  """The `evaluate` attack a study attack runs: the text-only ones (bert, paraphrase, bert_filtered) are
  BERT-Attack; co_filtered is co, sga_filtered sga; ATTACK@E is ATTACK's."""
  attack = _base(attack)
  return "bert" if attack in TEXT_ONLY else attack.removesuffix(FILTERED)


def collect(study: Mapping[str, Any], study_dir: Path, *, log: loop.Log = print) -> dict[str, Any]:
  """The finished evaluations of every arm x seed, without training or evaluating anything (`--report-only`:
  a report while shards still refresh evaluations). An evaluation written before the meaning-preserving
  ranks were kept is used as it is (its restored recall then has a seed range, not an interval)."""
  study_dir = Path(study_dir).absolute()
  check_study_dir(study_dir, study, reading=True, log=log)
  recorded = json.loads((study_dir / STUDY_FILE).read_text())
  collected, missing = {}, []
  for name, arm in study["arms"].items():
    for seed in range(study["seeds"]):
      eval_dir = _eval_dir_to_read(_run_dir(study_dir, name, seed), study, recorded)
      absent = [a for a in arm["attacks"] if not (eval_dir / f"{a}.npz").exists()]
      missing += [f"{name}-s{seed}/{a}" for a in absent]
      if not absent:
        collected[(name, seed)] = {a: _read_eval(eval_dir, a) for a in arm["attacks"]}
  if missing:
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    raise StudyError(f"--report-only: {len(missing)} evaluation(s) not finished in {study_dir} ({shown}); "
                     "run the study (or its shards) first")
  return {"collected": collected, "wall_seconds": None, "compilations": None, "cache_hits": None}


def _source_name(attack: str) -> str | None:
  """The candidate source an attack's text attack draws from (None: it changes no caption)."""
  attack = _base(attack)
  if attack == "clean" or _evaluated_as(attack) not in evaluate_lib.NEEDS_TEXT_SOURCE:
    return None
  if attack.endswith(FILTERED):
    return "filtered"
  return "paraphrase" if attack == "paraphrase" else "bert"


def evaluation_groups(attacks: Sequence[str], eps_255: float) -> list[tuple[str, ...]]:
  """A run's attacks as `evaluate` calls: the ones at the same budget that begin with the same text attack
  on the same candidate source together (one call runs that stage once per batch,
  `AttackSpec.text_stage`: bert, sep and co), every other alone; in the order given."""
  groups: dict[Any, list[str]] = {}
  for attack in attacks:
    name = _evaluated_as(attack)
    budget = _budget_of(attack, eps_255)
    stage = None if attack == "clean" else evaluate_lib.attack_spec(
        name, evaluate_lib.AttackSettings(), None if name in TEXT_ONLY else budget / 255).text_stage
    groups.setdefault(attack if stage is None else (_source_name(attack), stage, budget), []).append(attack)
  return [tuple(group) for group in groups.values()]


def _evaluate_group(model, tokenizer, eval_set, sources, attacks: Sequence[str], study, seed, out: Path) -> None:
  """Attacks of one run in one `evaluate` call (`evaluation_groups`), each written to
  out/ATTACK.{json,npz} (meaning-aware: the shapes judge). An attack's seconds: its own, plus an equal
  share of what the call spent on all of them (clean features, candidates)."""
  names = tuple(_evaluated_as(a) for a in attacks if a != "clean")
  source_name = _source_name(attacks[0])  # one per group
  source = sources[source_name] if source_name else None
  budget = _budget_of(attacks[-1], study["eps_255"])  # one per group (clean, alone or first, has none)
  t0 = time.perf_counter()
  result = evaluate_lib.evaluate(model, tokenizer=tokenizer, eval_set=eval_set, attacks=names,
                                 eps_255=(budget,), text_source=source, batch_size=study["eval_batch"],
                                 seed=seed, progress=False, keep_ranks=True,
                                 judge=evaluate_lib.shapes_judge(eval_set))
  entries = {a: None if a == "clean" else next(iter(result["attacks"][_evaluated_as(a)].values()))
             for a in attacks}
  own = {a: 0.0 if e is None else e["seconds"] for a, e in entries.items()}
  shared = max(time.perf_counter() - t0 - sum(own.values()), 0.0) / len(attacks)
  out.mkdir(parents=True, exist_ok=True)
  for attack, entry in entries.items():
    if entry is None:
      entry, ranks = {"recall": result["clean"], "asr": None}, result["clean_ranks"]
    else:
      entry = dict(entry)
      ranks = entry.pop("ranks")
    arrays = {"tr": ranks[0], "ir": ranks[1], "text_to_image": result["text_to_image"]}
    if "ranks_meaning_preserving" in entry:
      arrays["tr_mp"], arrays["ir_mp"] = entry.pop("ranks_meaning_preserving")
    entry = {k: v for k, v in entry.items() if k not in evaluate_lib.RANK_KEYS}
    entry.update(attack=attack, n_images=int(result["num_images"]), seconds=own[attack] + shared,
                 eps_255=0.0 if attack == "clean" or attack in TEXT_ONLY else budget)
    # The ranks last: the .npz marks the evaluation finished.
    evaluate_lib.write_json(entry, out / f"{attack}.json")
    tmp = out / f"{attack}.tmp.npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    tmp.replace(out / f"{attack}.npz")


def _is_current(eval_dir: Path, attack: str) -> bool:
  """A finished evaluation with every per-query array the report needs: a text attack's evaluation
  written without the meaning-preserving ranks (the meaning table's intervals need them) is re-run."""
  path = eval_dir / f"{attack}.npz"
  if not path.exists():
    return False
  if _evaluated_as(attack) not in evaluate_lib.NEEDS_TEXT_SOURCE:
    return True
  with np.load(path) as arrays:
    return "tr_mp" in arrays.files


def _read_eval(eval_dir: Path, attack: str) -> dict[str, Any]:
  entry = json.loads((eval_dir / f"{attack}.json").read_text())
  with np.load(eval_dir / f"{attack}.npz") as arrays:
    entry["tr_rank"], entry["ir_rank"], entry["text_to_image"] = arrays["tr"], arrays["ir"], arrays["text_to_image"]
    if "tr_mp" in arrays.files:
      entry["tr_rank_mp"], entry["ir_rank_mp"] = arrays["tr_mp"], arrays["ir_mp"]
  return entry


# ----------------------------------------------------------------------------------------------------
# Intervals and claims.


# (claim, better arm, other arm, attacks). A claim holds on a metric when its interval lies above 0.
CLAIMS = (
    ("1: MAT > TeCoA (unimodal AT) under multimodal attacks", "mat", "tecoa", ("co", "sga")),
    ("1: MAT > FARE (unimodal AT) under multimodal attacks", "mat", "fare", ("co", "sga")),
    # The shared budget is equal steps; TeCoA with twice them, FARE with four times, spend what MAT's
    # steps cost (the compute argument of experiments/study_shapes.py). The last two rows: what the extra
    # steps buy them.
    ("1: MAT > TeCoA with MAT's compute (twice the steps) under multimodal attacks", "mat", "tecoa_2x",
     ("co", "sga")),
    ("1: MAT > FARE with MAT's compute (four times the steps) under multimodal attacks", "mat", "fare_4x",
     ("co", "sga")),
    ("TeCoA with twice the steps > TeCoA", "tecoa_2x", "tecoa", ("clean", "pgd", "co", "sga")),
    ("FARE with four times the steps > FARE", "fare_4x", "fare", ("clean", "pgd", "co", "sga")),
    # MAVA's reading of its baselines (its Tables 1-2): fine-tuned at 2/255, FARE beats TeCoA under
    # Co-Attack and SGA at 2/255.
    ("FARE > TeCoA under multimodal attacks (MAVA's comparison)", "fare", "tecoa", ("co", "sga")),
    ("2: MAT+ > MAT", "matplus", "mat", ("clean", "co", "sga")),
    ("3: 1:N > the same augmented pairs as 1:1", "matplus", "matplus_1to1", ("clean", "co", "sga")),
    ("4: text augmentation > image augmentation", "matplus_text", "matplus_image", ("clean", "co", "sga")),
    ("5: aligned > misaligned augmentations", "matplus", "matplus_misaligned", ("clean", "co", "sga")),
    ("5: more diverse augmentations (5 captions, i2t 0.6) > MAT+ (3 captions, i2t 0.3)", "matplus_diverse",
     "matplus", ("clean", "co", "sga")),
    ("defenses > the clean fine-tuned control: MAT", "mat", "clean_ft", ("pgd", "bert", "co", "sga")),
    ("defenses > the clean fine-tuned control: MMCoA", "mmcoa", "clean_ft", ("pgd", "bert", "co", "sga")),
    # MAT trained against meaning-preserving substitutions only (the paraphrase source), evaluated under
    # the MLM threat: does a training attack that never flips a label keep MAT's gain, or its cost?
    ("6: MAT trained on paraphrases > MAT trained on the MLM threat", "mat_paraphrase", "mat",
     ("clean", "co", "sga")),
    ("6: MAT trained on paraphrases > TeCoA under multimodal attacks", "mat_paraphrase", "tecoa", ("co", "sga")),
    # Which half of MAT's text attack costs it image robustness: its image PGD guided by the adversarial
    # captions (gone in mat_unguided, whose PGD sees the clean ones), or its outer loss on the adversarial
    # pairs (kept). Without the guidance MAT either joins TeCoA or stays MAT.
    ("MAT without its guidance (the image attack against the clean captions) > MAT", "mat_unguided", "mat",
     ("clean", "pgd", "co", "sga")),
    ("TeCoA > MAT without its guidance", "tecoa", "mat_unguided", ("clean", "pgd", "co", "sga")),
    # The text half of MAT's claim, under attacks that only make true adversarial captions (in the
    # held-out-forms world their substitutes are words no caption of the world holds).
    ("7: MAT > TeCoA under meaning-filtered text attacks", "mat", "tecoa", FILTERED_ATTACKS),
    ("7: MAT > the clean fine-tuned control under meaning-filtered text attacks", "mat", "clean_ft",
     FILTERED_ATTACKS),
    ("7: MAT > TeCoA with MAT's compute (twice the steps) under meaning-filtered text attacks", "mat",
     "tecoa_2x", FILTERED_ATTACKS),
    ("7: TeCoA with twice the steps > TeCoA under meaning-filtered text attacks", "tecoa_2x", "tecoa",
     FILTERED_ATTACKS),
    ("7: MAT trained on paraphrases > MAT under meaning-filtered text attacks", "mat_paraphrase", "mat",
     FILTERED_ATTACKS),
    # Meeting the held-out words at random (EDA edits of the training captions) against choosing them
    # adversarially: is it exposure or the adversary that buys mat_paraphrase's robustness?
    ("7: TeCoA with random synonyms (EDA) > TeCoA under meaning-filtered text attacks", "tecoa_eda", "tecoa",
     FILTERED_ATTACKS),
    ("7: the control with random synonyms (EDA) > the control under meaning-filtered text attacks",
     "clean_ft_eda", "clean_ft", FILTERED_ATTACKS),
    ("7: MAT trained on paraphrases > TeCoA with random synonyms (EDA) under meaning-filtered text attacks",
     "mat_paraphrase", "tecoa_eda", FILTERED_ATTACKS),
    # With the words met at random, what each adversary adds: TeCoA's image adversary to none, MAT's text
    # adversary to TeCoA's.
    ("7: TeCoA with random synonyms (EDA) > the control with random synonyms (EDA)", "tecoa_eda", "clean_ft_eda",
     ("pgd", *FILTERED_ATTACKS)),
    ("7: MAT > TeCoA, both with random synonyms (EDA), under meaning-filtered text attacks", "mat_eda",
     "tecoa_eda", FILTERED_ATTACKS),
    # MAT+ as published against MAT, and its own EDA's share (MAT+ differs from MAT in more than its EDA).
    ("7: MAT+ > MAT under meaning-filtered text attacks", "matplus", "mat", FILTERED_ATTACKS),
    ("7: MAT+ > MAT+ without its EDA under meaning-filtered text attacks", "matplus", "matplus_no_eda",
     FILTERED_ATTACKS),
    # MAT's lead over TeCoA with and without the held-out words its training attack can write.
    ("7: MAT > MAT whose training attack writes no held-out word", "mat", "mat_no_heldout",
     ("clean", "pgd", *FILTERED_ATTACKS)),
    ("7: MAT whose training attack writes no held-out word > TeCoA under meaning-filtered text attacks",
     "mat_no_heldout", "tecoa", FILTERED_ATTACKS),
)


def attack_order(study: Mapping[str, Any]) -> list[str]:
  """Every attack of the study's arms, in the report's order: STUDY_ATTACKS', then each other budget's."""
  named = {a for arm in study["arms"].values() for a in arm["attacks"]}
  return [name for budget in (None, *budgets(study)) for a in STUDY_ATTACKS
          if (name := a if budget is None else at_budget(a, budget)) in named]


def budgets(study: Mapping[str, Any]) -> list[float]:
  """The other budgets (1/255 units) the study's attacks name (ATTACK@E), in increasing order."""
  return sorted({b for arm in study["arms"].values() for a in arm["attacks"] if (b := split_budget(a)[1]) is not None})


def claims_of(study: Mapping[str, Any]) -> list[tuple[str, str, str, tuple[str, ...]]]:
  """CLAIMS, and each claim again at every other budget the study evaluates: its attacks with an image
  budget as ATTACK@E, under the claim's name with "at eps E/255" added."""
  claims = list(CLAIMS)
  for budget in budgets(study):
    for claim, better, other, attacks in CLAIMS:
      at = tuple(at_budget(a, budget) for a in attacks if has_image_budget(a))
      if at:
        claims.append((f"{claim}, at eps {evaluate_lib.eps_key(budget)}/255", better, other, at))
  return claims


MEANING_PRESERVING = " (meaning-preserving)"  # the suffix of a claim's metric judged with flips restored


def _restored_key(attack: str) -> str:
  """The table key of an attack's recall with label-flipped captions restored. A filtered attack flips no
  label, so that recall is its recall, under its own key (and its claims are tested once)."""
  return attack if _base(attack).endswith(FILTERED) else attack + MEANING_PRESERVING


def summarise(study: Mapping[str, Any], collected: Mapping[tuple[str, int], Mapping[str, Any]]
              ) -> tuple[list[dict], list[dict], dict]:
  """runs[] rows, claims[] rows, and {(arm, attack): {metric: (mean, [lo, hi])}} for the table.

  The table also holds {(arm, attack + MEANING_PRESERVING): ...}, the recall with every label-flipped
  caption restored, for each text attack whose every seed kept those ranks; the claims are tested on it too."""
  seeds = study["seeds"]
  any_entry = next(iter(next(iter(collected.values())).values()))
  n_images = len(any_entry["tr_rank"])
  rows, table, values = [], {}, {}
  for (arm, seed), per_attack in collected.items():
    for attack, e in per_attack.items():
      rows.append({"method": arm, "seed": seed, "attack": attack, "eps_255": e["eps_255"], "n_images": e["n_images"],
                   "recall": e["recall"], "asr": e.get("asr"),
                   "asr_meaning_preserving": e.get("asr_meaning_preserving"),
                   "label_flip_share": e.get("label_flip_share"),
                   "recall_meaning_preserving": e.get("recall_meaning_preserving")})
  for name in study["arms"]:
    for attack in study["arms"][name]["attacks"]:
      entries = [collected[(name, s)][attack] for s in range(seeds)]
      views = [(attack, False, "recall")]
      if all("tr_rank_mp" in e for e in entries) and _restored_key(attack) != attack:
        views.append((_restored_key(attack), True, "recall_meaning_preserving"))
      for key, meaning_preserving, recall in views:
        per_seed = [hits(e, n_images, meaning_preserving) for e in entries]
        table[(name, key)] = {}
        for metric in METRICS:
          v = values[(name, key, metric)] = per_image(per_seed, metric)
          mean = float(np.mean([e[recall][metric] for e in entries]))
          table[(name, key)][metric] = (mean, recall_interval(v))
  claims = []
  for claim, better, other, attacks in claims_of(study):
    for attack in attacks:
      for key in (attack, attack + MEANING_PRESERVING):
        for metric in METRICS:
          if (better, key, metric) not in values or (other, key, metric) not in values:
            continue
          diff = values[(better, key, metric)] - values[(other, key, metric)]
          point = table[(better, key)][metric][0] - table[(other, key)][metric][0]
          ci = interval(diff)
          claims.append({"claim": claim, "metric": f"{attack} {metric}{key[len(attack):]}", "difference": point,
                         "ci95": ci, "holds": bool(ci[0] > 0)})
  return rows, claims, table


# ----------------------------------------------------------------------------------------------------
# Reports.


def interval_words(study: Mapping[str, Any], n_images: int) -> str:
  """What the report's intervals are, for its table and JSON."""
  over = "training seeds and test images" if study["seeds"] > 1 else "test images (one seed: the model fixed)"
  return f"95% interval over {over}: {study['seeds']} seed(s), {n_images} test images"


def markdown_table(study: Mapping[str, Any], table: Mapping, claims: Sequence[Mapping], n_images: int) -> str:
  attacks = attack_order(study)
  other = f" (ATTACK{AT}E: at E/255)" if budgets(study) else ""
  at_eps: dict[float, list[str]] = {}  # the arms trained at another budget than the shared one, by budget
  for name, arm in study["arms"].items():
    if "train_eps_255" in arm:
      at_eps.setdefault(arm["train_eps_255"], []).append(name)
  trained = "".join(f"; trained at {e:g}/255: {', '.join(names)}" for e, names in sorted(at_eps.items()))
  lines = [f"Recall@1 (%) TR / IR, mean over seeds and [{interval_words(study, n_images)}]; "
           f"eps {study['eps_255']:g}/255{other}{trained}.", "",
           "| arm | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
  for name in study["arms"]:
    cells = []
    for attack in attacks:
      if (name, attack) not in table:
        cells.append("")
        continue
      t = table[(name, attack)]
      cells.append(" / ".join(f"{t[m][0]:.1f} [{t[m][1][0]:.1f}, {t[m][1][1]:.1f}]" for m in METRICS))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "| claim | metric | difference (points) | 95% interval | holds |", "|---|---|---|---|---|"]
  for c in claims:
    lines.append(f"| {c['claim']} | {c['metric']} | {c['difference']:+.1f} | [{c['ci95'][0]:+.1f}, "
                 f"{c['ci95'][1]:+.1f}] | {'yes' if c['holds'] else 'no'} |")
  return "\n".join(lines) + "\n"


def meaning_table(study: Mapping[str, Any], collected: Mapping[tuple[str, int], Mapping[str, Any]],
                  n_images: int, table: Mapping | None = None) -> str:
  """The text attacks judged by meaning: per arm and attack, the share of changed captions that are label
  flips (mean over seeds {min, max}), and the recall with every label-flipped caption restored (the
  attack's true adversarial examples only): mean over seeds with the interval from `summarise`'s `table`,
  or {min, max} over seeds where the per-query ranks were not kept."""
  attacks = [a for a in attack_order(study) if _base(a) not in ("clean", "pgd")]
  lines = ["Text attacks judged by meaning (`shapes.consistent`): label flips (changed captions that no longer "
           "describe their image, %) | TR@1 / IR@1 with the flipped captions restored; mean over seeds and "
           f"[{interval_words(study, n_images)}] or {{min, max}} over seeds.", "",
           "| arm | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
  table = table or {}

  def spread(values: Sequence[float]) -> str:
    return f"{np.mean(values):.1f} {{{min(values):.1f}, {max(values):.1f}}}"

  for name, arm in study["arms"].items():
    cells = []
    for attack in attacks:
      entries = [collected[(name, s)][attack] for s in range(study["seeds"])
                 if attack in arm["attacks"] and (name, s) in collected]
      if not entries or any(e.get("recall_meaning_preserving") is None for e in entries):
        cells.append("")
        continue
      shares = [100 * share for e in entries if (share := evaluate_lib.label_flip_share(e)) is not None]
      flips = spread(shares) if shares else "–"
      with_interval = table.get((name, _restored_key(attack)))
      if with_interval:
        kept = " / ".join(f"{with_interval[m][0]:.1f} [{with_interval[m][1][0]:.1f}, {with_interval[m][1][1]:.1f}]"
                          for m in METRICS)
      else:
        kept = " / ".join(spread([e["recall_meaning_preserving"][m] for e in entries]) for m in METRICS)
      cells.append(f"{flips} \\| {kept}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(study: Mapping[str, Any], table: Mapping, path: Path, arms: Sequence[str], attacks: Sequence[str],
         title: str) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, axes = plt.subplots(1, len(METRICS), figsize=(6 * len(METRICS), 4), squeeze=False)
  width = 0.8 / max(1, len(arms))
  for ax, metric in zip(axes[0], METRICS, strict=True):
    for i, arm in enumerate(arms):
      xs, ys, lo, hi = [], [], [], []
      for j, attack in enumerate(attacks):
        if (arm, attack) in table:
          mean, (a, b) = table[(arm, attack)][metric]
          xs.append(j + i * width)
          ys.append(mean)
          lo.append(mean - a)
          hi.append(b - mean)
      ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=arm)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(attacks))], attacks)
    ax.set_ylabel(f"{metric.upper()} (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def report(study: Mapping[str, Any], result: Mapping[str, Any], out: Path, *, log: loop.Log = print) -> dict[str, Path]:

  rows, claims, table = summarise(study, result["collected"])
  n_images = rows[0]["n_images"]
  doc = {"study": study["name"], "seeds": study["seeds"], "eps_255": study["eps_255"],
         "interval": interval_words(study, n_images),
         # This command's wall time and compilations (None with --report-only); a rerun reuses finished runs.
         "cpu_wall_seconds": result["wall_seconds"], "xla_compilations": result["compilations"],
         "evaluation_seconds": sum(e["seconds"] for per in result["collected"].values() for e in per.values()),
         "runs": rows, "claims": claims}
  out = Path(out)
  paths = {"json": evaluate_lib.write_json(doc, out / "shapes_study.json")}
  paths["table"] = out / "shapes_study_table.md"
  paths["table"].write_text(markdown_table(study, table, claims, n_images) + "\n"
                            + meaning_table(study, result["collected"], n_images, table))
  main_arms = [a for a in study["arms"] if not a.startswith("matplus_")]
  ablations = [a for a in study["arms"] if a.startswith("matplus")]
  attacks = [a for a in attack_order(study) if any((arm, a) in table for arm in main_arms)]
  paths["main_plot"] = plot(study, table, out / "shapes_study_methods.png", main_arms, attacks,
                            "methods under one budget")
  if len(ablations) > 1:
    abl_attacks = [a for a in attack_order(study) if all((arm, a) in table for arm in ablations)]
    paths["ablation_plot"] = plot(study, table, out / "shapes_study_ablations.png", ablations, abl_attacks,
                                  "MAT+ ablations")
  for c in claims:
    log(f"claim {c['claim']} [{c['metric']}]: {c['difference']:+.1f} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}] "
        f"-> {'holds' if c['holds'] else 'does not hold'}")
  return paths


# ----------------------------------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str] | None = None) -> int:
  return errors.cli_main(_main, argv, output_dir=lambda: _out_dir)


_out_dir: str | None = None  # the results directory of the running command, named by a disk-full report


def default_out(name: str) -> Path:
  """Where a study's report goes by default: docs/results for the shapes study, docs/results/REST for a
  study of its own named shapes_study_REST (or NAME), so one study's report never overwrites another's."""
  if name == "shapes_study":
    return DEFAULT_OUT
  return DEFAULT_OUT / (name.removeprefix("shapes_study_") or name)


def build_parser() -> argparse.ArgumentParser:
  """The command line of `python -m mat_jax.study`."""
  parser = argparse.ArgumentParser(prog="python -m mat_jax.study", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=str(DEFAULT_STUDY), help="study file (default experiments/study_shapes.py)")
  parser.add_argument("--quick", action="store_true", help="the study file's quick variant (tests, CI)")
  parser.add_argument("--mesh", help="devices each run trains on, as train's --mesh ('8' or 'data=4,fsdp=2'; "
                                     "default: all devices on data); evaluations run on one device")
  parser.add_argument("--study-dir", type=errors.directory,
                      help="where runs and evaluations go (default: $MAT_JAX_CACHE_DIR/studies/NAME)")
  parser.add_argument("--out", type=errors.directory,
                      help="results directory (default docs/results for the shapes_study, "
                           "docs/results/REST for a study named shapes_study_REST; with --quick the study dir)")
  parser.add_argument("--shard", default="0/1", help="I/N: run only every N-th run starting at I, to split a "
                      "study over N processes sharing --study-dir; then rerun without --shard for the report")
  parser.add_argument("--report-only", action="store_true", help="write the report from the finished "
                      "evaluations in the study dir; train and evaluate nothing")
  return parser


def _main(argv: Sequence[str] | None) -> int:
  global _out_dir
  args = build_parser().parse_args(argv)
  shard = _parse_shard(args.shard)
  if args.report_only and shard[1] > 1:
    raise StudyError("--report-only writes the whole study's report; leave out --shard")

  # Compiled programs on disk: the runs of one arm differ only in their seed (a runtime value), so every
  # run after the first of its shape loads its train step instead of compiling it. A study trains and
  # evaluates the shapes world's small models only (runtime: their GEMMs).
  runtime.prepare_process(small_models=True)
  study = load(args.config, quick=args.quick)
  study_dir = Path(args.study_dir) if args.study_dir else paths_lib.cache_root() / "studies" / study["name"]
  # A study that shrinks the shared budget (the quick study: --quick, or the file's "quick" argument with
  # or without others) reports into its study dir: its smoke-test tables have no place beside the shipped
  # results, which are the shared budget's.
  out = Path(args.out) if args.out else (study_dir if study["budget"] else default_out(study["name"]))
  _out_dir = str(out)
  # Before hours of training: directories that cannot be written would lose the results at the end.
  errors.check_writable_dir(study_dir, "--study-dir")
  errors.check_writable_dir(out, "--out")
  if args.mesh is not None and not args.report_only:
    check_mesh(study, args.mesh)
  result = collect(study, study_dir) if args.report_only else run(study, study_dir, shard=shard, mesh_spec=args.mesh)
  if shard[1] > 1:
    print(f"shard {shard[0]}/{shard[1]} done; when every shard is done, rerun without --shard to write the "
          "report (it reuses every finished run)")
    return 0
  paths = report(study, result, out)
  print("wrote " + ", ".join(str(p) for p in paths.values()))
  return 0


def _parse_shard(text: str) -> tuple[int, int]:
  index, sep, count = text.partition("/")
  try:
    shard = (int(index), int(count))
  except ValueError:
    shard = (-1, 0)
  if not sep or not 0 <= shard[0] < shard[1]:
    raise StudyError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/2 and --shard 1/2")
  return shard


if __name__ == "__main__":
  sys.exit(main())
