"""onnxruntime sessions: the one place engines get a session from.

onnxruntime is imported lazily so that the bus, the bridge and the CLI start without it.
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

DEFAULT_THREADS = int(os.environ.get("UNITBUS_THREADS", "0")) or min(2, os.cpu_count() or 1)
_MADV_RANDOM = 1  # Linux madvise advice: a page fault reads that page only, no readahead around it
_MADV_PAGEOUT = 21  # Linux madvise advice: reclaim these pages now if they are clean (never discards data)
_M_ARENA_MAX = -8  # glibc mallopt parameter: how many malloc arenas threads share
MALLOC_ARENAS = 2
# How often every process hands its freed heap back (trim_loop): well under the time between two requests.
TRIM_EVERY_S = 5.0


def choose_providers(available: Sequence[str], wanted: Sequence[str] | None = None) -> list[str]:
    """Pick execution providers: the wanted ones that exist, in order, always ending with CPU."""
    order = list(wanted) if wanted else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen = [p for p in order if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def create_session(
    model: str | Path | bytes,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    options: dict[str, str] | None = None,
    shapes_vary: bool = False,
    arena: bool = True,
) -> Any:
    """An InferenceSession with a fixed thread count and all graph optimisations.

    `threads` is the intra-op thread count (default: UNITBUS_THREADS or min(2, cores)); inter-op
    parallelism stays at 1 because unit graphs are sequential and extra pools only add contention.
    `shapes_vary`: the inputs' shapes change from run to run (speech of any length): onnxruntime's
    memory pattern, planned and kept per shape, then only holds memory (measured on the Piper voice:
    293 MB resident after 16 texts with it, 246 MB without, and no slower). `arena=False`: tensors are
    allocated and freed as needed instead of from a pool that keeps its peak (measured on Whisper tiny:
    the pool held 90 MB after loading alone, and transcription was no slower without it).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or DEFAULT_THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.enable_mem_pattern = not shapes_vary
    so.enable_cpu_mem_arena = arena
    for key, value in (options or {}).items():
        so.add_session_config_entry(key, value)
    chosen = choose_providers(ort.get_available_providers(), providers)
    source = model if isinstance(model, bytes) else str(model)
    log.debug("onnxruntime session %s on %s with %d threads", "<bytes>" if isinstance(model, bytes) else model, chosen,
              so.intra_op_num_threads)
    return ort.InferenceSession(source, sess_options=so, providers=chosen)


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    """glibc's malloc_trim and madvise, or None (another libc, another OS)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_malloc_arenas() -> None:
    """At most MALLOC_ARENAS glibc malloc arenas in this process: call it before any thread starts.

    glibc gives each new thread its own arena, up to 8 per core, and a freed block can only be reused by
    the arena it came from: onnxruntime's pool threads and the unit's job threads then each keep their
    own high-water mark. Measured on the voice chain after 8 questions: asr 233 -> 203 MB PSS.
    An explicit MALLOC_ARENA_MAX in the environment wins.
    """
    libc = _glibc()
    if libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


@dataclass(frozen=True)
class MappedFile:
    """A file this process memory-maps, known by its inode: a file renamed over it later (a model cache
    built again) leaves the mapping on the old one, which /proc/self/maps then lists as "(deleted)"."""

    path: Path
    device: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> "MappedFile":
        st = os.stat(path)
        return cls(Path(path), st.st_dev, st.st_ino)

    def same(self, device: str, inode: str) -> bool:
        """A /proc/<pid>/maps line's device ("fe:00") and inode fields name this file."""
        major, minor = (int(v, 16) for v in device.split(":"))
        return int(inode) == self.inode and (major, minor) == (os.major(self.device), os.minor(self.device))


def _advise_mapped(mapped: MappedFile, advice: int, length: int | None = None) -> None:
    """madvise this process's mappings of `mapped`, or of its first `length` bytes only."""
    libc = _glibc()
    if libc is None:
        return
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) != 6 or not mapped.same(fields[3], fields[4]):
                continue
            start, end = (int(v, 16) for v in fields[0].split("-"))
            offset = int(fields[2], 16)
            if length is not None:
                if offset >= length:
                    continue
                end = min(end, start + -(-(length - offset) // mmap.PAGESIZE) * mmap.PAGESIZE)
            if libc.madvise(start, end - start, advice) != 0:
                log.debug("madvise(%d) on %s failed (errno %d)", advice, mapped.path, ctypes.get_errno())
                return


def read_rows_only(mapped_file: MappedFile, length: int) -> None:
    """The first `length` bytes of the memory-mapped `mapped_file` are a table a graph gathers rows
    from (a token table): a page fault there brings in that page alone. With readahead, a kernel that
    caches files in large folios maps a whole folio per fault (2 MB per new token on Whisper's
    decoder, measured on Linux 6.18)."""
    _advise_mapped(mapped_file, _MADV_RANDOM, length)


def page_out(mapped_file: MappedFile, length: int | None = None) -> None:
    """Drop the clean resident pages of the memory-mapped `mapped_file` (or of its first `length`
    bytes): MADV_PAGEOUT never discards data, a page used again is read back from the file."""
    _advise_mapped(mapped_file, _MADV_PAGEOUT, length)


def return_memory_to_os(*mapped_files: Path) -> None:
    """Give freed and load-only memory back to the OS (glibc on Linux; a no-op elsewhere).

    - glibc keeps freed heap pages (tokenizer.json parsing, weight repacking, a generation's scratch, a
      transcription's or a sentence's tensors): malloc_trim returns them (about 9 MB after an llm
      generation, 48 MB after a Whisper transcription, in under a millisecond).
    - onnxruntime memory-maps the external weights, repacks most of them into its own buffers and
      unmaps those, but keeps the MatMulNBits scale tensors mapped although the repacked copy is what
      runs; the pages read while repacking stay resident, as do the rows a graph gathers from a mapped
      table. `page_out` drops those of `mapped_files`.
    """
    libc = _glibc()
    if libc is None:
        return
    for mapped_file in mapped_files:
        page_out(MappedFile.of(mapped_file))
    libc.malloc_trim(0)


async def trim_loop() -> None:
    """return_memory_to_os every TRIM_EVERY_S, from the event loop. Units that run jobs trim at their end,
    but work done in the event loop has no end: sys and the bridges route every microphone frame, kws
    and vad score them as they come. Measured after 5 spoken questions, glibc was keeping freed pages
    of 9.5 MB in kws (its load), 1.8 MB in sys and 1.6 MB in the bridge; malloc_trim takes well under
    a millisecond on heaps that size."""
    while True:
        await asyncio.sleep(TRIM_EVERY_S)
        return_memory_to_os()
