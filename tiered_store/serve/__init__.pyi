"""Type stub of the package's lazy exports: what ``__init__.py`` imports on first use."""

from .app import INFERENCE_PATH, build_app
from .cli import register_init_model, register_serve, run_init_model, run_serve
from .config import SERVE_DEFAULTS, CheckpointSection, ServeConfig, ServerSection, check_address
from .guarded_table import GuardedTable, TableUnavailableError
from .inference_request import InferenceRequest, RequestError, parse_request
from .served_model import NonFiniteOutputError, ServedModel, create_checkpoint
from .server import InferenceServer, without_paths

__all__ = [
    "INFERENCE_PATH",
    "SERVE_DEFAULTS",
    "CheckpointSection",
    "GuardedTable",
    "InferenceRequest",
    "InferenceServer",
    "NonFiniteOutputError",
    "RequestError",
    "ServeConfig",
    "ServedModel",
    "ServerSection",
    "TableUnavailableError",
    "build_app",
    "check_address",
    "create_checkpoint",
    "parse_request",
    "register_init_model",
    "register_serve",
    "run_init_model",
    "run_serve",
    "without_paths",
]
