"""The discrete-event simulator: one SimPy process per layer-forward, copy engines as resources.

Resources and what is an event:
- GPU stream: used only by the running layer (layers are sequential, per-layer barrier), so its
  work is a chain of timeouts inside the layer process.
- CPU worker pool: likewise used only by the running layer; its tasks are placed by the
  deterministic longest-first rule (tidesim.sim.lpt), whose makespans depend on nothing dynamic,
  so they are computed for all layers up front and cost one timeout per layer.
- Copy engines (pcie.copy_engines: 1 shared, or one H2D + one D2H): SimPy PriorityResources,
  because asynchronous refresh copies cross layer and forward boundaries. Demand traffic (sync
  refresh, demotions, on-demand copies, activations, results) has priority 0. Background
  refresh copies have priority 1 + their issue order, so they are served first-in first-out; a batch holds the engine
  until a demand request arrives, then finishes the copy in progress (no preemption within an
  expert's copy) and queues again behind the demand.

Ties at equal simulated times follow SimPy's event order (time, priority, insertion id), which
is fixed; no wall clock is read. docs/costmodel.md gives the full execution model.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy

from tidesim.layermodel import AFTER_GROUPED, FREE_NOW, OnDemand, ondemand_pipeline
from tidesim.sim.accounting import BREAKDOWN_KEYS, RunTimes
from tidesim.sim.costs import ScheduleCosts
from tidesim.sim.lpt import lpt_assign
from tidesim.sim.timeline import GPU_ROW, Timeline

DEMAND, BACKGROUND = 0, 1
Proc = Generator[simpy.Event, Any, Any]
EPS = 1e-9


class CopyEngine:
    """A copy engine: a SimPy priority resource, plus the signal a waiting demand request gives
    to the background batch that holds the engine."""

    def __init__(self, env: simpy.Environment) -> None:
        self.resource = simpy.PriorityResource(env, capacity=1)
        self.signal: simpy.Event | None = None

    def request(self, priority: int) -> simpy.resources.resource.PriorityRequest:
        req = self.resource.request(priority=priority)
        if priority == DEMAND and not req.triggered and self.signal is not None and not self.signal.triggered:
            self.signal.succeed()
        return req


@dataclass
class Flight:
    """Progress of one layer-forward's background copies: how many have landed, the run on the
    engine in progress (its start and the copies landed before it), and an event that fires (and
    is replaced) whenever a run starts or ends, so a waiter learns each copy's landing time."""

    changed: simpy.Event
    done: int = 0
    run: tuple[float, int] | None = None


class Simulator:
    """Simulate one Schedule's costs; call run() once."""

    def __init__(self, costs: ScheduleCosts, timeline: Timeline | None = None) -> None:
        self.c = costs
        self.tl = timeline
        self.env = simpy.Environment()
        self.h2d = CopyEngine(self.env)
        self.d2h = self.h2d if costs.rates.engines == 1 else CopyEngine(self.env)
        self.h2d_row = "copy engine (H2D+D2H)" if costs.rates.engines == 1 else "H2D copy engine"
        self.d2h_row = self.h2d_row if costs.rates.engines == 1 else "D2H copy engine"
        self.background: list[simpy.Process] = []           # every layer-forward's background copies
        self.flights: dict[int, Flight] = {}
        self.acc = dict.fromkeys(BREAKDOWN_KEYS, 0.0)
        self.layer_time = np.zeros(costs.layers)
        items = costs.items
        # plain Python lists: per-layer slicing is much faster than on numpy arrays
        self.cpu_span = costs.cpu_span().tolist()
        self.od_expert = items.od_expert.tolist()
        self.od_ptr = costs.group_ptr(items.od_g).tolist()
        self.async_ptr = costs.group_ptr(items.async_g).tolist()
        self.async_release = items.async_release.tolist()
        self.async_g = items.async_g.tolist()
        self.uses = self._waiters(items.async_use)          # per layer-forward: copies its GPU waits for
        self.freed = self._waiters(items.async_freed)       # copies whose slots its demand copies reuse
        self.sync_ptr = costs.group_ptr(items.sync_g).tolist()
        self.demote_ptr = costs.group_ptr(items.demote_g).tolist()
        self.layer_fixed = costs.gpu.layer_fixed.tolist()
        self.fwd_fixed = costs.gpu.fwd_fixed.tolist()
        g, cp = costs.gpu, costs.copies
        self.g = {"sync_h2d": cp.sync_h2d.tolist(), "demote_d2h": cp.demote_d2h.tolist(),
                  "act_d2h": cp.act_d2h.tolist(), "res_h2d": cp.res_h2d.tolist(), "od_n": cp.od_n.tolist(),
                  "n_async": cp.n_async.tolist(), "grouped": g.grouped.tolist(), "slow_extra": g.slow_extra.tolist(),
                  "cpu_n": costs.cpu.n.tolist()}
        if timeline is not None:
            timeline.row(GPU_ROW)
            timeline.row(self.h2d_row)
            timeline.row(self.d2h_row)
            for w in range(costs.rates.workers):
                timeline.row(f"CPU worker {w}")
            self.cpu_ptr = costs.group_ptr(items.cpu_g).tolist()
            self.cpu_time = items.cpu_time.tolist()
            self.cpu_expert = items.cpu_expert.tolist()

    def _waiters(self, at: np.ndarray) -> dict[int, list[int]]:
        """{layer-forward: [background copy index]} from each copy's waiting layer-forward (-1: none)."""
        out: dict[int, list[int]] = {}
        for j in np.flatnonzero(at >= 0).tolist():
            out.setdefault(int(at[j]), []).append(j)
        return out

    # ----- driver -------------------------------------------------------------------------
    def run(self, on_forward: Callable[[int], None] | None = None) -> RunTimes:
        self.env.process(self._forwards(on_forward))
        self.env.run()
        return RunTimes(total_s=float(self.env.now), breakdown=dict(self.acc), layer_time=self.layer_time)

    def _forwards(self, on_forward: Callable[[int], None] | None) -> Proc:
        env, c = self.env, self.c
        for f in range(c.forwards):
            fixed = self.fwd_fixed[f]
            self._mark(GPU_ROW, f"fwd {f}: dense layers + lm_head", env.now, fixed, "gpu_fixed")
            yield env.timeout(fixed)
            self.acc["gpu_fixed"] += fixed
            for layer in range(c.layers):
                yield env.process(self._layer(f, layer))
            if on_forward is not None:
                on_forward(f)
        left = [p for p in self.background if p.is_alive]
        if left:  # background copies still in flight are paid for: the run ends when they land
            start = env.now
            yield env.all_of(left)
            self.acc["copy_stall"] += env.now - start

    # ----- one layer-forward --------------------------------------------------------------
    def _layer(self, f: int, layer: int) -> Proc:
        env, gi = self.env, f * self.c.layers + layer
        G = self.g
        t0 = env.now
        fixed = self.layer_fixed[f]
        self._mark(GPU_ROW, f"f{f} moe{layer}: attention + shared expert + gate", t0, fixed, "gpu_fixed")
        yield env.timeout(fixed)
        self.acc["gpu_fixed"] += fixed
        waits, freed = self.uses.get(gi, []), self.freed.get(gi, [])
        if (waits or freed) and (G["sync_h2d"][gi] > 0 or G["demote_d2h"][gi] > 0 or G["od_n"][gi]):
            # demand copies into slots: they start after the background copies this layer-forward
            # waits for (its GPU's and those whose slots it reuses), at the gate (docs/costmodel.md)
            start = env.now
            for j in sorted(set(waits) | set(freed)):
                yield from self._landed(j)
            self.acc["copy_stall"] += env.now - start
            waits = []
        t_gate = env.now
        sync = [env.process(self._copies(self.h2d, self.h2d_row, f"f{f} moe{layer}: expert {{}} sync refresh",
                                         self.c.items.sync_expert, self.sync_ptr, gi, self.c.rates.expert_copy_s))
                for _ in range(G["sync_h2d"][gi] > 0)]
        sync += [env.process(self._copies(self.d2h, self.d2h_row, f"f{f} moe{layer}: expert {{}} demotion",
                                          self.c.items.demote_expert, self.demote_ptr, gi,
                                          self.c.rates.expert_demote_s))
                 for _ in range(G["demote_d2h"][gi] > 0)]
        if sync:
            yield env.all_of(sync)
        t_sync = env.now
        self.acc["sync_refresh"] += t_sync - t_gate
        # demand traffic is requested first at t_sync (fixed order: CPU side, on-demand copies),
        # background refresh copies last
        cpu = env.process(self._cpu_side(f, layer, gi)) if G["cpu_n"][gi] else None
        od: tuple[simpy.Event, simpy.Event] | None = None
        if G["od_n"][gi]:
            od = (env.event(), env.event())
            env.process(self._on_demand_copies(f, layer, gi, *od))
        released = env.event()    # the GPU side tells copies waiting for a slot when it frees
        gpu = env.process(self._gpu_side(f, layer, gi, waits, od, released))
        if G["n_async"][gi]:
            self.flights[gi] = Flight(env.event())
            self.background.append(env.process(self._background(f, layer, gi, released)))
        yield gpu
        t_gpu = env.now
        if cpu is not None:
            yield cpu
        self.acc["cpu_wait"] += env.now - t_gpu
        self.layer_time[layer] += env.now - t0

    def _gpu_side(self, f: int, layer: int, gi: int, waits: list[int],
                  od: tuple[simpy.Event, simpy.Event] | None, released: simpy.Event) -> Proc:
        """Wait for the earlier background copies of the experts this grouped kernel runs (only
        those), run it, then the on-demand experts as the layer model's pipeline places them
        (tidesim.layermodel)."""
        env = self.env
        start = env.now
        for j in waits:
            yield from self._landed(j)
        stall = env.now - start
        work = self.g["grouped"][gi] + self.g["slow_extra"][gi]
        if work > 0:
            self._mark(GPU_ROW, f"f{f} moe{layer}: resident experts (grouped)", env.now, work, "gpu_experts")
            yield env.timeout(work)
        grouped_end = env.now
        ends: list[float] = []
        if od is not None:
            started, copies_end = od
            s0 = yield started
            a, b = self.od_ptr[gi], self.od_ptr[gi + 1]
            one = OnDemand.single(gi, self.c.items.od_compute[a:b], self.c.items.od_release[a:b])
            engine, end, starts, finish = ondemand_pipeline(self.c.rates.expert_copy_s, np.array([s0]),
                                                            np.array([grouped_end]), one)
            n = b - a
            compute = one.compute[:, 0].tolist()
            ends = finish[:, 0].tolist()
            copies_end.succeed((float(engine[0]), starts[:, 0].tolist()))
            for k in range(n):
                self._mark(GPU_ROW, f"f{f} moe{layer}: expert {self.od_expert[self.od_ptr[gi] + k]} (copied on demand)",
                           ends[k] - compute[k], compute[k], "gpu_experts")
            work += sum(compute)
            stall += float(end[0]) - grouped_end - sum(compute)
            released.succeed((grouped_end, ends))
            yield env.timeout(float(end[0]) - env.now)
        else:
            released.succeed((grouped_end, ends))
        self.acc["copy_stall"] += stall
        self.acc["gpu_experts"] += work

    def _cpu_side(self, f: int, layer: int, gi: int) -> Proc:
        env = self.env
        yield from self._copy(self.d2h, self.g["act_d2h"][gi], self.d2h_row, f"f{f} moe{layer}: activations to CPU",
                              "cpu")
        if self.tl is not None:
            a, b = self.cpu_ptr[gi], self.cpu_ptr[gi + 1]
            times, keys = self.cpu_time[a:b], self.cpu_expert[a:b]
            start = env.now
            for job in lpt_assign(times, keys, self.c.rates.workers):
                self.tl.add(f"CPU worker {job.worker}", f"f{f} moe{layer}: expert {keys[job.task]}",
                            start + job.start, job.duration, "cpu")
        yield env.timeout(self.cpu_span[gi])
        yield from self._copy(self.h2d, self.g["res_h2d"][gi], self.h2d_row, f"f{f} moe{layer}: CPU results to GPU",
                              "cpu")

    def _on_demand_copies(self, f: int, layer: int, gi: int, started: simpy.Event, copies_end: simpy.Event
                          ) -> Proc:
        """All on-demand copies of a layer are requested together at the same instant; the engine
        is held from the first copy's start to the last one's end (an in-order copy stream: a copy
        whose slot is not free yet holds up the ones behind it). The GPU side computes the copy
        times with the layer model's pipeline once the grouped kernel is done."""
        env = self.env
        with self.h2d.request(priority=DEMAND) as req:
            yield req
            started.succeed(env.now)
            end, starts = yield copies_end
            if self.tl is not None:
                a = self.od_ptr[gi]
                for k, t in enumerate(starts):
                    self.tl.add(self.h2d_row, f"f{f} moe{layer}: expert {self.od_expert[a + k]} on demand",
                                t, self.c.rates.expert_copy_s, "on_demand")
            if end > env.now:
                yield env.timeout(end - env.now)

    def _background(self, f: int, layer: int, gi: int, released: simpy.Event) -> Proc:
        """Asynchronous refresh copies of one layer-forward, in order: those with a free slot at
        once, the others once their slot is released (after the grouped kernel or an on-demand
        expert: tidesim.layermodel.copy_releases); each run is a low-priority batch."""
        a, b = self.async_ptr[gi], self.async_ptr[gi + 1]
        tags = self.async_release[a:b]
        experts = self.c.items.async_expert[a:b].tolist() if self.tl is not None else []
        done = 0
        while done < len(tags):
            tag = tags[done]
            count = 1
            while done + count < len(tags) and tags[done + count] == tag:
                count += 1
            if tag != FREE_NOW:
                if not released.triggered:
                    yield released
                grouped_end, ends = released.value  # type: ignore[misc]
                at = grouped_end if tag == AFTER_GROUPED else ends[tag]
                if at > self.env.now:
                    yield self.env.timeout(at - self.env.now)
            yield from self._batch(f, layer, gi, experts[done:done + count] if experts else [], count, done)
            done += count

    def _landed(self, j: int) -> Proc:
        """Wait until background copy j (an index into the schedule's asynchronous copies) has
        landed: at its landing time within its run on the engine, else for the next run."""
        g = self.async_g[j]
        fl, p = self.flights[g], j - self.async_ptr[g]
        dur = self.c.rates.expert_copy_s
        while fl.done <= p:
            changed = fl.changed
            if fl.run is None:
                yield changed
                continue
            start, base = fl.run
            lands = self.env.timeout(max(start + (p - base + 1) * dur - self.env.now, 0.0))
            yield lands | changed
            if lands.processed:
                return

    def _progress(self, gi: int, run: tuple[float, int] | None, done: int) -> None:
        fl = self.flights[gi]
        fl.run, fl.done = run, done
        fl.changed.succeed()
        fl.changed = self.env.event()

    def _batch(self, f: int, layer: int, gi: int, experts: list[int], total: int, first: int) -> Proc:
        """`total` background copies (from the layer-forward's copy `first` on): hold the engine
        until a demand request arrives, then finish the copy in progress (no preemption within an
        expert's copy) and queue again."""
        env, dur, engine = self.env, self.c.rates.expert_copy_s, self.h2d
        done = 0
        while done < total:
            # priority 1 + issue order: batches stay first-in first-out even after yielding
            with engine.request(priority=BACKGROUND + gi) as req:
                yield req
                start = env.now
                ran = not (engine.resource.queue and engine.resource.queue[0].priority == DEMAND)
                if not ran:
                    count = 0                        # a demand request arrived at this very instant
                else:
                    self._progress(gi, (start, first + done), first + done)
                    engine.signal = env.event()
                    finish = env.timeout((total - done) * dur)
                    yield finish | engine.signal
                    engine.signal = None
                    if finish.processed or env.now >= start + (total - done) * dur - EPS:
                        count = total - done
                    else:                            # finish the copy in progress, then yield
                        count = min(total - done, int(np.ceil((env.now - start) / dur - EPS)))
                        yield env.timeout(max(start + count * dur - env.now, 0.0))
                for k in range(count):
                    self._mark(self.h2d_row, f"f{f} moe{layer}: expert {experts[done + k] if experts else ''} "
                               "async refresh", start + k * dur, dur, "async_refresh")
                done += count
                if ran:
                    self._progress(gi, None, first + done)

    def _copies(self, engine: CopyEngine, row: str, name: str, experts: np.ndarray, ptr: list[int], gi: int,
                dur: float) -> Proc:
        """A layer-forward's synchronous copies (or demotions) on one engine, back to back in
        expert order: one demand request, one timeline slice per expert copy."""
        a, b = ptr[gi], ptr[gi + 1]
        with engine.request(priority=DEMAND) as req:
            yield req
            if self.tl is not None:
                for k, e in enumerate(experts[a:b].tolist()):
                    self.tl.add(row, name.format(e), self.env.now + k * dur, dur, "sync_refresh")
            yield self.env.timeout((b - a) * dur)

    def _copy(self, engine: CopyEngine, duration: float, row: str, name: str, category: str) -> Proc:
        with engine.request(priority=DEMAND) as req:
            yield req
            self._mark(row, name, self.env.now, duration, category)
            yield self.env.timeout(duration)

    def _mark(self, row: str, name: str, start: float, dur: float, category: str) -> None:
        if self.tl is not None:
            self.tl.add(row, name, start, dur, category)


def simulate(costs: ScheduleCosts, timeline: Timeline | None = None,
             on_forward: Callable[[int], None] | None = None) -> RunTimes:
    """Run the simulator over a schedule's costs."""
    return Simulator(costs, timeline).run(on_forward)
