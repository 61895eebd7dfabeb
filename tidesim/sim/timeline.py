"""Chrome trace JSON of a simulated run: one row per resource; opens in Perfetto or chrome://tracing.

Times are simulated seconds, written in microseconds as the format expects. Output is sorted and
rounded so that identical runs give identical bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidesim.atomic import write_text

GPU_ROW = "GPU stream"


@dataclass
class Timeline:
    """Collects complete events ("ph": "X") per named row."""

    rows: list[str] = field(default_factory=list)
    events: list[tuple[int, float, float, str, str]] = field(default_factory=list)

    def row(self, name: str) -> int:
        if name not in self.rows:
            self.rows.append(name)
        return self.rows.index(name)

    def add(self, row: str, name: str, start_s: float, dur_s: float, category: str = "") -> None:
        if dur_s <= 0:
            return
        self.events.append((self.row(row), start_s, dur_s, name, category))

    def to_chrome(self) -> dict[str, Any]:
        meta: list[dict[str, Any]] = [{"ph": "M", "pid": 0, "name": "process_name", "args": {"name": "tidesim"}}]
        for tid, name in enumerate(self.rows):
            meta.append({"ph": "M", "pid": 0, "tid": tid, "name": "thread_name", "args": {"name": name}})
            meta.append({"ph": "M", "pid": 0, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
        body = [
            {"ph": "X", "pid": 0, "tid": tid, "ts": round(start * 1e6, 3), "dur": round(dur * 1e6, 3),
             "name": name, "cat": cat or "work"}
            for tid, start, dur, name, cat in sorted(self.events, key=lambda e: (e[1], e[0], e[3]))
        ]
        return {"displayTimeUnit": "ms", "traceEvents": meta + body}

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_chrome(), sort_keys=True, separators=(",", ":")) + "\n")
