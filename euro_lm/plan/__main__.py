"""`python -m euro_lm.plan` (this commit only moves plan.py into the package)."""

import runpy

runpy.run_module('euro_lm.plan.memory', run_name='__main__')
