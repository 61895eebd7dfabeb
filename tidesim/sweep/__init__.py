"""What-if sweeps: grid files over hardware, model shapes, decode settings and policies,
evaluated in parallel (local processes or a Dask cluster) into one Parquet table plus figures.

grid.py reads the grid; hardware.py and workloads.py resolve a point's profile and workload;
point.py evaluates one point into a row; results.py is the table; executors.py runs the tasks;
runner.py is the resumable sweep itself."""

from tidesim.sweep.grid import PARAMS, Grid, Point, load_grid, parse_grid
from tidesim.sweep.point import Evaluation, evaluate_point
from tidesim.sweep.runner import SweepReport, run_sweep

__all__ = ["PARAMS", "Evaluation", "Grid", "Point", "SweepReport", "evaluate_point", "load_grid", "parse_grid",
           "run_sweep"]
