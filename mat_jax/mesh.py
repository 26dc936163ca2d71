"""The device mesh: `--mesh` parsing, batch and parameter shardings, host batches as global arrays.

Every mesh has the two axes `data` and `fsdp` (either may have size 1), so one set of sharding rules
serves all layouts:

- the batch is split over (data, fsdp) jointly: every device holds a distinct slice of the examples;
- parameters are replicated by default; with FSDP they are split over `fsdp`, either by the largest
  divisible axis of each parameter (`param_sharding="fsdp"`) or by their logical axis names
  (`param_sharding="logical"` with rules such as `embed=fsdp`); a dimension that the axis does not
  divide stays replicated.

Under `jit`, computations on a sharded batch are written as if on one device: XLA inserts the
collectives (the contrastive loss over the global batch all-gathers the embeddings by itself).

Multi-host: `initialize_distributed` starts `jax.distributed` when the run is one of several processes;
each process then feeds its own rows of the global batch (`global_batch`), which
`jax.make_array_from_process_local_data` assembles without any cross-host copy.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mat_jax.errors import MatJaxError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both axes jointly
PARAM_SHARDING_MODES = ("replicated", "fsdp", "logical")

# Environment variables read by `initialize_distributed` when no flag is given.
ENV_COORDINATOR = "MAT_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MAT_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MAT_JAX_PROCESS_ID"


class MeshError(MatJaxError, ValueError):
  """A mesh specification or a sharding request that the devices cannot satisfy."""


# ----------------------------------------------------------------------------------------------------
# Mesh construction.


def parse_mesh_spec(spec: str | int | None, device_count: int) -> dict[str, int]:
  """`None`/"" -> all devices on data; "8" -> data=8; "data=4,fsdp=2" -> both. Returns sizes by axis."""
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    sizes = {"data": device_count}
  elif isinstance(spec, int) or spec.strip().isdigit():
    sizes = {"data": int(spec)}
  else:
    sizes = {}
    for part in spec.split(","):
      name, sep, value = part.partition("=")
      name = name.strip()
      if not sep or not value.strip().lstrip("-").isdigit():
        raise MeshError(f"cannot parse mesh {spec!r}: write a device count ('8') or axis sizes "
                        f"('data=4,fsdp=2'); axes are {AXES}")
      if name not in AXES:
        raise MeshError(f"unknown mesh axis {name!r} in {spec!r}; valid axes: {AXES}")
      if name in sizes:
        raise MeshError(f"mesh axis {name!r} given twice in {spec!r}")
      sizes[name] = int(value)
  sizes = {axis: sizes.get(axis, 1) for axis in AXES}
  if any(size < 1 for size in sizes.values()):
    raise MeshError(f"mesh axis sizes must be positive, got {sizes}")
  total = int(np.prod(list(sizes.values())))
  if total > device_count:
    raise MeshError(f"mesh {spec!r} needs {total} devices but only {device_count} are visible "
                    f"({jax.devices()[0].platform}); pass a smaller --mesh. On CPU, simulate more with "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=N (set before importing jax).")
  return sizes


def make_mesh(spec: str | int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: every device of every process).

  With fewer devices requested than visible, the first ones are used (only on a single process:
  a multi-process mesh must span all devices so that every host takes part).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec, len(devices))
  total = sizes["data"] * sizes["fsdp"]
  if total < len(devices) and jax.process_count() > 1:
    raise MeshError(f"a multi-process run must use all {len(devices)} devices, the mesh asks for "
                    f"{total}; leave --mesh out or give sizes whose product is {len(devices)}")
  grid = np.asarray(devices[:total], dtype=object).reshape(sizes["data"], sizes["fsdp"])
  return Mesh(grid, AXES)


def describe(mesh: Mesh) -> str:
  return ", ".join(f"{name}={size}" for name, size in mesh.shape.items()) + \
      f" ({mesh.devices.size} {mesh.devices.flat[0].platform} devices, {jax.process_count()} process(es))"


# ----------------------------------------------------------------------------------------------------
# Batches.


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Axis 0 split over (data, fsdp) jointly; all other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (counters, metrics)."""
  return NamedSharding(mesh, P())


def batch_devices(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  n = batch_devices(mesh)
  if global_batch_size % n:
    raise MeshError(f"the global batch size {global_batch_size} is not divisible by the {n} devices "
                    f"of the batch axes ({describe(mesh)}); use a multiple of {n}")
  if global_batch_size % jax.process_count():
    raise MeshError(f"the global batch size {global_batch_size} is not divisible by the "
                    f"{jax.process_count()} processes")


def local_batch_size(global_batch_size: int) -> int:
  """Rows of the global batch that this process reads."""
  return global_batch_size // jax.process_count()


def device_arrays(batch: Mapping[str, Any]) -> dict[str, np.ndarray | jax.Array]:
  """The numeric entries of a batch (strings such as the raw captions stay on the host)."""
  return {k: v for k, v in batch.items()
          if isinstance(v, (np.ndarray, jax.Array)) and v.dtype.kind in "biuf"}


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch (numpy) -> global arrays sharded over the batch axes.

  Non-numeric entries (caption strings) are dropped: they never go to the devices. Entries that are
  global arrays already (a batch the input pipeline's thread put on the devices, `OnDevices`) pass as
  they are.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in device_arrays(local).items():
    if isinstance(value, jax.Array):
      out[key] = value
      continue
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


class OnDevices:
  """A batch transform: each batch onto the mesh's devices (`global_batch`). As the input pipeline's last
  stage it runs in the pipeline's prefetch thread, so the host-to-device copy of the next batches overlaps
  the training loop's dispatch instead of preceding each step on the loop's thread; the prefetch buffer
  then holds its batches on the devices."""

  def __init__(self, mesh: Mesh):
    self.mesh = mesh

  def __call__(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    return global_batch(batch, self.mesh)


# ----------------------------------------------------------------------------------------------------
# Parameters.


def parse_logical_rules(rules: str | Mapping[str, str | None] | None) -> dict[str, str | None]:
  """'embed=fsdp,mlp=fsdp' (or a mapping) -> {logical name: mesh axis or None}."""
  if not rules:
    return {}
  if isinstance(rules, Mapping):
    parsed = dict(rules)
  else:
    parsed = {}
    for part in str(rules).split(","):
      name, sep, axis = part.partition("=")
      if not sep:
        raise MeshError(f"cannot parse logical sharding rule {part!r}; write 'embed=fsdp,mlp=fsdp'")
      parsed[name.strip()] = axis.strip() or None
  for name, axis in parsed.items():
    if axis not in (None, "none", "None", *AXES):
      raise MeshError(f"logical rule {name}={axis}: the mesh axis must be one of {AXES} (or none)")
    if axis in ("none", "None"):
      parsed[name] = None
  return parsed


def _largest_divisible_axis(shape: tuple[int, ...], size: int) -> int | None:
  best = None
  for axis, dim in enumerate(shape):
    if dim % size == 0 and dim >= size and (best is None or dim >= shape[best]):
      best = axis
  return best


def spec_for(shape: tuple[int, ...], logical: tuple[str | None, ...] | None, mesh: Mesh, mode: str,
             rules: Mapping[str, str | None] | None = None) -> P:
  """The PartitionSpec of one parameter (see the module docstring for the modes)."""
  if mode not in PARAM_SHARDING_MODES:
    raise MeshError(f"unknown param_sharding {mode!r}; choose one of {PARAM_SHARDING_MODES}")
  fsdp = mesh.shape["fsdp"]
  if mode == "replicated" or not shape:
    return P()
  if mode == "fsdp":
    if fsdp == 1:
      return P()
    axis = _largest_divisible_axis(shape, fsdp)
    if axis is None:
      return P()
    return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])
  # logical: map each named dimension through the rules; a mesh axis is used at most once.
  names = tuple(logical or ()) + (None,) * (len(shape) - len(logical or ()))
  used, entries = set(), []
  for dim, name in zip(shape, names, strict=True):
    axis = (rules or {}).get(name) if name is not None else None
    if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
      entries.append(None)
    else:
      used.add(axis)
      entries.append(axis)
  return P(*entries)


def check_param_sharding(mesh: Mesh, mode: str, rules: str | Mapping[str, str | None] | None = None) -> None:
  """Refuse a parameter sharding that would split nothing on a mesh of several devices: `fsdp` without an
  fsdp axis, `logical` whose rules name only axes of one device. Every parameter would be replicated on
  every device, which the run was configured not to do; on one device nothing is split anyway."""
  if mode == "replicated" or mesh.devices.size == 1:
    return
  axes = ["fsdp"] if mode == "fsdp" else sorted({a for a in parse_logical_rules(rules).values() if a is not None})
  if any(mesh.shape[axis] > 1 for axis in axes):
    return
  devices = mesh.devices.size
  named = "its fsdp axis" if mode == "fsdp" else f"mesh.logical_rules' axes ({', '.join(axes) or 'none'})"
  raise MeshError(f"mesh.param_sharding={mode} splits the parameters over {named}, which the mesh "
                  f"({describe(mesh)}) gives one device: every parameter would be replicated on all {devices} "
                  f"devices. Give the mesh an fsdp axis (e.g. --mesh data={max(devices // 2, 1)},fsdp=2), use "
                  "param_sharding=logical with logical_rules embed=data, or set mesh.param_sharding=replicated")


def sharded_count(shardings: Any) -> tuple[int, int]:
  """(arrays split over some mesh axis, all arrays) of a pytree of NamedSharding."""
  leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  return sum(any(axis is not None for axis in s.spec) for s in leaves), len(leaves)


def param_shardings(params: Any, mesh: Mesh, mode: str = "replicated",
                    rules: str | Mapping[str, str | None] | None = None) -> Any:
  """A pytree of NamedSharding matching `params` (an nnx.State or any pytree of arrays).

  Logical axis names are read from the nnx variables' `out_sharding` metadata (set in clip.py).
  """
  from flax import nnx  # the mesh module stays importable without flax for the data side

  parsed = parse_logical_rules(rules)
  if isinstance(params, nnx.State):
    logical = nnx.get_partition_spec(params)
    if mode == "logical":
      # A misspelt name would shard nothing, silently: every rule must name one of the model's axes.
      known = {name for spec in jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, P)) for name in spec
               if isinstance(name, str)}
      unknown = sorted(set(parsed) - known)
      if unknown:
        raise MeshError(f"logical sharding rules name {unknown}, which no parameter has; the model's logical "
                        f"axes are {sorted(known)}")
    return jax.tree.map(
        lambda x, names: NamedSharding(mesh, spec_for(tuple(x.shape), tuple(names), mesh, mode, parsed)),
        params, logical)
  return jax.tree.map(lambda x: NamedSharding(mesh, spec_for(tuple(np.shape(x)), None, mesh, mode, parsed)),
                      params)


# ----------------------------------------------------------------------------------------------------
# Multi-host start.


# The --mesh of the evaluation commands, which train on it only a cached starting model they lack.
CACHED_MODEL_MESH_HELP = ("devices that train a cached starting model (shapes, cache:NAME) on first use, as train's "
                          "--mesh ('8' or 'data=4,fsdp=2'; default: all devices on data); the evaluation itself runs "
                          "on one device")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Start `jax.distributed` when this is one process of several; return whether it did.

  Arguments fall back to MAT_JAX_COORDINATOR / MAT_JAX_NUM_PROCESSES / MAT_JAX_PROCESS_ID. With none of
  them set, nothing happens (single process), except on clusters that JAX detects by itself (TPU pods,
  SLURM, ...), where `MAT_JAX_DISTRIBUTED=1` asks for auto-detection. Call before any other JAX work.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _int_from_env(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _int_from_env(ENV_PROCESS_ID)
  if num_processes is not None and num_processes < 1:  # 0 would otherwise read as "one process" silently
    raise MeshError(f"the number of processes is {num_processes}; it must be at least 1")
  if process_id is not None and process_id < 0:  # -1 would otherwise read as "a single process" silently
    raise MeshError(f"process id {process_id} is negative; process ids count from 0")
  auto = os.environ.get("MAT_JAX_DISTRIBUTED", "")
  if auto not in ("", "0", "1"):  # "true" or "yes" would be ignored: a pod run started as many single runs
    raise MeshError(f"MAT_JAX_DISTRIBUTED={auto!r}: set it to 1 (start jax.distributed by auto-detection) or 0")
  # Any sign of several processes (a process id past 0 included) asks for all three settings.
  explicit = coordinator_address is not None or (num_processes or 1) > 1 or (process_id or 0) > 0
  if not explicit and auto != "1":
    return False
  if explicit and (coordinator_address is None or num_processes is None or process_id is None):
    raise MeshError("a multi-process run needs the coordinator address (host:port), the number of "
                    "processes and this process's id: pass --coordinator, --num-processes and "
                    f"--process-id (or set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
  flags = (f"--coordinator, --num-processes and --process-id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
           f"{ENV_PROCESS_ID})")
  if explicit:
    if num_processes < 1:
      raise MeshError(f"the number of processes is {num_processes}; it must be at least 1")
    if not 0 <= process_id < num_processes:
      raise MeshError(f"process id {process_id} is outside [0, {num_processes})")
    # Checked whole: jax.distributed takes a scheme or a space in the address and then waits for peers that
    # can never register, until its deadline aborts the process.
    address = _COORDINATOR_ADDRESS.fullmatch(coordinator_address)
    if address is None or not 0 < int(address.group("port")) < 65536:
      raise MeshError(f"coordinator address {coordinator_address!r}: give it as HOST:PORT, a host name or IP "
                      "address (an IPv6 one in brackets) and a port, no scheme or spaces (e.g. 10.0.0.1:1234), "
                      "the address process 0 listens on")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  except (ValueError, RuntimeError, IndexError) as err:
    where = (f"with coordinator {coordinator_address}, {num_processes} processes, process id {process_id}"
             if explicit else "by auto-detection (MAT_JAX_DISTRIBUTED=1: JAX found no cluster it knows)")
    raise MeshError(f"jax.distributed could not start {where}: {err}. Check {flags}; a single-process run "
                    "needs none of them") from None
  return True


_COORDINATOR_ADDRESS = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})")


def _int_from_env(name: str) -> int | None:
  value = os.environ.get(name)
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise MeshError(f"{name}={value!r} is not an integer; set it to a whole number (or unset it)") from None


def coordination_client() -> Any:
  """The `jax.distributed` client of a multi-process run (its key-value store and barriers, for agreeing
  without device work), or None in a single-process run."""
  if jax.process_count() == 1:
    return None
  from jax._src import distributed  # JAX has no public accessor; Orbax reads the client the same way
  return distributed.global_state.client


def is_main_process() -> bool:
  """Only process 0 writes logs, metrics and exported models."""
  return jax.process_index() == 0


def main_process_says(value: bool) -> bool:
  """The main process's `value`, on every process: a collective that all processes call, so they take
  the same branch after it (one process deciding alone would leave the others in a collective)."""
  if jax.process_count() == 1:
    return bool(value)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(value))))
