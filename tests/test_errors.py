"""Every bad input to linear_cross_entropy and FusedLinearCrossEntropyLoss raises a clear error:
the right exception type, with a message that names the problem (and the bad values)."""

import math

import pytest
import torch

from fused_cel import FusedLinearCrossEntropyLoss, api, backends, linear_cross_entropy
from helpers import BACKENDS, DEVICE, make_inputs

V, D = 50, 16


def small_inputs():
    """hidden [2, 5, D], weight [V, D], labels [2, 5], none ignored."""
    hidden, weight, _, labels = make_inputs((2, 5), D, V, ignore_frac=0.0)
    return hidden, weight, labels


# (id, (hidden, weight, labels) -> (hidden, weight, labels, bias), exception, message regex)
TENSOR_CASES = [
    (
        "D mismatch",
        lambda h, w, y: (h, w[:, :8], y, None),
        ValueError,
        r"hidden's last dim \(16\) must equal weight's D \(8\)",
    ),
    (
        "labels shape",
        lambda h, w, y: (h, w, y[:, :4], None),
        ValueError,
        r"labels must have hidden's leading shape \(2, 5\), got \(2, 4\)",
    ),
    ("labels flat", lambda h, w, y: (h, w, y.reshape(-1), None), ValueError, r"leading shape \(2, 5\), got \(10,\)"),
    (
        "bias short",
        lambda h, w, y: (h, w, y, h.new_zeros(V - 1)),
        ValueError,
        r"bias must be \[V\] = \[50\], got shape \(49,\)",
    ),
    (
        "bias 2-D",
        lambda h, w, y: (h, w, y, h.new_zeros(1, V)),
        ValueError,
        r"bias must be \[V\] = \[50\], got shape \(1, 50\)",
    ),
    ("weight 1-D", lambda h, w, y: (h, w[0], y, None), ValueError, r"weight must be \[V, D\], got shape \(16,\)"),
    (
        "weight 3-D",
        lambda h, w, y: (h, w[None], y, None),
        ValueError,
        r"weight must be \[V, D\], got shape \(1, 50, 16\)",
    ),
    (
        "hidden 0-dim",
        lambda h, w, y: (h.sum(), w, y, None),
        ValueError,
        r"hidden must be \[\.\.\., D\], got a 0-dim tensor",
    ),
    ("hidden list", lambda h, w, y: (h.tolist(), w, y, None), TypeError, r"hidden must be a torch\.Tensor, got list"),
    (
        "weight ndarray",
        lambda h, w, y: (h, w.cpu().numpy(), y, None),
        TypeError,
        r"weight must be a torch\.Tensor, got ndarray",
    ),
    ("labels list", lambda h, w, y: (h, w, y.tolist(), None), TypeError, r"labels must be a torch\.Tensor, got list"),
    ("bias float", lambda h, w, y: (h, w, y, 0.0), TypeError, r"bias must be a torch\.Tensor or None, got float"),
    (
        "hidden int",
        lambda h, w, y: (h.long(), w, y, None),
        TypeError,
        r"hidden must be a floating-point tensor, got torch\.int64",
    ),
    (
        "weight int",
        lambda h, w, y: (h, w.int(), y, None),
        TypeError,
        r"weight must be a floating-point tensor, got torch\.int32",
    ),
    (
        "bias int",
        lambda h, w, y: (h, w, y, y.new_zeros(V)),
        TypeError,
        r"bias must be a floating-point tensor, got torch\.int64",
    ),
    (
        "labels float",
        lambda h, w, y: (h, w, y.float(), None),
        TypeError,
        r"labels must be int64 or int32, got torch\.float32",
    ),
    (
        "labels int16",
        lambda h, w, y: (h, w, y.short(), None),
        TypeError,
        r"labels must be int64 or int32, got torch\.int16",
    ),
    (
        "labels bool",
        lambda h, w, y: (h, w, y.bool(), None),
        TypeError,
        r"labels must be int64 or int32, got torch\.bool",
    ),
    (
        "weight dtype",
        lambda h, w, y: (h, w.double(), y, None),
        TypeError,
        r"hidden \(torch\.float32\) and weight \(torch\.float64\) must have the same dtype outside torch\.autocast",
    ),
    (
        "bias dtype",
        lambda h, w, y: (h, w, y, h.new_zeros(V, dtype=torch.float16)),
        TypeError,
        r"hidden \(torch\.float32\) and bias \(torch\.float16\) must have the same dtype",
    ),
    (
        "weight V=0",
        lambda h, w, y: (h, w[:0], y, None),
        ValueError,
        r"weight must have V >= 1 and D >= 1, got shape \(0, 16\)",
    ),
    (
        "weight D=0",
        lambda h, w, y: (h[..., :0], w[:, :0], y, None),
        ValueError,
        r"weight must have V >= 1 and D >= 1, got shape \(50, 0\)",
    ),
    (
        "hidden on meta",
        lambda h, w, y: (h.to("meta"), w, y, None),
        ValueError,
        r"all tensors must be on one device, got hidden: meta, weight: ",
    ),
]


@pytest.mark.parametrize("make, exc, match", [c[1:] for c in TENSOR_CASES], ids=[c[0] for c in TENSOR_CASES])
def test_bad_tensors(make, exc, match):
    with pytest.raises(exc, match=match):
        linear_cross_entropy(*make(*small_inputs()))


# (keyword options, exception, message regex); the module checks the same options at construction.
OPTION_CASES = [
    (dict(reduction="avg"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    (dict(reduction=None), ValueError, r"reduction must be one of .*, got None"),
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be >= 0\.0, got -0\.1"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be <= 1\.0, got 1\.5"),
    (dict(label_smoothing=math.nan), ValueError, r"label_smoothing must be finite, got nan"),
    (dict(label_smoothing="0.1"), TypeError, r"label_smoothing must be a real number, got str"),
    (dict(z_loss=-1e-4), ValueError, r"z_loss must be >= 0\.0, got -0\.0001"),
    (dict(softcap=0), ValueError, r"softcap must be > 0\.0, got 0\.0"),
    (dict(softcap=-30.0), ValueError, r"softcap must be > 0\.0, got -30\.0"),
    (dict(softcap=math.inf), ValueError, r"softcap must be finite, got inf"),
    (dict(logit_scale=math.inf), ValueError, r"logit_scale must be finite, got inf"),
    (dict(logit_scale=math.nan), ValueError, r"logit_scale must be finite, got nan"),
    (dict(logit_scale=True), TypeError, r"logit_scale must be a real number, got bool"),
    (dict(temperature=0), ValueError, r"temperature must be > 0\.0, got 0\.0"),
    (dict(temperature=-1.0), ValueError, r"temperature must be > 0\.0, got -1\.0"),
    (dict(temperature=math.nan), ValueError, r"temperature must be finite, got nan"),
    (dict(temperature=math.inf), ValueError, r"temperature must be finite, got inf"),
    (dict(temperature="hot"), TypeError, r"temperature must be a real number, got str"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be > 0, got 0"),
    (dict(chunk_size=-4), ValueError, r"chunk_size must be > 0, got -4"),
    (dict(chunk_size=8.0), TypeError, r"chunk_size must be an int or None, got float"),
    (dict(chunk_size=True), TypeError, r"chunk_size must be an int or None, got bool"),
    (dict(ignore_index=-100.0), TypeError, r"ignore_index must be an int, got float"),
    (dict(shift=1), TypeError, r"shift must be a bool, got int"),
    (dict(shift="yes"), TypeError, r"shift must be a bool, got str"),
    (dict(check_labels=None), TypeError, r"check_labels must be a bool, got NoneType"),
    (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"),
    (dict(backend="Triton"), ValueError, r"backend must be one of .*, got 'Triton'"),
]
NUM_ITEMS_CASES = [
    (dict(num_items=0), ValueError, r"num_items must be finite and > 0, got 0"),
    (dict(num_items=-3), ValueError, r"num_items must be finite and > 0, got -3"),
    (dict(num_items=math.nan), ValueError, r"num_items must be finite and > 0, got nan"),
    (dict(num_items=math.inf), ValueError, r"num_items must be finite and > 0, got inf"),
    (dict(num_items="10"), TypeError, r"num_items must be a number, a one-element tensor or None, got str"),
    (dict(num_items=True), TypeError, r"num_items must be a number, a one-element tensor or None, got bool"),
    (
        dict(num_items=10, reduction="sum"),
        ValueError,
        r"num_items applies to reduction='mean' only, got reduction='sum'",
    ),
    (
        dict(num_items=10, reduction="none"),
        ValueError,
        r"num_items applies to reduction='mean' only, got reduction='none'",
    ),
    (dict(num_items=torch.tensor([3, 4])), ValueError, r"num_items must be a one-element tensor, got shape \(2,\)"),
    (dict(num_items=torch.tensor([])), ValueError, r"num_items must be a one-element tensor, got shape \(0,\)"),
    (dict(ignore_index=2**70), ValueError, r"ignore_index must fit in int64, got 1180591620717411303424"),
]
PARALLEL_CASES = [
    (
        dict(process_group="world"),
        TypeError,
        r"process_group must be a torch.distributed ProcessGroup or None, got str",
    ),
    (
        dict(vocab_start=0),
        ValueError,
        r"vocab_start, vocab_size and reduce_hidden_grad apply only with a process_group",
    ),
    (dict(vocab_size=V), ValueError, r"apply only with a process_group"),
    (dict(reduce_hidden_grad=False), ValueError, r"apply only with a process_group"),
    (dict(vocab_start=1.0), TypeError, r"vocab_start must be an int or None, got float"),
    (dict(vocab_size=True), TypeError, r"vocab_size must be an int or None, got bool"),
    (dict(reduce_hidden_grad=1), TypeError, r"reduce_hidden_grad must be a bool, got int"),
]


@pytest.mark.parametrize("kwargs, exc, match", OPTION_CASES + NUM_ITEMS_CASES + PARALLEL_CASES, ids=str)
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        linear_cross_entropy(*small_inputs(), **kwargs)


@pytest.mark.parametrize("kwargs, exc, match", OPTION_CASES + NUM_ITEMS_CASES + PARALLEL_CASES, ids=str)
def test_module_bad_option_fails_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FusedLinearCrossEntropyLoss(**kwargs)


@pytest.mark.parametrize(
    "kwargs, unknown", [(dict(reduce="mean"), "'reduce'"), (dict(bias=None, smoothing=0.1), "'bias', 'smoothing'")]
)
def test_module_unknown_option(kwargs, unknown):
    with pytest.raises(TypeError, match=rf"unknown option\(s\) \[{unknown}\]; valid: \["):
        FusedLinearCrossEntropyLoss(**kwargs)


def test_module_bad_tensors():
    hidden, weight, labels = small_inputs()
    with pytest.raises(ValueError, match=r"hidden's last dim \(16\) must equal weight's D \(8\)"):
        FusedLinearCrossEntropyLoss(reduction="sum")(hidden, weight[:, :8], labels)


def test_shift_needs_sequence_dim():
    hidden, weight, labels = small_inputs()
    with pytest.raises(ValueError, match=r"shift=True needs a sequence dimension: hidden must be at least \[T, D\]"):
        linear_cross_entropy(hidden[0, 0], weight, labels[0, 0], shift=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "bad, kwargs, match",
    [
        (V, {}, r"label 50 is out of range: labels must be in \[0, V\) = \[0, 50\) or equal ignore_index \(-100\)"),
        (1000, {}, r"label 1000 is out of range.*\[0, 50\)"),
        (-1, {}, r"label -1 is out of range.*\[0, 50\)"),
        (-100, dict(ignore_index=-1), r"label -100 is out of range.*\[0, 50\) or equal ignore_index \(-1\)"),
        (V, dict(reduction="none", shift=True), r"label 50 is out of range.*\[0, 50\)"),
    ],
)
def test_label_out_of_range(backend, bad, kwargs, match):
    hidden, weight, labels = small_inputs()
    labels[1, -1] = bad  # with shift=True the last label is still a target (of position -2)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(hidden, weight, labels, backend=backend, **kwargs)
    with pytest.raises(ValueError, match=match):  # int32 labels too
        linear_cross_entropy(hidden, weight, labels.int(), backend=backend, **kwargs)


CLASS_WEIGHT_CASES = [
    (lambda w: w.tolist(), TypeError, r"class_weight must be a torch\.Tensor or None, got list"),
    (lambda w: w.long(), TypeError, r"class_weight must be a floating-point tensor, got torch\.int64"),
    (lambda w: w[:-1], ValueError, r"class_weight must be \[V\] = \[50\], got shape \(49,\)"),
    (lambda w: w[None], ValueError, r"class_weight must be \[V\] = \[50\], got shape \(1, 50\)"),
    (lambda w: w.to("meta"), ValueError, r"all tensors must be on one device, got class_weight: meta"),
    (lambda w: w.index_fill(0, torch.tensor([3], device=w.device), -1.0), ValueError,
     r"class_weight must be finite and >= 0, got -1\.0 at index 3"),
    (lambda w: w.index_fill(0, torch.tensor([7], device=w.device), float("nan")), ValueError,
     r"class_weight must be finite and >= 0, got nan at index 7"),
    (lambda w: w.index_fill(0, torch.tensor([0], device=w.device), float("inf")), ValueError,
     r"class_weight must be finite and >= 0, got inf at index 0"),
]  # fmt: skip


@pytest.mark.parametrize("make, exc, match", CLASS_WEIGHT_CASES)
def test_bad_class_weight(make, exc, match):
    with pytest.raises(exc, match=match):
        linear_cross_entropy(*small_inputs(), class_weight=make(torch.ones(V, device=DEVICE)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [V, -1])
def test_unchecked_label_gives_nan(backend, bad):
    hidden, weight, labels = small_inputs()
    labels[1, 2] = bad
    loss = linear_cross_entropy(hidden, weight, labels, check_labels=False, backend=backend)
    assert torch.isnan(loss)
    per_token = linear_cross_entropy(hidden, weight, labels, check_labels=False, backend=backend, reduction="none")
    assert torch.isnan(per_token[1, 2]) and torch.isfinite(per_token[labels != bad]).all()


def test_triton_backend_unavailable(monkeypatch):
    monkeypatch.setattr(api, "triton_available", lambda device: False)  # as on a machine without CUDA
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run: .*use backend='torch' or 'auto'"):
        linear_cross_entropy(*small_inputs(), backend="triton")


def test_triton_backend_not_installed(monkeypatch):
    monkeypatch.setattr(backends, "TRITON", None)
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run: Triton is not installed"):
        linear_cross_entropy(*small_inputs(), backend="triton")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    if backends.TRITON is None:
        pytest.skip("Triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, labels = (t.cpu() for t in small_inputs())
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run: tensors are on cpu"):
        linear_cross_entropy(hidden, weight, labels, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for a second device")
@pytest.mark.parametrize("which", ["weight", "labels", "bias"])
def test_mismatched_devices(which):
    hidden, weight, labels = small_inputs()
    tensors = dict(hidden=hidden.cuda(), weight=weight.cuda(), labels=labels.cuda(), bias=torch.zeros(V, device="cuda"))
    tensors[which] = tensors[which].cpu()
    with pytest.raises(ValueError, match=rf"all tensors must be on one device, got .*{which}: cpu"):
        linear_cross_entropy(**tensors)


def test_process_group_without_init():
    """A group object but no initialised default group: a clear error, before any collective."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)  # no backend: never used, the check comes first
    with pytest.raises(RuntimeError, match=r"process_group needs torch.distributed to be initialised"):
        linear_cross_entropy(*small_inputs(), process_group=group)
