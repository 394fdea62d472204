"""Peak memory of each phase of a step (rollout, log-probs, train, refit).

On CUDA the peak is the caching allocator's ``max_memory_allocated``, reset when a phase starts. On
CPU it is the process's resident high-water mark (``VmHWM``), reset by writing "5" to
``/proc/self/clear_refs`` (Linux >= 4.0): torch's CPU allocator keeps no cache, so the resident set
follows the bytes held in live tensors, up to what glibc keeps of freed heap chunks. Before a CPU
phase starts, freed chunks are handed back (``malloc_trim``), so a phase is charged for what it
allocates rather than hidden by chunks an earlier phase left behind; running with
``MALLOC_MMAP_THRESHOLD_=262144`` makes every large tensor its own mapping and the figures exact.

Each phase gives two numbers: the peak (everything the process holds, the model included) and the
rise, peak minus what was held when the phase started, i.e. the phase's own transient memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys

import torch

from megatron_lpreg.parallel import all_reduce, group_or_none

MB = 1024 ** 2

_libc = None


def _status(field: str) -> int:
    """A byte count from /proc/self/status (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def resident_bytes() -> int:
    """The process's resident set now."""
    return _status("VmRSS")


def resident_peak_bytes() -> int:
    """The resident set's high-water mark since the process started or the last reset."""
    return _status("VmHWM")


def reset_resident_peak() -> bool:
    """Reset the high-water mark to the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    # Kernels that accept the write but ignore "5" leave the old mark standing.
    return resident_peak_bytes() <= resident_bytes() + 4 * MB


def resident_peak_measurable() -> bool:
    return sys.platform.startswith("linux") and reset_resident_peak()


def release_freed_memory() -> None:
    """Return freed heap memory to the system (glibc), so the resident set is what is live."""
    global _libc
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def freeze_setup_objects() -> None:
    """Collect once, then keep everything alive now (modules, models, tokenizers) out of later
    collections: ``release_freed_memory`` runs in every phase and a full collection over a
    process with megatron-core and transformers loaded costs ~0.15 s each time."""
    gc.collect()
    gc.freeze()


def unfreeze_setup_objects() -> None:
    """Hand the frozen objects back to the collector (a process may build another trainer)."""
    gc.unfreeze()


def parameter_bytes(model) -> int:
    """Bytes of ``model``'s parameters on this rank (its TP shards)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class PhasePeaks:
    """Per-phase peak and rise of this process's memory: ``with peaks.phase("train"): ...``.

    ``metrics(group)`` returns ``memory/peak_<phase>_mb``, ``memory/rise_<phase>_mb`` and
    ``memory/end_<phase>_mb`` (what the process, or on CUDA the whole device, holds when the phase
    ends) for the phases measured since the last call, each the maximum over the ranks of ``group``.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.enabled = self.cuda or resident_peak_measurable()
        self._peaks: dict[str, tuple[int, int]] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_memory()
            start = resident_bytes()
            reset_resident_peak()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
                # What the whole device holds at the phase's end, vLLM's own pool included (torch's
                # allocator statistics do not see it): an engine asleep through training shows here.
                free, total = torch.cuda.mem_get_info(self.device)
                used = total - free
            else:
                peak = resident_peak_bytes()
                used = resident_bytes()
            self._peaks[name] = (peak, max(peak - start, 0), used)

    def metrics(self, group=None) -> dict[str, float]:
        """The phases measured since the last call, in MB, max over ``group`` (collective: every
        rank of the group calls it with the same phases; None: this rank's own)."""
        names = sorted(self._peaks)
        values = torch.tensor([v for n in names for v in self._peaks[n]], dtype=torch.float64)
        self._peaks.clear()
        if not names:
            return {}
        if group_or_none(group) is not None:
            values = values.to(self.device)
            all_reduce(values, group, "max")
            values = values.cpu()
        out = {}
        for i, n in enumerate(names):
            peak, rise, used = values[3 * i:3 * i + 3].tolist()
            out[f"memory/peak_{n}_mb"] = peak / MB
            out[f"memory/rise_{n}_mb"] = rise / MB
            out[f"memory/end_{n}_mb"] = used / MB
        return out
