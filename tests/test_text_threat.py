"""The shapes world's text threat: the BERT masked LM (training, transformers layout, meaning changes), the
paraphrase control, the source names in configs, and meaning-aware scoring in `evaluate`."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from mat_jax import config as config_lib
from mat_jax import evaluate as evaluate_lib
from mat_jax import evaluate_cli
from mat_jax import metrics
from mat_jax.attacks.candidates import STOP_WORDS, BertMLMSource, LexiconSource, MeaningFilteredSource
from mat_jax.data import shapes
from mat_jax.errors import InputError
from mat_jax.models import load_bert_mlm, load_tokenizer
from mat_jax.training import inputs, mlm

# A budget that trains in ~25 CPU-seconds: enough to learn which category of word fits where (a higher
# masking rate than BERT's 15% gives more signal per step).
TINY = mlm.MLMSettings(hidden_size=32, layers=1, heads=2, intermediate_size=64, steps=300, batch_size=64,
                       learning_rate=1e-2, warmup_steps=10, mask_prob=0.3, train_images=300, eval_images=20)


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
  directory = tmp_path_factory.mktemp("mlm") / "shapes-mlm"
  logs: list[str] = []
  mlm.build(TINY, directory, log=logs.append)
  return directory, mlm.load_info(directory), logs


def test_mlm_trains_and_proposes_meaning_changing_words(tiny_mlm):
  directory, info, logs = tiny_mlm
  # Well below chance (the uniform distribution's cross-entropy, log V).
  assert info["train"]["final_loss"] < 0.6 * math.log(len(mlm.mlm_vocabulary()))
  assert any("mlm step 300/300" in line for line in logs)
  # Without the image no MLM can know which colour a caption names, but the category is learnable.
  assert info["masked_accuracy"]["category"] > 0.8
  report = info["meaning_change"]
  for category in ("colour", "shape"):
    assert report[category]["proposals"] > 0 and report[category]["share"] > 0.5
  assert 0.3 < report["all"]["share"] < 1.0
  # Proposals come from context: for a colour word, mostly other colours (a real MLM's co-hyponyms).
  source = BertMLMSource(load_bert_mlm(directory), load_tokenizer(directory), top_k=10)
  words = "a red square and a blue circle".split()
  proposals = source([words])[0]
  colours = [w for w in proposals[1] if shapes.word_category(words[:1] + [w] + words[2:], 1) == "colour"]
  assert len(colours) >= 5, proposals[1]


def test_data_mlm_command_reports_the_mlm(tiny_mlm, tmp_path, monkeypatch, capsys):
  # `python -m mat_jax.data mlm` (the documented way to build and inspect the text threat), with the build
  # replaced by the tiny MLM: the command's own flags and report.
  from mat_jax.data import __main__ as data_cli
  directory, _, _ = tiny_mlm
  asked = {}

  def build(settings, out, overwrite=False):
    asked.update(steps=settings.steps, out=out, overwrite=overwrite)
    return directory

  monkeypatch.setattr(data_cli.mlm, "build", build)
  assert data_cli.main(["mlm", "--dir", str(tmp_path / "out"), "--steps", "7", "--overwrite"]) == 0
  assert asked == {"steps": 7, "out": str(tmp_path / "out"), "overwrite": True}
  printed = capsys.readouterr().out
  assert f"shapes-mlm at {directory}" in printed and "masked-word accuracy" in printed and "all" in printed
  # The report describes the MLM the directory holds (built with TINY's steps), not the steps asked for.
  assert f"trained {TINY.steps} steps x {TINY.batch_size}" in printed and "trained 7 steps" not in printed
  assert f"already built with {TINY.steps} steps, reused" in printed
  with pytest.raises(SystemExit) as exit_:
    data_cli.main(["mlm", "--steps", "0"])
  assert exit_.value.code == 2 and "argument --steps: must be at least 1, got 0" in capsys.readouterr().err


def test_saved_mlm_matches_transformers(tiny_mlm):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  directory, _, _ = tiny_mlm
  hf = transformers.BertForMaskedLM.from_pretrained(str(directory)).eval()
  tokenizer = load_tokenizer(directory)
  assert tokenizer.context_length == shapes.DEFAULT_CONTEXT_LENGTH
  batch = tokenizer(["a red square in the top left", "the small blue star is above the white ring"])
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(batch.input_ids).long(),
                attention_mask=torch.from_numpy(batch.attention_mask).long()).logits.numpy()
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(load_bert_mlm(directory)(batch.input_ids, batch.attention_mask))
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
  # The tokenizer is a BERT one over the world's words: [CLS] words [SEP], a [MASK] token, no [UNK] here.
  assert tokenizer.hf.mask_token == "[MASK]" and tokenizer.hf.unk_token_id not in batch.input_ids


def test_paraphrase_source_keeps_meaning():
  scenes, caption_lists = mlm.test_scenes(TINY, 20)
  source = inputs.make_source("paraphrase")
  assert isinstance(source, LexiconSource)
  report = mlm.meaning_change_report(source, scenes, caption_lists)
  assert report["all"]["proposals"] > 100 and report["all"]["changed"] == 0


def test_the_candidate_cache_never_evicts_a_caption_its_batch_needs(tmp_path):
  # A full cache, then a batch holding its oldest caption and a new one: the new caption's entry evicts
  # the oldest only after the batch's rows are read (a real corpus has more captions than the cache holds).
  tokenizer = load_tokenizer(shapes.build_tokenizer(tmp_path))
  attach = inputs.AttachCandidates(tokenizer, inputs.make_source("paraphrase"), max_words=tokenizer.context_length - 2,
                                   max_pieces=4, top_k=8, max_targets=12, cache_size=4)
  rng = np.random.default_rng(0)
  captions = [shapes.describe(shapes.sample_scene(rng), rng) for _ in range(6)]
  alone = inputs.AttachCandidates(tokenizer, inputs.make_source("paraphrase"), max_words=tokenizer.context_length - 2,
                                  max_pieces=4, top_k=8, max_targets=12)({"captions": np.array(captions[:1])})
  attach({"captions": np.array(captions[:4])})
  out = attach({"captions": np.array([captions[0], captions[4]])})
  for name in inputs.PER_CAPTION:
    np.testing.assert_array_equal(out[inputs.PREFIX + name][0], alone[inputs.PREFIX + name][0])
  assert len(attach._cache) == 4 and captions[0] in attach._cache and captions[1] not in attach._cache
  # A batch with more distinct captions than the cache holds still gets all its rows.
  assert attach({"captions": np.array(captions)})[inputs.PREFIX + inputs.PER_CAPTION[0]].shape[0] == 6


def test_spatial_words_attackable_as_in_the_references():
  # BERT-Attack's filter list (used by Co-Attack and SGA) holds above/below/over/under but not the
  # position words nor beneath/underneath/near.
  for word in ("left", "right", "top", "bottom", "upper", "lower", "middle", "centre", "beneath", "underneath",
               "near"):
    assert word not in STOP_WORDS
  for word in ("above", "below", "over", "under", "the", "of"):
    assert word in STOP_WORDS


def test_source_names_in_configs_and_cli():
  assert config_lib.build({}).text_attack.source == "bert"
  assert config_lib.build({}).text_attack.bert == mlm.MLM_NAME
  with pytest.raises(config_lib.ConfigError, match="renamed.*paraphrase.*shapes-mlm"):
    config_lib.build({"text_attack": {"source": "lexicon"}})
  with pytest.raises(ValueError, match="renamed"):
    inputs.make_source("lexicon")
  with pytest.raises(ValueError, match="unknown text_attack.source 'synonyms'"):
    inputs.make_source("synonyms")
  with pytest.raises(ValueError, match="shapes world's synonym table"):
    evaluate_cli._text_source("paraphrase", "flickr30k", None, 10)
  for name in ("shapes_mat", "shapes_matplus", "shapes_mmcoa"):
    ta = config_lib.load(f"experiments/{name}.py").text_attack
    assert (ta.source, ta.bert, ta.top_k) == ("bert", "shapes-mlm", 10)



def test_cli_text_source_auto_is_the_shapes_mlm_on_shapes_data(monkeypatch):
  # What `python -m mat_jax.evaluate` attacks captions with when --text-source is not given (the end-to-end
  # command-line tests name a cheaper source; building the MLM is tested above).
  made = []
  monkeypatch.setattr(inputs, "make_source", lambda name, *, bert, top_k: made.append((name, bert, top_k)))
  evaluate_cli._text_source("auto", "shapes", None, 10)
  evaluate_cli._text_source("auto", "flickr30k", "./my-bert", 5)
  evaluate_cli._text_source("auto", "flickr30k", None, 7)
  assert made == [("bert", "shapes-mlm", 10), ("bert", "./my-bert", 5), ("charedit", "", 7)]
  assert evaluate_cli.build_parser().parse_args(["--model", "x"]).text_source == "auto"

def test_a_second_builder_waits_for_the_first_and_reuses_its_copy(tiny_mlm, tmp_path, monkeypatch):
  """Two shards of a study on fresh caches both find the MLM missing: one trains, the other waits for it
  and reuses its copy. (Both training, the second to finish could delete the first one's copy while the
  first was reading it: a finished MLM read back as a damaged file.)"""
  import threading

  from mat_jax.models import load_bert_mlm, load_tokenizer

  built, info, _ = tiny_mlm
  directory = tmp_path / "shapes-mlm"
  release, trainings = threading.Event(), []

  def train_slowly(settings, log):
    trainings.append(threading.current_thread().name)
    assert release.wait(60)
    return load_bert_mlm(built), load_tokenizer(built), info["train"]

  monkeypatch.setattr(mlm, "train_mlm", train_slowly)
  first = threading.Thread(target=mlm.build, args=(TINY, directory), kwargs=dict(log=lambda line: None),
                           name="first")
  first.start()
  while not trainings:  # the first holds the lock and trains
    first.join(0.05)
  second_log: list[str] = []
  second = threading.Thread(target=lambda: second_log.append(mlm.build(TINY, directory, log=second_log.append)))
  second.start()
  second.join(1.0)
  assert second.is_alive() and any(line.startswith("waiting for the process holding") for line in second_log)
  release.set()
  first.join(60)
  second.join(60)
  assert trainings == ["first"] and second_log[-1] == directory and mlm.is_built(directory)
  assert any(line.startswith("reusing the masked LM another process built") for line in second_log)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith("shapes-mlm.")]  # no staging left behind


def test_resolve_bert_builds_into_the_cache_once(tmp_path, monkeypatch):
  monkeypatch.setenv("MAT_JAX_CACHE_DIR", str(tmp_path))
  built = []
  monkeypatch.setattr(mlm, "build", lambda settings, directory, log: built.append(directory) or
                      (directory.mkdir(parents=True), (directory / mlm.INFO_FILE).write_text("{}"),
                       (directory / "model.safetensors").write_text("")))
  lines: list[str] = []
  path = mlm.resolve_bert("shapes-mlm", log=lines.append)
  assert path.startswith(str(tmp_path / "mlm" / "shapes-mlm-")) and len(built) == 1
  assert "training the shapes-world masked LM" in lines[0]
  assert mlm.resolve_bert("shapes-mlm", log=lines.append) == path and len(built) == 1
  assert mlm.resolve_bert("./some/bert") == "./some/bert"
  from mat_jax import errors
  with pytest.raises(errors.ConfigError, match="no BERT masked LM named: set text_attack.bert"):  # one line, exit 2
    mlm.resolve_bert("")
  # Another setting is another model: another directory.
  assert mlm.cached_dir(dataclasses.replace(mlm.MLMSettings(), steps=7)) != mlm.cached_dir()


# ---------------------------------------------------------------------------------------------------
# Meaning-aware scoring.


def test_meaning_preserving_scores_by_hand():
  # 3 images, 2 captions each (caption c belongs to image c // 2); orthonormal-ish embeddings.
  text_to_image = np.repeat(np.arange(3), 2)
  eye = np.eye(3, dtype=np.float32)
  images = eye
  clean_txt = eye[text_to_image]
  # The attack turned caption 0 into image 1's and caption 2 into image 2's (both changed); caption 0's
  # change is a label flip, caption 2's kept its meaning.
  adv_txt = clean_txt.copy()
  adv_txt[0], adv_txt[2] = eye[1], np.array([0.0, 0.5, 0.9], np.float32)  # no ties in any ranking
  changed = np.zeros(6, bool)
  changed[[0, 2]] = True
  flipped = np.zeros(6, bool)
  flipped[0] = True
  clean_ranks = metrics.retrieval_ranks(images @ clean_txt.T, text_to_image)
  restored_txt = np.where(flipped[:, None], clean_txt, adv_txt)  # what `evaluate` ranks for these scores
  scores = evaluate_lib.meaning_preserving_scores(changed, flipped, clean_ranks,
                                                  metrics.retrieval_ranks(images @ restored_txt.T, text_to_image))
  assert scores["label_flip_share"] == 0.5
  # Caption 0 restored: only caption 2 is wrong (it points at image 2). IR@1: 5 of 6 captions right.
  assert math.isclose(scores["recall_meaning_preserving"]["ir@1"], 100 * 5 / 6)
  assert math.isclose(scores["asr_meaning_preserving"]["ir@1"], 100 / 6)
  # TR: each image's best caption still ranks first (image 1 keeps caption 3; image 2's own captions score
  # 1 > 0.9) -> no TR loss.
  assert scores["recall_meaning_preserving"]["tr@1"] == 100.0
  none = evaluate_lib.meaning_preserving_scores(np.zeros(6, bool), np.zeros(6, bool), clean_ranks, clean_ranks)
  assert math.isnan(none["label_flip_share"]) and none["recall_meaning_preserving"]["ir@1"] == 100.0
  with pytest.raises(ValueError, match="did not change"):
    evaluate_lib.meaning_preserving_scores(flipped & False, flipped, clean_ranks, clean_ranks)


def test_shapes_judge():
  scenes, caption_lists = mlm.test_scenes(TINY, 3)

  @dataclasses.dataclass
  class Set:
    scenes: list
    text_to_image: np.ndarray
    captions: np.ndarray

  captions = np.array([c for five in caption_lists for c in five])
  judge = evaluate_lib.shapes_judge(Set(scenes, np.repeat(np.arange(3), 5), captions))
  assert all(judge(5 * i + j, caption_lists[i][j]) for i in range(3) for j in range(5))
  assert not judge(0, caption_lists[1][0]) or shapes.describes(caption_lists[1][0], scenes[0])
  assert not judge(0, "red red red")  # does not parse: a label flip
  with pytest.raises(ValueError, match="no scenes"):
    evaluate_lib.shapes_judge(Set(None, np.zeros(1), captions))


@dataclasses.dataclass
class _EvalSet:
  scenes: list
  text_to_image: np.ndarray
  captions: np.ndarray


def test_meaning_filter_keeps_exactly_the_substitutes_that_describe_the_image(tiny_mlm):
  directory, _, _ = tiny_mlm
  scenes, caption_lists = mlm.test_scenes(TINY, 20)
  captions = np.array([c for five in caption_lists for c in five])
  eval_set = _EvalSet(scenes, np.repeat(np.arange(20), 5), captions)
  base = BertMLMSource(load_bert_mlm(directory), load_tokenizer(directory), top_k=10)
  filtered = MeaningFilteredSource(base, evaluate_lib.shapes_meaning_filter(eval_set))
  assert filtered.max_substitutes == base.max_substitutes
  judge = evaluate_lib.shapes_judge(eval_set)
  words = [c.split() for c in captions]
  kept_total = dropped_total = 0
  for i, (proposed, kept) in enumerate(zip(base(words), filtered(words), strict=True)):
    for position, (subs, kept_subs) in enumerate(zip(proposed, kept, strict=True)):
      for sub in subs:
        changed = " ".join([*words[i][:position], sub, *words[i][position + 1:]])
        # Kept exactly when the judge that scores label flips says the caption still describes its image.
        assert (sub in kept_subs) == judge(i, changed), changed
      kept_total += len(kept_subs)
      dropped_total += len(subs) - len(kept_subs)
  assert kept_total > 0 and dropped_total > kept_total  # the MLM mostly flips; some proposals are synonyms
  assert mlm.meaning_change_report(filtered, scenes, caption_lists)["all"]["changed"] == 0
  assert evaluate_lib.describe_source(filtered) == {**evaluate_lib.describe_source(base), "meaning_filter": True}

  # A caption two images share keeps a substitute only if the new caption is true of both.
  rng = np.random.default_rng(0)
  red_square = shapes.Scene((shapes._jitter(shapes.SHAPES.index("square"), shapes.COLOURS.index("red"), 0, 0, 0,
                                            rng),), (0.5, 0.5, 0.5))
  blue_circle = shapes.Scene((shapes._jitter(shapes.SHAPES.index("circle"), shapes.COLOURS.index("blue"), 1, 2, 2,
                                             rng),), (0.5, 0.5, 0.5))
  shared = "a red square"
  alone = evaluate_lib.shapes_meaning_filter(_EvalSet([red_square], np.array([0]), np.array([shared])))
  both = evaluate_lib.shapes_meaning_filter(
      _EvalSet([red_square, blue_circle], np.array([0, 1]), np.array([shared, shared])))
  assert alone(shared.split(), 1, "crimson") and not both(shared.split(), 1, "crimson")
  assert not alone(shared.split(), 1, "blue")
  # A caption the set does not hold has nothing to be checked against: no substitute is kept.
  assert not alone("a green star".split(), 1, "emerald")
  with pytest.raises(InputError, match="no scenes"):
    evaluate_lib.shapes_meaning_filter(_EvalSet(None, np.zeros(1), captions))


def _one_object(shape, colour, size, row, col):
  return shapes.SceneObject(shapes.SHAPES.index(shape), shapes.COLOURS.index(colour), size, row, col, 0.5, 0.5, 0.1,
                            (0.0, 0.0, 0.0))


def test_a_position_right_before_an_objects_words_is_that_objects():
  """"... and a bottom tangerine donut": the judge and the meaning filter score it by the donut's place,
  not by the object before it, in both directions."""
  # A large orange star bottom left, a small orange ring top right.
  scene = shapes.Scene((_one_object("star", "orange", 1, 2, 0), _one_object("ring", "orange", 0, 0, 2)), (0, 0, 0))
  original = "an image showing a large orange pentagram and a little tangerine donut"
  assert shapes.parse("a large orange star and a bottom orange ring").mentions[1].row == 2
  assert not shapes.describes(original.replace("little", "bottom"), scene, original=original)
  assert shapes.describes(original.replace("little", "top"), scene, original=original)
  assert shapes.parse("a red square in the top left and a blue circle").mentions[0].row == 0  # still the first's
  captions = _EvalSet([scene], np.array([0]), np.array([original]))
  source = MeaningFilteredSource(LexiconSource({"little": ["bottom", "top", "tiny"]}),
                                 evaluate_lib.shapes_meaning_filter(captions))
  assert source([original.split()])[0][original.split().index("little")] == ["top", "tiny"]


def test_the_meaning_filter_reads_a_caption_cut_to_the_context_as_the_whole_caption(tmp_path):
  # prepare_candidates gives the source the words inside the context; the filter checks the whole caption.
  from mat_jax.attacks.candidates import prepare_candidates

  scene = shapes.Scene((_one_object("cross", "purple", 0, 1, 0), _one_object("triangle", "orange", 1, 2, 0)),
                       (0, 0, 0))
  caption = "a photo of a violet cross at the left with a tangerine triangle at the bottom left"
  assert shapes.describes(caption, scene)
  captions = _EvalSet([scene], np.array([0]), np.array([caption]))
  source = MeaningFilteredSource(LexiconSource(shapes.substitution_table()),
                                 evaluate_lib.shapes_meaning_filter(captions))
  short = shapes.tokenizer(tmp_path / "tok", context_length=14)  # 12 of the caption's 17 words fit
  unfiltered = prepare_candidates([caption], short, LexiconSource(shapes.substitution_table()))
  filtered = prepare_candidates([caption], short, source)
  assert int(np.sum(filtered.target_valid)) == int(np.sum(unfiltered.target_valid)) > 0


def test_meaning_filter_flag_needs_shapes_data_and_one_changed_word(capsys, tmp_path):
  for flags, message in [(["--data", "flickr30k"], "use it with --data shapes"),
                         (["--max-changes", "2"], "holds for one changed word")]:
    with pytest.raises(SystemExit):
      evaluate_cli.main(["--model", "shapes", "--meaning-filter", "--attacks", "bert", "--out", str(tmp_path),
                         *flags])
    assert message in capsys.readouterr().err


def test_rare_form_rate_flag_needs_shapes_data_and_a_probability(capsys, tmp_path):
  for flags, message in [(["--data", "flickr30k"], "use it with --data shapes"),
                         (["--rare-form-rate", "1.5"], "--rare-form-rate: rare_form_rate must be in [0, 1]")]:
    with pytest.raises(SystemExit):
      evaluate_cli.main(["--model", "shapes", "--rare-form-rate", "0", "--attacks", "bert", "--out", str(tmp_path),
                         *flags])
    assert message in capsys.readouterr().err
  with pytest.raises(ValueError, match="rare_form_rate is a shapes-world option"):
    evaluate_lib.load_dataset("flickr30k", None, 48, rare_form_rate=0.0)


def test_the_judge_refuses_captions_that_contradict_themselves_or_lose_a_relation():
  """One substituted word can leave every object true while the caption contradicts itself (two colours
  of one object, two rows of one position, "of" inside an object) or no longer states its relation."""
  rng = np.random.default_rng(0)
  square, circle = shapes.SHAPES.index("square"), shapes.SHAPES.index("circle")
  scene = shapes.Scene((shapes._jitter(square, shapes.COLOURS.index("red"), 0, 0, 0, rng),  # small, top left
                        shapes._jitter(circle, shapes.COLOURS.index("blue"), 1, 2, 2, rng)),  # large, bottom right
                       (0.5, 0.5, 0.5))
  true = ("a small red square and a large blue circle", "a red square in the upper left and a blue circle",
          "the red square is above the blue circle", "a picture of a red square and a blue circle")
  assert all(shapes.describes(c, scene) for c in true)
  for contradictory in ("a green red square and a large blue circle", "a small red square and a purple blue circle",
                        "an orange of a small red square and a large blue circle", "a small large red square and a "
                        "blue circle", "a red square on the left right and a blue circle",
                        "a red square at the top bottom and a blue circle"):
    assert not shapes.describes(contradictory, scene), contradictory
  original = "the red square is above the blue circle"
  assert shapes.describes("the red square is over the blue circle", scene, original=original)  # a synonym
  assert shapes.describes("the red square is together of the blue circle", scene)  # the objects alone hold
  assert not shapes.describes("the red square is together of the blue circle", scene, original=original)
