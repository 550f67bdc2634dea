"""Settings from the environment (`PREFLOOP_*`), built on demand, never at import.

    PREFLOOP_DB_URL=postgresql://user@host/db prefloop db upgrade
    PREFLOOP_LEASE_TTL_S=300 PREFLOOP_GOLD_RATE=0.1 prefloop up --port 8000
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.web_security import parse_networks

DEFAULT_DATA_DIR = Path("prefloop-data")

DEFAULT_GUIDELINES = """\
**Pick the better response** for the person who wrote the prompt: correct first, then helpful,
then clear and concise. Judge the content, not the length or the position on the screen.

- *Tie*: both are about equally good. *Both bad*: neither is acceptable.
- Listwise: give each response a rank (1 = best); equal ranks are ties.
- Binary: thumbs up if you would be happy to receive the response as it is.
- Not sure, or the task is broken? Skip it.
"""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFLOOP_", frozen=True, extra="ignore")

    data_dir: Path = Field(default=DEFAULT_DATA_DIR, description="Where the SQLite file, "
                           "exports and runs live by default.")
    db_url: str | None = Field(default=None, description="SQLAlchemy URL of the store; "
                               "default: a SQLite file under data_dir.")
    sqlite_synchronous: Literal["NORMAL", "FULL"] = Field(
        default="FULL", description="FULL: acknowledged labels survive power loss; NORMAL: only "
        "a process crash, but writes are faster.")

    # Assignment
    overlap: int = Field(default=1, ge=1, le=50, description="Distinct annotators per task "
                         "(tasks created through the API without an explicit overlap).")
    lease_ttl_s: float = Field(default=600.0, gt=0, description="How long a task stays with "
                               "the annotator it was given to before it is offered again.")
    gold_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="Share of offers that "
                             "are gold tasks (when there are any left for the annotator).")
    undo_grace_s: float = Field(default=60.0, ge=0, description="How long after submitting "
                                "an annotator may undo a label.")

    # Accounts and sessions
    token_ttl_days: float = Field(default=90.0, gt=0, description="Lifetime of API tokens "
                                  "made by `prefloop users add`.")
    session_ttl_hours: float = Field(default=12.0, gt=0, description="Lifetime of a browser "
                                     "login session.")
    secure_cookies: bool = Field(default=False, description="Send the session cookie only over "
                                 "HTTPS (turn on behind a TLS proxy).")

    # Abuse limits
    login_attempts: int = Field(default=10, ge=1, description="Failed logins allowed per "
                                "(account, client address) in login_window_s; beyond, that "
                                "address gets 429 for that account (others are not locked out).")
    login_attempts_per_address: int = Field(default=50, ge=1, description="Failed logins "
                                            "allowed per client address (any account) in "
                                            "login_window_s.")
    login_window_s: float = Field(default=900.0, gt=0)
    trusted_proxies: str = Field(default="", description="Comma-separated IP addresses or "
                                 "networks of reverse proxies whose X-Forwarded-For is "
                                 "believed (client address for login limits); empty: none, the "
                                 "peer address is the client.")
    submit_rate_per_s: float = Field(default=5.0, gt=0, description="Sustained label submits "
                                     "per second allowed per annotator.")
    submit_burst: int = Field(default=20, ge=1, description="Submits an annotator may make at "
                              "once before the sustained rate applies.")
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, description="Largest request "
                                "body accepted (413 beyond).")

    ui_concurrency: int = Field(default=16, ge=1, le=256, description="Labeling UI events "
                                "handled at once (per event type).")

    guidelines: str = Field(default=DEFAULT_GUIDELINES, description="Markdown shown in the "
                            "labeling UI's guidelines panel.")

    # Policy serving (app/policy_engine.py, app/deploy.py, /v1)
    serving: Literal["hf", "upstream", "off"] = Field(
        default="hf", description="How /v1 generates: hf = the deployed version's Hugging Face "
        "folder in this process (needs torch); upstream = proxy to an OpenAI-compatible server "
        "(vLLM) at serving_upstream_url; off = no /v1 generation.")
    serving_upstream_url: str | None = Field(
        default=None, description="Base URL of the OpenAI-compatible server, e.g. "
        "http://vllm:8000/v1; may contain {name}/{id} to reach one server per version.")
    serving_upstream_model: str = Field(
        default="{weights_uri}", description="The model name sent upstream for a version "
        "(`vllm serve PATH` names its model PATH; {name}, {id}, {base_model} also work).")
    serving_upstream_api_key: SecretStr | None = Field(default=None)
    serving_upstream_concurrency: int = Field(default=16, ge=1, le=1024,
                                              description="Requests sent upstream at once.")
    serving_device: str = Field(default="cpu", description="torch device of the hf engine.")
    serving_dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32")
    serving_max_queue: int = Field(default=32, ge=1, le=4096, description="Requests waiting "
                                   "per engine; beyond this /v1 answers 503 at once.")
    serving_max_batch: int = Field(default=16, ge=1, le=1024, description="Requests the hf "
                                   "engine generates together (continuous batching); more "
                                   "wait in its queue.")
    serving_max_context: int = Field(default=4096, ge=16, description="Prompt + max_tokens of "
                                     "one request at most on the hf engine (400 beyond); the "
                                     "model's own context if smaller.")
    serving_kv_cache_gb: float = Field(default=2.0, gt=0, description="The hf engine's KV "
                                       "cache at most; requests that would exceed it wait.")
    serving_max_concurrent_per_token: int = Field(
        default=8, ge=1, le=4096, description="Generations one API token may run at once on "
        "/v1; beyond that, 429 with Retry-After.")
    serving_default_max_tokens: int = Field(default=128, ge=1, description="max_tokens when "
                                            "a request gives none.")
    serving_max_tokens: int = Field(default=1024, ge=1, description="Largest max_tokens "
                                    "accepted (400 beyond).")
    serving_request_timeout_s: float = Field(default=300.0, gt=0, description="A request "
                                             "that produces nothing for this long gets 504.")
    serving_smoke_prompt: str = Field(
        default="Answer in one short sentence: what is the capital of France?",
        description="The fixed prompt every version must answer before it takes traffic.")
    serving_smoke_max_tokens: int = Field(default=8, ge=1, le=256)
    serving_smoke_timeout_s: float = Field(default=60.0, gt=0, description="A smoke "
                                           "generation slower than this refuses the version.")
    serving_load_timeout_s: float = Field(default=600.0, gt=0, description="Loading a "
                                          "version slower than this refuses it.")
    serving_poll_interval_s: float = Field(default=2.0, gt=0, description="How often the "
                                           "app checks which version is deployed.")
    serving_keep_previous: bool = Field(default=True, description="Keep the previous "
                                        "version loaded for an instant rollback.")
    serving_reject_failed: bool = Field(default=True, description="A version that fails to "
                                        "load or smoke-generate is marked rejected (and its "
                                        "predecessor deployed again) in the store.")

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        parse_networks(value)  # ValueError naming the bad entry
        return value

    def trusted_networks(self) -> tuple[Any, ...]:
        return parse_networks(self.trusted_proxies)

    @model_validator(mode="after")
    def _upstream_needs_url(self) -> Settings:
        if self.serving == "upstream" and not self.serving_upstream_url:
            raise ValueError("PREFLOOP_SERVING=upstream needs PREFLOOP_SERVING_UPSTREAM_URL")
        return self

    def resolved_db_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(self.data_dir / 'prefloop.db').as_posix()}"


def get_settings(**overrides: object) -> Settings:
    """Read the environment now; explicit overrides (e.g. from CLI flags) win."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
