"""Mesh and memory planner: will a config fit, per device, on a given mesh? And how long
will its token budget take?

`python -m euro_lm.plan --config=configs/llama_7b.py:gpu --devices=16 --nodes=4
--accelerator=h100 --config.mesh.dcn_fsdp=4` prints the per-device memory of params,
gradients, optimizer state and activations for the mesh the config resolves to on that
many devices, and a WARNING naming what to change when it does not fit. Nothing runs on an
accelerator: shapes come from `jax.eval_shape` of the real model init and shardings from
the config's logical-axis rules, divided out arithmetically, so a 7B config on 512
devices plans on a laptop.

`memory` is the model (`estimate_memory`, `estimate_with_overrides`, `suggestions`,
`training_seconds`, ...; what it counts is in its docstring), `report` the text and the
notebook's tables and plots (`format_plan`, `summary`, `presets_table` /
`format_presets_table` for several configs on one mesh, `scaling_points` / `plot_scaling`
for days and memory against the number of devices; matplotlib, imported lazily),
`__main__` the command line. All of them are
importable from here, as notebooks/scaling.ipynb does.
"""

from euro_lm.plan.memory import (
    GIB,
    LOSS_CHUNK_LENGTH,
    USABLE_FRACTION,
    MemoryEstimate,
    StateLeaf,
    accelerator,
    accelerator_names,
    estimate_memory,
    estimate_with_overrides,
    leaf_bytes,
    mesh_degrees,
    peak_flops,
    per_device_elements,
    run_tokens,
    state_leaves,
    suggestions,
    training_seconds,
    with_overrides,
)
from euro_lm.plan.report import (
    describe_change,
    format_plan,
    format_presets_table,
    plot_scaling,
    presets_table,
    scaling_points,
    summary,
)
