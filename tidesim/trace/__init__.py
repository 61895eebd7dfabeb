"""Expert-activation traces: format v1 (schema, Parquet IO, validation), statistics, synthesis."""

from tidesim.trace.io import read_trace, write_trace
from tidesim.trace.schema import FORMAT_VERSION, Trace, TraceMeta
from tidesim.trace.validate import validate_trace

__all__ = ["FORMAT_VERSION", "Trace", "TraceMeta", "read_trace", "validate_trace", "write_trace"]
