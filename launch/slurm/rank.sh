#!/usr/bin/env bash
# Run by srun on every rank (see train.sbatch): picks the GPUs this process may use, then
# runs the training command, inside $CONTAINER when set. Rank, process count and coordinator
# are left to jax.distributed.initialize(), which reads SLURM's variables itself.
set -euo pipefail

rank=${SLURM_PROCID:?} local_rank=${SLURM_LOCALID:?} ntasks=${SLURM_NTASKS:?}
node=${SLURMD_NODENAME:-$(hostname)}
gpus=${EURO_LM_GPUS_PER_NODE:?set by train.sbatch}

if [[ ${GPU_RUNTIME:-cuda} == rocm ]]; then
  var=ROCR_VISIBLE_DEVICES
  unset HIP_VISIBLE_DEVICES CUDA_VISIBLE_DEVICES   # they would filter ROCR's list a second time
  container_gpu=--rocm
else
  var=CUDA_VISIBLE_DEVICES container_gpu=--nv
fi
# The node's GPUs as SLURM exposes them (its cgroup may renumber them), else 0..gpus-1.
visible=${!var:-$(seq -s, 0 $((gpus - 1)))}
IFS=, read -ra devices <<<"$visible"

# JAX_LOCAL_DEVICE_IDS: JAX's SLURM detection would otherwise use [SLURM_LOCALID], i.e. only
# GPU 0 for a one-per-node process, and a missing index for a process SLURM bound to one GPU.
if [[ ${PROCS_PER_NODE:-node} == gpu ]]; then
  if ((${#devices[@]} > 1)); then visible=${devices[local_rank]}; fi   # SLURM did not bind: we do
  export JAX_LOCAL_DEVICE_IDS=0
else
  export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((${#devices[@]} - 1)))
fi
export "$var=$visible"

cmd=("$@")
if [[ -n ${CONTAINER:-} ]]; then
  cmd=(apptainer exec "$container_gpu" --bind "${BIND:?}" --pwd "${REPO:-$PWD}" "$CONTAINER" "${cmd[@]}")
fi

echo "rank $rank of $ntasks: node $node, local rank $local_rank, coordinator ${EURO_LM_COORDINATOR:-?}," \
     "$var=$visible JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"
if ((${DRY_RUN:-0})); then
  echo "rank $rank command: ${cmd[*]}"
  exit 0
fi
exec "${cmd[@]}"
