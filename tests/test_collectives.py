"""One collective helper (``megatron_lpreg.parallel``): nothing bypasses it, and it rejects a host
tensor sent through a device group, also on CPU where gloo would accept it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from megatron_lpreg.parallel import CollectiveDeviceError
from tests.distributed import run_distributed
from tests.host_tracing import HostTensorTracer, is_host

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_lpreg"
HELPER = PACKAGE / "parallel.py"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "broadcast_object_list",
    "reduce", "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all", "all_to_all_single",
    "barrier", "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv", "P2POp",
}


def direct_collectives(source: str, filename: str = "<src>") -> list[str]:
    """``file:line name`` for each torch.distributed collective ``source`` reaches directly."""
    tree = ast.parse(source, filename)
    aliases = {"torch.distributed"}  # dotted names bound to torch.distributed in this file
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{filename}:{node.lineno} {a.name}" for a in node.names if a.name in COLLECTIVES]
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in aliases:
            found.append(f"{filename}:{node.lineno} {node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and ast.unparse(node.args[0]) in aliases
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in COLLECTIVES):
            found.append(f"{filename}:{node.lineno} {node.args[1].value}")
    return found


def test_no_module_bypasses_the_collective_helper():
    bypasses = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path != HELPER:
            bypasses += direct_collectives(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert bypasses == [], "collectives outside megatron_lpreg/parallel.py: " + ", ".join(bypasses)
    assert direct_collectives(HELPER.read_text()), "the helper itself issues the collectives"


@pytest.mark.parametrize("source", [
    "import torch.distributed as dist\ndist.all_reduce(t, group=g)",
    "import torch\ntorch.distributed.broadcast(t, 0)",
    "from torch import distributed as d\nd.barrier()",
    "from torch.distributed import all_gather_into_tensor",
    "import torch.distributed as dist\nop = getattr(dist, 'reduce_scatter_single', None)",
    "import torch.distributed as dist\nops = [dist.P2POp(dist.isend, t, 1)]",
])
def test_the_bypass_check_sees_each_form(source):
    assert direct_collectives(source)


def test_the_bypass_check_leaves_non_collectives_alone():
    assert direct_collectives("import torch.distributed as dist\nr = dist.get_rank(g)\nx.gather(0, i)") == []


def _host_tensor_body(ctx):
    from megatron_lpreg import parallel

    out = {"plain": parallel.all_reduce(torch.ones(2), ctx.tp).tolist()}  # gloo: host tensors are right
    with parallel.device_groups_on_cpu():
        try:
            parallel.all_reduce(torch.ones(2), ctx.tp)
        except CollectiveDeviceError as e:
            out["all_reduce"] = str(e)
        try:
            parallel.all_gather([torch.empty(1), torch.empty(1)], torch.ones(1), ctx.tp)
        except CollectiveDeviceError as e:
            out["all_gather"] = str(e)
    # A predicate that tells host from device tensors (what the tracer provides): only host ones fail.
    with parallel.device_groups_on_cpu(is_host=lambda t: t.dtype == torch.float64):
        out["device"] = parallel.all_reduce(torch.ones(2), ctx.tp, "max").tolist()
        try:
            parallel.all_reduce(torch.ones(2, dtype=torch.float64), ctx.tp)
        except CollectiveDeviceError as e:
            out["host"] = str(e)
    # Strict device mode as the trainer tests run it: the tracer tells the tensors apart.
    with HostTensorTracer(), parallel.device_groups_on_cpu(is_host):
        out["traced_device"] = parallel.all_reduce(torch.ones(1, device=ctx.device), ctx.tp).tolist()
        try:
            parallel.all_reduce(torch.tensor([1.0]), ctx.tp)  # e.g. a token count made on the host
        except CollectiveDeviceError as e:
            out["traced_host"] = str(e)
    out["after"] = parallel.all_reduce(torch.ones(1), ctx.tp).tolist()  # strict mode ended
    return out


def test_a_host_tensor_into_a_device_group_raises():
    for r in run_distributed(_host_tensor_body, world_size=2, tp_size=2, timeout_s=120):
        assert r["plain"] == [2.0, 2.0] and r["device"] == [1.0, 1.0] and r["after"] == [2.0]
        assert r["all_reduce"].startswith("tests/test_collectives.py:")
        assert "all_reduce on a device (strict on CPU) group got a (2,) torch.float32 tensor on cpu (a host tensor)" \
            in r["all_reduce"]
        assert "all_gather on a device (strict on CPU) group" in r["all_gather"]
        assert "(2,) torch.float64 tensor" in r["host"]
        assert r["traced_device"] == [2.0] and "(1,) torch.float32 tensor on cpu (a host tensor)" in r["traced_host"]


def test_the_tracer_tags_what_a_gpu_run_holds_on_the_host():
    device = torch.device("cpu")  # the run's device, as code passes it
    with HostTensorTracer():
        made_on_host = torch.tensor([3.0])
        on_device = torch.zeros(2, device=device)
        moved = made_on_host.to(device)
        copy_back = on_device.cpu()
        mixed = on_device * made_on_host  # a host scalar in a device op: a device result
        host_only = made_on_host * 2
        on_device.add_(1.0)  # in place: stays
        cast = made_on_host.to(torch.float64)
        like = torch.zeros_like(made_on_host)
        named_cpu = on_device.to("cpu")
    assert [is_host(t) for t in (made_on_host, on_device, moved, copy_back, mixed, host_only, on_device, cast,
                                 like, named_cpu)] == \
        [True, False, False, True, False, True, False, True, True, True]
    assert moved is not made_on_host and copy_back is not on_device  # copies, as on a GPU
