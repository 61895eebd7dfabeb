"""What-if sweeps: grid files over hardware, model shapes, decode settings and policies,
evaluated in parallel (local processes or a Dask cluster) into one Parquet table plus figures."""

from tidesim.sweep.grid import PARAMS, Grid, Point, load_grid, parse_grid
from tidesim.sweep.runner import Evaluation, SweepReport, evaluate_point, run_sweep

__all__ = ["PARAMS", "Evaluation", "Grid", "Point", "SweepReport", "evaluate_point", "load_grid", "parse_grid",
           "run_sweep"]
