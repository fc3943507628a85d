"""Settings of `offsite serve` (import-light: the command line builds its flags from them)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

URL_ENV, TOKEN_ENV = "OFFSITE_URL", "OFFSITE_TOKEN"  # where --url/--token default from

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass
class ServeConfig:
    """`offsite serve` settings; every field is also a flag and a YAML key."""

    bundles: str  # directory whose subdirectories are the emulator bundles on offer
    state: str  # directory for the database, uploads and reports (created if missing)
    model: str | None = None  # base model for jobs and representation queries (checkpoint dir or asset name)
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 2 * 1024**3
    max_json_bytes: int = 16 * 1024**2  # any other request body (jobs with own docs, representation queries)
    body_timeout: float = 30.0  # seconds a request body may stall before the request ends with 408
    max_connections: int = 64  # concurrent connections and requests; past it uvicorn answers 503
    device: str = "auto"  # where jobs and representation queries run
    eval_batch_size: int = 16
    max_norm_ratio: float = 100.0  # plug-in norm bound of jobs (see offsite plugin); 0 disables
    max_jobs_per_owner: int = 8  # queued or running jobs of one data owner; past it 429
    max_attempts: int = 2  # runs of a job interrupted by server restarts before it is marked failed
    log_level: str = "info"

    def __post_init__(self):
        if not self.body_timeout > 0:
            raise ConfigError(f"body_timeout must be positive, got {self.body_timeout}")
        for name in ("max_upload_bytes", "max_json_bytes", "max_connections", "max_jobs_per_owner", "eval_batch_size", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535 (0: any free port), got {self.port}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
