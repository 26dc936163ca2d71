"""The shapes world: scenes, renderer, captions, their meaning, augmentations and the tokenizer."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mat_jax.data import shapes
from mat_jax.errors import InputError
from mat_jax.models import clip_config


@pytest.fixture(scope="module")
def test_split():
  """1k test scenes with their 5 captions, as the dataset builder writes them."""
  scenes = [shapes.scene_for(0, "test", i) for i in range(1000)]
  caps = [shapes.captions(s, np.random.default_rng((0, 2, i, 1)), 5) for i, s in enumerate(scenes)]
  return scenes, caps


def test_scenes_are_deterministic_and_well_formed(test_split):
  scenes, _ = test_split
  assert shapes.scene_for(0, "test", 7) == scenes[7]
  assert shapes.scene_for(1, "test", 7) != scenes[7]
  assert shapes.scene_for(0, "train", 7) != scenes[7]
  counts = np.bincount([len(s.objects) for s in scenes], minlength=4)
  assert counts[0] == 0 and min(counts[1:]) > 100, counts
  for s in scenes:
    assert len({(o.row, o.col) for o in s.objects}) == len(s.objects)   # distinct cells
    assert len({o.key for o in s.objects}) == len(s.objects)            # distinct (shape, colour)
    for o in s.objects:
      assert abs(o.x - (o.col + 0.5) / 3) < 1 / 6 and abs(o.y - (o.row + 0.5) / 3) < 1 / 6
  with pytest.raises(ValueError, match="unknown split"):
    shapes.scene_for(0, "dev", 0)
  assert shapes.Scene.from_record(scenes[3].to_record()).objects[0].key == scenes[3].objects[0].key


def _solo(shape: int, size: int, colour: int = 0, row: int = 1, col: int = 1) -> shapes.Scene:
  obj = shapes._jitter(shape, colour, size, row, col, np.random.default_rng(0))
  return shapes.Scene((dataclasses.replace(obj, shade=(0.0, 0.0, 0.0)),), (0.1, 0.1, 0.1))


def test_render_draws_objects_in_their_colour_on_the_background(test_split):
  scenes, _ = test_split
  for scene in scenes[:50]:
    image = shapes.render(scene)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    for o in scene.objects:
      # A point inside every shape: the centre, except for the ring (on its band).
      dx = 0.78 * o.extent if shapes.SHAPES[o.shape] == "ring" else 0.0
      px = image[int(o.y * 64), int((o.x + dx) * 64)].astype(int)
      want = np.clip(np.add(shapes.COLOUR_RGB[shapes.COLOURS[o.colour]], o.shade), 0, 1) * 255
      assert np.abs(px - want).max() <= 2, (scene, o)
  empty = shapes.Scene((), (0.2, 0.3, 0.4))
  assert np.abs(shapes.render(empty, 32) - np.array([0.2, 0.3, 0.4]) * 255).max() <= 0.5
  assert shapes.render(scenes[0], 128).shape == (128, 128, 3)
  with pytest.raises(ValueError, match="too small"):
    shapes.render(scenes[0], 8)


def test_every_pair_of_shapes_is_distinguishable_at_64px():
  for size in (0, 1):
    masks = [(shapes.render(_solo(s, size)) > 40).any(-1) for s in range(len(shapes.SHAPES))]
    for a in range(len(masks)):
      for b in range(a + 1, len(masks)):
        differing = int((masks[a] ^ masks[b]).sum())
        assert differing >= 8, (shapes.SHAPES[a], shapes.SHAPES[b], size, differing)
  # Sizes never blur into each other: the largest small circle covers clearly less than the smallest
  # large one.
  biggest_small = dataclasses.replace(_solo(0, 0).objects[0], extent=shapes._EXTENT[0][1])
  smallest_large = dataclasses.replace(_solo(0, 1).objects[0], extent=shapes._EXTENT[1][0])
  areas = [int((shapes.render(shapes.Scene((o,), (0.1, 0.1, 0.1))) > 40).any(-1).sum())
           for o in (biggest_small, smallest_large)]
  assert areas[1] > 1.3 * areas[0], areas


def test_render_anti_aliases_edges():
  image = shapes.render(_solo(0, 1, colour=6))  # white circle on dark grey
  levels = np.unique(image[..., 0])
  assert len(levels) > 5  # intermediate coverage values exist on the edge, not just two colours


def test_captions_are_distinct_short_true_and_read_back(test_split):
  scenes, caps = test_split
  rng = np.random.default_rng(0)
  for scene, five in zip(scenes[:300], caps[:300], strict=True):
    assert len(set(five)) == 5
    for text in five:
      assert len(text.split()) <= shapes.MAX_CAPTION_WORDS
      assert shapes.consistent(shapes.parse(text), scene), text
    text, meaning = shapes.describe_with_meaning(scene, rng)
    assert shapes.parse(text) == meaning, text


def test_captions_vary_in_what_they_mention(test_split):
  _, caps = test_split
  meanings = [shapes.parse(c) for five in caps[:200] for c in five]
  mentions = [m for meaning in meanings for m in meaning.mentions]
  sized = np.mean([m.size is not None for m in mentions])
  placed = np.mean([m.row is not None or m.col is not None for m in mentions])
  related = np.mean([bool(meaning.relations) for meaning in meanings])
  assert 0.2 < sized < 0.7 and 0.1 < placed < 0.7 and 0.1 < related < 0.7, (sized, placed, related)
  words = {w for five in caps for c in five for w in c.split()}
  assert all(forms[1] in words for forms in shapes.COLOUR_WORDS.values())  # synonyms are used


def test_captions_identify_their_image_in_a_1k_split(test_split):
  scenes, caps = test_split
  stats = shapes.ambiguity(scenes, caps)
  print(f"shapes world 1k test split: {stats}")
  assert stats["wrong_fraction"] == 0.0
  assert stats["captions"] == 5000
  # Measured 1.32 images per caption and 16.5% ambiguous captions (1-object scenes described loosely).
  assert stats["mean_matches"] < 1.5
  assert stats["ambiguous_fraction"] < 0.22


def test_consistent_rejects_false_statements(test_split):
  scenes, _ = test_split
  scene = next(s for s in scenes if len(s.objects) == 2)
  a, b = scene.objects
  other_colour = (a.colour + 1) % 7 if ((a.colour + 1) % 7, a.shape) != (b.colour, b.shape) else (a.colour + 2) % 7
  true = shapes.Meaning((shapes.Mention(a.shape, a.colour, a.size, a.row, a.col), shapes.Mention(b.shape, b.colour)))
  assert shapes.consistent(true, scene)
  for wrong in (
      shapes.Meaning((shapes.Mention(a.shape, other_colour), shapes.Mention(b.shape, b.colour))),
      shapes.Meaning((shapes.Mention(a.shape, a.colour, 1 - a.size), shapes.Mention(b.shape, b.colour))),
      shapes.Meaning((shapes.Mention(a.shape, a.colour, row=(a.row + 1) % 3), shapes.Mention(b.shape, b.colour))),
      shapes.Meaning((shapes.Mention(a.shape, a.colour),)),  # misses an object
  ):
    assert not shapes.consistent(wrong, scene), wrong
  rel = shapes._true_relations(a, b)[0]
  opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}[rel]
  pair = (shapes.Mention(a.shape, a.colour), shapes.Mention(b.shape, b.colour))
  assert shapes.consistent(shapes.Meaning(pair, ((0, rel, 1),)), scene)
  assert not shapes.consistent(shapes.Meaning(pair, ((0, opposite, 1),)), scene)


def test_parse_reads_the_grammar_and_rejects_other_text():
  m = shapes.parse("in the upper left corner there is a tiny crimson disc")
  assert m == shapes.Meaning((shapes.Mention(0, 0, 0, 0, 0),))
  m = shapes.parse("the big azure box is to the right of an amber wedge with a snowy hoop at the bottom")
  assert m.relations == ((0, "right", 1),) and m.mentions[2].row == 2 and m.mentions[0].size == 1
  assert shapes.parse("a violet star in the middle left").mentions[0].row == 1
  assert shapes.parse("a violet star in the top centre").mentions[0].col == 1
  for bad in ("a dog on a mat", "a red", "a circle", "a red circle above"):
    with pytest.raises(shapes.CaptionParseError):
      shapes.parse(bad)


def test_one_object_has_one_place_and_negations_are_not_descriptions():
  """A substituted word can give an object a second position phrase, which must agree with the first; an
  outside masked LM can propose a negation, which the grammar would read past."""
  clean = "a white star in the bottom right and a small yellow ring in the top centre"
  scene = shapes.scene_from_meaning(shapes.parse(clean), np.random.default_rng(0))
  assert shapes.describes(clean, scene)
  for contradicting in ("a white star in the bottom right and a small yellow ring lower the top centre",
                        "a white star in the bottom right and a small yellow ring left in the top centre",
                        "in the lower centre there is a small yellow ring in the top",  # before and after it
                        "in the top in the bottom there is a small yellow ring"):  # two phrases before it
    with pytest.raises(shapes.CaptionParseError, match="one object in two places"):
      shapes.parse(contradicting)
    assert not shapes.describes(contradicting, scene, original=clean)
  # Two phrases that agree, or complete each other, are one place.
  ring = shapes.parse("a small yellow ring top in the top").mentions[0]
  assert (ring.row, ring.col) == (0, None)
  ring = shapes.parse("in the top there is a small yellow ring on the left").mentions[0]
  assert (ring.row, ring.col) == (0, 0)
  for negated in ("an image missing a white star in the bottom right and a small yellow ring in the top centre",
                  "no white star in the bottom right and a small yellow ring in the top centre"):
    assert shapes.parse(negated) == shapes.parse(clean)  # what the grammar reads: the negation is skipped
    assert not shapes.describes(negated, scene, original=clean)


def test_substitution_table_keeps_the_meaning(test_split):
  scenes, caps = test_split
  table = shapes.substitution_table()
  assert table["red"] == ["crimson", "scarlet"] and "red" in table["crimson"]
  assert all(w not in subs and subs for w, subs in table.items())
  assert "left" not in table and "a" not in table  # no single-word synonym keeps these meanings
  groups = [set(forms) for forms in (*shapes.COLOUR_WORDS.values(), *shapes.SHAPE_WORDS.values(),
                                     *shapes.SIZE_WORDS.values())]
  assert all(2 <= len(g) <= 4 for g in groups)
  for _scene, five in zip(scenes[:60], caps[:60], strict=True):
    for text in five:
      words = text.split()
      for i, w in enumerate(words):
        for sub in table.get(w, []):
          changed = " ".join(words[:i] + [sub] + words[i + 1:])
          assert shapes.parse(changed) == shapes.parse(text), (text, changed)


def test_eda_changes_words_but_not_meaning(test_split):
  scenes, caps = test_split
  rng = np.random.default_rng(1)
  changed = 0
  for scene, five in zip(scenes[:200], caps[:200], strict=True):
    for text in five:
      edited = shapes.eda(text, rng, synonym_prob=0.5, swap_prob=0.5, delete_prob=0.3, insert_prob=0.5)
      assert shapes.consistent(shapes.parse(edited), scene), (text, edited)
      changed += edited != text
  assert changed > 800  # nearly all of the 1000 captions are edited at these rates


def test_hflip_mirrors_image_and_captions(test_split):
  scenes, caps = test_split
  for scene, five in zip(scenes[:40], caps[:40], strict=True):
    image, flipped = shapes.hflip(shapes.render(scene), five)
    mirror = shapes.flip_scene(scene)
    assert np.abs(image.astype(int) - shapes.render(mirror).astype(int)).max() <= 2
    for text in flipped:
      assert shapes.consistent(shapes.parse(text), mirror), text
  assert shapes.mirror_caption("a red box to the left of a blue disc") == "a red box to the right of a blue disc"
  # A raw corpus caption (`data build --no-cleaning`): its case and punctuation, and words merely containing
  # "left" or "right", stay as they are.
  assert (shapes.mirror_caption("A man on the Left, a dog to the right. RIGHT-hand side; bright lefty")
          == "A man on the Right, a dog to the left. LEFT-hand side; bright lefty")
  # The swap matters: a mirrored caption that speaks of left or right is false for the unflipped scene.
  sided = [(s, c) for s, five in zip(scenes[:200], caps[:200], strict=True)
           for c in five if {"left", "right"} & set(c.split())]
  assert len(sided) > 50
  assert not any(shapes.consistent(shapes.parse(shapes.mirror_caption(c)), s) for s, c in sided)


def test_rerender_and_t2i_stay_true_to_the_text(test_split):
  scenes, caps = test_split
  rng = np.random.default_rng(2)
  for scene, five in zip(scenes[:50], caps[:50], strict=True):
    again = shapes.rerender_scene(scene, rng)
    assert [(o.key, o.size, o.row, o.col) for o in again.objects] == \
        [(o.key, o.size, o.row, o.col) for o in scene.objects]
    assert not np.array_equal(shapes.render(again), shapes.render(scene))
    assert all(shapes.consistent(shapes.parse(c), again) for c in five)
    for text in five[:2]:
      generated = shapes.scene_from_meaning(shapes.parse(text), rng)
      assert shapes.consistent(shapes.parse(text), generated)
    assert shapes.t2i(five[0], rng).shape == (64, 64, 3)
    fresh = shapes.i2t(scene, rng, 3)
    assert len(set(fresh)) == 3 and all(shapes.consistent(shapes.parse(c), scene) for c in fresh)
  with pytest.raises(ValueError, match="contradict"):
    shapes.scene_from_meaning(shapes.parse("a red disc above a blue box in the top left corner"), rng)


def test_image_jitter_is_small_and_in_range(test_split):
  scenes, _ = test_split
  image = shapes.render(scenes[0])
  out = shapes.image_jitter(image, np.random.default_rng(0))
  assert out.dtype == np.float32 and out.shape == image.shape
  assert 0.0 <= out.min() and out.max() <= 1.0
  base = image.astype(np.float32) / 255
  assert not np.allclose(out, base) and np.median(np.abs(out - base)) < 0.15
  still = shapes.image_jitter(base, np.random.default_rng(0), brightness=0, colour=0, noise=0, max_shift=0)
  np.testing.assert_allclose(still, base)


# --------------------------------------------------------------------------------------------------
# Tokenizer.
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from mat_jax.models.tokenizers import load_tokenizer

  directory = shapes.build_tokenizer(tmp_path_factory.mktemp("shapes_tokenizer"))
  return directory, load_tokenizer(directory, context_length=24)


def test_tokenizer_files_and_special_ids(tokenizer):
  directory, tok = tokenizer
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    assert (directory / name).exists(), name
  assert (tok.pad_id, tok.hf.unk_token_id, tok.start_id, tok.end_id) == (0, 1, 2, 3)
  # The tiny CLIP preset's special ids are the tokenizer's, and its end id is not transformers' legacy 2.
  text = clip_config("tiny").text
  assert (text.pad_token_id, text.bos_token_id, text.eos_token_id) == (tok.pad_id, tok.start_id, tok.end_id)
  assert text.text_pooling == "eos"
  words = [piece for pieces in tok.encode_words(["a", "red", "circle"]) for piece in pieces]
  assert tok(["a red circle"]).input_ids[0, :6].tolist() == [2, *words, 3, 0]
  assert tok.vocab_size == len(shapes.SPECIAL_TOKENS) + len(shapes.vocabulary()) < 128
  assert json.loads((directory / "special_tokens_map.json").read_text())["pad_token"] == "[PAD]"
  assert json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
  assert shapes.build_tokenizer(directory) == directory  # reused


def test_a_tokenizer_directory_with_other_ids_is_rebuilt(tmp_path):
  """A directory written by an older version (v1: [START]=1, [END]=2) is not reused as it is."""
  from mat_jax.models.tokenizers import load_tokenizer

  old_specials = ("[PAD]", "[START]", "[END]", "[UNK]")
  old_vocab = {w: i for i, w in enumerate((*old_specials, *shapes.vocabulary()))}
  (tmp_path / "shapes_world.json").write_text(json.dumps({"version": 1, "vocab": old_vocab}))
  tok = load_tokenizer(shapes.build_tokenizer(tmp_path), context_length=24)
  assert (tok.start_id, tok.end_id) == (2, 3)
  assert json.loads((tmp_path / "shapes_world.json").read_text())["version"] == shapes.TOKENIZER_VERSION
  assert shapes.default_tokenizer_dir(tmp_path).name == f"shapes_world_v{shapes.TOKENIZER_VERSION}"


def test_every_word_the_world_writes_is_in_the_vocabulary(tokenizer, test_split):
  _, tok = tokenizer
  _, caps = test_split
  pieces = tok.encode_words(shapes.vocabulary())
  assert all(len(p) == 1 and p[0] > 3 for p in pieces)
  assert len({p[0] for p in pieces}) == len(pieces)
  rng = np.random.default_rng(3)
  texts = [c for five in caps[:300] for c in five]
  texts += [shapes.eda(c, rng, synonym_prob=0.5, swap_prob=0.5, insert_prob=1.0) for c in texts[:600]]
  texts += [shapes.mirror_caption(c) for c in texts[:300]]
  batch = tok(texts)
  assert (batch.input_ids != tok.hf.unk_token_id).all()       # no unknown words
  lengths = batch.attention_mask.sum(1)
  assert lengths.max() <= 24
  assert (batch.input_ids[np.arange(len(texts)), lengths - 1] == tok.end_id).all()  # never truncated
  np.testing.assert_array_equal(lengths, [len(t.split()) + 2 for t in texts])
  assert tok.decode(batch.input_ids[0]) == texts[0]
  assert tok(["a purple zebra"]).input_ids[0, 3] == 1          # unknown words map to [UNK]


def test_the_held_out_forms_world_writes_each_words_canonical_form(test_split):
  scenes, _ = test_split
  groups = [g for g in shapes._synonym_groups() if g != shapes.PICTURE_WORDS]  # intros keep their picture words
  canonical = {g[0] for g in groups}
  others = {w for g in groups for w in g[1:]}
  for rate, never in ((0.0, others), (1.0, canonical)):
    seen: set[str] = set()
    for i, scene in enumerate(scenes[:300]):
      for text in shapes.captions(scene, np.random.default_rng((0, 2, i, 1)), 5, rare_form_rate=rate):
        assert shapes.describes(text, scene), (rate, text)
        seen.update(text.split())
    assert not seen & never, (rate, sorted(seen & never))
    assert seen & (others if rate else canonical)
  # A rate in between: about that share of the words that have other forms take one.
  texts = [shapes.describe(s, np.random.default_rng(i), rare_form_rate=0.1) for i, s in enumerate(scenes[:300])]
  words = [w for t in texts for w in t.split() if w in canonical or w in others]
  share = np.mean([w in others for w in words])
  assert 0.06 < share < 0.14, share
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match=r"rare_form_rate must be in \[0, 1\]"):
      shapes.describe(scenes[0], np.random.default_rng(0), rare_form_rate=bad)


def test_held_out_forms_are_the_words_only_the_default_worlds_captions_hold(test_split):
  scenes, _ = test_split
  held_out_world, default_world = set(), set()
  for i, scene in enumerate(scenes):
    held_out_world.update(shapes.describe(scene, np.random.default_rng((3, i)), rare_form_rate=0.0).split())
    default_world.update(shapes.describe(scene, np.random.default_rng((4, i))).split())
  assert default_world - held_out_world == set(shapes.held_out_forms())
  assert {"crimson", "box", "upper", "beneath", "centre"} <= set(shapes.held_out_forms())


_START = None  # the builders' common start (a multiprocessing.Barrier), set in each worker process


def _ready(start):
  """Worker initializer: the imports first, so that the builders meet at `start` and build at once."""
  global _START
  from mat_jax.data import shapes as shapes_module
  from mat_jax.models import tokenizers

  tokenizers.import_transformers()
  shapes_module.vocabulary()
  _START = start


def _build_and_load(directory):
  from mat_jax.data import shapes as shapes_module

  _START.wait(timeout=300)
  return shapes_module.tokenizer(directory).vocab_size


def test_processes_building_the_tokenizer_at_once_each_read_a_whole_one(tmp_path):
  """Every process of a multi-host run builds the tokenizer at start; none may read another's half-written
  files (a JSONDecodeError or 'not valid JSON' once files were written in place)."""
  import concurrent.futures
  import multiprocessing

  # One pool of 4 processes for both attempts (each spawned process spends seconds importing transformers),
  # its builders starting together at a barrier.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(4, mp_context=context, initializer=_ready,
                                              initargs=(context.Barrier(4),)) as pool:
    for attempt in range(2):
      directory = tmp_path / f"tokenizer{attempt}"
      sizes = list(pool.map(_build_and_load, [directory] * 4))
      assert sizes == [len(shapes.SPECIAL_TOKENS) + len(shapes.vocabulary())] * 4
  # No building leftovers (the lock file stays, as the datasets' do).
  assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "tokenizer0", "tokenizer1"]
  assert oct((tmp_path / "tokenizer0").stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # readable by all


def _umask() -> int:
  import os

  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_a_directory_of_other_files_is_refused_not_emptied(tmp_path):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(InputError, match=r"holds other files \(notes.txt\) and no shapes tokenizer"):
    shapes.build_tokenizer(tmp_path / "mine")
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_half_written_tokenizer_directory_is_rebuilt(tmp_path):
  directory = tmp_path / "tok"
  directory.mkdir()
  (directory / "shapes_world.json").write_text('{"version": 3, "vo')  # cut off mid-write
  assert shapes.tokenizer(directory).vocab_size == len(shapes.SPECIAL_TOKENS) + len(shapes.vocabulary())
