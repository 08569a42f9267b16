"""python -m fused_cel.bench: the LM head + cross-entropy, fused_cel against its peers.

For each shape (real LM heads, or custom) and each method it measures the median time of a
forward, backward or both, the peak memory beyond the inputs and the gradients, the throughput
against the matmuls no method can avoid (the "floor", timed in the same run), and the error of
loss, dX and dW against a float64 reference. It prints a table and writes results.csv,
results.json and PNG plots to --out.

Usage:

    python -m fused_cel.bench                                  # Llama 3 8B head, every method, bf16
    python -m fused_cel.bench --preset gemma2-2b --methods plain,fused_cel,'fused_cel[chunk_size=4096]'
    python -m fused_cel.bench --tokens 2048 --tokens 8192 --tokens 32768 --methods plain,fused_cel
    python -m fused_cel.bench --frozen-weight --mode fwd       # LoRA-style head, forward only
    python -m fused_cel.bench --autocast --preset qwen2.5-7b   # fp32 weights, bf16 compute
    python -m fused_cel.bench --device cpu --dtype fp32 --shape 256,64,1000 --methods plain,fused_cel

The H100 record in docs/benchmarks/h100-bench/ is made by scripts/h100_bench.sh (heads, Qwen 2.5
at 16384 tokens, scaling with N, frozen weight, fp16, fp32 and autocast).

Methods (--methods, comma-separated; default every one; those that cannot run here are skipped
with a note): plain (F.linear, upcast to fp32, F.cross_entropy), compile (torch.compile of plain),
torch_native (torch.nn.functional.linear_cross_entropy, chunked options, where torch has it),
liger (Liger Kernel's LigerFusedLinearCrossEntropyLoss), cce (Apple's Cut Cross-Entropy), trl
(TRL's SFTTrainer head: its chunked log-prob kernel on the counted rows, with entropy and top-1), fused_cel
and fused_cel[key=value;...] (keywords of fused_cel.linear_cross_entropy, values read by
ast.literal_eval, e.g. fused_cel[chunk_size=4096;backend='torch']). Softcap presets pass their
softcap to every method; a method without a softcap argument is skipped for them.

Timing: CUDA events (time.perf_counter on the CPU, for testing only). --mode bwd is the median
of forward + backward minus the median of forward, both measured; "fwd" is a training forward
(inputs require grad), which for the fused methods already computes the gradients. Memory is CUDA
only. Errors are ||got - ref|| / ||ref|| on --error-tokens tokens of the same head, the reference
computed in float64 from the very inputs the methods get (already in --dtype), always for a
forward + backward whatever --mode.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import datetime
import functools
import gc
import importlib.metadata
import importlib.util
import inspect
import os
import json
import re
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_cel

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRESETS = {  # name: (D, V, softcap)
    "llama3-8b": (4096, 128256, None),
    "llama3.2-1b": (2048, 128256, None),
    "gemma2-2b": (2304, 256000, 30.0),
    "qwen2.5-7b": (3584, 152064, None),
    "mistral-7b": (4096, 32768, None),
    "gpt2": (768, 50257, None),
}
DEFAULT_TOKENS = 8192
METHODS = ("plain", "compile", "torch_native", "liger", "cce", "trl", "fused_cel")
MODES = ("fwd", "bwd", "fwd+bwd")
ARGS = ("hidden", "weight", "labels", "bias")  # of fused_cel.linear_cross_entropy, not settable in fused_cel[...]
COLUMNS = (
    "date", "gpu", "torch", "triton", "fused_cel", "dtype", "autocast", "frozen_weight", "mode",
    "shape", "N", "D", "V", "softcap", "method", "status", "ms", "floor_ms", "ratio_to_floor",
    "extra_mib", "tflops", "loss_err", "dx_err", "dw_err", "error_tokens", "warmup", "reps", "ignored", "note",
)  # fmt: skip


# Helpers shared with fused_cel.demo.


def make_inputs(n, d, v, device, seed=0, ignored=0.1):
    """Hidden states, head weight and labels like a real LM head's (logits std about 2), the
    fraction ``ignored`` of the labels -100 (padding, or an SFT prompt's tokens)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * (2.0 / d**0.5)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    return hidden.to(device), weight.to(device), labels.to(device)


def plain_loss(hidden, weight, labels, softcap=None):
    """What Hugging Face models do: logits, upcast to fp32, (softcap,) cross-entropy."""
    logits = F.linear(hidden, weight).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels)


def step(loss_fn, hidden, weight, labels, backward=True, weight_grad=True, autocast=None):
    """One forward (+ backward) on fresh leaves sharing the inputs' storage; loss and gradients.

    weight_grad=False is a frozen head (no dW); autocast is None or the dtype of torch.autocast.
    """
    x = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_(weight_grad)
    with torch.autocast(hidden.device.type, dtype=autocast, enabled=autocast is not None):
        loss = loss_fn(x, w, labels)
    if backward:
        loss.backward()
    return loss.detach(), x.grad, w.grad


def reference(hidden, weight, labels, chunk=1024, softcap=None):
    """float64 loss and gradients, computed chunk by chunk to stay within GPU memory."""
    x = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    count = (labels != -100).sum().clamp(min=1)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for s in range(0, x.shape[0], chunk):
        part = fused_cel.linear_cross_entropy_reference(
            x[s : s + chunk],
            w,
            labels[s : s + chunk],
            reduction="sum",
            softcap=softcap,
            compute_dtype=torch.float64,
        )
        (part / count).backward()
        total += part.detach()
    return total / count, x.grad, w.grad


def rel_err(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


def time_gpu(fn, warmup=2, reps=5):
    times = []
    for i in range(warmup + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


# Configuration, shapes and methods.


@dataclass(frozen=True)
class Config:
    """What every measurement shares.

    device: where it runs; dtype: of hidden and weight as the methods get them (fp32 under
    autocast); autocast: None or the compute dtype under torch.autocast; mode: one of MODES;
    train_weight: the weight requires grad (False: --frozen-weight); warmup, reps: untimed and
    timed steps per measurement; error_tokens: N of the accuracy check; ignored: the fraction of
    labels ignored in the timed inputs.
    """

    device: torch.device
    dtype: torch.dtype
    autocast: torch.dtype | None
    mode: str
    train_weight: bool
    warmup: int
    reps: int
    error_tokens: int
    ignored: float = 0.1


@dataclass(frozen=True)
class Shape:
    """One LM head: name (preset, or custom-D..-V..), N tokens, hidden size D, vocabulary V, softcap."""

    name: str
    n: int
    d: int
    v: int
    softcap: float | None

    @property
    def label(self):
        return f"{self.name} N={self.n}"


class Unavailable(Exception):
    """The method cannot run here; the message says why."""


def parse_shape(text):
    """'N,D,V' or 'N,D,V,SOFTCAP' -> Shape."""
    parts = text.split(",")
    try:
        n, d, v = (int(p) for p in parts[:3])
        softcap = float(parts[3]) if len(parts) == 4 else None
    except ValueError:
        parts = []
    if len(parts) not in (3, 4) or min(n, d, v) < 1 or (softcap is not None and softcap <= 0):
        raise argparse.ArgumentTypeError(f"--shape must be N,D,V or N,D,V,SOFTCAP (positive), got {text!r}")
    name = f"custom-D{d}-V{v}" + (f"-softcap{softcap:g}" if softcap else "")
    return Shape(name, n, d, v, softcap)


def fused_kwargs(spec, allowed=None, methods=METHODS):
    """'fused_cel[chunk_size=4096;backend=torch]' -> {'chunk_size': 4096, 'backend': 'torch'}.
    allowed: the keys it may set (default: linear_cross_entropy's keywords and matmul); methods:
    the other method names, for the error message."""
    match = re.fullmatch(r"fused_cel(?:\[(.*)\])?", spec)
    if match is None:
        raise ValueError(f"unknown method {spec!r}: expected one of {', '.join(methods)} or fused_cel[key=value;...]")
    if allowed is None:
        # matmul=cublas|triton: the chunk's logits matmul (FUSED_CEL_MATMUL, fused_cel/kernels/logits.py)
        keywords = inspect.signature(fused_cel.linear_cross_entropy).parameters
        allowed = [k for k in keywords if k not in ARGS] + ["matmul"]
    kwargs = {}
    for item in filter(None, (match.group(1) or "").split(";")):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in allowed:
            raise ValueError(f"bad setting {item!r} in {spec!r}: expected key=value, key one of {', '.join(allowed)}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a bare word: backend=torch
    return kwargs


def parse_methods(text):
    """The comma-separated --methods list, checked; ValueError names an unknown method."""
    methods = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        if spec not in METHODS:
            fused_kwargs(spec)
        if spec not in methods:
            methods.append(spec)
    if not methods:
        raise ValueError("--methods is empty")
    return methods


def build_method(spec, softcap, device):
    """loss_fn(hidden, weight, labels) of one method spec; raises Unavailable."""
    if spec == "plain":
        return lambda x, w, y: plain_loss(x, w, y, softcap)
    if spec == "compile":
        torch.compiler.reset()  # a static graph for this shape, never the recompile limit
        return torch.compile(lambda x, w, y: plain_loss(x, w, y, softcap), dynamic=False)
    if spec == "torch_native":
        return _torch_native(softcap)
    if spec in ("liger", "cce", "trl") and device.type != "cuda":
        raise Unavailable("its Triton kernels need CUDA")
    if spec == "liger":
        return _liger(softcap)
    if spec == "cce":
        return _cce(softcap)
    if spec == "trl":
        return _trl(softcap)
    kwargs = {"softcap": softcap, **fused_kwargs(spec)}
    route = kwargs.pop("matmul", None)
    if route is None:
        return lambda x, w, y: fused_cel.linear_cross_entropy(x, w, y, **kwargs)

    def call(x, w, y):
        saved = os.environ.get("FUSED_CEL_MATMUL")
        os.environ["FUSED_CEL_MATMUL"] = route
        try:
            return fused_cel.linear_cross_entropy(x, w, y, **kwargs)
        finally:
            if saved is None:
                del os.environ["FUSED_CEL_MATMUL"]
            else:
                os.environ["FUSED_CEL_MATMUL"] = saved

    return call


def _torch_native(softcap):
    fn = getattr(F, "linear_cross_entropy", None)
    if fn is None:
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    if softcap is not None:
        raise Unavailable("torch.nn.functional.linear_cross_entropy has no softcap")
    kwargs = {}
    if "options" in inspect.signature(fn).parameters and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        kwargs["options"] = torch.nn.LinearCrossEntropyOptions()  # chunked; None would materialise the logits
    return lambda x, w, y: fn(x, w, y, **kwargs)


def _liger(softcap):
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise Unavailable(f"liger_kernel is not importable ({e})") from None
    kwargs = {}
    if softcap is not None:
        if "softcap" not in inspect.signature(LigerFusedLinearCrossEntropyLoss).parameters:
            raise Unavailable("this liger_kernel's LigerFusedLinearCrossEntropyLoss has no softcap")
        kwargs["softcap"] = softcap
    loss_module = LigerFusedLinearCrossEntropyLoss(**kwargs)

    def liger(x, w, y):
        out = loss_module(w, x, y)  # weight first
        return out.loss if hasattr(out, "loss") else out[0] if isinstance(out, tuple) else out

    return liger


def _cce(softcap):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Unavailable(f"cut_cross_entropy is not importable ({e})") from None
    kwargs = {} if softcap is None else {"softcap": softcap}
    return lambda x, w, y: linear_cross_entropy(x, w, y, **kwargs)


@functools.cache  # once: the stand-in packages it leaves in sys.modules hide trl's own spec
def load_trl_kernel():
    """TRL's ChunkedLogProbFunction (trl/kernels/chunked_logprob.py) from the installed trl
    package's file, or None. The file is loaded on its own: its backward imports
    trl.trainer.utils, which pulls in the trainers (and their dependencies) for one context
    manager, replaced here by a null one (that is DeepSpeed's ZeRO-3 gather)."""
    spec = importlib.util.find_spec("trl")
    if spec is None:
        return None
    path = spec.submodule_search_locations[0] + "/kernels/chunked_logprob.py"
    for name in ("trl", "trl.kernels", "trl.trainer"):  # packages with no code run
        sys.modules.setdefault(name, types.ModuleType(name)).__path__ = []
    utils = types.ModuleType("trl.trainer.utils")
    utils.maybe_gather_lm_head_ctx = lambda *args, **kwargs: contextlib.nullcontext()
    sys.modules["trl.trainer.utils"] = utils
    module_spec = importlib.util.spec_from_file_location("trl.kernels.chunked_logprob", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _trl(softcap):
    """SFTTrainer's own head (TRL >= 1.16 on a Triton device): the counted rows gathered, their
    log-probabilities, entropy and top-1 by TRL's chunked kernel, the NLL mean."""
    try:
        trl = load_trl_kernel()
    except Exception as e:  # an older trl without the file, or one that cannot load this way
        raise Unavailable(f"TRL's chunked_logprob kernel does not load ({_why(e)})") from None
    if trl is None:
        raise Unavailable("trl is not installed")

    def trl_sft(x, w, y):
        counted = y != -100
        out = trl.ChunkedLogProbFunction.apply(x[counted], w, None, y[counted], 1.0, 32768, softcap, 1.0,
                                               ("entropy", "is_top1"))  # fmt: skip
        return -out[0].sum() / counted.sum().clamp(min=1)

    return trl_sft


# Measurements. Throughout: x, w, y are hidden [N, D], weight [V, D] and labels [N] as the methods
# get them; fn is a loss_fn(x, w, y) from build_method; spec a method as given in --methods.


def cast_inputs(hidden, weight, cfg):
    return hidden.to(cfg.dtype), weight.to(cfg.dtype)


def time_ms(fn, cfg):
    """Median ms of fn over cfg.reps calls after cfg.warmup."""
    if cfg.device.type == "cuda":
        return time_gpu(fn, cfg.warmup, cfg.reps)
    times = []
    for i in range(cfg.warmup + cfg.reps):
        t0 = time.perf_counter()
        fn()
        if i >= cfg.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def floor_flops(shape, cfg):
    """2*N*D*V per unavoidable matmul: logits (fwd), dX and dW (bwd; no dW with a frozen head)."""
    matmuls = {"fwd": 1, "bwd": 1 + cfg.train_weight, "fwd+bwd": 2 + cfg.train_weight}[cfg.mode]
    return 2 * shape.n * shape.d * shape.v * matmuls


def floor_ms(x, w, cfg):
    """Median ms of the matmuls no method can avoid, by cuBLAS into preallocated buffers."""
    x, w = x.to(cfg.autocast or cfg.dtype), w.to(cfg.autocast or cfg.dtype)
    # V padded to a multiple of 64 with zero rows, as torch.compile does: at an odd V (GPT-2)
    # cuBLAS is otherwise 5-7x slower, and the floor is the best the matmuls can do.
    w = F.pad(w, (0, 0, 0, -w.shape[0] % 64))
    logits = x @ w.T  # real values, reused as dlogits
    dx = torch.empty_like(x)
    dw = torch.empty_like(w) if cfg.train_weight else None

    def matmuls():
        if cfg.mode != "bwd":
            torch.mm(x, w.T, out=logits)
        if cfg.mode != "fwd":
            torch.mm(logits, w, out=dx)
            if dw is not None:
                torch.mm(logits.T, x, out=dw)

    return time_ms(matmuls, cfg)


def run_step(fn, x, w, y, cfg, backward):
    return step(fn, x, w, y, backward=backward, weight_grad=cfg.train_weight, autocast=cfg.autocast)


def time_mode(fn, x, w, y, cfg):
    """(median ms of cfg.mode, note); bwd is fwd+bwd minus fwd."""
    fwd_bwd = fwd = None
    if cfg.mode != "fwd":
        fwd_bwd = time_ms(lambda: run_step(fn, x, w, y, cfg, True), cfg)
    if cfg.mode != "fwd+bwd":
        fwd = time_ms(lambda: run_step(fn, x, w, y, cfg, False), cfg)
    if cfg.mode == "bwd":
        return fwd_bwd - fwd, f"bwd = fwd+bwd {fwd_bwd:.3f} ms - fwd {fwd:.3f} ms (medians)"
    return (fwd if cfg.mode == "fwd" else fwd_bwd), ""


def peak_extra_mib(fn, x, w, y, cfg):
    """Peak memory of one step beyond what was allocated before it and the dX, dW it returns (CUDA)."""
    if cfg.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _, dx, dw = run_step(fn, x, w, y, cfg, cfg.mode != "fwd")
    torch.cuda.synchronize()
    grads = sum(t.nbytes for t in (dx, dw) if t is not None)
    return (torch.cuda.max_memory_allocated() - before - grads) / 2**20


def profile_step(fn, x, w, y, cfg, trace_path):
    """One step under torch.profiler: chrome trace to trace_path; returns the top-15 kernel table."""
    from torch.profiler import ProfilerActivity, profile

    cuda = cfg.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run_step(fn, x, w, y, cfg, cfg.mode != "fwd")
        if cuda:
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace_path))
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=15)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def accuracy(shape, methods, cfg):
    """{method: {loss_err, dx_err, dw_err}} on cfg.error_tokens tokens of the shape's head."""
    hidden, weight, labels = make_inputs(cfg.error_tokens, shape.d, shape.v, cfg.device, seed=1)
    x, w = cast_inputs(hidden, weight, cfg)
    del hidden, weight
    ref = reference(x, w, labels, chunk=256, softcap=shape.softcap)
    errors = {}
    for spec in methods:
        errors[spec] = {"loss_err": None, "dx_err": None, "dw_err": None}
        try:
            errors[spec] = method_errors(build_method(spec, shape.softcap, cfg.device), x, w, labels, ref, cfg)
        except Unavailable:
            pass
        except Exception as e:  # OOM or a failing peer: the timing run records it too
            errors[spec]["note"] = f"error check failed: {_why(e)}"
        free_memory(cfg.device)
    return errors


def method_errors(fn, x, w, y, ref, cfg):
    """Relative errors of one fwd+bwd step against ref = (loss, dX, dW) in float64."""
    loss, dx, dw = run_step(fn, x, w, y, cfg, True)
    return {
        "loss_err": rel_err(loss, ref[0]),
        "dx_err": rel_err(dx, ref[1]),
        "dw_err": None if dw is None else rel_err(dw, ref[2]),
    }


def _why(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def run_method(spec, shape, x, w, y, cfg, floor, profile_dir):
    """Timing, memory and throughput of one method on one shape: part of a results row."""
    try:
        fn = build_method(spec, shape.softcap, cfg.device)
    except Unavailable as e:
        return {"status": "skipped", "note": str(e)}
    try:
        ms, note = time_mode(fn, x, w, y, cfg)
        extra = peak_extra_mib(fn, x, w, y, cfg)
        if profile_dir is not None and spec.startswith("fused_cel"):
            path = profile_dir / f"trace-{_slug(spec)}.json"
            table = profile_step(fn, x, w, y, cfg, path)
            _write(f"\nprofile of {spec} on {shape.label} ({cfg.mode}), trace in {path}:\n{table}")
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM", "note": "out of memory"}
    except Exception as e:
        return {"status": "error", "note": _why(e)}
    return {
        "status": "ok",
        "ms": ms,
        "extra_mib": extra,
        "tflops": floor_flops(shape, cfg) / ms / 1e9 if ms > 0 else None,  # bwd of a method that does it in fwd
        "ratio_to_floor": ms / floor if floor else None,
        "note": note,
    }


def bench_shape(shape, methods, cfg, errors, meta, profile_dir, bar):
    """Results rows of every method on one shape.

    errors: accuracy()'s result for its head; meta: run_meta(); profile_dir: where --profile
    writes traces (None: no profiling); bar: the tqdm progress bar.
    """
    hidden, weight, labels = make_inputs(shape.n, shape.d, shape.v, cfg.device, ignored=cfg.ignored)
    x, w = cast_inputs(hidden, weight, cfg)
    del hidden, weight
    try:
        floor, floor_note = floor_ms(x, w, cfg), ""
    except torch.cuda.OutOfMemoryError:
        floor, floor_note = None, "floor: OOM"
    free_memory(cfg.device)
    rows = []
    for spec in methods:
        bar.set_description(f"{shape.label} {spec}")
        row = dict(meta, shape=shape.name, N=shape.n, D=shape.d, V=shape.v, softcap=shape.softcap, method=spec)
        row.update(floor_ms=floor, **errors[spec])
        result = run_method(spec, shape, x, w, labels, cfg, floor, profile_dir)
        notes = [floor_note, result.pop("note", ""), row.pop("note", "")]
        row.update(result, note="; ".join(filter(None, notes)))
        rows.append({c: row.get(c) for c in COLUMNS})
        free_memory(cfg.device)
        bar.update(1)
    return rows


# Output.


def _slug(text):
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def _write(text):
    from tqdm import tqdm

    tqdm.write(text)


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


TABLE = (  # header, width, column, format
    ("ms", 9, "ms", ".2f"), ("floor ms", 9, "floor_ms", ".2f"), ("ratio", 7, "ratio_to_floor", ".2f"),
    ("extra MiB", 10, "extra_mib", ".0f"), ("TFLOP/s", 8, "tflops", ".3g"), ("loss err", 9, "loss_err", ".2e"),
    ("dX err", 9, "dx_err", ".2e"), ("dW err", 9, "dw_err", ".2e"),
)  # fmt: skip


def print_table(rows):
    width = max(len(r["method"]) for r in rows) + 2
    print(f"\n{'method':<{width}}{'shape':<28}" + "".join(f" {h:>{n}}" for h, n, _, _ in TABLE))
    for r in rows:
        cells = [_fmt(r[c], f) if r["status"] == "ok" or c != "ms" else r["status"] for _, _, c, f in TABLE]
        shape = f"{r['shape']} N={r['N']}"
        print(f"{r['method']:<{width}}{shape:<28}" + "".join(f" {v:>{n}}" for v, (_, n, _, _) in zip(cells, TABLE)))
    if rows[0]["mode"] == "bwd":
        print("bwd = median of fwd+bwd - median of fwd; both are in the note column of results.csv")
    notes = [f"{r['method']}: {r['note']}" for r in rows if r["note"] and not r["note"].startswith("bwd =")]
    for note in dict.fromkeys(notes):
        print(f"note: {note}")


def write_results(rows, out):
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "results.json", "w") as f:
        json.dump(rows, f, indent=1)


def plot_shape(rows, path):
    """Two bar panels for one shape: time with the floor as a line, extra memory on a log scale."""
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["method"] for r in rows]
    labels = [format(r["ms"], ".3g") if r["status"] == "ok" else r["status"] for r in rows]
    ax_t.bar_label(ax_t.bar(names, [r["ms"] or 0 for r in rows]), labels=labels)
    if rows[0]["floor_ms"]:
        ax_t.axhline(rows[0]["floor_ms"], color="k", linestyle="--", label=f"floor {rows[0]['floor_ms']:.2f} ms")
        ax_t.legend()
    ax_t.set_ylabel(f"{rows[0]['mode']} ms (median)")
    mem = [(r["method"], r["extra_mib"]) for r in rows if r["extra_mib"] and r["extra_mib"] > 0]
    if mem:
        ax_m.bar_label(ax_m.bar(*zip(*mem)), fmt="%.0f")
        ax_m.set_yscale("log")
    ax_m.set_ylabel("peak extra MiB")
    for ax in (ax_t, ax_m):
        _finish(ax)
    fig.suptitle(f"{rows[0]['shape']} N={rows[0]['N']}, {rows[0]['dtype']}, {rows[0]['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _finish(ax):
    """Slanted tick labels; a word where there is nothing to draw (memory on the CPU)."""
    ax.tick_params(axis="x", labelrotation=30)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    if not ax.lines and not ax.patches:
        ax.text(0.5, 0.5, "not measured (CUDA only)", ha="center", transform=ax.transAxes)


def plot_scaling(rows, path):
    """Time and extra memory against N, one line per method (and the floor), log-log."""
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    floor = sorted({(r["N"], r["floor_ms"]) for r in rows if r["floor_ms"]})
    if floor:
        ax_t.plot(*zip(*floor), "k--", label="floor")
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        for ax, key in ((ax_t, "ms"), (ax_m, "extra_mib")):
            points = [(r["N"], r[key]) for r in mine if r[key] and r[key] > 0]
            if points:
                ax.plot(*zip(*points), "o-", label=method)
    tokens = sorted({r["N"] for r in rows})
    for ax, label in ((ax_t, f"{rows[0]['mode']} ms"), (ax_m, "peak extra MiB")):
        ax.set_xscale("log")
        ax.set_xticks(tokens, [str(n) for n in tokens], minor=False)
        ax.minorticks_off()
        ax.set_xlabel("tokens N")
        ax.set_ylabel(label)
        if ax.lines:
            ax.set_yscale("log")
            ax.legend(fontsize="small")
        _finish(ax)
    fig.suptitle(f"{rows[0]['shape']}, {rows[0]['dtype']}, {rows[0]['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_all(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    for key in dict.fromkeys((r["shape"], r["N"]) for r in rows):
        plot_shape([r for r in rows if (r["shape"], r["N"]) == key], out / f"{_slug(key[0])}-N{key[1]}.png")
    for name in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == name]
        if len({r["N"] for r in mine}) > 1:
            plot_scaling(mine, out / f"scaling-{_slug(name)}.png")


# Driver.


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m fused_cel.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", action="append", choices=PRESETS, help="a real LM head (repeatable; default llama3-8b)")
    ap.add_argument("--shape", action="append", type=parse_shape, help="custom N,D,V[,SOFTCAP] (repeatable)")
    ap.add_argument("--tokens", action="append", type=int, help="N for every shape (repeatable: a scaling sweep)")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16", help="inputs (compute, with --autocast)")
    ap.add_argument("--autocast", action="store_true", help="fp32 hidden and weight, --dtype compute under autocast")
    ap.add_argument("--frozen-weight", action="store_true", help="the weight needs no grad (floor: 2 matmuls)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all available)")
    ap.add_argument("--mode", choices=MODES, default="fwd+bwd")
    ap.add_argument("--reps", type=int, default=10, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--error-tokens", type=int, default=1024, help="N of the accuracy check against fp64")
    ap.add_argument("--ignored", type=float, default=0.1, help="fraction of labels ignored (default 0.1: padding)")
    ap.add_argument("--out", default="bench-results", help="directory for results.csv, results.json, plots")
    ap.add_argument("--profile", action="store_true", help="trace one step of each fused_cel method, first shape")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    args = ap.parse_args(argv)
    try:
        args.methods = parse_methods(args.methods)
    except ValueError as e:
        ap.error(str(e))
    if args.autocast and args.dtype == "fp32":
        ap.error("--autocast needs --dtype bf16 or fp16 (the compute dtype)")
    if not 0 <= args.ignored < 1:
        ap.error(f"--ignored must be in [0, 1), got {args.ignored}")
    if min(args.reps, args.error_tokens) < 1 or args.warmup < 0 or min(args.tokens or [1]) < 1:
        ap.error("--reps, --error-tokens and --tokens must be >= 1, --warmup >= 0")
    return args


def make_config(args):
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    compute = DTYPES[args.dtype]
    return Config(
        device=torch.device(device),
        dtype=torch.float32 if args.autocast else compute,
        autocast=compute if args.autocast else None,
        mode=args.mode,
        train_weight=not args.frozen_weight,
        warmup=args.warmup,
        reps=args.reps,
        error_tokens=args.error_tokens,
        ignored=args.ignored,
    )


def make_shapes(args):
    """Presets and custom shapes, each at every --tokens value (its own N, or 8192, if none)."""
    bases = [Shape(p, DEFAULT_TOKENS, *PRESETS[p]) for p in args.preset or []] + (args.shape or [])
    bases = bases or [Shape("llama3-8b", DEFAULT_TOKENS, *PRESETS["llama3-8b"])]
    return [Shape(b.name, n, b.d, b.v, b.softcap) for b in bases for n in args.tokens or [b.n]]


def run_meta(cfg, args):
    """The columns every row shares."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(cfg.device) if cfg.device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "triton": triton,
        "fused_cel": fused_cel.__version__,
        "dtype": args.dtype,
        "autocast": args.autocast,
        "frozen_weight": args.frozen_weight,
        "mode": args.mode,
        "error_tokens": args.error_tokens,
        "warmup": args.warmup,
        "reps": args.reps,
        "ignored": args.ignored,
    }


def main(argv=None):
    """Run the benchmark; returns the results rows (dicts with COLUMNS)."""
    from tqdm import tqdm

    args = parse_args(argv)
    cfg, shapes = make_config(args), make_shapes(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = run_meta(cfg, args)
    weights = "fp32 weights, autocast " if args.autocast else ""
    print(f"fused_cel bench on {meta['gpu']}: torch {meta['torch']}, triton {meta['triton']}, {weights}{args.dtype}")
    rows, errors = [], {}
    with tqdm(total=len(shapes) * len(args.methods), unit="run") as bar:
        for i, shape in enumerate(shapes):
            key = (shape.name, shape.d, shape.v, shape.softcap)
            if key not in errors:  # errors do not depend on N: once per head
                bar.set_description(f"{shape.name} fp64 errors")
                errors[key] = accuracy(shape, args.methods, cfg)
            profile_dir = out if args.profile and i == 0 else None
            rows += bench_shape(shape, args.methods, cfg, errors[key], meta, profile_dir, bar)
    print_table(rows)
    write_results(rows, out)
    plot_all(rows, out)
    print(f"\nresults in {out}/: results.csv, results.json, plots")
    return rows


if __name__ == "__main__":
    main()
