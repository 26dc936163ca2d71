"""The embedded default: `python -m mat_jax.train` with no flags runs the shapes-world demo end to end.

1. build the shapes world (10k/1k/1k scenes at 48 px) if it is not in the data directory yet;
2. obtain the clean tiny CLIP: experiments/shapes_clip.py, trained once into the cache;
3. fine-tune it under ONE budget (mat_jax/recipes.py) three ways, each into <workdir>/<name> (resumed if
   interrupted): the clean fine-tuning control (experiments/shapes_clean_ft.py), TeCoA-ITR
   (experiments/shapes_tecoa.py) and MAT (experiments/shapes_mat.py), so that any difference between them
   is the objective's, not extra training's;
4. evaluate the three on DEMO_IMAGES test images under image PGD, BERT-Attack with the study's text threat
   (key "bert"), Co-Attack and SGA at ε = 2/255, 1 word, print the recalls side by side and the headline
   differences with 95% paired intervals over the test images (results.json in the workdir).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mat_jax import objectives, precompile, runs, tables
from mat_jax import config as config_lib
from mat_jax import evaluate as evaluate_lib
from mat_jax.data import corpora, pipeline
from mat_jax.intervals import hits, interval, per_image
from mat_jax.training import ahead, inputs, loop, setup

DEMO_ATTACKS = ("pgd", "bert", "co", "sga")
MULTIMODAL = ("co", "sga")
DEMO_IMAGES = 500        # test images evaluated (2,500 captions): intervals of about ±3-4 points on R@1
DEMO_EPS_255 = 2.0
# Model name in results.json -> experiment file fine-tuned from the clean model under the shared budget.
DEMO_MODELS = {"clean fine-tuned": "shapes_clean_ft", "TeCoA": "shapes_tecoa", "MAT": "shapes_mat"}
# evaluate()'s settings for every model: one image batch shape, so one set of compiled programs.
DEMO_EVALUATION = dict(attacks=DEMO_ATTACKS, eps_255=(DEMO_EPS_255,), batch_size=100, seed=0)
DEFAULT_WORKDIR = Path("runs") / "shapes_demo"  # results.json and one run directory per fine-tuning


def side_by_side(results: dict[str, dict]) -> str:
  """One row per attack; per model TR@1 and IR@1, and under attack the drop from its own clean recall."""
  names = list(results)
  first = results[names[0]]
  rows = [("clean", "-", [(results[n]["clean"], None) for n in names])]
  for attack, budgets in first["attacks"].items():
    for eps_key in budgets:
      rows.append((attack, eps_key, [(results[n]["attacks"][attack][eps_key]["recall"], results[n]["clean"])
                                     for n in names]))

  def cell(recall, clean, key):
    drop = "" if clean is None else f" ({recall[key] - clean[key]:+.1f})"
    return f"{recall[key]:.1f}{drop}"

  header = ["attack", "eps(/255)"] + [f"{n} {k}" for n in names for k in ("TR@1", "IR@1")]
  cells = [[a, e] + [cell(r, c, k) for r, c in recalls for k in ("tr@1", "ir@1")] for a, e, recalls in rows]
  return "\n".join(tables.aligned(header, cells, left_columns=2))


def paired_interval(a: tuple, b: tuple, metric: str, n_images: int, text_to_image: np.ndarray
                    ) -> tuple[float, list[float]]:
  """Difference a - b of a recall@1 (points) and its 95% paired interval over the test images (one model
  each: `intervals.interval` with one seed).

  `a`, `b`: (TR ranks (N,), IR ranks (T,)) of two evaluations on the same images; an image counts with
  all its captions.
  """
  values = [per_image([hits({"tr_rank": tr, "ir_rank": ir, "text_to_image": text_to_image}, n_images)], metric)
            for tr, ir in (a, b)]
  difference = values[0] - values[1]
  return float(difference.mean()), interval(difference)


def headline(results: dict[str, dict]) -> list[tuple[str, str, float, list[float]]]:
  """(what, metric, difference, interval): the attacks' damage to the clean fine-tuned model, and MAT
  against TeCoA and the control under each multimodal attack, as the literature scores it and, where the
  evaluation kept them (a judge), with every label-flipped caption restored to its clean text."""
  n = results["MAT"]["num_images"]
  t2i = results["MAT"]["text_to_image"]

  def entry(name, attack):
    return results[name]["attacks"][attack][next(iter(results[name]["attacks"][attack]))]

  rows = []
  control = results["clean fine-tuned"]
  for attack in DEMO_ATTACKS:
    for metric in ("tr@1", "ir@1"):
      d, ci = paired_interval(entry("clean fine-tuned", attack)["ranks"], control["clean_ranks"], metric, n, t2i)
      rows.append((f"{attack} on the clean fine-tuned model", metric, d, ci))
  for metric in ("tr@1", "ir@1"):
    d, ci = paired_interval(entry("clean fine-tuned", "sga")["ranks"], entry("clean fine-tuned", "pgd")["ranks"],
                            metric, n, t2i)
    rows.append(("SGA - PGD on the clean fine-tuned model", metric, d, ci))
  for other in ("TeCoA", "clean fine-tuned"):
    for attack in MULTIMODAL:
      for key, judged in (("ranks", ""), ("ranks_meaning_preserving", ", flips restored")):
        if key not in entry("MAT", attack) or key not in entry(other, attack):
          continue
        for metric in ("tr@1", "ir@1"):
          d, ci = paired_interval(entry("MAT", attack)[key], entry(other, attack)[key], metric, n, t2i)
          rows.append((f"MAT - {other} under {attack}{judged}", metric, d, ci))
  return rows


def label_flip_line(results: dict[str, dict]) -> str:
  """The share of the captions each text-changing attack changed that no longer describe their image."""
  parts = []
  for name, result in results.items():
    shares = [f"{attack} {100 * share:.0f}%" for attack, budgets in result["attacks"].items()
              for entry in budgets.values() if (share := evaluate_lib.label_flip_share(entry)) is not None]
    if shares:
      parts.append(f"{name}: " + ", ".join(shares))
  return "; ".join(parts)


def _evaluation_inputs(mat_config, builder, tokenizer, eval_images: int) -> tuple[Any, Any]:
  """The evaluation's test set (its first `eval_images` images) and the text threat's candidate source."""
  eval_set = pipeline.load_eval_set(corpora.data_source(builder, "test"), tokenizer, max_images=eval_images)
  ta = mat_config.text_attack
  return eval_set, inputs.make_source(ta.source, bert=ta.bert, top_k=ta.top_k)


def _evaluation_lowering(stand_in: tuple[Any, Any], eval_set, source) -> Callable[[], list]:
  """The function that lowers the evaluation's programs (`evaluate(..., lowering_only=True)`) for `stand_in`,
  the (model, tokenizer) the runs start from: the fine-tuned models have its architecture and parameter
  dtypes, so their evaluations find the programs compiled. The masked LM makes the candidates here (the
  source keeps them for the evaluation); the function only traces and lowers."""
  model, tokenizer = stand_in
  return evaluate_lib.evaluate(model, tokenizer=tokenizer, eval_set=eval_set, text_source=source,
                               judge=evaluate_lib.shapes_judge(eval_set), keep_ranks=True, lowering_only=True,
                               **DEMO_EVALUATION)


def main(workdir: str | Path | None = None, mesh_spec: str | None = None,
         log: Callable[[str], None] = print, eval_images: int = DEMO_IMAGES, progress: bool = True) -> int:

  start = time.perf_counter()
  workdir = Path(workdir or DEFAULT_WORKDIR).absolute()
  def clock():
    return f"[{time.perf_counter() - start:5.0f}s]"

  configs = {name: config_lib.load(runs.EXPERIMENTS_DIR / f"{file}.py") for name, file in DEMO_MODELS.items()}
  mat_config = configs["MAT"]
  # A bad --mesh fails now, not after minutes of building the world and training the clean model (which
  # trains on the same mesh).
  for config in [*configs.values(), runs.cached_experiment("shapes_clip")[1]]:
    loop.run_mesh(config, mesh_spec)
  log(f"{clock()} 1/4 the shapes world")
  builder = setup.data_builder(mat_config, mat_config.data.image_size, log=log)

  log(f"{clock()} 2/4 the clean tiny CLIP (experiments/shapes_clip.py, cached)")
  loop.ensure_cached_run("shapes_clip", log=log, mesh_spec=mesh_spec)

  evaluation_inputs = evaluating = None
  stopped = threading.Event()
  if ahead.enabled():
    # The fine-tunings' steps compile on threads before they start (on an accelerator a first run's most
    # costly part; training/ahead.py), and then the evaluation's programs. A run reaches its step through
    # the persistent cache; the evaluation, in this process, needs none. The runs whose batches need no
    # masked LM start compiling first, so that they compile while it trains (the masked LM for MAT's text
    # threat and the evaluation's, on first use).
    untrained = {name: config for name, config in configs.items()
                 if ahead.later_runs_enabled() and not runs.is_trained(workdir / DEMO_MODELS[name])}
    def compile_ahead(needing_candidates: bool) -> list[ahead.Compilation]:
      return [loop.compile_run_ahead(config, mesh_spec=mesh_spec, log=log) for config in untrained.values()
              if objectives.make(config.objective).needs_text_candidates == needing_candidates]

    compiling = compile_ahead(needing_candidates=False)
    # What the evaluation's lowering needs from the device (the masked LM's candidates) is made before the
    # steps that read candidates compile: on a CPU a small program's compilation waits behind big ones.
    stand_in = runs.model_from_config(mat_config)
    evaluation_inputs = _evaluation_inputs(mat_config, builder, stand_in[1], eval_images)
    lower_evaluation = _evaluation_lowering(stand_in, *evaluation_inputs)
    compiling += compile_ahead(needing_candidates=True)
    evaluating = ahead.Compilation(lambda: precompile.compile_all(lower_evaluation(), stop=stopped),
                                   name="evaluation", after=compiling)
  models: dict[str, Any] = {}
  try:
    for i, (name, config) in enumerate(configs.items()):
      run_dir = workdir / DEMO_MODELS[name]
      if evaluating is not None and objectives.make(config.objective).needs_text_candidates:
        # No compilation beside a run whose input pipeline runs the masked LM beside its steps
        # (docs/performance.md#compiling-ahead-of-the-first-call).
        evaluating.wait()
      log(f"{clock()} 3/4 ({i + 1}/{len(configs)}) {name}: experiments/{DEMO_MODELS[name]}.py into {run_dir}")
      loop.train(config, run_dir, mesh_spec=mesh_spec, log=log, evaluate=False, progress=progress)
      models[name] = runs.restore_model(run_dir)
  except BaseException:
    stopped.set()  # an interrupted or failed demo does not wait at its exit for every evaluation program
    raise
  if evaluating is not None:
    evaluating.wait()

  log(f"{clock()} 4/4 evaluation on {eval_images} test images: clean, " + ", ".join(DEMO_ATTACKS) +
      f" at eps {DEMO_EPS_255:g}/255, 1 word, text threat {dict(mat_config.text_attack)}")
  eval_set, source = evaluation_inputs or _evaluation_inputs(mat_config, builder, models["MAT"][1], eval_images)
  results = {}
  for name, (model, model_tokenizer) in models.items():
    results[name] = evaluate_lib.evaluate(model, tokenizer=model_tokenizer, eval_set=eval_set, text_source=source,
                                          progress=progress, log=log, keep_ranks=True,
                                          judge=evaluate_lib.shapes_judge(eval_set), **DEMO_EVALUATION)
    log(f"{clock()} evaluated {name}")

  print(f"\nImage-text retrieval on {eval_images} shapes-world test images (recall@1 in %; in brackets the "
        "change from the model's own clean recall); all three fine-tuned from one clean model under one budget")
  print(side_by_side(results))
  print("\nHeadline differences (points of recall@1) with 95% paired intervals over the test images:")
  for what, metric, diff, (lo, hi) in headline(results):
    sign = "outside" if lo > 0 or hi < 0 else "INSIDE"
    print(f"  {what:60s} {metric.upper()}  {diff:+6.1f}  [{lo:+6.1f}, {hi:+6.1f}]  (0 {sign} the interval)")
  flips = label_flip_line(results)
  if flips:
    # Why the two scorings differ: a changed caption that names another colour or shape is a label flip.
    print(f"\nLabel flips among the changed captions (shapes.consistent): {flips}. \"flips restored\": those "
          "captions back to their clean text, the attack's true adversarial examples only.")
  out = evaluate_lib.write_json(results, workdir / "results.json")
  print(f"results in {out}; total {time.perf_counter() - start:.0f}s")
  return 0
