#!/usr/bin/env bash
# Runs the same training command on every worker of a Cloud TPU VM slice (or of N slices).
#
#   launch/tpu_vm.sh --tpu NAME --zone ZONE [--project P] [--slices N] [--repo-dir DIR]
#                    [--dry-run] -- --config=configs/llama_1b.py --workdir=gs://bucket/run1 [...]
#
# Every worker must hold the repository at --repo-dir (default ~/euro_lm) with its Python
# environment (${PYTHON:-python3} there). The workdir must be shared by all workers: a gs://
# bucket or a shared filesystem, since every host writes its part of each checkpoint.
# JAX finds the TPU pod by itself (jax.distributed.initialize() with no coordinator flags).
#
# Multislice (--slices N): the slices come from one queued resource created with
#   gcloud compute tpus queued-resources create QR --node-count=N --node-prefix=NAME ...
# so the TPU VMs are NAME-0 .. NAME-(N-1), and the service sets MEGASCALE_COORDINATOR_ADDRESS,
# MEGASCALE_NUM_SLICES and MEGASCALE_SLICE_ID on every VM, which JAX reads to join the slices
# (jax/_src/clusters/cloud_tpu_cluster.py). Separately created TPU VMs are not supported here:
# they would need those variables set by hand. Slices talk over DCN, so the DCN mesh degrees
# must multiply to N: this script adds --config.mesh.dcn_data=N unless a --config.mesh.dcn_*
# flag is given (dcn_data * dcn_fsdp * dcn_tensor = N).
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

tpu='' zone='' project='' slices=1 repo_dir='~/euro_lm' dry_run=0
while (($#)); do
  case $1 in
    --tpu) tpu=${2:?}; shift 2 ;;
    --zone) zone=${2:?}; shift 2 ;;
    --project) project=${2:?}; shift 2 ;;
    --slices) slices=${2:?}; shift 2 ;;
    --repo-dir) repo_dir=${2:?}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "tpu_vm.sh: unknown option '$1' (train flags go after --)" >&2; usage ;;
  esac
done
[[ -n $tpu && -n $zone ]] || { echo "tpu_vm.sh: --tpu and --zone are required" >&2; usage; }
[[ $slices =~ ^[1-9][0-9]*$ ]] || { echo "tpu_vm.sh: --slices must be >= 1" >&2; exit 2; }
flags=("$@")
[[ " ${flags[*]} " == *" --workdir"* ]] || { echo "tpu_vm.sh: the train flags need --workdir (gs://... or a shared path)" >&2; exit 2; }
if ((slices > 1)) && [[ " ${flags[*]}" != *" --config.mesh.dcn_"* ]]; then
  flags+=("--config.mesh.dcn_data=$slices")
fi

# The command each worker runs, quoted for the remote shell. ~ stays unquoted to expand there.
remote="cd $repo_dir && PYTHONUNBUFFERED=1 ${PYTHON:-python3} -m euro_lm.train"
for flag in "${flags[@]}"; do remote+=" $(printf '%q' "$flag")"; done

names=("$tpu")
if ((slices > 1)); then names=(); for ((i = 0; i < slices; i++)); do names+=("$tpu-$i"); done; fi

pids=()
for name in "${names[@]}"; do
  cmd=(gcloud compute tpus tpu-vm ssh "$name" "--zone=$zone" ${project:+"--project=$project"} --worker=all)
  if ((dry_run)); then echo "${cmd[*]} --command='$remote'"; continue; fi
  "${cmd[@]}" "--command=$remote" &
  pids+=($!)
done
((dry_run)) && exit 0

# Ctrl-C / SIGTERM: stop the local ssh sessions; preempted TPU VMs send SIGTERM to training
# themselves, and re-running this command resumes from the newest checkpoint.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for pid in "${pids[@]}"; do
  while :; do
    wait "$pid" && s=0 || s=$?
    kill -0 "$pid" 2>/dev/null || break   # a trapped signal ends `wait` early: wait on
  done
  ((s == 0)) || status=$s
done
exit "$status"
