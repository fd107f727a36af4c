"""The runtime: one resident base model, every expert's compressed delta, mixed-expert batches."""
from .engine import Completion, ContextLengthError, QueueFullError, Request, RequestError, SamplingParams
from .store import MemoryBudgetError, parse_memory
from .switch import SourceError, Switch

__all__ = ["Switch", "Completion", "Request", "RequestError", "QueueFullError", "SamplingParams",
           "MemoryBudgetError", "ContextLengthError", "SourceError", "parse_memory"]
