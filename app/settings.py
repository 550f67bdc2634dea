"""Settings from the environment (`PREFLOOP_*`), built on demand, never at import.

    PREFLOOP_DB_URL=postgresql://user@host/db prefloop db upgrade
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path("prefloop-data")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFLOOP_", frozen=True, extra="ignore")

    data_dir: Path = Field(default=DEFAULT_DATA_DIR, description="Where the SQLite file, "
                           "exports and runs live by default.")
    db_url: str | None = Field(default=None, description="SQLAlchemy URL of the store; "
                               "default: a SQLite file under data_dir.")
    sqlite_synchronous: Literal["NORMAL", "FULL"] = Field(
        default="FULL", description="FULL: acknowledged labels survive power loss; NORMAL: only "
        "a process crash, but writes are faster.")

    def resolved_db_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(self.data_dir / 'prefloop.db').as_posix()}"


def get_settings(**overrides: object) -> Settings:
    """Read the environment now; explicit overrides (e.g. from CLI flags) win."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
