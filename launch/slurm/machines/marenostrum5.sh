# MareNostrum 5 (BSC), accelerated partition: 4x NVIDIA H100 64GB per node, 80 cores, InfiniBand.
# Sourced by submit.sh (sbatch options) and by train.sbatch in the job (modules, machine_env).
PARTITION=${PARTITION:-acc}
ACCOUNT=${ACCOUNT:-FILL_ME}     # PLACEHOLDER, must fill: your project account
QOS=${QOS:-FILL_ME}             # PLACEHOLDER, must fill: MN5 jobs need a QoS of the acc partition
                                # (your project's, or a debug one); see the MN5 user guide
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
GPU_RUNTIME=cuda
MODULES=${MODULES:-}            # PLACEHOLDER: modules your venv needs (check `module avail`)

machine_env() {
  :   # nothing machine-specific needed; add NCCL_* here if `NCCL_DEBUG=INFO` shows a problem
}
