"""Which serving engine a policy version gets: `make_engine(policy, settings)` builds the
local engine (app/local_engine.py) or the upstream proxy (app/upstream_engine.py) as
PREFLOOP_SERVING says. The deployment manager (app/deploy.py) calls it for every version it
loads.

    engine = make_engine(ServedPolicy(1, "v1", "smollm2-135m-instruct", "smollm2-135m-instruct"),
                         get_settings())
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.policy_engine import Engine, NoModel, ServedPolicy

if TYPE_CHECKING:
    from app.settings import Settings


def make_engine(policy: ServedPolicy, settings: Settings) -> Engine:
    """The engine for `policy` as the settings say (PREFLOOP_SERVING=hf|upstream)."""
    if settings.serving == "hf":
        from app.local_engine import LocalEngine

        return LocalEngine(policy, max_batch=settings.serving_max_batch,
                           max_queue=settings.serving_max_queue, device=settings.serving_device,
                           dtype=settings.serving_dtype, max_context=settings.serving_max_context,
                           kv_cache_gb=settings.serving_kv_cache_gb)
    if settings.serving == "upstream":
        from app.upstream_engine import UpstreamEngine, upstream_model_name

        assert settings.serving_upstream_url is not None  # checked by Settings
        key = settings.serving_upstream_api_key
        return UpstreamEngine(
            policy, base_url=upstream_model_name(settings.serving_upstream_url, policy),
            model=upstream_model_name(settings.serving_upstream_model, policy),
            api_key=key.get_secret_value() if key is not None else None,
            timeout_s=settings.serving_request_timeout_s,
            max_concurrency=settings.serving_upstream_concurrency,
            max_queue=settings.serving_max_queue)
    raise NoModel("serving is off (PREFLOOP_SERVING=off)")
