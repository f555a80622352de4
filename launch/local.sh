#!/usr/bin/env bash
# Runs training on this machine as N processes that form one JAX runtime (coordinator on
# 127.0.0.1), to exercise the multi-host code paths without a cluster.
#
#   launch/local.sh [--processes N] [--cpu-devices D] [--dry-run] -- <train flags...>
#   launch/local.sh --processes 2 --cpu-devices 4 -- --config=configs/tiny.py --workdir=/tmp/run \
#       --config.mesh.dcn_data=2
#
# --cpu-devices D gives each process D fake CPU devices (JAX_PLATFORMS=cpu). Process 0 prints
# to this terminal, process i>0 to <workdir>/logs/process_<i>.log. SIGTERM/SIGINT go to every
# process (they save a checkpoint and exit 0); if one process fails the others are killed
# and its exit status is ours. Interpreter: ${PYTHON:-python3}; port: ${PORT:-a free one}.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

processes=1 cpu_devices='' dry_run=0
while (($#)); do
  case $1 in
    --processes) processes=${2:?}; shift 2 ;;
    --processes=*) processes=${1#*=}; shift ;;
    --cpu-devices) cpu_devices=${2:?}; shift 2 ;;
    --cpu-devices=*) cpu_devices=${1#*=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "local.sh: unknown option '$1' (train flags go after --)" >&2; usage ;;
  esac
done
flags=("$@")
[[ $processes =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: --processes must be >= 1" >&2; exit 2; }

workdir=''
for ((k = 0; k < ${#flags[@]}; k++)); do
  case ${flags[k]} in
    --workdir=*) workdir=${flags[k]#*=} ;;
    --workdir) workdir=${flags[k + 1]:-} ;;
  esac
done
[[ -n $workdir ]] || { echo "local.sh: the train flags need --workdir=DIR (logs go there)" >&2; exit 2; }

PYTHON=${PYTHON:-python3}
env_vars=(PYTHONUNBUFFERED=1)
if [[ -n $cpu_devices ]]; then
  env_vars+=(JAX_PLATFORMS=cpu "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$cpu_devices")
fi

# The command of process $1, in the array `cmd`.
command_for() {
  cmd=(env "${env_vars[@]}" "$PYTHON" -m euro_lm.train "${flags[@]}")
  if ((processes > 1)); then
    cmd+=(--config.distributed.initialize=always
          "--config.distributed.coordinator_address=127.0.0.1:$port"
          "--config.distributed.num_processes=$processes"
          "--config.distributed.process_id=$1")
  fi
}

port=${PORT:-}
if ((processes > 1)) && [[ -z $port ]]; then
  # Ask the kernel for a free port (closed again at once; the coordinator binds it next).
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

if ((dry_run)); then
  for ((i = 0; i < processes; i++)); do
    command_for "$i"
    log=$( ((i == 0)) && echo stdout || echo "$workdir/logs/process_$i.log")
    printf 'process %d (%s):' "$i" "$log"; printf ' %q' "${cmd[@]}"; echo
  done
  exit 0
fi

if ((processes == 1)); then
  command_for 0
  exec "${cmd[@]}"
fi

mkdir -p "$workdir/logs"
pids=()
for ((i = 0; i < processes; i++)); do
  command_for "$i"
  if ((i == 0)); then "${cmd[@]}" & else "${cmd[@]}" >"$workdir/logs/process_$i.log" 2>&1 & fi
  pids+=($!)
done
echo "local.sh: $processes processes (${pids[*]}), coordinator 127.0.0.1:$port," \
     "logs of processes 1.. in $workdir/logs/" >&2

forward() { echo "local.sh: $1, passing SIGTERM to all processes" >&2; kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT

# Poll instead of `wait -n -p` (bash >= 5.1) so that this runs on older bash too.
running=$processes
while ((running > 0)); do
  for ((i = 0; i < processes; i++)); do
    pid=${pids[i]}
    [[ $pid == done ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    status=0; wait "$pid" || status=$?
    pids[i]=done; running=$((running - 1))
    if ((status != 0)); then
      echo "local.sh: process $i failed (exit status $status); stopping the others" >&2
      for p in "${pids[@]}"; do [[ $p == done ]] || kill -KILL "$p" 2>/dev/null || true; done
      wait || true
      exit "$status"
    fi
  done
  sleep 0.2
done
exit 0
