"""Load on `lmforge serve` over loopback: 1, 8, 32 and 100 concurrent clients, each request asking for 64 tokens.

A ~14M-parameter GPT-2-shaped model with random weights (greedy, no EOS in its char-level vocabulary, so
every request gets exactly --tokens tokens) is written once as a Hugging Face folder with
`lmforge.interop.save_hf`; the server (a subprocess running `run_serve`, --max_batch 16) and the HF
baseline both load that folder. Each of C clients sends --rounds streamed requests one after another
(httpx, async). Reported per level: requests/s, tokens/s, p50/p99 time to first token and latency,
errors, and the server's peak RSS (VmHWM). Baselines in the same run: the same requests sent one at a
time to the same server, and HF `transformers` `generate` called in a loop on the same weights.

    python benchmarks/serve_load.py            # the measurement (machine otherwise idle)
    python benchmarks/serve_load.py --quick    # smoke run: a 2-layer model, 1 and 4 clients, 8 tokens
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from _common import format_table, settle, write_results

from lmforge.config import ModelConfig
from lmforge.interop import save_hf
from lmforge.models import CausalLM
from lmforge.tokenizer import train_char

# GPT-2 block at 384 wide, 8 layers: ~14M parameters with a char-level vocabulary.
FULL = dict(preset="gpt2", n_layers=8, d_model=384, n_heads=6, context_length=256)
QUICK = dict(preset="gpt2", n_layers=2, d_model=64, n_heads=4, context_length=64)


def build_folder(folder: Path, shape: dict[str, Any]) -> int:
    """Random weights + a char tokenizer without special tokens (no EOS: every request runs to max_tokens)."""
    tokenizer = train_char([string.printable])
    spec = dict(shape)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset(spec.pop("preset"), vocab_size=tokenizer.vocab_size, **spec))
    save_hf(folder, model, tokenizer)
    return model.num_parameters()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`run_serve` in a subprocess; its peak RSS read from /proc before it is stopped."""

    def __init__(self, folder: Path, max_batch: int, max_queue: int) -> None:
        self.port = free_port()
        code = ("from lmforge.recipes.serve import ServeConfig, run_serve; "
                f"run_serve(ServeConfig(model={str(folder)!r}, port={self.port}, max_batch={max_batch}, "
                f"max_queue={max_queue}, device='cpu'))")
        self.log = folder.parent / "server.log"  # one line per request, read back on failure
        with self.log.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-c", code], stderr=log)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.base + "/health").status_code == 200:
                    return
            time.sleep(0.2)
        raise SystemExit("the server did not start within 180 s")

    def memory_mb(self, field: str) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(60)


async def one_request(http: httpx.AsyncClient, prompt: str, tokens: int) -> dict[str, Any]:
    """One streamed completion: time to first token, latency, tokens received (from the usage chunk)."""
    body = {"model": "model", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, completion = None, 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"error": f"{response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    completion = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return {"error": type(exc).__name__}
    return {"ttft": first if first is not None else time.perf_counter() - start,
            "latency": time.perf_counter() - start, "tokens": completion}


async def load_level(base: str, clients: int, rounds: int, tokens: int) -> tuple[list[dict], float]:
    """C clients, each sending `rounds` requests one after another; returns the results and the wall time."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        async def client(number: int) -> list[dict]:
            return [await one_request(http, f"Client {number}, request {r}: def f", tokens) for r in range(rounds)]

        start = time.perf_counter()
        results = await asyncio.gather(*(client(c) for c in range(clients)))
        return [r for rs in results for r in rs], time.perf_counter() - start


def summarise(name: str, results: list[dict], seconds: float, rss_mb: float | None) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    ttft = np.array([r["ttft"] for r in ok]) * 1000 if ok else np.array([np.nan])
    latency = np.array([r["latency"] for r in ok]) * 1000 if ok else np.array([np.nan])
    tokens = sum(r["tokens"] for r in ok)
    return {"mode": name, "requests": len(results), "errors": len(results) - len(ok),
            "requests_per_s": len(ok) / seconds, "tokens_per_s": tokens / seconds,
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "latency_p50_ms": float(np.percentile(latency, 50)), "latency_p99_ms": float(np.percentile(latency, 99)),
            "server_peak_rss_mb": rss_mb, "seconds": seconds, "tokens": tokens}


def hf_loop(folder: Path, prompts: list[str], tokens: int) -> dict[str, Any]:
    """The baseline without a server: transformers' generate, one prompt after another, same weights."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    latencies, produced = [], 0
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            began = time.perf_counter()
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=0)
            latencies.append(time.perf_counter() - began)
            produced += out.shape[1] - ids.shape[1]
    seconds = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"mode": "hf generate loop", "requests": len(prompts), "errors": 0, "requests_per_s": len(prompts) / seconds,
            "tokens_per_s": produced / seconds, "ttft_p50_ms": None, "ttft_p99_ms": None,
            "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p99_ms": float(np.percentile(lat, 99)),
            "server_peak_rss_mb": None, "seconds": seconds, "tokens": produced}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32,100", help="comma-separated concurrency levels")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--sequential", type=int, default=16, help="requests of the one-at-a-time baselines")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--no-wait", action="store_true", help="do not wait for an idle CPU before timing")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1 and 4 clients, 8 tokens")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.rounds, args.tokens, args.sequential, args.no_wait = "1,4", 1, 8, 2, True
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        parameters = build_folder(folder, QUICK if args.quick else FULL)
        print(f"model: {parameters / 1e6:.1f}M parameters (random weights), {args.tokens} tokens per request, "
              f"max_batch {args.max_batch}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
        server = Server(folder, args.max_batch, args.max_queue)
        rows = []
        try:
            rss_loaded = server.memory_mb("VmRSS")
            asyncio.run(load_level(server.base, 1, 1, args.tokens))  # warm-up
            settle(not args.no_wait)
            results, seconds = asyncio.run(load_level(server.base, 1, args.sequential, args.tokens))
            rows.append(summarise("server, one at a time", results, seconds, server.memory_mb("VmHWM")))
            for clients in levels:
                settle(not args.no_wait)
                results, seconds = asyncio.run(load_level(server.base, clients, args.rounds, args.tokens))
                rows.append(summarise(f"server, {clients} clients", results, seconds, server.memory_mb("VmHWM")))
                print(f"  {clients} clients: {rows[-1]['tokens_per_s']:.0f} tokens/s, {rows[-1]['errors']} errors",
                      flush=True)
        finally:
            status = server.stop()
        settle(not args.no_wait)
        rows.append(hf_loop(folder, [f"Client 0, request {r}: def f" for r in range(args.sequential)], args.tokens))
    headers = ["mode", "requests", "errors", "req/s", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "latency p50 ms",
               "latency p99 ms", "server peak RSS MB"]
    keys = ["mode", "requests", "errors", "requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms",
            "latency_p50_ms", "latency_p99_ms", "server_peak_rss_mb"]
    print(format_table(headers, [["-" if row[k] is None else row[k] for k in keys] for row in rows]))
    sequential = rows[0]["tokens_per_s"]
    for row in rows[1:-1]:
        print(f"ratio batched/sequential (tokens/s) {row['mode']}: {row['tokens_per_s'] / sequential:.2f}")
    print(f"ratio server one-at-a-time / hf generate loop (tokens/s): {sequential / rows[-1]['tokens_per_s']:.2f}")
    print(f"server RSS after loading {rss_loaded:.0f} MB; exit status after SIGTERM {status}")
    payload = {"parameters": parameters, "tokens_per_request": args.tokens, "rounds": args.rounds,
               "max_batch": args.max_batch, "max_queue": args.max_queue, "server_rss_loaded_mb": rss_loaded,
               "server_exit_status": status, "rows": rows}
    path = write_results("serve_load", payload, quick=args.quick)
    print(f"results -> {path}")
    if any(row["errors"] for row in rows) or status != 0:
        raise SystemExit("errors under load, or the server did not shut down cleanly")


if __name__ == "__main__":
    main()
