"""Serving latency and memory: a probe inside the forward pass vs the bare model vs a separate guard model.

Side by side in one run, per request (batch 1, one prompt of --tokens tokens, one generated token, the paper's
setting in design.md §2):

  base      the serving model's ``generate(max_new_tokens=1)``
  pooling   ProbedModel.generate with a pooling probe over all L+1 hidden states (stage 1 in the hooks)
  scoring   the same with a scoring-attention probe
  mha       the same with a downcast-32 multi-head-attention probe (the paper's main setting)
  guard     guard-then-serve: a second copy of the model with a classification head (LlamaForSequenceClassification,
            the same weights, random head) scores the prompt first, then the serving model generates

Probes are randomly initialised (latency does not depend on their weights). Every configuration runs in a fresh
subprocess, so its peak memory is its own: on CPU ru_maxrss (whole-process peak RSS: Python, torch, the weights,
activations), on CUDA torch.cuda.max_memory_allocated. Repeats are interleaved (each repeat runs every
configuration once, in a rotated order) and ratios to base are taken within a repeat, then the median over repeats:
machine-wide slowdowns (another job on the box) hit both sides of a ratio alike.

    python bench/serve.py --quick                                  # embedded SmolLM2-135M on CPU, ~2 min
    python bench/serve.py --quick --threads 1                      # steadier on a busy machine
    python bench/serve.py                                          # 512 tokens, 5 repeats x 20 requests
    python bench/serve.py --shape llama-3.2-3b --device cuda      # random Llama-3.2-3B weights, bf16, GPU

``--shape`` builds a model of that architecture with random weights from a transformers LlamaConfig (no download):
the paper's Llama-3.2-3B (d = 3072, 28 layers, 24 heads, 8 KV heads, FFN 8192, vocabulary 128,256).
Prompts are random token ids in every mode (latency depends on their number only).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

CONFIGS = ("base", "pooling", "scoring", "mha", "guard")
SHAPES = {
    # the paper's model (Llama-3.2-3B-Instruct): random weights of its shape
    "llama-3.2-3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    # a few-MB model to check the benchmark's own code paths in seconds
    "tiny": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=2048),
}
PAPER_MS = {"base": "26.4", "pooling": "29.7", "scoring": "30.9", "mha": "40.3", "guard": "88-123"}
DOWNCAST = 32  # the paper's main MHA setting


# ---- one configuration, in its own process ------------------------------------------------------------------


def build_models(args, with_guard: bool):
    """(serving model, tokenizer or None, guard model or None) on args.device in args.dtype."""
    import torch
    from probecache.lm.models import load_model, resolve_dtype, resolve_model
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    dtype = resolve_dtype(args.dtype, args.device)
    if args.shape == "smollm2":
        source = resolve_model("smollm2-135m")
        model, tokenizer = load_model(source, dtype, args.device)
        guard = None
        if with_guard:  # the same weights with a (random) 2-class head: a same-size guard model
            guard = AutoModelForSequenceClassification.from_pretrained(source.path, num_labels=2, dtype=dtype)
            guard.to(args.device).eval().requires_grad_(False)
        return model, tokenizer, guard
    config = LlamaConfig(**SHAPES[args.shape], pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=2)
    torch.manual_seed(0)
    with torch.device(args.device):  # initialise in place: no 12 GB fp32 detour through host memory
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval().requires_grad_(False)
        guard = None
        if with_guard:
            from transformers import LlamaForSequenceClassification

            guard = LlamaForSequenceClassification._from_config(config, dtype=dtype).eval().requires_grad_(False)
    return model, None, guard


def bench_run(kind: str, model):
    """A randomly initialised probe of ``kind`` over every hidden state, as a ServedRun."""
    import torch
    from probecache.serve.loading import ServedRun
    from probecache.train.probes import ProbeConfig, build_probe
    from probecache.train.sweep import auto_heads

    n_states, d = model.config.num_hidden_layers + 1, model.config.hidden_size
    torch.manual_seed(0)
    probe = build_probe(ProbeConfig(kind, n_states, d, 2, downcast=DOWNCAST, heads=auto_heads(d // DOWNCAST)))
    if kind == "scoring":  # w = 0 would be plain mean pooling: give the gates real work
        with torch.no_grad():
            for p in probe.parameters():
                p.normal_(0, 0.02)
    store = {"model": "bench", "model_weights": "bench", "prompt_format": "raw", "truncation_side": "right",
             "max_tokens": None, "n_layers": n_states, "hidden_size": d}
    return ServedRun(name=kind, kind=kind, layers=list(range(n_states)), label_names=["neg", "pos"], threshold=0.5,
                     store=store, probe=probe)


def child(args) -> dict:
    import torch
    from probecache.serve.probed import ProbedModel

    if args.threads:
        torch.set_num_threads(args.threads)
    kind = args.child
    model, tokenizer, guard = build_models(args, with_guard=kind == "guard")
    cuda = args.device.startswith("cuda")
    probed = ProbedModel(model, tokenizer, [bench_run(kind, model)]) if kind in ("pooling", "scoring", "mha") else None
    generator = torch.Generator().manual_seed(1)
    vocab = min(model.config.vocab_size, 49152)
    prompt = torch.randint(3, vocab, (1, args.tokens), generator=generator).to(args.device)  # (1, T)
    mask = torch.ones_like(prompt)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def request() -> None:
        if probed is not None:
            probed.generate_ids(prompt.tolist(), max_new_tokens=1, decode=False)
            return
        if guard is not None:
            with torch.inference_mode():
                guard(input_ids=prompt, attention_mask=mask).logits.float().softmax(-1)  # the guard's verdict
        model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=pad)

    for _ in range(args.warmup):
        request()
    if cuda:
        torch.cuda.synchronize()
    times, cpu_times = [], []
    for _ in range(args.requests):
        start, cpu_start = time.perf_counter(), time.process_time()
        request()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        cpu_times.append((time.process_time() - cpu_start) * 1e3)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"config": kind, "ms": statistics.median(times), "cpu_ms": statistics.median(cpu_times),
            "peak_bytes": peak, "threads": torch.get_num_threads()}


# ---- the driver ---------------------------------------------------------------------------------------------


def run_child(args, kind: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--shape", args.shape, "--device", args.device,
           "--dtype", args.dtype, "--tokens", str(args.tokens), "--requests", str(args.requests),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"configuration {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, list[dict]], args) -> str:
    base = results["base"]
    ms_ratio = {k: statistics.median(r["ms"] / b["ms"] for r, b in zip(v, base, strict=True))
                for k, v in results.items()}
    mem_ratio = {k: statistics.median(r["peak_bytes"] / b["peak_bytes"] for r, b in zip(v, base, strict=True))
                 for k, v in results.items()}
    cpu = args.device == "cpu"
    cpu_ratio = {k: statistics.median(r["cpu_ms"] / b["cpu_ms"] for r, b in zip(v, base, strict=True))
                 for k, v in results.items()}
    memory = "peak RSS" if cpu else "peak CUDA memory"
    # on CPU, the process's own CPU time per request too: unlike wall time, other jobs on the machine barely move it
    cpu_head = " CPU ms / request | x base |" if cpu else ""
    lines = [f"| configuration | ms / request | x base |{cpu_head} {memory} (MB) | x base | paper, Llama-3.2-3B GPU "
             f"(ms) |", "|---|---|---|" + ("---|---|" if cpu else "") + "---|---|---|"]
    names = {"base": "base: forward + 1 token", "pooling": "+ pooling probe", "scoring": "+ scoring probe",
             "mha": f"+ MHA probe (downcast {DOWNCAST})", "guard": "guard-then-serve (2nd model)"}
    for k in CONFIGS:
        ms = statistics.median(r["ms"] for r in results[k])
        mb = statistics.median(r["peak_bytes"] for r in results[k]) / 2**20
        cpu_cells = ""
        if cpu:
            cpu_cells = f" {statistics.median(r['cpu_ms'] for r in results[k]):.1f} | {cpu_ratio[k]:.2f} |"
        lines.append(f"| {names[k]} | {ms:.1f} | {ms_ratio[k]:.2f} |{cpu_cells} {mb:,.0f} | {mem_ratio[k]:.2f} | "
                     f"{PAPER_MS[k]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128 tokens, 3 repeats x 5 requests")
    parser.add_argument("--shape", default="smollm2", choices=["smollm2", *SHAPES],
                        help="smollm2: the embedded SmolLM2-135M; others: random weights of that shape")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where fast) | bf16 | fp16 | fp32")
    parser.add_argument("--tokens", type=int, default=None, help="prompt length [default: 512, --quick 128]")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats [default: 5, --quick 2]")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per process [default: 20, "
                                                                    "--quick 5]")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads [default: torch's]; 1 is "
                                                                "steadier on a shared machine")
    parser.add_argument("--out", default="bench/out/serve.json", help="raw results (JSON)")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tokens = args.tokens or (128 if args.quick else 512)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.requests = args.requests or (5 if args.quick else 20)
    if args.child:
        print(json.dumps(child(args)))
        return
    results: dict[str, list[dict]] = {k: [] for k in CONFIGS}
    started = time.time()
    for repeat in range(args.repeats):
        order = CONFIGS[repeat % len(CONFIGS):] + CONFIGS[:repeat % len(CONFIGS)]  # rotate: no fixed position
        for kind in order:
            results[kind].append(run_child(args, kind))
            print(f"repeat {repeat + 1}/{args.repeats} {kind}: {results[kind][-1]['ms']:.1f} ms", file=sys.stderr)
    threads = results["base"][0]["threads"]
    print(f"\n{args.shape} on {args.device} ({args.dtype}, {threads} threads): batch 1, {args.tokens}-token prompt, "
          f"1 new token; median of {args.requests} requests per process, {args.repeats} interleaved repeats "
          f"({time.time() - started:.0f} s)\n")
    print(table(results, args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
