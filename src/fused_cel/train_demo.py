"""Training demo: a Llama-architecture model, stock transformers vs fused_cel.patch.

Each run starts from the same random initialisation and sees the same batches of the bundled
text (byte-level tokens), so the loss curves of the two must agree. Every run is its own process
(spawned), which keeps peak-memory figures apart and keeps a peer's class-level patch (Liger's)
from leaking into the other runs.
"""

from __future__ import annotations

import multiprocessing
import pickle
import resource
import time
from importlib import resources

import torch

import fused_cel

# Model sizes: hidden, intermediate, layers, heads, kv heads, vocab.
SIZES = {
    "tiny": (256, 688, 2, 4, 4, 8192),  # bytes in an 8192-entry vocabulary
    "tiny-llama3-vocab": (256, 688, 2, 4, 4, 128256),  # CPU default: a small body, Llama 3's vocabulary
    "llama3.2-1b": (2048, 8192, 16, 32, 8, 128256),  # Llama 3.2 1B's shape, random init
}
METHODS = ("stock", "fused_cel", "liger")


def corpus_tokens(device) -> torch.Tensor:
    """The bundled text as byte ids."""
    text = resources.files("fused_cel").joinpath("data/corpus.txt").read_bytes()
    return torch.tensor(list(text), dtype=torch.long, device=device)


def byte_tokenizer():
    """A tokenizer built in memory for corpus_tokens' ids, one token per byte, plus pad and eos
    (trainers such as TRL's SFTTrainer need one)."""
    import transformers
    from tokenizers import Tokenizer, models

    vocab = {f"<{i}>": i for i in range(256)} | {"<pad>": 256, "<eos>": 257, "<unk>": 258}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def build_model(size: str, dtype: torch.dtype, device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=1 << 20,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it will train: a 1B model inits slowly on CPU
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype).train()


def apply_method(model, method: str):
    if method == "fused_cel":
        fused_cel.patch(model)
    elif method == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # Only the fused linear cross-entropy, so the comparison is of the loss alone.
        apply_liger_kernel_to_llama(
            rope=False, rms_norm=False, swiglu=False, cross_entropy=False, fused_linear_cross_entropy=True
        )
    return model


def train(method, size, dtype, device, seq, batch, steps, lr, progress=True) -> dict:
    """Train one model; returns losses per step, tokens/s (after 3 warm-up steps) and peak MiB."""
    from tqdm import tqdm

    model = apply_method(build_model(size, dtype, device), method)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    data = corpus_tokens(device)
    gen = torch.Generator().manual_seed(1)
    losses, start, warm = [], None, min(3, steps - 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in tqdm(range(steps), desc=method, disable=not progress, leave=False):
        if i == warm:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        ids = _batch(data, batch, seq, gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    elapsed = time.perf_counter() - start
    return {"losses": losses, "tokens_per_s": batch * seq * (steps - warm) / elapsed, "peak_mib": peak}


def _batch(data, batch, seq, gen):
    """batch random windows of seq tokens; the text repeated when seq exceeds it (speed runs)."""
    if seq >= len(data):
        data = data.repeat(seq // len(data) + 2)
    offsets = torch.randint(0, len(data) - seq, (batch,), generator=gen).tolist()
    return torch.stack([data[o : o + seq] for o in offsets])


def _child(conn, fn, args, kwargs):
    try:
        result = fn(*args, **kwargs)
    except torch.OutOfMemoryError as e:
        result = {"oom": str(e).splitlines()[0]}
    except ImportError as e:
        result = {"unavailable": str(e)}
    except Exception as e:  # reported by the parent, never a silent hang
        result = {"error": f"{type(e).__name__}: {e}"}
    # Plain pickle copies tensors' bytes; Connection.send would share them through files that
    # vanish when this process exits.
    conn.send_bytes(pickle.dumps(result))


def run_in_process(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh spawned process (fn at module level, result picklable).

    A failure comes back as {"oom": ...}, {"unavailable": ...} or {"error": ...}.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs))
    proc.start()
    child.close()  # so that a child that dies without answering ends recv with EOFError
    try:
        result = pickle.loads(parent.recv_bytes())
    except EOFError:
        result = {"error": f"the {getattr(fn, '__name__', fn)} process died (exit code {proc.exitcode})"}
    proc.join()
    return result


def run_isolated(method: str, **kwargs) -> dict:
    """train() of one method in its own process (see run_in_process)."""
    return run_in_process(train, method, **kwargs)


def longest_sequence(method: str, start: int, limit: int, **kwargs) -> int:
    """Doubling search: the longest power-of-two multiple of start that trains one step."""
    best, seq = 0, start
    while seq <= limit:
        result = run_isolated(method, seq=seq, steps=2, progress=False, **kwargs)
        if "losses" not in result:
            break
        best, seq = seq, seq * 2
    return best


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    stock = results.get("stock", {}).get("losses")
    for method, r in results.items():
        if "losses" in r:
            top.plot(r["losses"], label=method, lw=1)
            if stock is not None and method != "stock":
                diff = [a - b for a, b in zip(r["losses"], stock)]
                bottom.plot(diff, label=f"{method} - stock", lw=1)
    top.set_ylabel("training loss")
    top.legend()
    bottom.set_ylabel("difference")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
