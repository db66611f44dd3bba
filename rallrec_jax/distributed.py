"""Multi-host runs on JAX's multi-controller runtime: one process per host, one program.

A launcher turns it on with environment variables (launch/tpu_vm.sh, gpu_hosts.sh and
slurm.sbatch set them):

  RALLREC_DISTRIBUTED=1         call jax.distributed.initialize() before anything else
  RALLREC_COORDINATOR=host:port with RALLREC_NUM_PROCESSES and RALLREC_PROCESS_ID: GPU hosts
                                (unset: JAX finds its peers itself on TPU VMs and under SLURM)

Every process runs every stage's code path; the workdir must be one folder that all hosts
see (NFS, a GCS mount). Process 0 alone writes artifacts, manifests, metrics and eval files;
stages that are single-host by nature run on process 0 while the others wait for their
manifest. On one process everything here is a no-op.
"""
import logging
import os
import time

import jax
import numpy as np

log = logging.getLogger(__name__)

ENABLE = "RALLREC_DISTRIBUTED"
COORDINATOR = "RALLREC_COORDINATOR"
NUM_PROCESSES = "RALLREC_NUM_PROCESSES"
PROCESS_ID = "RALLREC_PROCESS_ID"
POLL_SECONDS = 2.0


def initialize():
  """jax.distributed.initialize() when RALLREC_DISTRIBUTED asks for it; True if it did."""
  if os.environ.get(ENABLE, "").lower() not in ("1", "true", "yes"):
    return False
  kwargs = {}
  if os.environ.get(COORDINATOR):
    missing = [v for v in (NUM_PROCESSES, PROCESS_ID) if not os.environ.get(v)]
    if missing:
      raise ValueError(f"{COORDINATOR} is set, so {' and '.join(missing)} must be too")
    kwargs = dict(coordinator_address=os.environ[COORDINATOR],
                  num_processes=int(os.environ[NUM_PROCESSES]),
                  process_id=int(os.environ[PROCESS_ID]))
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_primary():
  return jax.process_index() == 0


def broadcast_int(value):
  """Process 0's `value` (an int32) on every process."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def barrier(name):
  """Every process waits here until all have arrived (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def wait_for(ready, what, timeout_s=None):
  """Poll `ready()` until it is true (process 0 is producing `what`)."""
  start = time.time()
  while not ready():
    if timeout_s is not None and time.time() - start > timeout_s:
      raise TimeoutError(f"process {jax.process_index()} waited {timeout_s:.0f} s for {what}; "
                         f"is the workdir on a filesystem every host sees?")
    time.sleep(POLL_SECONDS)


def to_host(x):
  """A numpy copy of a (possibly multi-host) array, the same on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
