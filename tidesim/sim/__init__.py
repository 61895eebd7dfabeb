"""The discrete-event simulator (SimPy): costs of a schedule, the engine, CPU task placement and
Chrome-trace timelines. Call tidesim.run.run() rather than these directly."""

from tidesim.sim.costs import ScheduleCosts, schedule_costs
from tidesim.sim.engine import Simulator, simulate
from tidesim.sim.timeline import Timeline

__all__ = ["ScheduleCosts", "Simulator", "Timeline", "schedule_costs", "simulate"]
