"""Multi-process start-up (one process per host or per GPU) on JAX's own runtime.

`jax.distributed.initialize` aborts the whole process from C++ when the coordinator cannot
be reached, with no address or rank in the message. So before calling it, each process says
which process it is and where the coordinator is, and every process but 0 (which hosts the
coordinator) first checks that the coordinator's port answers, failing with an error that
names both. Once joined, processes that see different numbers of devices are refused
before anything compiles.
"""

import collections
import socket
import sys
import time

import jax

from euro_lm.errors import UserError

# Variables that mean "this process is one of several" to jax.distributed's auto-detection.
_CLUSTER_SIZE_VARIABLES = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'JAX_NUM_PROCESSES')


class DistributedError(UserError):
  """A multi-process run that cannot form: unreachable coordinator, unequal processes."""


def wants_distributed(distributed_config, environ):
  """Whether to call jax.distributed.initialize, from the config and the environment."""
  mode = distributed_config.initialize
  if mode == 'always':
    return True
  if mode == 'never':
    return False
  if distributed_config.coordinator_address or environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  return any(int(environ.get(name, '1') or 1) > 1 for name in _CLUSTER_SIZE_VARIABLES)


def _configured(c):
  """(coordinator address, number of processes, process id) from the config; None where
  it leaves them to JAX's detection."""
  return (
      c.coordinator_address or None,
      c.num_processes or None,
      c.process_id if c.process_id >= 0 else None,
  )


def _resolve(c, environ):
  """(coordinator address, number of processes, process id) as jax.distributed will use
  them: the config's, else the cluster environment's (None where unknown)."""
  address, count, rank = _configured(c)
  address = address or environ.get('JAX_COORDINATOR_ADDRESS') or None
  if None in (address, count, rank):
    try:  # the detection jax.distributed.initialize runs itself (SLURM, Open MPI, TPU)
      from jax._src import clusters  # pylint: disable=import-outside-toplevel

      address, count, rank, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
          address, count, rank, None, None, c.initialization_timeout
      )
    except Exception:  # pylint: disable=broad-except  # best effort: JAX decides anyway
      pass
  return address, count, rank


def wait_for_coordinator(address, timeout, who):
  """Returns once `address` (host:port) accepts a TCP connection; DistributedError naming
  the address and `who` after `timeout` seconds."""
  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  deadline, error = time.monotonic() + timeout, None
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(5.0, timeout)):
        return
    except (OSError, ValueError) as e:
      error = e
    if time.monotonic() >= deadline:
      break
    time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
  raise DistributedError(
      f'{who} could not reach the coordinator {address} within {timeout:g} s '
      f'(distributed.initialization_timeout): {error}. Process 0 hosts it: check that '
      f'process 0 started, that {host} is reachable from {socket.gethostname()}, and that '
      'every process got the same coordinator address (distributed.coordinator_address, '
      "JAX_COORDINATOR_ADDRESS or the cluster's environment)."
  )


def check_device_counts(devices):
  """Refuses processes that see different numbers of devices (the mesh and the per-process
  data split assume equal processes)."""
  counts = collections.Counter(d.process_index for d in devices)
  if len(set(counts.values())) > 1:
    seen = ', '.join(f'process {p}: {n}' for p, n in sorted(counts.items()))
    raise DistributedError(
        f'the processes see different numbers of devices ({seen}); every process needs the '
        'same number: the same GPUs per node (--gpus-per-node, CUDA_VISIBLE_DEVICES, '
        'JAX_LOCAL_DEVICE_IDS) or --xla_force_host_platform_device_count on CPU'
    )


def initialize(distributed_config, environ, log=None):
  """Calls jax.distributed.initialize when asked for; arguments left unset are detected
  by JAX from the cluster environment (SLURM, Open MPI, TPU pods)."""
  if not wants_distributed(distributed_config, environ):
    return
  log = log or (lambda message: print(message, file=sys.stderr, flush=True))
  c = distributed_config
  if not c.initialization_timeout > 0:
    raise DistributedError(
        f'distributed.initialization_timeout={c.initialization_timeout} '
        'must be a positive number of seconds'
    )
  address, count, rank = _resolve(c, environ)
  who = f'process {"?" if rank is None else rank} of {count or "?"}'
  log(
      f'euro_lm: {who} joining the JAX runtime at coordinator {address or "(detected by JAX)"}'
      f', waiting up to {c.initialization_timeout} s for all processes'
  )
  if address and rank:  # process 0 starts the coordinator itself
    wait_for_coordinator(address, c.initialization_timeout, who)
  configured_address, configured_count, configured_rank = _configured(c)
  jax.distributed.initialize(
      coordinator_address=configured_address,
      num_processes=configured_count,
      process_id=configured_rank,
      initialization_timeout=c.initialization_timeout,
  )
  check_device_counts(jax.devices())
