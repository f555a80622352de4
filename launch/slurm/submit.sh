#!/usr/bin/env bash
# Submits train.sbatch with a machine's partition, account, QoS and GPUs per node.
#   launch/slurm/submit.sh MACHINE [sbatch options...] CONFIG WORKDIR [train flags...]
#   launch/slurm/submit.sh leonardo --nodes=4 --time=24:00:00 configs/llama_1b.py /scratch/me/run1
# MACHINE is a file in launch/slurm/machines/. Options given here win over the machine's.
# DRY_RUN=1 prints the sbatch command instead of running it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
machine=${1:?usage: submit.sh MACHINE [sbatch options...] CONFIG WORKDIR [train flags...]}
shift
[[ -f $repo/launch/slurm/machines/$machine.sh ]] || {
  echo "submit.sh: no machine '$machine'; there are: $(cd "$repo/launch/slurm/machines" && ls | sed 's/\.sh$//' | xargs)" >&2; exit 2; }
source "$repo/launch/slurm/machines/$machine.sh"
sbatch_options=()
while (($#)) && [[ $1 == -* ]]; do sbatch_options+=("$1"); shift; done
for value in "$ACCOUNT" "$QOS"; do
  [[ $value != FILL_ME* ]] || { echo "submit.sh: set ACCOUNT (and QOS where needed) for $machine: see machines/$machine.sh" >&2; exit 2; }
done
cmd=(sbatch "--partition=$PARTITION" "--account=$ACCOUNT" ${QOS:+"--qos=$QOS"}
     "--gpus-per-node=$GPUS_PER_NODE" "--export=ALL,MACHINE=$machine"
     "${sbatch_options[@]}" "$repo/launch/slurm/train.sbatch" "$@")
if ((${DRY_RUN:-0})); then echo "${cmd[*]}"; exit 0; fi
cd "$repo"   # the job finds the repository through $SLURM_SUBMIT_DIR
exec "${cmd[@]}"
