"""Multi-process start-up (one process per host or per GPU)."""

import jax

# Variables that mean "this process is one of several" to jax.distributed's auto-detection.
_CLUSTER_SIZE_VARIABLES = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'JAX_NUM_PROCESSES')


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


def initialize(distributed_config, environ):
  """Calls jax.distributed.initialize when asked for; arguments left unset are detected
  by JAX from the cluster environment (SLURM, Open MPI, TPU pods)."""
  if not wants_distributed(distributed_config, environ):
    return
  c = distributed_config
  jax.distributed.initialize(
      coordinator_address=c.coordinator_address or None,
      num_processes=c.num_processes or None,
      process_id=c.process_id if c.process_id >= 0 else None)
