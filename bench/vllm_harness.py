"""A tiny local Llama and a vLLM engine in a fresh process, for the vLLM e2e test and benchmark.

Nothing is downloaded: the model is a random-weight ``LlamaForCausalLM`` built
with transformers and saved as safetensors; prompts are token ids (no tokenizer).

Each engine runs in its own process (``python -m bench.vllm_harness engine``),
so its own prefix cache starts empty and the only way to reuse a prefix is
through kvstore.  The process reads a JSON spec and writes a JSON result::

    spec = {"model": DIR, "kvstore": {"socket": ..., "stats_dir": ...} | None,
            "max_model_len": 8192, "block_size": 128,
            "steps": [{"prompt": [ids...], "max_tokens": 8, "timed": false}, ...]}
    result = {"steps": [{"tokens": [...], "num_cached_tokens": n, "seconds": s}, ...],
              "startup_s": s}

Needs vllm (``make vllm-env``); importing this module does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def make_tiny_llama(
    path: str | Path,
    *,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    vocab: int = 1024,
    max_positions: int = 8192,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """Saves a random-weight Llama (safetensors, no tokenizer) into ``path``; returns it.

    The config's eos is token 2; prompts use ids >= 3 and generation ignores eos.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def random_prompt(n: int, seed: int, vocab: int = 1024) -> list[int]:
    """``n`` token ids in ``[3, vocab)`` (0-2 are pad/bos/eos)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _engine(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv = spec.get("kvstore")
    transfer = None
    if kv is not None:
        transfer = KVTransferConfig(
            kv_connector="KVStoreConnector",
            kv_connector_module_path="kvstore.integrations.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=kv,
        )
    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        enforce_eager=True,
        max_model_len=spec.get("max_model_len", 8192),
        block_size=spec.get("block_size", 128),
        dtype=spec.get("dtype", "bfloat16"),
        kv_transfer_config=transfer,
        seed=0,
    )
    startup = time.perf_counter() - t0
    steps = []
    for st in spec["steps"]:
        sp = SamplingParams(
            temperature=0.0, max_tokens=st.get("max_tokens", 8), detokenize=False, ignore_eos=True
        )
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=st["prompt"])], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        step: dict[str, Any] = {
            "tokens": list(out[0].outputs[0].token_ids),
            "num_cached_tokens": int(out[0].num_cached_tokens or 0),
            "seconds": dt,
        }
        if kv is not None and kv.get("stats_dir"):
            from kvstore.integrations.vllm_transfer import (
                read_counters,
            )

            # The connectors flush their counters at the end of each engine step.
            step["counters"] = read_counters(kv["stats_dir"])
        steps.append(step)
    return {"steps": steps, "startup_s": startup}


def run_engine(
    spec: dict[str, Any], workdir: Path, name: str, timeout: float = 600.0
) -> dict[str, Any]:
    """Runs one engine in a fresh process with ``spec``; returns its result.

    Raises:
        RuntimeError: the engine process failed (its log tail is in the message).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / f"{name}.spec.json"
    out_path = workdir / f"{name}.out.json"
    log_path = workdir / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bench.vllm_harness", "engine", str(spec_path), str(out_path)]
    with log_path.open("wb") as log:
        proc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout
        )
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"engine {name} failed (rc {proc.returncode}); log tail:\n{tail}")
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("engine", help="run one engine from a JSON spec")
    e.add_argument("spec")
    e.add_argument("out")
    m = sub.add_parser("model", help="build the tiny model into a folder")
    m.add_argument("path")
    args = p.parse_args(argv)
    if args.cmd == "model":
        print(make_tiny_llama(args.path))
        return 0
    spec = json.loads(Path(args.spec).read_text())
    result = _engine(spec)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
