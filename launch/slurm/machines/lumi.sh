# LUMI-G (CSC), standard-g partition: 4x AMD MI250X per node = 8 GCDs, each a JAX device,
# 64 cores, Slingshot-11 network. ROCm: needs a ROCm jaxlib (venv or container image).
# standard-g allocates whole nodes; small-g is the partition for partial nodes.
# Sourced by submit.sh (sbatch options) and by train.sbatch in the job (modules, machine_env).
PARTITION=${PARTITION:-standard-g}
ACCOUNT=${ACCOUNT:-FILL_ME}     # PLACEHOLDER, must fill: your project, project_465xxxxxx
QOS=${QOS:-}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GPU_RUNTIME=rocm                # rank.sh then selects GCDs with ROCR_VISIBLE_DEVICES and
                                # apptainer gets --rocm instead of --nv
# PLACEHOLDER: the LUMI software stack and ROCm modules your venv needs, e.g. the LUMI/<version>
# and partition/G modules plus rocm; check `module spider rocm`. None needed with CONTAINER.
MODULES=${MODULES:-}
# LUMI documents a CPU binding that puts each GCD's process on its closest CCD; for
# PROCS_PER_NODE=gpu set it with SRUN_ARGS='--cpu-bind=mask_cpu:...' (masks: LUMI docs).

machine_env() {
  # RCCL must use the Slingshot interfaces (not the management Ethernet) and GPU-direct RDMA;
  # it also needs the aws-ofi-rccl plugin on its library path (LUMI module or container).
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-hsn0,hsn1,hsn2,hsn3}
  export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-PHB}
}
