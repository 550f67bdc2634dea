"""Read a prefloop export, check it, tokenise it, and collate micro-batches.

The row shapes are those of docs/formats.md: `trl-preference` (dpo, rm), `trl-unpaired` (kto),
`sft` (sft) and `listwise` (rm with the Plackett-Luce loss). If `FILE.manifest.json` exists its
`sha256` must equal the file's; the digest is recorded in the run's outputs either way. All
problems (empty file, wrong shape, over-long rows with `overlong="skip"`) are found here, before
a model is loaded.

Batches are padded only up to the longest sequence of the micro-batch (right padding), and a
preference micro-batch holds [chosen; rejected] so both go through the model in one forward pass.

    python -c "from training.data import read_export; print(read_export('pairs.jsonl').sha256)"
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

Text = str | list[dict[str, Any]]
# Conditional SFT tags (reward-conditioned prefixes); kept as plain text so any tokenizer works.
GOOD_TAG, BAD_TAG = "<|quality:good|>", "<|quality:bad|>"


class DataError(ValueError):
    """The export cannot be trained on (with the file and line where that is known)."""


@dataclass(frozen=True)
class Export:
    """The rows of an export file plus its provenance."""

    path: Path
    rows: list[dict[str, Any]]
    sha256: str
    manifest: dict[str, Any] | None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (the digest `prefloop export` writes in the manifest)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_export(path: Path | str) -> Export:
    """Read a JSONL export and verify it against `FILE.manifest.json` when that exists."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    sha = file_sha256(path)
    manifest_path = path.with_name(path.name + ".manifest.json")
    manifest = None
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("sha256") != sha:
            raise DataError(
                f"{path}: sha256 {sha} does not match {manifest_path.name} "
                f"({manifest.get('sha256')}); the file changed after export"
            )
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: a row must be a JSON object")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: the export is empty; nothing to train on")
    return Export(path=path, rows=rows, sha256=sha, manifest=manifest)


# ------------------------------------------------------------------------------ tokenisation


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def encode_prompt_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: Text, completion: Text
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the completion that follows it.

    Text rows: EOS is appended to the completion (so the model learns to stop), and the text is
    tokenised as one string. Conversational rows: the tokenizer's chat template renders the prompt
    with the generation prompt, and prompt + completion as a whole. The completion starts where the
    two token sequences diverge, so that tokens merged across the boundary are not lost.
    """
    if _is_conversation(prompt):
        if not _is_conversation(completion):
            raise DataError("a conversational prompt needs a conversational completion")
        prompt_text = tokenizer.apply_chat_template(
            cast(Any, prompt), add_generation_prompt=True, tokenize=False
        )
        messages = cast(list[dict[str, Any]], prompt) + cast(list[dict[str, Any]], completion)
        full_text = tokenizer.apply_chat_template(cast(Any, messages), tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, str) and isinstance(completion, str):
        eos = tokenizer.eos_token or ""
        if not completion.endswith(eos):
            completion = completion + eos
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(prompt + completion)["input_ids"]
    else:
        raise DataError("prompt and completion must both be text or both be message lists")
    shared = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):
        if a != b:
            break
        shared += 1
    return list(full_ids[:shared]), list(full_ids[shared:])


def conditioned_prompt(prompt: Text, desirable: bool) -> Text:
    """Prepend a reward tag to a prompt (Conditional SFT: train on good and bad answers, each
    tagged, then generate with the good tag; cf. Hu et al. 2023, arXiv:2308.12050)."""
    tag = GOOD_TAG if desirable else BAD_TAG
    if _is_conversation(prompt):
        return [{"role": "system", "content": tag}, *prompt]
    return f"{tag}\n{prompt}"


# ------------------------------------------------------------------------------ examples


@dataclass(frozen=True)
class PairExample:
    """One preference pair: shared prompt, chosen and rejected completion ids."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float = 1.0
    margin: float = 0.0


@dataclass(frozen=True)
class CompletionExample:
    """One prompt + completion (SFT, or KTO with its label and its mismatched KL completion)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool = True
    weight: float = 1.0
    kl_completion_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ListExample:
    """One prompt with K completions and their 1-based ranks (ties share a rank)."""

    prompt_ids: list[int]
    completions_ids: list[list[int]]
    ranks: list[int]
    weight: float = 1.0


Example = PairExample | CompletionExample | ListExample


@dataclass(frozen=True)
class DataReport:
    """What happened to the rows: kept, truncated to max_length, or skipped."""

    rows: int
    examples: int
    truncated: int
    skipped: int

    def describe(self) -> str:
        return (f"{self.rows} rows -> {self.examples} examples "
                f"({self.truncated} truncated, {self.skipped} skipped as longer than max_length)")


def _require(row: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; have {sorted(row)}")


def _fit(prompt_ids: list[int], completion: list[int], max_length: int) -> list[int] | None:
    """Truncate a completion so that prompt + completion fits; None if nothing would be left."""
    room = max_length - len(prompt_ids)
    return completion[:room] if room >= 1 else None


def build_examples(
    mode: str,
    loss_type: str,
    export: Export,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    overlong: str,
    conditional_sft: bool = False,
) -> tuple[list[Example], DataReport]:
    """Validate rows for `mode` and tokenise them into examples.

    Raises:
        DataError: a row has the wrong shape, or nothing is left to train on.
    """
    examples: list[Example] = []
    truncated = skipped = 0

    def place(prompt_ids: list[int], completions: list[list[int]]) -> list[list[int]] | None:
        """Apply the overlong policy to one example's completions; None means skip it."""
        nonlocal truncated, skipped
        if all(len(prompt_ids) + len(c) <= max_length for c in completions):
            return completions
        fitted = [_fit(prompt_ids, c, max_length) for c in completions]
        if overlong == "skip" or any(c is None for c in fitted):
            skipped += 1
            return None
        truncated += 1
        return [c for c in fitted if c is not None]

    for index, row in enumerate(export.rows):
        where = f"{export.path}:{index + 1}"
        weight = float(row.get("weight", 1.0))
        if mode == "dpo" or (mode == "rm" and loss_type == "bradley_terry"):
            _require(row, ("prompt", "chosen", "rejected"), where)
            prompt_ids, chosen = encode_prompt_completion(tokenizer, row["prompt"], row["chosen"])
            prompt_r, rejected = encode_prompt_completion(tokenizer, row["prompt"], row["rejected"])
            # The prompt is shared: cut at the shorter common prefix of the two encodings.
            shared = min(len(prompt_ids), len(prompt_r))
            chosen = prompt_ids[shared:] + chosen
            rejected = prompt_r[shared:] + rejected
            placed = place(prompt_ids[:shared], [chosen, rejected])
            if placed:
                examples.append(PairExample(prompt_ids[:shared], placed[0], placed[1], weight,
                                            float(row.get("margin", 0.0))))
        elif mode == "rm":
            _require(row, ("prompt", "completions", "ranks"), where)
            if len(row["completions"]) != len(row["ranks"]) or len(row["completions"]) < 2:
                raise DataError(f"{where}: completions and ranks must have the same length >= 2")
            encoded = [encode_prompt_completion(tokenizer, row["prompt"], c)
                       for c in row["completions"]]
            shared = min(len(p) for p, _ in encoded)
            prompt_ids = encoded[0][0][:shared]
            completions = [p[shared:] + c for p, c in encoded]
            placed = place(prompt_ids, completions)
            if placed:
                examples.append(ListExample(prompt_ids, placed, [int(r) for r in row["ranks"]],
                                            weight))
        elif mode == "kto" or (mode == "sft" and conditional_sft):
            if mode == "sft" and "chosen" in row:  # a preference row gives one good, one bad
                _require(row, ("prompt", "chosen", "rejected"), where)
                labelled = [(row["chosen"], True), (row["rejected"], False)]
            else:
                _require(row, ("prompt", "completion", "label"), where)
                if not isinstance(row["label"], bool):
                    raise DataError(f"{where}: label must be true or false")
                labelled = [(row["completion"], row["label"])]
            for completion, desirable in labelled:
                prompt = conditioned_prompt(row["prompt"], desirable) if mode == "sft" else (
                    row["prompt"])
                prompt_ids, completion_ids = encode_prompt_completion(tokenizer, prompt, completion)
                placed = place(prompt_ids, [completion_ids])
                if placed:
                    examples.append(CompletionExample(prompt_ids, placed[0], desirable, weight))
        else:  # plain SFT
            _require(row, ("prompt", "completion"), where)
            prompt_ids, completion_ids = encode_prompt_completion(
                tokenizer, row["prompt"], row["completion"]
            )
            placed = place(prompt_ids, [completion_ids])
            if placed:
                examples.append(CompletionExample(prompt_ids, placed[0], True, weight))

    if not examples:
        raise DataError(
            f"{export.path}: no example left to train on ({skipped} of {len(export.rows)} rows "
            f"longer than max_length={max_length})"
        )
    if mode == "kto":
        examples = attach_kl_completions(examples, max_length)  # type: ignore[arg-type]
    report = DataReport(len(export.rows), len(examples), truncated, skipped)
    return examples, report


def attach_kl_completions(
    examples: list[CompletionExample], max_length: int
) -> list[Example]:
    """Give example i the completion of example i+1 (mod N) as its mismatched KL completion.

    KTO estimates its reference point from mismatched (x_i, y_j) pairs (Ethayarajh et al. 2024,
    Sec. 4.1). Fixing the pairing at dataset level (rather than per batch) lets the reference
    log-probs of the mismatched pairs be computed once, like every other reference log-prob.
    """
    n = len(examples)
    out: list[Example] = []
    for i, ex in enumerate(examples):
        other = examples[(i + 1) % n].completion_ids
        room = max(1, max_length - len(ex.prompt_ids))
        out.append(CompletionExample(ex.prompt_ids, ex.completion_ids, ex.desirable, ex.weight,
                                     other[:room]))
    return out


# ------------------------------------------------------------------------------ collation


def collate_sequences(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad prompt+completion sequences to the longest one in the list.

    Returns:
        input_ids (N, T), attention_mask (N, T), and completion_mask (N, T) that is 1 on the
        completion tokens of input_ids (the tokens whose log-probabilities are trained).
    """
    import torch

    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    completion_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        seq = prompt + completion
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        completion_mask[row, len(prompt) : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "completion_mask": completion_mask}


def collate_pairs(batch: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """[chosen_0..chosen_B-1; rejected_0..rejected_B-1] as one (2B, T) batch."""
    prompts = [ex.prompt_ids for ex in batch] * 2
    completions = [ex.chosen_ids for ex in batch] + [ex.rejected_ids for ex in batch]
    return collate_sequences(prompts, completions, pad_id)


def collate_lists(batch: list[ListExample], pad_id: int) -> dict[str, torch.Tensor]:
    """All completions of all lists as one batch, plus (B, K) ranks and validity masks."""
    import torch

    k = max(len(ex.ranks) for ex in batch)
    prompts = [ex.prompt_ids for ex in batch for _ in ex.completions_ids]
    completions = [c for ex in batch for c in ex.completions_ids]
    out = collate_sequences(prompts, completions, pad_id)
    ranks = torch.zeros((len(batch), k), dtype=torch.long)
    valid = torch.zeros((len(batch), k), dtype=torch.bool)
    for row, ex in enumerate(batch):
        ranks[row, : len(ex.ranks)] = torch.tensor(ex.ranks)
        valid[row, : len(ex.ranks)] = True
    out["ranks"], out["list_valid"] = ranks, valid
    return out


def collate_shared_prompts(prompts: list[list[int]], completions: list[list[int]],
                           pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded (B, P), so every prompt ends at column P-1, and their completions
    right-padded (B*K, C), prompt-major (row b*K + j is completion j of prompt b), for
    training.logprobs.shared_prompt_pair_logps."""
    import torch

    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            prompt_ids[row, width - len(ids):] = torch.tensor(ids)
            prompt_mask[row, width - len(ids):] = 1
    length = max(len(c) for c in completions)
    completion_ids = torch.full((len(completions), length), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completions), length), dtype=torch.long)
    for row, ids in enumerate(completions):
        completion_ids[row, : len(ids)] = torch.tensor(ids)
        completion_mask[row, : len(ids)] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask}


def collate_shared_prompt_pairs(batch: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """collate_shared_prompts for preference pairs: completions interleaved as
    [chosen_0, rejected_0, chosen_1, ...]."""
    return collate_shared_prompts([ex.prompt_ids for ex in batch],
                                  [c for ex in batch for c in (ex.chosen_ids, ex.rejected_ids)],
                                  pad_id)
