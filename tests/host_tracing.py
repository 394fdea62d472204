"""Which tensors a GPU run would hold on the host, traced on a CPU run.

On CPU every tensor is a CPU tensor, so a host tensor that would reach an NCCL collective on a GPU
(and fail there) looks like any other. ``HostTensorTracer`` follows where each tensor would live
on a GPU machine and tags the host ones; ``parallel.device_groups_on_cpu(is_host)``
then rejects them in collectives. The rules mirror torch's placement on a GPU:

- a tensor made without a ``device`` (``torch.tensor(list)``, ``torch.zeros(n)``, ``from_numpy``,
  ``frombuffer``) is a host tensor; with any ``device=`` it is on the run's device (on CPU megatron
  passes the shimmed ``torch.cuda.current_device()``, the string "cpu", for its GPU tensors);
- ``.cpu()`` and ``.to("cpu")`` make host tensors, ``.to(device)`` otherwise device ones (a copy,
  as on a GPU, even where the CPU would hand back the same tensor);
- any other op's result is on the host only when all its tensor inputs are (a CUDA op accepts
  host scalars, and its result is on the device); in-place ops leave a tensor where it is.

Tensors made before the tracer started, and autograd's gradients, count as device tensors: the
tracer finds host tensors, it does not prove a tensor is on the device.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_TAG = "_lpreg_traced_host"


def is_host(t: torch.Tensor) -> bool:
    """Whether the tracer tagged ``t`` as a host tensor."""
    return getattr(t, _TAG, False)


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _to_target(args, kwargs):
    """``Tensor.to``'s target: True (host), False (device), None (no device given: dtype only), or
    the tensor whose device it copies."""
    for a in (kwargs.get("device"), *args[1:], kwargs.get("other")):
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, str):
            return a.startswith("cpu")
        if isinstance(a, (torch.device, int)):
            return False
    return None


class HostTensorTracer(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.endswith("__")) or name == "__setitem__":
            return out
        outputs = _tensors(out)
        if not outputs:
            return out
        inputs = _tensors((args, kwargs))
        if name == "cpu":
            host = True
        elif name == "to" and (target := _to_target(args, kwargs)) is not None:
            host = is_host(target) if isinstance(target, torch.Tensor) else target
        elif "device" in kwargs and kwargs["device"] is not None:
            host = False
        elif not inputs:
            host = True
        else:
            host = all(is_host(t) for t in inputs)
        if isinstance(out, torch.Tensor) and any(out is t for t in inputs) and is_host(out) != host:
            out = out.clone()  # a CPU no-op move: the caller's other reference keeps its place
            outputs = [out]
        for t in outputs:
            setattr(t, _TAG, host)
        return out
