"""What the tests share: the device and backends, inputs, and the comparison against float64
relative to plain PyTorch (run_case). tests/conftest.py has set up the environment (Triton's
interpreter on a CPU machine) and each test's seed before this is imported."""

import math
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fused_cel
from fused_cel import chunks, linear_cross_entropy, linear_cross_entropy_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch"] + (["triton"] if fused_cel.triton_available(DEVICE) else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOSS_OPTS = (
    "ignore_index",
    "reduction",
    "label_smoothing",
    "z_loss",
    "softcap",
    "logit_scale",
    "temperature",
    "shift",
    "num_items",
    "class_weight",
)
LOW = 0.05  # MiB: below the default plan's fp32 accumulators at N=128, D=40, V=300


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (NaN if got has NaN)."""
    got, ref = got.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (got - ref).norm().item()
    return diff / denom if denom > 0 else diff


# Floor under the baseline-relative tolerance: what is left when both errors are pure noise.
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-5, torch.float16: 2e-6}


def assert_close_to_baseline(name, ours, base, ref, dtype, n_tokens):
    """Our error vs the fp64 reference is at most plain PyTorch's (same dtype) plus small slack.

    Two equally good computations differ in measured RMS error by about 1/sqrt(2n) for n
    independent error terms. In gradients the error is dominated by a few large entries of each
    token's dlogits (the target and the likeliest classes), so n is about 4 per token, not the
    number of elements. A scalar (a mean loss) has one random error, as likely near 0 for plain
    PyTorch as for us: there the floor is its expected size, eps / 2 / sqrt(tokens).
    """
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    e_ours, e_base = rel_err(ours, ref), rel_err(base, ref)
    slack = 0.1 + 3.0 / math.sqrt(max(min(ref.numel(), 4 * n_tokens), 1))
    floor = FLOOR[dtype]
    if ref.numel() == 1:
        floor = max(floor, torch.finfo(dtype).eps / 2 / math.sqrt(max(n_tokens, 1)))
    tol = e_base * (1.0 + slack) + floor
    assert e_ours <= tol, f"{name}: error {e_ours:.3e} > {tol:.3e} (plain PyTorch {e_base:.3e})"


def make_inputs(lead, D, V, *, logit_std=2.0, ignore_frac=0.2, ignore_index=-100):
    """fp32 hidden [*lead, D], weight [V, D], bias [V], labels [*lead] with some ignored."""
    hidden = torch.randn(*lead, D, device=DEVICE)
    weight = torch.randn(V, D, device=DEVICE) * (logit_std / D**0.5)
    bias = torch.randn(V, device=DEVICE) * 0.5
    labels = torch.randint(0, V, lead, device=DEVICE)
    labels[torch.rand(lead, device=DEVICE) < ignore_frac] = ignore_index
    return hidden, weight, bias, labels


def leaves(tensors, dtype, trainable):
    return [None if t is None else t.detach().to(dtype).requires_grad_(g) for t, g in zip(tensors, trainable)]


def run_case(
    inputs,
    dtype,
    backend,
    opts,
    *,
    chunk_size=None,
    use_bias=True,
    trainable=(True, True, True),
    grad_scale=3.7,
    fn=linear_cross_entropy,
):
    """Check loss and gradients of one configuration; return our loss for further checks.
    fn: linear_cross_entropy, or a compiled version of it (test_compile)."""
    hidden, weight, bias, labels = inputs
    bias = bias if use_bias else None
    ref_opts = {k: v for k, v in opts.items() if k in LOSS_OPTS}

    def backward(loss, g):
        if any(trainable):
            (loss * g).sum().backward()

    ours_in = leaves((hidden, weight, bias), dtype, trainable)
    loss = fn(*ours_in[:2], labels, ours_in[2], chunk_size=chunk_size, backend=backend, **opts)
    g = torch.randn(loss.shape, device=DEVICE) if loss.dim() else torch.tensor(grad_scale, device=DEVICE)
    backward(loss, g)

    base_in = leaves((hidden, weight, bias), dtype, trainable)
    base = linear_cross_entropy_reference(*base_in[:2], labels, base_in[2], **ref_opts)
    backward(base, g)

    ref_in = leaves((hidden, weight, bias), torch.float64, trainable)
    ref = linear_cross_entropy_reference(*ref_in[:2], labels, ref_in[2], compute_dtype=torch.float64, **ref_opts)
    backward(ref, g.double())

    assert loss.dtype == torch.float32
    assert_close_to_baseline("loss", loss.detach(), base.detach(), ref.detach(), dtype, labels.numel())
    for name, o, b, r in zip(("d_hidden", "d_weight", "d_bias"), ours_in, base_in, ref_in):
        if o is None:
            continue
        if not o.requires_grad:
            assert o.grad is None
            continue
        assert o.grad is not None and o.grad.dtype == dtype, f"{name}: {None if o.grad is None else o.grad.dtype}"
        assert_close_to_baseline(name, o.grad, b.grad, r.grad, dtype, labels.numel())
    return loss


def check_autocast(fn, backend):
    """fp32 parameters under autocast: bf16 compute, fp32 gradients, as good as plain autocast.
    fn: linear_cross_entropy, or a compiled version of it (test_compile). Returns our results."""
    device_type = DEVICE.type
    hidden, weight, bias, labels = make_inputs((3, 12), 40, 300)
    trainable = (True, True, True)
    ours_in = leaves((hidden, weight, bias), torch.float32, trainable)
    base_in = leaves((hidden, weight, bias), torch.float32, trainable)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss = fn(*ours_in[:2], labels, ours_in[2], backend=backend, chunk_size=8)
        base = linear_cross_entropy_reference(*base_in[:2], labels, base_in[2])
    loss.backward()
    base.backward()
    ref_in = leaves((hidden, weight, bias), torch.float64, trainable)
    ref = linear_cross_entropy_reference(*ref_in[:2], labels, ref_in[2], compute_dtype=torch.float64)
    ref.backward()
    assert_close_to_baseline("loss", loss.detach(), base.detach(), ref.detach(), torch.bfloat16, labels.numel())
    for name, o, b, r in zip(("d_hidden", "d_weight", "d_bias"), ours_in, base_in, ref_in):
        assert o.grad.dtype == torch.float32
        assert_close_to_baseline(name, o.grad, b.grad, r.grad, torch.bfloat16, labels.numel())
    return (hidden, weight, bias, labels), [loss.detach()] + [t.grad for t in ours_in]


def spy_calls(monkeypatch, module, name, record):
    """Replace module.<name> with a wrapper that appends record(args, kwargs) per call."""
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(record(args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def grads_written(args, kwargs):
    """spy_calls record of chunks.run(work, ...): which of dX, dW, db the pass writes."""
    work = args[0]
    return tuple(t is not None for t in (work.dx, work.dw, work.db))


def count_chunk_loops(monkeypatch, record=grads_written):
    return spy_calls(monkeypatch, chunks, "run", record)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that the aten ops run under it create, alive at once (a storage
    is freed when the last tensor on it dies). Outputs that write into or view a tensor from
    outside are not new; nor are the CPU's fp32 copies of matmul operands (a GPU multiplies
    low-precision operands into an fp32 result directly) or the copies Triton's CPU interpreter
    makes: neither exists on a GPU."""

    def __init__(self):
        super().__init__()
        self.tensors, self.size = {}, {}  # storage -> live tensors on it, its bytes
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == "mm" or frame.f_globals.get("__name__", "").startswith("triton."):
                return out
            frame = frame.f_back
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            key = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else 0
            if key == 0 or (key in given and key not in self.tensors):
                continue
            if key not in self.tensors:
                self.tensors[key], self.size[key] = 0, t.untyped_storage().nbytes()
                self.live += self.size[key]
                self.peak = max(self.peak, self.live)
            self.tensors[key] += 1
            weakref.finalize(t, self._drop, key)
        return out

    def _drop(self, key):
        self.tensors[key] -= 1
        if self.tensors[key] == 0:
            self.live -= self.size.pop(key)
            del self.tensors[key]


# Training runs through Hugging Face trainers (tests/test_hf_trainers.py, tests/test_trainer_matrix.py):
# a tiny Llama (random init, no downloads) over the bundled text as byte tokens, patched and stock
# from the same weights and data order. transformers is imported where it is needed, so that the
# modules that do not train keep running without it.
#
# Tolerances. With the patch the loss is the same fp32 sum of per-token terms as stock's, added in
# another order: a step's loss differs by a few float32 ulps. AdamW then scales each entry's step to
# about lr whatever its gradient's size, so an entry whose gradient is near zero carries that rounding
# into the weights. Measured in 44 comparisons (6-8 steps, CPU): losses at most 1.9e-7 apart
# (relative), parameters at most 8.3e-5 of how far training moved them. LOSS_RTOL and PARAM_RTOL
# leave a 50x / 12x margin over that, while a real fault is far larger: one token miscounted in
# num_items_in_batch (about 100 counted tokens per step) moves the loss by 1e-2.
#
# PATCH uses backend="torch", the Triton kernel's plain-PyTorch twin: these runs are on the CPU, where
# the kernel would go through Triton's interpreter at about a second per micro-batch (tests/test_kernels.py
# checks the kernel against the twin).

LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-3
VOCAB = 300  # byte ids 0-255, then the tokenizer's special tokens
BATCH, ACCUMULATE = 2, 2
PATCH = dict(backend="torch")


def tiny_llama():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config).train()


def byte_windows(lengths):
    """Windows of the bundled text at random offsets, as byte ids."""
    from fused_cel.train_demo import corpus_tokens

    text = corpus_tokens(torch.device("cpu"))
    return [text[o : o + n] for n, o in zip(lengths, torch.randint(0, len(text) - max(lengths), (len(lengths),)))]


class MapDataset(torch.utils.data.Dataset):
    """A map-style dataset of {"input_ids", "labels"} dicts, as a new user writes one."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def run_args(config_class, tmp_path, steps, **extra):
    """TrainingArguments (or a subclass: TRL's configs) for `steps` optimizer steps of ACCUMULATE
    micro-batches of BATCH sequences on the CPU, logging every step's loss; extra overrides."""
    args = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATE,  # Trainer passes num_items_in_batch to the model
        max_steps=steps,
        learning_rate=3e-3,  # AdamW (the default optimizer), linear decay
        logging_steps=1,
        seed=0,  # the same shuffled data order in every run
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    return config_class(**(args | extra))


def train(trainer):
    """Train; returns the per-optimizer-step losses Trainer logged (logging_steps=1)."""
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == trainer.args.max_steps, trainer.state.log_history
    return losses


def assert_same_training(
    losses, stock_losses, model, stock_model, init, loss_rtol=LOSS_RTOL, param_rtol=PARAM_RTOL, falls=True
):
    """Equal loss curves (loss_rtol) and final trainable parameters apart by at most param_rtol of
    how far training moved them; frozen ones (requires_grad False) as they were in init; and
    training did something (with ``falls``, the stock loss fell: not so for DFT's, -p log p)."""
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, stock_losses, strict=True))
    assert rel <= loss_rtol, f"loss curves differ by {rel:.2e} relative:\n  patched {losses}\n  stock   {stock_losses}"
    assert not falls or stock_losses[-1] < stock_losses[0], f"the stock run did not learn: {stock_losses}"
    stock_params, init_params = dict(stock_model.named_parameters()), dict(init.named_parameters())
    assert stock_params.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, init_params[name]), f"{name} is frozen but changed"
            continue
        moved = (stock_params[name] - init_params[name]).norm().item()
        diff = (p - stock_params[name]).norm().item()
        assert moved > 0, f"{name} did not move in training"
        assert diff <= param_rtol * moved, f"{name}: patched - stock = {diff:.2e}, {diff / moved:.2e} of its move"
