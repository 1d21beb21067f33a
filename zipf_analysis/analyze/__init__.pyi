"""Type stub of the package's lazy exports: what ``__init__.py`` imports on first use."""

from .cli import register, run_analyze
from .ngram_keys import NgramKeyCounter
from .options import AnalyzeOptions, parse_targets
from .pipeline import AnalysisResult, analyze
from .publish import OutputDirError, StagingFolderWarning

__all__ = [
    "AnalysisResult",
    "AnalyzeOptions",
    "NgramKeyCounter",
    "OutputDirError",
    "StagingFolderWarning",
    "analyze",
    "parse_targets",
    "register",
    "run_analyze",
]
