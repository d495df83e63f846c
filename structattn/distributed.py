"""Multi-host start-up, kept under its former name: see `structattn.runtime`."""

from structattn.runtime import MODES, agree, detect_cluster
from structattn.runtime import initialize_distributed as initialize

__all__ = ["MODES", "agree", "detect_cluster", "initialize"]
