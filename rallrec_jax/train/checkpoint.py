"""Resumable training checkpoints: a state pytree plus a JSON record of the run.

Each directory holds one orbax `CheckpointManager` with two items per step: "state" (whatever
pytree the trainer keeps: weights, optimizer state, step, rng) and "meta" (data position, best
evaluation, and the fields a `layout` needs to check that the state fits). The state is restored
straight into the shardings of an abstract state, so a run can resume on a different mesh. A
`Layout` says how the state is written: `PLAIN` as it is, `rallrec_jax.train.layout.PerLayer`
with the decoder's layers apart.
"""
from pathlib import Path

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "meta")


class Layout:
  """The state as it is written: no extra meta, nothing to check, no change of layout."""

  def meta(self):
    """Fields written into every checkpoint's meta and checked on restore."""
    return {}

  def check(self, meta, where):
    """Raise a ValueError when the checkpoint of `meta` cannot hold this run's state."""

  def stored(self, state):
    """The tree written for `state`."""
    return state

  def target(self, abstract_state):
    """The abstract tree read back for `abstract_state`."""
    return abstract_state

  def loaded(self, abstract_state, restored):
    """The state of a `restored` tree laid out like `target(abstract_state)`."""
    del abstract_state
    return restored


PLAIN = Layout()


def manager(directory, max_to_keep=None):
  """The checkpoint manager of `directory`, created if missing; `max_to_keep` None keeps all."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=ITEMS)


def save(mngr, step, state, meta, layout=PLAIN):
  """Write `state` and `meta` at `step` and wait, so a preempted process leaves it whole."""
  args = ocp.args.Composite(state=ocp.args.StandardSave(layout.stored(state)),
                            meta=ocp.args.JsonSave({**meta, **layout.meta()}))
  mngr.save(step, args=args, force=True)
  mngr.wait_until_finished()


def read_meta(mngr, step=None):
  """The JSON meta of `step` (default: the newest)."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{mngr.directory}: no checkpoint")
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mngr, abstract_state, step=None, layout=PLAIN):
  """(state, meta) of `step` (default: the newest), laid out like `abstract_state`.

  The stored meta is checked by `layout` first, so a checkpoint of another model is a
  ValueError naming the field, not a shape error from deep inside the restore. Leaves of
  `abstract_state` without a concrete sharding (as `jax.eval_shape` leaves them) go to the
  default device.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{mngr.directory}: no checkpoint to restore")
  meta = read_meta(mngr, step)
  layout.check(meta, f"{mngr.directory} step {step}")
  abstract_state = jax.tree.map(_placed, abstract_state)
  args = ocp.args.Composite(state=ocp.args.StandardRestore(layout.target(abstract_state)))
  return layout.loaded(abstract_state, mngr.restore(step, args=args)["state"]), meta


def _placed(leaf):
  if isinstance(leaf.sharding, jax.sharding.Sharding) and not _abstract_mesh(leaf.sharding):
    return leaf
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)


def _abstract_mesh(sharding):
  return isinstance(getattr(sharding, "mesh", None), jax.sharding.AbstractMesh)


def restore_partial(mngr, target, step, layout=PLAIN):
  """The subtree `target` (a prefix of the stored state, e.g. {"weights": ...}) of `step`.

  Only the leaves of `target` are read, so the rest of the state (an optimizer state of another
  layout) need not be rebuilt.
  """
  meta = read_meta(mngr, step)
  layout.check(meta, f"{mngr.directory} step {step}")
  stored = layout.target(target)
  args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
      stored, restore_args=ocp.checkpoint_utils.construct_restore_args(stored),
      partial_restore=True))
  return layout.loaded(target, mngr.restore(step, args=args)["state"])
