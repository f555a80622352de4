# Leonardo (CINECA), Booster partition: 4x NVIDIA A100 64GB per node, 32 cores, InfiniBand.
# Sourced by submit.sh (sbatch options) and by train.sbatch in the job (modules, machine_env).
PARTITION=${PARTITION:-boost_usr_prod}
ACCOUNT=${ACCOUNT:-FILL_ME}     # PLACEHOLDER, must fill: your project account (`saldo -b`)
QOS=${QOS:-}                    # optional, e.g. a debug QoS for short tests
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
GPU_RUNTIME=cuda
# PLACEHOLDER: modules your venv needs (e.g. the CUDA/cuDNN/NCCL your jaxlib expects; the
# pip wheels `jax[cuda12]` bring their own, so often none). Check `module avail`.
MODULES=${MODULES:-}

machine_env() {
  :   # nothing machine-specific needed; add NCCL_* here if `NCCL_DEBUG=INFO` shows a problem
}
