"""Grain pipelines: batch format, shuffling and epochs, host sharding, checkpointable state,
augmentations, and evaluation sets."""

from __future__ import annotations

import dataclasses
import os
import sys
import signal
import threading
import time

import numpy as np
import pytest

from mat_jax.data import corpora, pipeline, shapes

TRAIN, TEST = 24, 10
SIZE = corpora.DEFAULT_SHAPES_IMAGE_SIZE  # the default build's resolution


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  builder = corpora.build_shapes(root / "data", train=TRAIN, val=0, test=TEST, seed=5, log=lambda m: None)
  from mat_jax.models.tokenizers import load_tokenizer

  tok = load_tokenizer(shapes.build_tokenizer(root / "tokenizer"), context_length=24)
  return corpora.data_source(builder, "train"), corpora.data_source(builder, "test"), tok


def _take(dataset, n: int) -> list[dict[str, np.ndarray]]:
  it = iter(dataset)
  try:
    return [next(it) for _ in range(n)]
  finally:
    it.close()


def _pipe(world, batch_size=4, **kwargs):
  train, _, tok = world
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  return pipeline.training_pipeline(train, tok, batch_size, **kwargs)


def test_batches_follow_the_shared_format(world):
  train, _, tok = world
  (batch,) = _take(_pipe(world, 4), 1)
  assert set(batch) == {"images", "input_ids", "attention_mask", "captions", "image_ids"}
  assert batch["images"].shape == (4, SIZE, SIZE, 3) and batch["images"].dtype == np.float32
  assert 0.0 <= batch["images"].min() and batch["images"].max() <= 1.0
  assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 24)
  assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int32
  assert batch["captions"].shape == (4,) and batch["captions"].dtype.kind == "U"
  assert batch["image_ids"].dtype == np.int32
  for i in range(4):
    record = train[int(batch["image_ids"][i])]
    np.testing.assert_allclose(batch["images"][i], record["image"] / 255.0, atol=1e-6)
    assert str(batch["captions"][i]) in [c.decode() for c in record["captions"]]
  np.testing.assert_array_equal(batch["input_ids"], tok(list(batch["captions"])).input_ids)


def test_batch_transforms_run_inside_the_pipeline(world):
  def count_words(batch):
    return {**batch, "words": np.asarray([len(str(c).split()) for c in batch["captions"]], np.int32)}

  (batch,) = _take(_pipe(world, 4, batch_transforms=[count_words]), 1)
  np.testing.assert_array_equal(batch["words"], batch["attention_mask"].sum(1) - 2)


def test_k_captions_per_image_are_distinct_captions_of_that_image(world):
  train, _, _ = world
  (batch,) = _take(_pipe(world, 3, captions_per_image=4), 1)
  assert batch["captions"].shape == (3, 4) and batch["input_ids"].shape == (3, 4, 24)
  for row, image_id in zip(batch["captions"], batch["image_ids"], strict=True):
    stored = [c.decode() for c in train[int(image_id)]["captions"]]
    assert len(set(row)) == 4 and set(row) <= set(stored)


def test_shuffle_is_seeded_epochs_cover_the_split_and_reshuffle(world):
  def ids(**kwargs):
    return np.concatenate([b["image_ids"] for b in _take(_pipe(world, 4, **kwargs), 12)])

  two_epochs = ids(num_epochs=2, seed=1)
  first, second = two_epochs[:TRAIN], two_epochs[TRAIN:]
  assert sorted(first) == sorted(second) == list(range(TRAIN))
  assert not np.array_equal(first, second)  # a new order every epoch
  np.testing.assert_array_equal(two_epochs, ids(num_epochs=2, seed=1))
  assert not np.array_equal(two_epochs, ids(num_epochs=2, seed=2))
  finite = _pipe(world, 5, num_epochs=1)
  assert sum(1 for _ in finite) == TRAIN // 5  # the remainder is dropped: every batch has 5


def test_hosts_read_disjoint_slices(world):
  seen = []
  for index in range(3):
    batches = list(_pipe(world, 2, num_epochs=1, process_index=index, process_count=3))
    seen.append(np.concatenate([b["image_ids"] for b in batches]))
  assert sorted(np.concatenate(seen)) == list(range(TRAIN))
  with pytest.raises(ValueError, match="process_index 3"):
    _pipe(world, 2, process_index=3, process_count=3)


def test_hosts_of_a_finite_stream_yield_the_same_number_of_batches(world):
  # 24 records, 5 hosts, batches of 2: slicing alone gives hosts 5, 5, 5, 5 and 4 records (2, 2, 2, 2, 2
  # batches, but 3 epochs give 15, 15, 14, 14, 14 records: 7 or 8 batches); a host with one batch more
  # than the others would wait for them in the step's collectives forever.
  counts = [sum(1 for _ in _pipe(world, 2, num_epochs=3, process_index=i, process_count=5)) for i in range(5)]
  assert counts == [3 * TRAIN // (5 * 2)] * 5


def _examples(dataset) -> dict[str, np.ndarray]:
  batches = list(dataset)
  return {k: np.concatenate([b[k] for b in batches]) for k in ("image_ids", "captions", "images")}


def test_hosts_are_not_in_lockstep(world):
  # Slicing before shuffling gave each host the same permutation of its slice (host 1 read host 0's
  # record + 1 everywhere) and the same random draws at each position.
  train, _, _ = world
  hosts = [_examples(_pipe(world, 2, num_epochs=1, seed=1, augmentations={"hflip": 0.5}, process_index=i,
                           process_count=2)) for i in range(2)]
  ids = [h["image_ids"] for h in hosts]
  assert len(ids[0]) == len(ids[1]) == TRAIN // 2
  assert sorted(np.concatenate(ids)) == list(range(TRAIN))  # disjoint, every record exactly once
  assert len(set((ids[1] - ids[0]).tolist())) > 1

  def draws(host):  # per position: the caption picked (its index in the record) and whether it was flipped
    picks, flips = [], []
    for image_id, caption, image in zip(host["image_ids"], host["captions"], host["images"], strict=True):
      record = train[int(image_id)]
      flipped = not np.allclose(image, record["image"] / 255.0, atol=1e-6)
      stored = [c.decode() for c in record["captions"]]
      picks.append(stored.index(shapes.hflip(record["image"], [str(caption)])[1][0] if flipped else str(caption)))
      flips.append(flipped)
    return np.asarray(picks), np.asarray(flips)

  (picks0, flips0), (picks1, flips1) = draws(hosts[0]), draws(hosts[1])
  assert 0 < flips0.sum() < len(flips0)  # the augmentation is on, and random
  assert not np.array_equal(flips0, flips1) and not np.array_equal(picks0, picks1)


def test_hosts_together_read_the_one_host_stream(world):
  # Host h's i-th example is example P*i + h of one host: same records, same captions, same augmentations,
  # so the number of hosts does not change what a run trains on (up to the order of a global batch).
  options = dict(num_epochs=2, seed=4, augmentations="hflip,eda,image_jitter")
  single = _examples(_pipe(world, 4, **options))
  hosts = [_examples(_pipe(world, 2, process_index=i, process_count=2, **options)) for i in range(2)]
  for key in single:
    for i, host in enumerate(hosts):
      np.testing.assert_array_equal(host[key], single[key][i::2])


@pytest.mark.parametrize("num_workers", [0, 2])  # accelerator hosts read through worker processes
def test_iterator_state_resumes_exactly_also_through_orbax(world, tmp_path, num_workers):
  dataset = _pipe(world, 4, augmentations="hflip,eda,i2t,t2i", num_workers=num_workers)
  it = iter(dataset)
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  pipeline.save_iterator(tmp_path / "it", it)  # saved after 4 batches
  after_save = next(it)
  it.set_state(state)
  for want in expected:
    got = next(it)
    np.testing.assert_array_equal(got["images"], want["images"])
    np.testing.assert_array_equal(got["captions"], want["captions"])
  it.close()
  fresh = pipeline.restore_iterator(tmp_path / "it", iter(dataset))
  got = next(fresh)
  fresh.close()
  np.testing.assert_array_equal(got["image_ids"], after_save["image_ids"])
  np.testing.assert_array_equal(got["input_ids"], after_save["input_ids"])
  assert list((tmp_path / "it").glob("process_0-of-1.json"))


def test_reader_threads_host_work_per_batch_does_not_grow_with_the_batch(world, monkeypatch):
  """Without worker processes the reader threads make whole batches: Grain's prefetch then looks through a
  buffer of a few batches once per batch, not through prefetch_batches * batch_size examples at every example
  (host work growing with the batch's square, on the cores a CPU backend's steps run on)."""
  from grain._src.python.dataset.transformations import prefetch as grain_prefetch

  scanned = []
  measure = grain_prefetch.PrefetchDatasetIterator._measure_prefetch_depth
  monkeypatch.setattr(grain_prefetch.PrefetchDatasetIterator, "_measure_prefetch_depth",
                      lambda self: (scanned.append(len(self._buffer)), measure(self))[1])
  batches = _take(_pipe(world, 8, num_threads=2), 4)
  assert len(batches) == 4
  assert 0 < len(scanned) <= 8 and max(scanned) <= 4  # per batch, a buffer of batches (today: 8 x 16 examples each)


def test_positions_are_told_in_examples_whatever_reads_them(world):
  """The position a checkpoint holds counts examples (batches x examples per batch, renderings apart), as the
  pipeline that read examples one by one told it: checkpoints of either resume in the other."""
  it = iter(_pipe(world, 4, renderings_per_scene=2, num_threads=2))
  for _ in range(3):
    next(it)
  assert it.get_state() == {"next_index": 6}  # 3 batches of 2 scenes
  want = next(it)
  it.set_state({"next_index": 6})
  np.testing.assert_array_equal(next(it)["images"], want["images"])
  with pytest.raises(ValueError, match="not a whole number of batches"):
    it.set_state({"next_index": 5})
  it.close()


def test_augmentations_keep_image_and_text_aligned(world):
  train, _, _ = world
  (flipped,) = _take(_pipe(world, 6, augmentations={"hflip": 1.0}), 1)
  (plain,) = _take(_pipe(world, 6), 1)
  np.testing.assert_array_equal(flipped["image_ids"], plain["image_ids"])  # augmenting keeps the order
  for i, image_id in enumerate(flipped["image_ids"]):
    record = train[int(image_id)]
    scene = shapes.Scene.from_record(record["scene"])
    np.testing.assert_allclose(flipped["images"][i], record["image"][:, ::-1] / 255.0, atol=1e-6)
    assert shapes.consistent(shapes.parse(str(flipped["captions"][i])), shapes.flip_scene(scene))

  (mixed,) = _take(_pipe(world, 6, captions_per_image=2, augmentations="i2t:1,t2i:1,eda:1"), 1)
  for i, image_id in enumerate(mixed["image_ids"]):
    record = train[int(image_id)]
    scene = shapes.Scene.from_record(record["scene"])
    assert not np.allclose(mixed["images"][i], record["image"] / 255.0)  # a new rendering
    for caption in mixed["captions"][i]:
      assert shapes.consistent(shapes.parse(str(caption)), scene), caption

  (drawn,) = _take(_pipe(world, 6, augmentations="t2i_caption:1,image_jitter:1"), 1)
  for caption in drawn["captions"]:
    shapes.parse(str(caption))  # still a caption of the world
  assert 0.0 <= drawn["images"].min() and drawn["images"].max() <= 1.0


def test_augmentation_probabilities_are_obeyed(world):
  # An augmentation named at probability 0 changes nothing (a probability read the wrong way round, or
  # ignored, would mirror, edit or misalign every example); at 1, misalign falsifies the captions it is given.
  train, _, _ = world
  (plain,) = _take(_pipe(world, 8, captions_per_image=2), 1)
  (off,) = _take(_pipe(world, 8, captions_per_image=2, augmentations="hflip:0,eda:0,misalign:0"), 1)
  for key in ("images", "captions", "image_ids"):
    np.testing.assert_array_equal(off[key], plain[key])
  (on,) = _take(_pipe(world, 8, captions_per_image=2, augmentations="eda:1,misalign:1"), 1)
  scenes = [shapes.Scene.from_record(train[int(i)]["scene"]) for i in on["image_ids"]]
  captions = [(str(c), scene) for row, scene in zip(on["captions"], scenes, strict=True) for c in row]
  assert sum(not shapes.consistent(shapes.parse(c), scene) for c, scene in captions) >= len(captions) // 2
  stored = {c.decode() for i in on["image_ids"] for c in train[int(i)]["captions"]}
  assert sum(c not in stored for c, _ in captions) > len(captions) // 2


def test_text_attack_candidates_follow_their_captions_through_the_batch(world):
  # The candidates transform (`inputs.AttachCandidates`) prepares the captions it has not seen in one call
  # and caches them one by one: each (image, caption) slot must get its own caption's rows, however the
  # captions were grouped when they were prepared (rows shifted by one slot attack the wrong caption).
  from mat_jax.training import inputs

  _, _, tok = world
  (batch,) = _take(_pipe(world, 2, captions_per_image=2), 1)

  def attach():
    return inputs.AttachCandidates(tok, inputs.make_source("paraphrase"), max_words=tok.context_length - 2,
                                   max_pieces=4, top_k=4, max_targets=8)

  out = attach()(batch)
  alone = attach()({"captions": batch["captions"].reshape(-1)[::-1].copy()})  # the same captions, reversed
  for name in inputs.PER_CAPTION:
    got = out[inputs.PREFIX + name]
    assert got.shape[:2] == (2, 2), name
    np.testing.assert_array_equal(got.reshape((4,) + got.shape[2:])[::-1], alone[inputs.PREFIX + name], err_msg=name)
  assert out[inputs.PREFIX + "mask_pieces"].shape[0] == out[inputs.PREFIX + "mask_length"].shape[0] == 2



@pytest.mark.parametrize("options,workers", [({}, 0), ({"captions_per_image": 2, "augmentations": "i2t,hflip"}, 0),
                                             ({"renderings_per_scene": 2, "seed": 3}, 2)])
def test_first_batch_is_the_pipelines_first_made_in_the_calling_thread(world, options, workers):
  """`first_batch` (the shapes a train step compiles for ahead of the pipeline) is the batch the pipeline
  delivers first, values and all, whatever its options, with worker processes or without."""
  train, _, tok = world
  options = dict(options, process_index=0, process_count=1)
  before = set(threading.enumerate())
  made = pipeline.first_batch(train, tok, 4, **options)
  assert set(threading.enumerate()) <= before  # no reader threads, no workers
  (delivered,) = _take(_pipe(world, 4, num_workers=workers, **options), 1)
  assert made.keys() == delivered.keys()
  for key in made:
    np.testing.assert_array_equal(made[key], delivered[key], err_msg=key)


def test_a_candidates_stand_in_shapes_a_batch_as_its_transform_does(world):
  """`AttachCandidates.stand_in()` adds the same keys, shapes and dtypes without its source's substitutes,
  and leaves the transform's own cache alone."""
  from mat_jax.training import inputs

  _, _, tok = world
  (batch,) = _take(_pipe(world, 2, captions_per_image=2), 1)
  attach = inputs.AttachCandidates(tok, inputs.make_source("paraphrase"), max_words=tok.context_length - 2,
                                   max_pieces=4, top_k=4, max_targets=8)
  shaped = attach.stand_in()(batch)
  assert not attach._cache
  real = attach(batch)
  assert shaped.keys() == real.keys()
  for key in real:
    assert np.asarray(shaped[key]).shape == np.asarray(real[key]).shape, key
    assert np.asarray(shaped[key]).dtype == np.asarray(real[key]).dtype, key
  assert real[inputs.PREFIX + "sub_lengths"].any() and not shaped[inputs.PREFIX + "sub_lengths"].any()

def test_i2t_writes_fresh_captions_in_the_worlds_lexicon(world):
  others = {w for group in shapes._synonym_groups() if group != shapes.PICTURE_WORDS for w in group[1:]}
  batches = {rate: _take(_pipe(world, 8, captions_per_image=3, augmentations="i2t:1", rare_form_rate=rate), 2)
             for rate in (None, 0.0)}
  words = {rate: {w for batch in got for caption in batch["captions"].reshape(-1) for w in str(caption).split()}
           for rate, got in batches.items()}
  assert words[None] & others and not words[0.0] & others  # held-out forms never reach a training batch


class _Without:
  """A source whose records lack one field."""

  def __init__(self, source, field):
    self.source, self.field = source, field

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return {k: v for k, v in self.source[i].items() if k != self.field}


def test_bad_pipeline_options_are_explained(world):
  with pytest.raises(ValueError, match="unknown augmentation 'flip'.*hflip"):
    _pipe(world, 4, augmentations="flip")
  with pytest.raises(ValueError, match=r"probability 1\.5"):
    _pipe(world, 4, augmentations="eda:1.5")
  with pytest.raises(ValueError, match=r"t2i_caption .* captions_per_image=1 and renderings_per_scene=1 "
                                       r"\(got 2 and 1\)"):
    _pipe(world, 4, captions_per_image=2, augmentations="t2i_caption")
  with pytest.raises(ValueError, match=r"t2i_caption .* \(got 1 and 2\)"):
    _pipe(world, 4, renderings_per_scene=2, augmentations="t2i_caption")
  with pytest.raises(ValueError, match="records make no batch of 25 examples on each of 1 host"):
    _pipe(world, 25, num_epochs=1)

  _, _, tok = world
  with pytest.raises(ValueError, match=r"\['i2t'\] .* only shapes-world records"):
    pipeline.training_pipeline(_Without(world[0], "scene"), tok, 4, augmentations="i2t,hflip", process_index=0,
                               process_count=1)
  # eda's synonyms are the shapes world's: on another corpus they change meanings (star -> pentagram).
  with pytest.raises(ValueError, match=r"\['eda'\] edit captions through the shapes world's lexicon"):
    pipeline.training_pipeline(_Without(world[0], "scene"), tok, 4, augmentations="eda,hflip", process_index=0,
                               process_count=1)


def test_records_without_image_id_are_refused(world):
  # Without ids every image of a batch would be a positive of every caption: a contrastive loss of 0.
  _, _, tok = world
  with pytest.raises(pipeline.DataSourceError, match=r"lack \['image_id'\]\. Rebuild the dataset"):
    pipeline.training_pipeline(_Without(world[0], "image_id"), tok, 4, process_index=0, process_count=1)
  with pytest.raises(pipeline.DataSourceError, match="the data source is empty"):
    pipeline.training_pipeline([], tok, 4, process_index=0, process_count=1)


class RecordingTransform:
  """A batch transform that notes the thread it runs on and marks the batch."""

  def __init__(self):
    self.threads = set()

  def __call__(self, batch):
    self.threads.add(threading.get_ident())
    return {**batch, "transformed": np.ones(len(batch["image_ids"]))}


def test_worker_processes_deliver_the_same_batches_and_transform_them_off_the_loop(world):
  # Two workers, seven batches (an epoch of 24 images is six of 4): each worker makes whole batches of the
  # one-process stream, so the batches are those of any other worker count, and an epoch ends where it does.
  threads = _take(_pipe(world, 4, seed=3, augmentations="hflip"), 7)
  transform = RecordingTransform()
  in_workers = _take(_pipe(world, 4, seed=3, augmentations="hflip", num_workers=2, batch_transforms=[transform]), 7)
  for a, b in zip(threads, in_workers, strict=True):
    np.testing.assert_array_equal(a["image_ids"], b["image_ids"])
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert "transformed" in b
  # The candidates of a text attack are prepared beside the training loop, not on its thread.
  assert transform.threads and threading.get_ident() not in transform.threads
  # A finite stream keeps every whole batch: 24 images in batches of 7 are 3, whatever the workers (two
  # workers make 2 and 1: batching each worker's share of the 24 would leave them 1 each).
  for workers in (0, 2):
    it = iter(_pipe(world, 7, num_epochs=1, num_workers=workers))
    try:
      assert sum(1 for _ in it) == 3, workers
    finally:
      it.close()


class WorkersMeet:
  """A source whose reads wait, in each worker process, until `workers` processes have read: a pipeline
  that started its workers one after the other never gets past its first worker's first batch."""

  def __init__(self, source, directory, workers: int):
    self.source, self.directory, self.workers = source, directory, workers
    self.main_process = os.getpid()  # reads here (the pipeline checks a record) do not wait

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    if os.getpid() == self.main_process:
      return self.source[index]
    # Each worker also says whether it leaves Ctrl-C to the training process (see the test below).
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    (self.directory / f"{os.getpid()}").write_text("SIGINT ignored" if ignored else "SIGINT handled")
    deadline = time.monotonic() + 60
    while len(list(self.directory.iterdir())) < self.workers:
      if time.monotonic() > deadline:
        raise TimeoutError(f"worker {os.getpid()} read alone for 60 s: the other workers never started")
      time.sleep(0.05)
    return self.source[index]


def test_worker_processes_start_together_not_one_after_another(world, tmp_path):
  train, _, tok = world
  source = WorkersMeet(train, tmp_path, workers=2)
  dataset = pipeline.training_pipeline(source, tok, 4, process_index=0, process_count=1, num_workers=2,
                                       decoded_cache_bytes=0)
  (batch,) = _take(dataset, 1)
  assert batch["images"].shape[0] == 4 and len(list(tmp_path.iterdir())) == 2
  # A terminal's Ctrl-C reaches the whole process group: the workers leave it to the training process,
  # which checkpoints and stops them (each printed a KeyboardInterrupt traceback before).
  assert [p.read_text() for p in tmp_path.iterdir()] == ["SIGINT ignored"] * 2


class ModulesSeen:
  """A data source that records, in each worker process, whether the training command's modules were
  imported there."""

  def __init__(self, source, directory):
    self.source, self.directory = source, directory

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    imported = "mat_jax.training.demo" in sys.modules or "mat_jax.training.loop" in sys.modules
    (self.directory / f"{os.getpid()}").write_text("imported" if imported else "not imported")
    return self.source[index]


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_of_a_mat_jax_command_do_not_import_its_main_module(world, tmp_path, monkeypatch, workers):
  # Spawned processes import the parent's __main__ first: for `python -m mat_jax.train` the whole framework.
  import importlib.util
  from multiprocessing import spawn

  train, _, tok = world
  main = sys.modules["__main__"]
  command = importlib.util.find_spec("mat_jax.train")
  monkeypatch.setattr(main, "__spec__", command)  # as under `python -m mat_jax.train`
  assert spawn.get_preparation_data("worker")["init_main_from_name"] == "mat_jax.train"
  dataset = pipeline.training_pipeline(ModulesSeen(train, tmp_path), tok, 4, process_index=0, process_count=1,
                                       num_workers=workers, decoded_cache_bytes=0)
  (batch,) = _take(dataset, 1)
  (without_workers,) = _take(_pipe(world, 4, decoded_cache_bytes=0), 1)
  np.testing.assert_array_equal(batch["images"], without_workers["images"])
  in_workers = [p.read_text() for p in tmp_path.iterdir() if p.name != str(os.getpid())]
  assert in_workers == ["not imported"] * workers
  assert main.__spec__ is command  # named again once the workers have started


UNGUARDED_SCRIPT = """
# A user's script without an `if __name__ == "__main__":` guard, reading through worker processes a data
# source whose class it defines itself. It says once per process that runs it.
import os
import sys

from mat_jax.data import corpora, pipeline, shapes

print("script run by", os.getpid(), flush=True)


class MySource:
  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return self.source[index]


builder = corpora.build_shapes(sys.argv[1], log=lambda message: None, train=8, val=0, test=0, image_size=16, seed=3)
source = MySource(corpora.data_source(builder, "train"))
dataset = pipeline.training_pipeline(source, shapes.tokenizer(sys.argv[2]), 4, process_index=0, process_count=1,
                                     num_workers=2)
iterator = iter(dataset)
print("batch", next(iterator)["images"].shape, flush=True)
iterator.close()
"""


def test_a_script_without_a_main_guard_runs_once_with_worker_processes(tmp_path):
  # Python's spawn would run the script again in each worker as it starts (and the workers would die): the
  # workers start without the main module, and the script's own class reaches them by value.
  import subprocess

  script = tmp_path / "unguarded.py"
  script.write_text(UNGUARDED_SCRIPT)
  result = subprocess.run([sys.executable, str(script), str(tmp_path / "data"), str(tmp_path / "tok")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("script run by") == 1, result.stdout
  assert "batch (4, 16, 16, 3)" in result.stdout


KILLED_READER_SCRIPT = """
import sys
import time

from mat_jax.data import corpora, pipeline, shapes

builder = corpora.build_shapes(sys.argv[1], log=lambda message: None, train=8, val=0, test=0, image_size=16, seed=3)
dataset = pipeline.training_pipeline(corpora.data_source(builder, "train"), shapes.tokenizer(sys.argv[2]), 4,
                                     process_index=0, process_count=1, num_workers=2)
iterator = iter(dataset)
next(iterator)
print("reading", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads the processes from /proc")
def test_worker_processes_end_with_a_killed_run(tmp_path):
  """A run killed outright (SIGKILL, the OOM killer) takes its pipeline's workers along: orphaned, they ran on,
  each holding its memory and the run's stdout (so `| tee` never ended)."""
  import subprocess

  import helpers

  script = tmp_path / "reader.py"
  script.write_text(KILLED_READER_SCRIPT)
  reader = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data"), str(tmp_path / "tok")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
  children = {}
  try:
    for line in reader.stdout:
      if line.startswith("reading"):
        break
    workers = [pid for pid, _ in helpers.child_processes(reader.pid).items()
               if "spawn_main" in open(f"/proc/{pid}/cmdline").read()]
    children = helpers.child_processes(reader.pid)
    assert len(workers) == 2, f"{reader.poll()=}, {children=}"
    assert not helpers.survivors_after_kill(reader, children)
  finally:
    reader.kill()
    helpers.kill_processes(children)


def test_eval_set_holds_all_images_captions_and_index_maps(world):
  _, test, tok = world
  ev = pipeline.load_eval_set(test, tok)
  assert ev.num_images == TEST and ev.num_texts == 5 * TEST
  assert ev.images.dtype == np.uint8 and ev.images.shape == (TEST, SIZE, SIZE, 3)
  assert ev.input_ids.shape == (5 * TEST, 24)
  np.testing.assert_array_equal(ev.text_to_image, np.repeat(np.arange(TEST), 5))
  assert ev.image_to_texts.shape == (TEST, 5)
  for i in range(TEST):
    assert [str(ev.captions[t]) for t in ev.image_to_texts[i]] == [c.decode() for c in test[i]["captions"]]
    assert (ev.text_to_image[ev.image_to_texts[i]] == i).all()
  assert len(ev.scenes) == TEST and shapes.ambiguity(ev.scenes, [list(ev.captions[r]) for r in ev.image_to_texts])[
      "wrong_fraction"] == 0.0
  batches = list(ev.image_batches(4))
  assert [count for _, count in batches] == [4, 4, 2]
  assert all(b.shape == (4, SIZE, SIZE, 3) and b.dtype == np.float32 for b, _ in batches)
  np.testing.assert_allclose(batches[2][0][:2], ev.float_images(8, 10))
  assert (batches[2][0][2:] == 0).all()
  # An evaluation set of float pixels (the evaluator takes either) is not scaled a second time.
  as_float = dataclasses.replace(ev, images=ev.float_images())
  np.testing.assert_array_equal(as_float.float_images(0, 2), ev.float_images(0, 2))
  two = pipeline.load_eval_set(test, tok, max_images=3, captions_per_image=2)
  assert two.num_texts == 6 and two.image_to_texts.tolist() == [[0, 1], [2, 3], [4, 5]]


def test_eval_set_pads_uneven_caption_counts():
  class Uneven:
    records = [{"image": np.zeros((8, 8, 3), np.uint8), "captions": [b"a"] * n, "image_id": i}
               for i, n in enumerate((5, 6, 5))]

    def __len__(self):
      return 3

    def __getitems__(self, keys):
      return [self.records[k] for k in keys]

  class Tok:
    def __call__(self, texts):
      n = len(texts)
      return type("T", (), {"input_ids": np.ones((n, 4), np.int32), "attention_mask": np.ones((n, 4), np.int32)})

  ev = pipeline.load_eval_set(Uneven(), Tok())
  assert ev.num_texts == 16 and ev.image_to_texts.shape == (3, 6)
  assert ev.image_to_texts[0, 5] == -1 and ev.image_to_texts[1, 5] == 10
  # A plain list of records (no batched __getitems__, as the training pipeline takes it) reads the same.
  from_list = pipeline.load_eval_set(list(Uneven.records), Tok())
  np.testing.assert_array_equal(from_list.image_to_texts, ev.image_to_texts)
  # Records of float pixels in [0, 1] keep their values (a uint8 cast would make them black), uint8
  # records beside them are scaled; other integer pixels are refused by name.
  pixels = np.random.default_rng(0).random((8, 8, 3), np.float32)
  mixed = [dict(Uneven.records[0], image=pixels), Uneven.records[1]]
  floats = pipeline.load_eval_set(mixed, Tok())
  assert floats.images.dtype == np.float32
  np.testing.assert_array_equal(floats.float_images(0, 1)[0], pixels)
  np.testing.assert_array_equal(floats.float_images(1, 2)[0], 0.0)
  with pytest.raises(ValueError, match="record 1 of the evaluation split has a uint16 image"):
    pipeline.load_eval_set([Uneven.records[0], dict(Uneven.records[1], image=np.zeros((8, 8, 3), np.uint16))], Tok())


def test_auto_workers_stay_in_process_on_a_cpu_backend_and_scale_with_an_accelerator_hosts_cores():
  assert pipeline.auto_worker_count("cpu", 64) == 0  # the step itself uses the cores
  assert pipeline.auto_worker_count("gpu", 4) == 0
  assert pipeline.auto_worker_count("gpu", 16) == 8
  assert pipeline.auto_worker_count("tpu", 240) == 8
  assert pipeline.auto_worker_count("gpu", None) == 0
  assert pipeline.DEFAULT_NUM_THREADS >= 4
  # Worker processes share the host's cores as reader threads instead of taking all of them each.
  assert pipeline.threads_per_process(16, 0, 16) == 16
  assert pipeline.threads_per_process(16, 8, 16) == 2
  assert pipeline.threads_per_process(16, 4, 64) == 16
  assert pipeline.threads_per_process(4, 8, 4) == 2


class CountingSource:
  """A source that counts how often each record is read."""

  def __init__(self, source):
    self.source, self.reads = source, np.zeros(len(source), int)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    self.reads[index] += 1
    return self.source[index]


def test_decoded_cache_reads_each_record_once_and_changes_no_batch(world):
  train, _, tok = world
  epochs = 3 * TRAIN // 4  # three epochs of batches of 4
  counted = CountingSource(train)
  cached = _take(pipeline.training_pipeline(counted, tok, 4, process_index=0, process_count=1), epochs)
  # Once for the pipeline's check of the first record, once for the cache: later epochs read memory
  # (two reader threads may both miss a record read at the end of one epoch and the start of the next).
  assert counted.reads[0] <= 2 and (counted.reads[1:] >= 1).all() and counted.reads[1:].sum() <= TRAIN + 1
  uncounted = CountingSource(train)
  plain = _take(pipeline.training_pipeline(uncounted, tok, 4, process_index=0, process_count=1,
                                           decoded_cache_bytes=0), epochs)
  assert uncounted.reads[1:].min() >= 3
  for a, b in zip(cached, plain, strict=True):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_decoded_cache_keeps_records_read_only_within_its_budget_and_pickles_empty(world):
  import pickle

  train, _, _ = world
  one = pipeline.DecodedCache(train)[0]
  with pytest.raises(ValueError, match="read-only"):
    one["image"][0, 0, 0] = 0
  record_bytes = pipeline._nbytes(train[0])
  counted = CountingSource(train)
  small = pipeline.DecodedCache(counted, max_bytes=3 * record_bytes)
  for _ in range(2):
    for i in range(TRAIN):
      small[i]
  assert 0 < small.cached_bytes <= 3 * record_bytes
  kept = int((counted.reads == 1).sum())
  assert 1 <= kept <= 3 and (counted.reads[counted.reads != 1] == 2).all()
  copy = pickle.loads(pickle.dumps(small))
  assert copy.cached_bytes == 0 and len(copy) == TRAIN
  np.testing.assert_array_equal(copy[5]["image"], train[5]["image"])


def test_decoded_cache_budget_bounds_the_memory_it_holds(world):
  """The budget is memory, array headers and containers included: counting data bytes alone, a cache of
  shapes-world records held 1.3x (48 px) to 3x (16 px) its budget."""
  import gc
  import pickle
  import tracemalloc

  train, _, _ = world
  records = [train[i] for i in range(TRAIN)]

  class FreshRecords:
    """Shapes-world records, each read a new copy (as the reader decodes one), so what the cache keeps is new."""

    def __len__(self):
      return 400

    def __getitem__(self, index):  # every object new, keys and caption bytes too, as the reader makes them
      return pickle.loads(pickle.dumps(records[index % TRAIN]))

  budget = 200 * pipeline._nbytes(records[0])
  gc.collect()
  tracemalloc.start()
  try:
    cache = pipeline.DecodedCache(FreshRecords(), max_bytes=budget)
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(len(cache)):
      cache[i]
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
  finally:
    tracemalloc.stop()
  assert cache.cached_bytes <= budget and held <= 1.05 * budget, (held, budget)
  assert held >= 0.9 * cache.cached_bytes  # the count is of what is held, not a loose upper bound
