"""Device meshes and the table that maps logical axis names to mesh axes.

Models name logical axes only ("batch", "embed", "heads", ...). A mesh is described as a list
of (axis, size) pairs over "data", "fsdp" and "tensor", one size -1 (whatever is left), and one
rules table maps logical names to mesh axes. A dimension that the mesh axes do not divide
evenly (9 heads over 2 tensor devices) stays replicated rather than failing.
"""
import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes), first match wins. Params shard over fsdp (embed) and
# tensor (heads, mlp, vocab); activations shard their batch over data and fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("length", None),
    ("norm", None),
    ("layers", None),  # the scanned layers' stacking axis: the scan walks it on every device
)


def check_mesh_shape(shape):
  """ValueError unless [(axis, size), ...] names distinct MESH_AXES with positive sizes, at most
  one of them -1."""
  names = [a for a, _ in shape]
  sizes = [s for _, s in shape]
  if any(a not in MESH_AXES for a in names) or len(set(names)) != len(names):
    raise ValueError(f"mesh axes {names}: each must be one of {MESH_AXES}, at most once")
  if sizes.count(-1) > 1 or any(not isinstance(s, int) or s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes {sizes}: positive integers, with at most one -1")


def rules_from_table(table):
  """Rules from {logical axis: "data,fsdp" | "tensor" | "" (replicated)}, one rule per axis,
  in DEFAULT_RULES' order (the first rule that claims a mesh axis in an array keeps it: batch).

  ValueError naming the logical axis when a value names an axis outside MESH_AXES.
  """
  order = [logical for logical, _ in DEFAULT_RULES]
  rules = []
  for logical, value in sorted(table.items(), key=lambda kv: (
      order.index(kv[0]) if kv[0] in order else len(order), kv[0])):
    axes = tuple(a.strip() for a in str(value or "").split(",") if a.strip())
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown or len(set(axes)) != len(axes):
      raise ValueError(f"{logical}={value!r}: a comma-separated list of distinct mesh axes "
                       f"among {MESH_AXES}, or '' for replicated")
    rules.append((logical, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(rules)


def check_rules(rules, arrays):
  """ValueError when one mesh axis would shard two dimensions of one array.

  `arrays` lists logical axis tuples (the model's params); a logical axis without a rule is
  replicated. The message names both logical axes.
  """
  table = dict(rules)
  for names in arrays:
    owner = {}
    for name in names:
      axes = table.get(name)
      for axis in (axes,) if isinstance(axes, str) else axes or ():
        if axis in owner:
          raise ValueError(f"{owner[axis]!r} and {name!r} both map to mesh axis {axis!r}, "
                           f"but they are dimensions of one array {tuple(names)}")
        owner[axis] = name


def make_mesh(shape=(("data", -1),), devices=None):
  """A Mesh with Auto axis types from [(axis, size), ...]; one size may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  shape = [(a, int(s)) for a, s in shape]
  check_mesh_shape(shape)
  names = [a for a, _ in shape]
  sizes = [s for _, s in shape]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {shape}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {shape} needs {math.prod(sizes)} devices, {len(devices)} present")
  grid = np.array(devices).reshape(sizes)
  return Mesh(grid, tuple(names), axis_types=(AxisType.Auto,) * len(names))


def _mesh_size(mesh, axes):
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def _present(axes, mesh):
  """The rule's mesh axes that this mesh has (None when it has none of them)."""
  if axes is None:
    return None
  kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.shape)
  return kept or None


def rules_for(mesh, rules=DEFAULT_RULES):
  """The rules restricted to the axes this mesh has."""
  return tuple((k, _present(v, mesh)) for k, v in rules)


@contextlib.contextmanager
def activation_sharding(mesh, rules=DEFAULT_RULES):
  """Within: the model's logical activation constraints resolve on `mesh` (no-op for None)."""
  if mesh is None:
    yield
    return
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for(mesh, rules)):
    yield


def logical_sharding(shape, logical_axes, mesh, rules=DEFAULT_RULES):
  """NamedSharding of an array with these logical axes; uneven dimensions stay replicated."""
  rules = rules_for(mesh, rules)
  spec = nn.logical_to_mesh_axes(logical_axes, rules)
  spec = [axes if dim % _mesh_size(mesh, axes) == 0 else None
          for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))]
  return NamedSharding(mesh, PartitionSpec(*spec))


def tree_shardings(abstract, mesh, rules=DEFAULT_RULES):
  """Shardings for a pytree of boxed abstract params (nn.LogicallyPartitioned leaves)."""
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return logical_sharding(leaf.value.shape, leaf.names, mesh, rules)
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh, shape, rules=DEFAULT_RULES):
  """Sharding of a [batch, ...] input: batch over the mesh axes of "batch"."""
  return logical_sharding(shape, ("batch",) + (None,) * (len(shape) - 1), mesh, rules)


def put_batch(array, mesh, rules=DEFAULT_RULES):
  """A host [batch, ...] array on `mesh`, its batch split over the mesh's batch axes.

  Under several processes each process hands over only the rows its own devices hold
  (`jax.make_array_from_process_local_data`); the global array is the same either way.
  """
  sharding = batch_sharding(mesh, array.shape, rules)
  if jax.process_count() == 1:
    return jax.device_put(array, sharding)
  spans = [index[0].indices(array.shape[0])[:2]
           for index in sharding.addressable_devices_indices_map(array.shape).values()]
  lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
  return jax.make_array_from_process_local_data(sharding, array[lo:hi], array.shape)


def replicate(x, mesh):
  """`x` (the same value on every process) replicated over every device of `mesh`."""
  sharding = NamedSharding(mesh, PartitionSpec())
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(replicate(jax.random.key_data(x), mesh),
                                    impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
