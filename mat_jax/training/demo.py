"""The embedded default: `python -m mat_jax.train` with no flags runs the shapes-world demo end to end.

1. build the shapes world (10k/1k/1k scenes at 48 px) if it is not in the data directory yet;
2. obtain the clean tiny CLIP: experiments/shapes_clip.py, trained once into the cache;
3. fine-tune it with MAT (experiments/shapes_mat.py) into <workdir>/mat (resumed if interrupted);
4. evaluate the clean model and the MAT model on test images under image PGD, BERT-Attack (the
   world's synonym lexicon as the substitution source), Co-Attack and SGA at ε = 2/255, 1 word, and
   print the recalls side by side (results.json in the workdir).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

DEMO_ATTACKS = ("pgd", "bert", "co", "sga")
MULTIMODAL = ("co", "sga")
DEMO_IMAGES = 150        # test images evaluated (750 captions): enough to separate the models
DEMO_EPS_255 = 2.0


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
  cells = [header] + [[a, e] + [cell(r, c, k) for r, c in recalls for k in ("tr@1", "ir@1")]
                      for a, e, recalls in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  lines = []
  for i, row in enumerate(cells):
    lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
    if i == 0:
      lines.append("  ".join("-" * w for w in widths))
  return "\n".join(lines)


def main(workdir: str | Path | None = None, mesh_spec: str | None = None,
         log: Callable[[str], None] = print, eval_images: int = DEMO_IMAGES) -> int:
  from mat_jax import checkpoint
  from mat_jax import config as config_lib
  from mat_jax import evaluate as evaluate_lib
  from mat_jax.attacks.candidates import LexiconSource
  from mat_jax.data import corpora, load_eval_set, shapes
  from mat_jax.training import loop, setup

  start = time.perf_counter()
  workdir = Path(workdir or Path("runs") / "shapes_demo").absolute()
  clock = lambda: f"[{time.perf_counter() - start:5.0f}s]"

  mat_config = config_lib.load(setup.EXPERIMENTS_DIR / "shapes_mat.py")
  # A bad --mesh fails now, not after minutes of building the world and training the clean model.
  loop.run_mesh(mat_config, mesh_spec)
  log(f"{clock()} 1/4 the shapes world")
  builder = corpora.build_shapes(mat_config.data.data_dir or None, train=mat_config.data.build_train,
                                 val=mat_config.data.build_val, test=mat_config.data.build_test,
                                 image_size=mat_config.data.image_size, log=log)

  log(f"{clock()} 2/4 the clean tiny CLIP (experiments/shapes_clip.py, cached)")
  clean_dir = setup.ensure_cached_run("shapes_clip", log=log)

  log(f"{clock()} 3/4 MAT fine-tuning (experiments/shapes_mat.py) into {workdir / 'mat'}")
  loop.train(mat_config, workdir / "mat", mesh_spec=mesh_spec, log=log, evaluate=False)

  log(f"{clock()} 4/4 evaluation on {eval_images} test images: clean, " + ", ".join(DEMO_ATTACKS) +
      f" at eps {DEMO_EPS_255:g}/255, 1 word")
  models: dict[str, Any] = {"clean CLIP": checkpoint.restore_model(clean_dir),
                            "MAT": checkpoint.restore_model(workdir / "mat")}
  tokenizer = models["clean CLIP"][1]
  eval_set = load_eval_set(corpora.data_source(builder, "test"), tokenizer, max_images=eval_images)
  source = LexiconSource(shapes.substitution_table())
  results = {}
  for name, (model, model_tokenizer) in models.items():
    results[name] = evaluate_lib.evaluate(model, tokenizer=model_tokenizer, eval_set=eval_set,
                                          attacks=DEMO_ATTACKS, eps_255=(DEMO_EPS_255,), text_source=source,
                                          batch_size=100, seed=0, progress=True, log=log)
    log(f"{clock()} evaluated {name}")

  print(f"\nImage-text retrieval on {eval_images} shapes-world test images (recall@1 in %; in brackets the "
        "change from the model's own clean recall)")
  print(side_by_side(results))
  eps_key = next(iter(results["MAT"]["attacks"]["co"]))
  verdict = []
  for attack in MULTIMODAL:
    clean_r = results["clean CLIP"]["attacks"][attack][eps_key]["recall"]
    mat_r = results["MAT"]["attacks"][attack][eps_key]["recall"]
    gains = {k: mat_r[k] - clean_r[k] for k in ("tr@1", "ir@1")}
    verdict.append(f"{attack}: MAT {gains['tr@1']:+.1f} TR@1, {gains['ir@1']:+.1f} IR@1 vs the clean model")
  print("\n" + "; ".join(verdict))
  out = evaluate_lib.write_json(results, workdir / "results.json")
  print(f"results in {out}; total {time.perf_counter() - start:.0f}s")
  return 0

