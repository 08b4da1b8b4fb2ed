"""Multi-stream generation: plan, prompts, decode loop, streamers and outputs."""

from .api import custom_generate, multi_stream_generate
from .output import MultiStreamOutput, Telemetry
from .plan import PlanError, parse_plan
from .streamer import MultiStreamIteratorStreamer, MultiStreamPrinter, MultiStreamStreamer, StreamEvent

__all__ = [
    "MultiStreamIteratorStreamer",
    "MultiStreamOutput",
    "MultiStreamPrinter",
    "MultiStreamStreamer",
    "PlanError",
    "StreamEvent",
    "Telemetry",
    "custom_generate",
    "multi_stream_generate",
    "parse_plan",
]
