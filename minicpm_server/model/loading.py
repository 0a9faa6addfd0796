"""Stream a checkpoint's weights into the model one tensor at a time, so loading never holds two
copies of the weights and nothing of the checkpoint file stays mapped afterwards.

Why not transformers' `from_pretrained`: on the full MiniCPM-2B shape on CPU it left the fp32
`pytorch_model.bin` memory-mapped for as long as the model lived (float32 weights were views
into the mapping, and the engine's packed copies came on top: 22.4 GB resident on a 24 GB
machine), and in bfloat16 it converted from the mapped file with both copies resident for a
while (16.4 GB while loading, 8 GB after).

What this does instead, for each tensor in the file's order (which is layer order):

1. read it as a view into the file's memory mapping (`torch.load(mmap=True)` for the pickled
   `.bin` the download ships, `safe_open` for safetensors; neither reads the data yet);
2. copy it to its device and dtype (the only copy kept: private memory, or the GPU's);
3. tell the kernel we are done with those pages of the mapping (`madvise(MADV_DONTNEED)`: the
   file stays in the OS page cache, but no longer counts in this process's resident memory);
4. put the copy into the model, which was built with no storage at all (PyTorch's meta device).

So the resident peak is the loaded weights plus one tensor, on CPU and for the host side of a
CUDA load alike, and once the last view is dropped the mapping is closed (tests/test_loading.py
reads /proc/self/maps to check).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("minicpm_server")

# Marks a parameter that is a view into the checkpoint's mapping ("mapped" form): the engine
# copies it into memory of its own after start-up (engine/native/kernels, KernelLinear).
IN_MAPPING = "in_mapping"


@dataclass
class LoadReport:
    """Where the load's time went, for the start-up log and bench/memory.py."""

    tensors: int = 0
    bytes_read: int = 0
    bytes_mapped: int = 0  # tensors left in the file's mapping: served from it, or packed after start-up
    mapped_for: str = "to pack after start-up"
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def summary(self) -> str:
        phases = ", ".join(f"{name} {value:.1f} s" for name, value in self.seconds.items())
        mapped = f", {self.bytes_mapped / 1e9:.2f} GB mapped {self.mapped_for}" if self.bytes_mapped else ""
        return f"{self.tensors} tensors, {self.bytes_read / 1e9:.2f} GB read{mapped} ({phases})"


# --------------------------------------------------------------------------- reading


@contextmanager
def mapped_tensors(file: Path) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
    """(name, tensor) pairs whose data are views into `file`'s memory mapping, in file order.
    The mapping closes when the caller has dropped every view (and this context has ended)."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            yield ((name, handle.get_tensor(name)) for name in handle.keys())  # noqa: SIM118 (a handle, not a dict)
    else:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        try:
            yield _drain(state)
        finally:
            state.clear()


def _drain(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Hand out the dict's tensors in its order, dropping its own reference to each as we go."""
    for name in list(state):
        yield name, state.pop(name)


def _madvise() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_MADVISE = _madvise()


def release_pages(view: torch.Tensor) -> None:
    """Drop the pages under `view` from this process's resident set (Linux; elsewhere a no-op).

    Only for views into a read-only, private file mapping, never written: the kernel then
    discards our reference to the pages, and a later read would fault them in from the file
    again. The range is widened to whole pages, which may take in a neighbour's first or last
    page: harmless for the same reason."""
    if _MADVISE is None or view.device.type != "cpu" or view.numel() == 0:
        return
    first, last = _page_range(view)
    _MADVISE(first, last - first, mmap.MADV_DONTNEED)


MADV_POPULATE_READ = 22  # Linux 5.14+; Python's mmap module names it only from 3.13 on


def populate_pages(view: torch.Tensor) -> None:
    """Map the pages under `view` into this process now (Linux 5.14+; elsewhere a no-op), for a
    view that will be computed from: one system call instead of a page fault every 64 KB during
    the first products. Full-size float32 layers, warm page cache: 0.7 s here, against 1.6 s of
    faults taken in the warm-up generation. Reading them from disk, when not cached, happens here too."""
    if _MADVISE is None or view.device.type != "cpu" or view.numel() == 0:
        return
    first, last = _page_range(view)
    _MADVISE(first, last - first, MADV_POPULATE_READ)  # refused on older kernels: faults then, as before


def _page_range(view: torch.Tensor) -> tuple[int, int]:
    page = mmap.PAGESIZE
    start = view.data_ptr()
    end = start + view.numel() * view.element_size()
    return start // page * page, -(-end // page) * page


def return_freed_memory() -> None:
    """Ask glibc to hand freed heap pages back to the system. Loading's temporaries (a converted
    tensor, a block being quantized) are freed as it goes, but glibc keeps what lands on its heap:
    seen, 1 GB more resident after an int8 load than after quantizing a loaded model, which did
    this. No-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def copy_out(view: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A copy of a mapped tensor that owns its memory, on `device` in `dtype` (norms and other
    float tensors take the model's dtype, as from_pretrained does)."""
    target = dtype if view.is_floating_point() else view.dtype
    copied = torch.empty(view.shape, dtype=target, device=device)
    copied.copy_(view)
    return copied


# --------------------------------------------------------------------------- building


def empty_model(config: Any, dtype: torch.dtype, attn: str) -> Any:
    """The model with every parameter on the meta device: shapes, no storage, no init. Our own
    MiniCPM for our config (architecture.py), transformers' GraniteForCausalLM for a GraniteConfig."""
    from minicpm_server.model.architecture import ModelConfig, empty_minicpm

    if isinstance(config, ModelConfig):
        return empty_minicpm(config, dtype)
    from transformers import GraniteForCausalLM

    with torch.device("meta"):
        model = GraniteForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)
    return model


def _set_tensor(model: Any, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=False))
    else:
        owner._buffers[leaf] = value


def _rebuild_buffers(model: Any, device: torch.device) -> None:
    """Non-persistent buffers (the rotary table's frequencies) are computed, not stored: make them
    again off the meta device, the way the module's constructor does."""
    for module_name, module in list(model.named_modules()):
        if not any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            continue
        fresh = type(module)(config=model.config).to(device)
        parent_name, _, leaf = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, fresh)


def _linear_owner(model: Any, name: str) -> tuple[Any, str] | None:
    """(parent module, attribute) when `name` is the weight of a bias-free nn.Linear."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf != "weight" or not isinstance(owner, torch.nn.Linear) or owner.bias is not None:
        return None
    parent_name, _, attribute = owner_name.rpartition(".")
    return model.get_submodule(parent_name), attribute


@dataclass(frozen=True)
class LinearForm:
    """What the linear layers become as they are read: "dense" (a copy in the model's dtype),
    "mapped" (our CPU kernels': the weights stay in the file's mapping, read where they are),
    "kernel" (our CPU kernels' layers over a copy in `table_dtype`: bfloat16 weights in a
    float32 model, engine/native/quantized.py, weights_in), "packed" (oneDNN's layout, CPU) or
    "int8" (weight-only int8, engine/native/quantized.py).
    int8 leaves the output head (and the embedding tied to it) dense unless `quantize_head`.
    Packed `later`: each layer keeps its view into the file's mapping, no copy, until the engine
    packs it after start-up (engine/native/packed.py, DeferredPacking)."""

    kind: str = "dense"
    quantize_head: bool = False
    later: bool = False
    # int8 on CPU with our kernels: a float32 model's tied table (embedding and head) in bfloat16
    # (quantized.py); "kernel": the linear layers' weights too
    table_dtype: torch.dtype | None = None

    def table(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of a tied embedding table in a model computing in `dtype`."""
        return self.table_dtype if self.table_dtype is not None and dtype == torch.float32 else dtype

    def converts(self, name: str) -> bool:
        """Whether the linear layer whose weight is `name` takes this form (a module of its own)."""
        return self.kind in ("packed", "int8", "kernel") and (
            self.kind == "packed" or self.quantize_head or name != "lm_head.weight"
        )

    def serves_mapped(self, view: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether the model takes `view` itself, a view into the file's mapping, as its tensor:
        with "mapped", every matrix (the linear layers and the embedding table) already in the
        model's dtype; with "kernel" later, the embedding table of a file already in the table's
        dtype (a bfloat16 checkpoint); vectors (the norms) and anything converted are copied."""
        if view.dim() != 2 or not view.is_contiguous():
            return False
        if self.kind == "kernel":
            return self.later and view.dtype == self.table(dtype)
        return self.kind == "mapped" and view.dtype == dtype

    @property
    def phase(self) -> str:
        if self.kind == "mapped" or (self.kind == "packed" and self.later):
            return "mapping"
        return {"packed": "packing", "int8": "quantizing", "kernel": "converting"}.get(self.kind, "copying")

    def keeps_view(self, view: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether the layer made from `view` computes from the file's mapping for now: packed
        later from a file in the model's dtype, or our kernels' bfloat16 layers (tiled later)
        from a bfloat16 file, as llama.cpp serves a BF16 GGUF from its mapping."""
        if self.kind == "packed":
            return self.later and view.dtype == dtype
        return self.kind == "kernel" and self.later and view.dtype == self.table(dtype) and view.is_contiguous()

    def make(
        self, view: torch.Tensor, device: torch.device, dtype: torch.dtype, *, tile: bool = True
    ) -> torch.nn.Module:
        """The layer made from `view`; `tile=False`: an int8 table the embedding also reads by rows."""
        if self.kind == "packed":
            from minicpm_server.engine.native.packed import PackedLinear

            if self.keeps_view(view, dtype):  # its pages leave our resident set once it is packed
                return PackedLinear(view, later=True, on_packed=release_pages)
            # one pass over the file's bytes, no private copy first (a converted matrix is the only temporary)
            return PackedLinear(view if view.dtype == dtype else view.to(dtype), later=self.later)
        if self.kind == "kernel":
            from minicpm_server.engine.native.kernels import KernelLinear, built_products

            if self.keeps_view(view, dtype):  # its pages leave our resident set once it is tiled
                layer = KernelLinear(view, built_products())
                setattr(layer.weight, IN_MAPPING, True)
                return layer
            layer = KernelLinear(copy_out(view, device, self.table(dtype)), built_products())
            if not self.later:
                layer.pack_now()  # tiled now (--packing at-load), else by the engine after start-up
            return layer
        from minicpm_server.engine.native.quantized import Int8Linear

        return Int8Linear.from_weight(view, dtype, device, tile=tile)


DENSE = LinearForm()  # every layer a plain copy in the model's dtype


def stream_weights(
    model: Any,
    weight_files: tuple[Path, ...],
    device: torch.device,
    dtype: torch.dtype,
    report: LoadReport,
    *,
    form: LinearForm = DENSE,
) -> None:
    """Fill the meta model's parameters from the files, one tensor at a time; its linear layers
    take `form` as they are read (packed for oneDNN on CPU, or int8), never a dense copy first.
    With int8 and `form.quantize_head` the tied embedding table is quantized too: one int8 table
    for the output head's products and the embedding's row lookups (quantized.py)."""
    wanted = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    int8_table = tied and form.kind == "int8" and form.quantize_head
    for file in weight_files:
        with mapped_tensors(file) as tensors:
            for name, view in tensors:
                if name not in wanted or (tied and name == "lm_head.weight"):
                    continue  # e.g. a stored rotary table: computed, not loaded; a tied head's copy of the table
                _expect_shape(name, view, wanted[name])
                start = time.perf_counter()
                linear = _linear_owner(model, name) if form.converts(name) else None
                kept = linear is not None and form.keeps_view(view, dtype)  # computed from until packed
                served = linear is None and form.serves_mapped(view, dtype)  # read where it is, for good
                if linear is not None:
                    setattr(*linear, form.make(view, device, dtype))
                    if kept:
                        populate_pages(view)
                    report.add("mapping" if kept else form.phase, time.perf_counter() - start)
                elif int8_table and name == "model.embed_tokens.weight":
                    _set_int8_table(model, form.make(view, device, dtype, tile=False))
                    report.add(form.phase, time.perf_counter() - start)
                elif served:
                    _set_tensor(model, name, view)
                    setattr(model.get_parameter(name), IN_MAPPING, True)
                    populate_pages(view)
                    report.mapped_for = "and read where they are until copied after start-up"
                    report.add("mapping", time.perf_counter() - start)
                else:
                    table = tied and name == "model.embed_tokens.weight"
                    _set_tensor(model, name, copy_out(view, device, form.table(dtype) if table else dtype))
                    report.add("copying", time.perf_counter() - start)
                report.tensors += 1
                if kept or served:
                    report.bytes_mapped += view.numel() * view.element_size()
                else:
                    report.bytes_read += view.numel() * view.element_size()
                    release_pages(view)
                del view


def _set_int8_table(model: Any, table: torch.nn.Module) -> None:
    """The output head becomes `table` and the embedding reads its rows (MiniCPM ties them)."""
    from minicpm_server.engine.native.quantized import Int8Embedding

    model.lm_head = table
    model.model.embed_tokens = Int8Embedding(table)


def _expect_shape(name: str, view: torch.Tensor, param: torch.Tensor) -> None:
    if view.shape != param.shape:
        raise ValueError(f"{name} has shape {tuple(view.shape)} in the file, the config says {tuple(param.shape)}")


def load_streaming(
    config: Any,
    weight_files: tuple[Path, ...],
    device: torch.device,
    dtype: torch.dtype,
    attn: str,
    form: LinearForm = DENSE,
) -> tuple[Any, list[str], LoadReport]:
    """(model, missing tensor names, report); the model is tied, in eval mode, on `device`; its
    linear layers take `form` as they are read (stream_weights)."""
    report = LoadReport()
    start = time.perf_counter()
    model = empty_model(config, dtype, attn)
    built = time.perf_counter()
    report.add("building", built - start)
    stream_weights(model, weight_files, device, dtype, report, form=form)
    if config.tie_word_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        model.lm_head.weight = model.model.embed_tokens.weight  # MiniCPM stores only the embedding
        if form.table(dtype) != dtype:
            from minicpm_server.engine.native.quantized import table_in

            table_in(model, form.table(dtype))  # already in that dtype: the modules that read it
    _rebuild_buffers(model, device)
    model.eval()
    return_freed_memory()
    missing = [name for name, param in model.named_parameters(remove_duplicate=False) if param.is_meta]
    spent = sum(report.seconds.get(phase, 0.0) for phase in ("copying", "packing", "quantizing", "mapping"))
    report.add("opening files", time.perf_counter() - built - spent)
    return model, missing, report
