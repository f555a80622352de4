# JUPITER (JSC), Booster: 4x NVIDIA GH200 (Grace Hopper) per node, InfiniBand.
# The Grace CPUs are aarch64: the venv or container image must be built for arm64.
# Sourced by submit.sh (sbatch options) and by train.sbatch in the job (modules, machine_env).
PARTITION=${PARTITION:-booster} # VERIFY with `sinfo -s`: partition names on JUPITER may differ
ACCOUNT=${ACCOUNT:-FILL_ME}     # PLACEHOLDER, must fill: your project's compute budget account
QOS=${QOS:-}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
GPU_RUNTIME=cuda
MODULES=${MODULES:-}            # PLACEHOLDER: modules your venv needs (check `module avail`)

machine_env() {
  :   # nothing machine-specific needed; add NCCL_* here if `NCCL_DEBUG=INFO` shows a problem
}
