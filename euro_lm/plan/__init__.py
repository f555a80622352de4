"""Mesh and memory planner (being split into rooms: this commit only moves plan.py)."""

from euro_lm.plan.memory import *  # pylint: disable=wildcard-import
from euro_lm.plan.memory import _with  # pylint: disable=unused-import
