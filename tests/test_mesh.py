"""Mesh parsing, batch placement and parameter sharding rules (8 simulated CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mat_jax import mesh as mesh_lib


def test_mesh_specs(devices):
  assert dict(mesh_lib.make_mesh().shape) == {"data": 8, "fsdp": 1}
  assert dict(mesh_lib.make_mesh("8").shape) == {"data": 8, "fsdp": 1}
  assert dict(mesh_lib.make_mesh("data=4,fsdp=2").shape) == {"data": 4, "fsdp": 2}
  assert dict(mesh_lib.make_mesh("fsdp=8").shape) == {"data": 1, "fsdp": 8}
  assert mesh_lib.make_mesh("2").devices.size == 2


@pytest.mark.parametrize("spec, message", [
    ("data=4,fsdp=4", "needs 16 devices"),
    ("model=2", "unknown mesh axis"),
    ("data=two", "cannot parse mesh"),
    ("data=2,data=2", "given twice"),
])
def test_bad_mesh_specs(devices, spec, message):
  with pytest.raises(mesh_lib.MeshError, match=message):
    mesh_lib.make_mesh(spec)


def test_batch_size_must_divide_the_batch_devices(devices):
  mesh = mesh_lib.make_mesh("data=4,fsdp=2")
  mesh_lib.check_batch_size(16, mesh)
  with pytest.raises(mesh_lib.MeshError, match="multiple of 8"):
    mesh_lib.check_batch_size(12, mesh)


def test_global_batch_is_split_over_data_and_fsdp(devices):
  mesh = mesh_lib.make_mesh("data=4,fsdp=2")
  local = {"images": np.arange(16 * 2, dtype=np.float32).reshape(16, 2),
           "input_ids": np.zeros((16, 3, 5), np.int32),
           "captions": np.asarray(["a caption"] * 16)}
  batch = mesh_lib.global_batch(local, mesh)
  assert set(batch) == {"images", "input_ids"}  # strings stay on the host
  assert batch["input_ids"].shape == (16, 3, 5)
  shards = batch["images"].addressable_shards
  assert len(shards) == 8 and all(s.data.shape == (2, 2) for s in shards)
  np.testing.assert_array_equal(np.asarray(batch["images"]), local["images"])


def test_a_batch_already_on_the_devices_passes_as_it_is(devices):
  # What the input pipeline's last stage (mesh.OnDevices) made reaches the step unchanged.
  mesh = mesh_lib.make_mesh("data=4,fsdp=2")
  local = {"images": np.ones((8, 2), np.float32), "captions": np.asarray(["a caption"] * 8)}
  on_devices = mesh_lib.OnDevices(mesh)(local)
  assert set(on_devices) == {"images"} and on_devices["images"].sharding == mesh_lib.batch_sharding(mesh)
  assert mesh_lib.global_batch(on_devices, mesh)["images"] is on_devices["images"]


def test_fsdp_shards_the_largest_divisible_axis(devices):
  mesh = mesh_lib.make_mesh("data=2,fsdp=4")
  assert mesh_lib.spec_for((6, 8), None, mesh, "fsdp") == P(None, "fsdp")
  assert mesh_lib.spec_for((16, 8), None, mesh, "fsdp") == P("fsdp", None)
  assert mesh_lib.spec_for((3, 5), None, mesh, "fsdp") == P()  # nothing divisible: replicated
  assert mesh_lib.spec_for((), None, mesh, "fsdp") == P()
  assert mesh_lib.spec_for((6, 8), None, mesh, "replicated") == P()


def test_logical_rules(devices):
  mesh = mesh_lib.make_mesh("data=2,fsdp=4")
  rules = mesh_lib.parse_logical_rules("embed=fsdp,mlp=fsdp")
  assert mesh_lib.spec_for((128, 512), ("embed", "mlp"), mesh, "logical", rules) == P("fsdp", None)
  assert mesh_lib.spec_for((512, 128), ("mlp", "embed"), mesh, "logical", rules) == P("fsdp", None)
  assert mesh_lib.spec_for((6, 128), ("embed", "mlp"), mesh, "logical", rules) == P(None, "fsdp")
  assert mesh_lib.spec_for((6,), ("embed",), mesh, "logical", rules) == P(None)
  # A rule may name the data axis (ZeRO-style sharding over the data-parallel devices), fsdp axis or not.
  data_only = mesh_lib.make_mesh("8")
  assert mesh_lib.spec_for((128, 512), ("embed", "mlp"), data_only, "logical", {"embed": "data"}) == P("data", None)
  assert mesh_lib.spec_for((128, 512), ("embed", "mlp"), data_only, "logical", rules) == P(None, None)  # fsdp=1
  with pytest.raises(mesh_lib.MeshError, match="mesh axis must be one of"):
    mesh_lib.parse_logical_rules("embed=model")


def test_param_shardings_read_logical_names(devices):
  from flax import nnx
  from mat_jax.models import CLIP, clip_config, split
  from mat_jax.models.clip import TextConfig, VisionConfig

  cfg = clip_config("tiny", vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2,
                                                mlp_dim=64),
                    text=TextConfig(vocab_size=64, context_length=8, width=32, layers=1, heads=2, mlp_dim=64,
                                    eos_token_id=3, bos_token_id=2, pad_token_id=0), projection_dim=32)
  _, params = split(nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0))))
  mesh = mesh_lib.make_mesh("data=4,fsdp=2")
  logical = mesh_lib.param_shardings(params, mesh, "logical", "embed=fsdp")
  fc1 = logical["vision"]["blocks"][0]["fc1"]["kernel"]
  assert fc1.spec == P("fsdp", None)  # (embed, mlp)
  # A misspelt name sharded nothing, silently: FSDP without its memory saving.
  with pytest.raises(mesh_lib.MeshError, match=r"rules name \['embd'\], which no parameter has; the model's logical "
                                               r"axes are \[.*'embed'.*'mlp'"):
    mesh_lib.param_shardings(params, mesh, "logical", "embd=fsdp,mlp=fsdp")
  # Every logical name a parameter carries is one the run's mesh check knows (layers.LOGICAL_AXES), so a
  # misspelt rule is refused before any model is built or trained.
  from mat_jax import config as config_lib
  from mat_jax.models import layers
  from mat_jax.training import loop
  carried = {name for spec in jax.tree.leaves(nnx.get_partition_spec(params), is_leaf=lambda x: isinstance(x, P))
             for name in spec if isinstance(name, str)}
  assert carried == set(layers.LOGICAL_AXES)
  for rules, message in (("embd=fsdp", r"mesh.logical_rules names \['embd'\], which no parameter has"),
                         ("embed=fsdq", "the mesh axis must be one of"), ("embed", "cannot parse")):
    config = config_lib.build({"mesh": {"param_sharding": "logical", "logical_rules": rules}})
    with pytest.raises(mesh_lib.MeshError, match=message):
      loop.run_mesh(config, "data=4,fsdp=2")
  fsdp = mesh_lib.param_shardings(params, mesh, "fsdp")
  assert fsdp["vision"]["blocks"][0]["fc1"]["kernel"].spec == P(None, "fsdp")  # 64 > 32
  assert fsdp["logit_scale"].spec == P()
  replicated = mesh_lib.param_shardings(params, mesh)
  assert all(s.spec == P() for s in jax.tree.leaves(replicated))


def test_a_parameter_sharding_that_splits_nothing_on_several_devices_is_refused(devices):
  """fsdp on a mesh without an fsdp axis (--mesh 8), or logical rules naming only one-device axes, would
  replicate every parameter on every device: refused, with the mesh that splits them."""
  from mat_jax import config as config_lib
  from mat_jax.training import loop

  def run_mesh(spec, **mesh):
    return loop.run_mesh(config_lib.build({"mesh": mesh}), spec)

  for mesh in ({"param_sharding": "fsdp"}, {"param_sharding": "logical"}):  # the default rules: embed=fsdp
    with pytest.raises(mesh_lib.MeshError, match=rf"param_sharding={mesh['param_sharding']} splits the parameters "
                                                 r"over .*gives one device.*--mesh data=4,fsdp=2"):
      run_mesh("8", **mesh)
    run_mesh("data=4,fsdp=2", **mesh)
    run_mesh("1", **mesh)  # one device: nothing to split, as on a laptop
  run_mesh("8", param_sharding="logical", logical_rules="embed=data")
  run_mesh("8", param_sharding="replicated")
  split = mesh_lib.sharded_count(mesh_lib.param_shardings({"w": np.zeros((8, 4)), "b": np.zeros(3)},
                                                          mesh_lib.make_mesh("data=4,fsdp=2"), "fsdp"))
  assert split == (1, 2)


def test_single_process_needs_no_distributed_start(monkeypatch):
  for var in (mesh_lib.ENV_COORDINATOR, mesh_lib.ENV_NUM_PROCESSES, mesh_lib.ENV_PROCESS_ID):
    monkeypatch.delenv(var, raising=False)
  assert mesh_lib.initialize_distributed() is False
  with pytest.raises(mesh_lib.MeshError, match="--process-id"):
    mesh_lib.initialize_distributed("localhost:1234", 2, None)
  with pytest.raises(mesh_lib.MeshError, match="--coordinator, --num-processes"):  # process 1 of how many?
    mesh_lib.initialize_distributed(None, None, 1)


@pytest.mark.parametrize("args, message", [
    (("notahost", 1, 0), "coordinator address 'notahost': give it as HOST:PORT"),
    (("localhost", 2, 0), "coordinator address 'localhost': give it as HOST:PORT"),
    (("localhost:99999", 2, 0), "give it as HOST:PORT"),
    (("localhost:1234", 0, 0), "the number of processes is 0; it must be at least 1"),
    ((None, 0, None), "the number of processes is 0; it must be at least 1"),  # else one process, silently
    ((None, None, -1), "process id -1 is negative"),  # else one process, silently
    (("localhost:1234", 2, -1), "process id -1 is negative"),
    # jax.distributed would take these and wait for peers that cannot register, then abort the process.
    (("http://localhost:1234", 2, 0), "'http://localhost:1234': give it as HOST:PORT.*no scheme or spaces"),
    (("localhost :1234", 2, 0), "no scheme or spaces"),
])
def test_a_bad_multi_process_setting_is_named_before_jax_starts(monkeypatch, args, message):
  # Else they reach jax.distributed and come back as a traceback (IndexError, exit 1) or a hang.
  monkeypatch.setattr(jax.distributed, "initialize", lambda **_: pytest.fail("jax.distributed was started"))
  with pytest.raises(mesh_lib.MeshError, match=message):
    mesh_lib.initialize_distributed(*args)


@pytest.mark.parametrize("address", ["10.0.0.1:1234", "node-3.cluster.local:8476", "[::1]:1234", "localhost:1"])
def test_a_coordinator_address_of_host_and_port_starts_jax_distributed(monkeypatch, address):
  started = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: started.append(kwargs))
  assert mesh_lib.initialize_distributed(address, 2, 1) is True
  assert started == [{"coordinator_address": address, "num_processes": 2, "process_id": 1}]


@pytest.mark.parametrize("value", ["true", "yes"])
def test_an_auto_detection_switch_other_than_1_or_0_is_refused(monkeypatch, value):
  # Ignored, every process of a pod run would go on as a single-process run of its own.
  for var in (mesh_lib.ENV_COORDINATOR, mesh_lib.ENV_NUM_PROCESSES, mesh_lib.ENV_PROCESS_ID):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("MAT_JAX_DISTRIBUTED", value)
  with pytest.raises(mesh_lib.MeshError, match=f"MAT_JAX_DISTRIBUTED='{value}': set it to 1"):
    mesh_lib.initialize_distributed()
  monkeypatch.setenv("MAT_JAX_DISTRIBUTED", "0")
  assert mesh_lib.initialize_distributed() is False


def test_auto_detection_without_a_cluster_is_one_error(monkeypatch):
  for var in (mesh_lib.ENV_COORDINATOR, mesh_lib.ENV_NUM_PROCESSES, mesh_lib.ENV_PROCESS_ID):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("MAT_JAX_DISTRIBUTED", "1")

  def no_cluster(**_):
    raise ValueError("coordinator_address should be defined.")  # what jax says outside a known cluster

  monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
  with pytest.raises(mesh_lib.MeshError, match="could not start by auto-detection .* coordinator_address should be "
                                               "defined.* --coordinator, --num-processes and --process-id"):
    mesh_lib.initialize_distributed()


def test_cli_mesh_errors_are_one_line_and_come_first(monkeypatch, tmp_path, capsys):
  # The demo checks --mesh before building the world and training its clean model (minutes), and
  # neither a bad mesh nor a bad multi-host variable ends in a traceback.
  from mat_jax import train
  from mat_jax.data import corpora
  monkeypatch.setattr(corpora, "build_shapes", lambda *a, **k: pytest.fail("the world was built before the mesh check"))
  for argv, message in [(["--mesh", "data=4,fdsp=2"], "fdsp"), (["--mesh", "3"], "batch"),
                        (["--no-eval"], "--no-eval skips a training run's evaluations")]:
    assert train.main([*argv, "--workdir", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
  for var in (mesh_lib.ENV_COORDINATOR, mesh_lib.ENV_PROCESS_ID):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv(mesh_lib.ENV_NUM_PROCESSES, "two")
  assert train.main(["--workdir", str(tmp_path / "demo")]) == 2
  assert f"{mesh_lib.ENV_NUM_PROCESSES}='two' is not an integer" in capsys.readouterr().err


def test_renderings_per_scene_must_divide_each_processs_share_of_the_batch(monkeypatch):
  # The config check sees the global batch only; each process then read 4 images in scenes of 8 and
  # failed after building the dataset, naming a batch size of 4 nobody set.
  from mat_jax import config as config_lib
  from mat_jax.training import loop

  config = config_lib.build({"train": {"batch_size": 16}, "data": {"renderings_per_scene": 8}})
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  with pytest.raises(mesh_lib.MeshError, match=r"renderings_per_scene=8 does not divide the 4 images each of the 4 "
                                               r"processes reads .* a multiple of 32"):
    loop.run_mesh(config)
  config = config_lib.build({"train": {"batch_size": 32}, "data": {"renderings_per_scene": 8}})
  assert loop.run_mesh(config).devices.size == jax.device_count()
