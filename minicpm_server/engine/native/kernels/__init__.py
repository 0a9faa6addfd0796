"""Our own matrix products and decode attention for the native engine on x86-64 CPUs with AVX2
or AVX-512 (products.cpp, attention.cpp, vectors.h).

Why: a decode step is nearly all matrix products over a few rows, so at one client it runs at
the speed the weights stream from memory. On the 2-core AVX2 benchmark machine (AMD EPYC,
Zen 3), at MiniCPM-2B's shapes, per decoder layer (BENCHMARKS.md, "Our own CPU kernels"):

* float32 at one row: 11.7 ms (20.9 GB/s) against oneDNN's packed product's 18.8 and MKL's 20.7;
  llama.cpp's F32 decode reads its weights at about 16 GB/s on the same machine;
* float32 at 4-64 rows: 1.0-1.6x packed's speed; at 512 rows (long prompts) 0.87x of it;
* bfloat16 weights (widened to float32 in registers): 7.7 ms at one row, where PyTorch has no
  fast bfloat16 product on AVX2 (oneDNN packs bfloat16 only with AVX512-BF16 or AMX): 9.9 ms
  at one row and 105 against our 23 at 16 rows;
* int8 weights with a float32 scale per output: 5.5 ms at one row against PyTorch's
  `_weight_int8pack_mm`'s 6.7, 20.5 against 33.9 ms at 16 rows.

They read weights as checkpoints store them ([out, in], row-major): at start-up float32 layers
are read where they are, in the checkpoint's memory mapping, and the engine copies them into
memory of its own between steps (KernelLinear.pack_now, called by packed.DeferredPacking),
because the page cache's 4 KB pages cost 14% of the decode speed against our huge pages.
bfloat16 and int8 weights are also read in a tiled layout (tiled(): 4 outputs, a 64-byte cache
line of each in turn), which streams as one run of memory where rows of 2.3-4.6 KB are too short
for the hardware prefetcher: at one row 1.31x (int8) and 1.06x (bfloat16) the speed of rows.
int8 weights are tiled as they are quantized (quantized.py), bfloat16 ones by pack_now after
start-up. MiniCPM's output head reads the embedding table it is tied to, in rows, with no 1.1 GB
packed copy (packed.py). Each output is summed by one thread in one order, in either layout, so
a row's result does not depend on the other rows in the batch, nor on the layout.

Many rows (a prompt): each thread walks its outputs in blocks of about 1 MB of weights, which
stay in its L2 cache while every group of rows passes, and the inputs in pieces of 1,024 with
the partial sums kept whole between pieces (bit-identical to one pass). On AVX-512 CPUs a build
with 16 lanes and 6-row groups replaces the AVX2 one: on a 2-core Xeon with AVX-512 (BENCHMARKS.md,
"An AVX-512 CPU"), 1.34-1.70x the AVX2 build's speed from 16 rows up, level at one row (memory-bound).

Decode attention (attention.cpp): each row's one query per head against its visible tokens,
read where they lie in the paged KV pool; the lean decoder used to gather every row's blocks
into a dense copy for PyTorch's attention first (1.5 GB copied per step at 32 rows of 64 tokens
on MiniCPM-2B's shape: 0.5 s of a 2.2 s step, against 0.1 s now).

The sources are compiled once, on first use, with the system's C++ compiler (`CXX`, else g++ or
c++; -O3 -fopenmp and -mavx2 -mfma, or the AVX-512 flags; 2-5 s) into the cache directory, named
by a hash of the sources and flags. No compiler, a CPU without AVX2, a failed build, or a result
that differs from PyTorch's: the engine says why once and uses PyTorch's products (packed.py)
and attention as before (a failed AVX-512 build falls back to the AVX2 one first).
`--no-cpu-kernels` (MINICPM_CPU_KERNELS=false) chooses PyTorch's. ATEN_CPU_CAPABILITY=avx2 (which
PyTorch also obeys) keeps the AVX2 build on an AVX-512 CPU.

The library links the same OpenMP runtime PyTorch loaded (libgomp.so.1, found already in the
process), so its threads are PyTorch's threads; each call runs on torch.get_num_threads() of them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from minicpm_server.cache import cache_root
from minicpm_server.model.loading import IN_MAPPING, release_pages

log = logging.getLogger("minicpm_server.engine.native.kernels")

SOURCES = tuple(Path(__file__).with_name(name) for name in ("products.cpp", "attention.cpp"))
HEADERS = (Path(__file__).with_name("vectors.h"),)
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# The builds, best first: instruction-set flags, and the CPU capability PyTorch must report for
# each (which follows ATEN_CPU_CAPABILITY=avx2, say, where that is set).
ISA_FLAGS = {
    "avx512": ("-mavx2", "-mfma", "-DMINICPM_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"),
    "avx2": ("-mavx2", "-mfma"),
}
ISA_CAPABILITIES = {"avx512": {"AVX512"}, "avx2": {"AVX2", "AVX512"}}
# The CPU capabilities PyTorch reports that include AVX2 and FMA.
CAPABLE = ISA_CAPABILITIES["avx2"]
# Inner sizes must be a multiple of this (one AVX2 register of float32; AVX-512 takes a last
# half register).
WIDTH = 8
BUILD_TIMEOUT_S = 300

_enabled = True


class KernelBuildError(RuntimeError):
    """The kernels could not be built or loaded here."""


def use_cpu_kernels(enabled: bool) -> None:
    """Process-wide switch (the server sets it from --cpu-kernels before loading a model)."""
    global _enabled
    _enabled = enabled


def cpu_products() -> CpuProducts | None:
    """The kernels, built and checked once; None where switched off or unavailable (logged once)."""
    return _load() if _enabled else None


def built_products() -> CpuProducts | None:
    """The kernels wherever they build, whatever the switch says: for weights already laid out
    for them (tiled())."""
    return _load()


def kernel_cache_dir() -> Path:
    return cache_root() / "kernels"


def isas_here() -> list[str]:
    """The builds this CPU runs, best first (none without AVX2)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return [isa for isa, capabilities in ISA_CAPABILITIES.items() if capability in capabilities]


@functools.cache
def _load() -> CpuProducts | None:
    """The best build that compiles and agrees with PyTorch here (logged once)."""
    isas = isas_here()
    if not isas:
        log.info(
            "our CPU kernels need AVX2 (this CPU: %s); using PyTorch's products",
            torch.backends.cpu.get_cpu_capability(),
        )
        return None
    for isa in isas:
        products = load_products(isa)
        if products is not None:
            return products
    return None


def load_products(isa: str) -> CpuProducts | None:
    """One build ("avx512" or "avx2"), built unless cached, loaded and checked; None (logged)
    where it fails. cpu_products() keeps the best one for the process."""
    try:
        products = CpuProducts(ctypes.CDLL(str(build(isa))), isa)
        products.check()
    except (KernelBuildError, OSError, AttributeError) as exc:
        log.warning("our %s CPU kernels are unavailable (%s); using PyTorch's products", isa.upper(), exc)
        return None
    log.info("our CPU kernels: the %s build", isa.upper())
    return products


def compiler() -> str:
    found = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not found:
        raise KernelBuildError("no C++ compiler found (install g++, or set CXX)")
    return found


def build(isa: str = "avx2") -> Path:
    """The compiled library for one instruction set, built now unless the cache has it."""
    cxx = compiler()
    flags = (*FLAGS, *ISA_FLAGS[isa])
    source = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    key = hashlib.sha256(source + " ".join((cxx, *flags)).encode()).hexdigest()[:16]
    target = kernel_cache_dir() / f"products-{isa}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:  # two servers building at once: last wins
        built = Path(staging) / target.name
        try:
            run = subprocess.run(
                [cxx, *flags, *map(str, SOURCES), "-o", str(built)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelBuildError(f"{cxx} failed to run: {exc}") from exc
        if run.returncode != 0:
            detail = " ".join(run.stderr.strip().splitlines()[-3:])
            raise KernelBuildError(f"{cxx} exited with {run.returncode}: {detail}")
        os.replace(built, target)
    log.info("built our %s CPU kernels in %.1f s (%s)", isa.upper(), time.perf_counter() - start, target)
    return target


# The tiled layout (products.cpp): 4 outputs, one 64-byte cache line of each in turn.
TILE_OUTPUTS = 4
TILE_BLOCK = {torch.bfloat16: 32, torch.int8: 64}


def can_tile(weight: torch.Tensor) -> bool:
    """Whether a [out, in] weight has a tiled layout (bfloat16 and int8; float32 rows are read
    at the memory's speed already)."""
    block = TILE_BLOCK.get(weight.dtype)
    return (
        block is not None and weight.dim() == 2 and weight.shape[0] % TILE_OUTPUTS == 0 and weight.shape[1] % block == 0
    )


def tiled(weight: torch.Tensor) -> torch.Tensor:
    """A copy of `weight` ([out, in]) in the tiled layout: [out / 4, in / BLOCK, 4, BLOCK]."""
    if not can_tile(weight):
        raise ValueError(f"a {weight.dtype} {tuple(weight.shape)} weight has no tiled layout")
    out_features, in_features = weight.shape
    block = TILE_BLOCK[weight.dtype]
    tiles = weight.view(out_features // TILE_OUTPUTS, TILE_OUTPUTS, in_features // block, block)
    return tiles.transpose(1, 2).contiguous()


def is_tiled(weight: torch.Tensor) -> bool:
    return weight.dim() == 4 and weight.shape[2] == TILE_OUTPUTS and weight.shape[3] == TILE_BLOCK.get(weight.dtype)


def untiled(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] from either layout (a copy from a tiled one: tests, accuracy checks)."""
    if not is_tiled(weight):
        return weight
    tiles, blocks, outputs, block = weight.shape
    return weight.transpose(1, 2).reshape(tiles * outputs, blocks * block)


def matrix_shape(weight: torch.Tensor) -> tuple[int, int]:
    """(out, in) of a weight in either layout."""
    if is_tiled(weight):
        tiles, blocks, outputs, block = weight.shape
        return tiles * outputs, blocks * block
    out_features, in_features = weight.shape
    return out_features, in_features


class CpuProducts:
    """y = x @ W^T (times a scale per output for int8), W as stored: [out, in], row-major."""

    def __init__(self, library: ctypes.CDLL, isa: str = "avx2") -> None:
        self.isa = isa
        pointer, size, count = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        self._f32 = library.minicpm_product_f32
        self._f32.argtypes = [pointer, size, size, pointer, size, pointer, size, count]
        self._bf16 = library.minicpm_product_bf16
        self._bf16.argtypes = [pointer, size, size, pointer, count, size, pointer, size, count]
        self._int8 = library.minicpm_product_int8
        self._int8.argtypes = [pointer, size, size, pointer, count, pointer, size, pointer, size, count]
        self._attention = library.minicpm_decode_attention
        self._attention.argtypes = [pointer, size, size, size, size, pointer, pointer, count, pointer, size, size]
        self._attention.argtypes += [pointer, ctypes.c_float, pointer, count]
        self.attention_max_dim = library.minicpm_attention_max_dim()
        for function in (self._f32, self._bf16, self._int8, self._attention):
            function.restype = None
        blocks = {torch.bfloat16: library.minicpm_tile_block_bf16(), torch.int8: library.minicpm_tile_block_int8()}
        if blocks != TILE_BLOCK:
            raise KernelBuildError(f"the library tiles in blocks of {blocks}, this module expects {TILE_BLOCK}")
        lanes = library.minicpm_lanes()
        if lanes != {"avx512": 16, "avx2": 8}[isa]:
            raise KernelBuildError(f"the {isa} library computes {lanes} lanes at a time")

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        """Whether `weight` is a layout the kernels read: [out, in] rows, or tiled()."""
        if weight.device.type != "cpu" or not weight.is_contiguous():
            return False
        if weight.dim() == 4:
            return is_tiled(weight)
        return (
            weight.dtype in (torch.float32, torch.bfloat16, torch.int8)
            and weight.dim() == 2
            and weight.shape[1] % WIDTH == 0
        )

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [..., out] from x [..., in] (any float dtype); `scales` (float32 [out]) for int8."""
        out_features, in_features = matrix_shape(weight)
        rows = self.rows(x, in_features)
        y = torch.empty((rows.shape[0], out_features), dtype=torch.float32)
        self.linear_into(y, rows, weight, scales)
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
        """x as the kernels read it: float32 [rows, in], contiguous."""
        if x.shape[-1] != in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the weight takes {in_features}")
        return x.reshape(-1, in_features).to(torch.float32).contiguous()

    def linear_into(
        self, y: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None
    ) -> None:
        """y = rows @ W^T, written into `y` ([rows, out] float32, each row contiguous: a column
        slice of a wider tensor will do) from `rows` as rows() gives them."""
        if not self.supports(weight):
            raise ValueError("these weights are not a layout the kernels read")
        out_features, in_features = matrix_shape(weight)
        if y.shape != (rows.shape[0], out_features) or y.dtype != torch.float32 or y.stride(-1) != 1:
            raise ValueError(f"the output must be float32 {rows.shape[0]} x {out_features}, rows contiguous")
        threads, tiled = torch.get_num_threads(), int(weight.dim() == 4)
        x, count, w, out, ldy = rows.data_ptr(), rows.shape[0], weight.data_ptr(), y.data_ptr(), y.stride(0)
        if weight.dtype == torch.int8:
            if scales is None or scales.dtype != torch.float32 or not scales.is_contiguous():
                raise ValueError("int8 weights need contiguous float32 scales")
            self._int8(x, count, in_features, w, tiled, scales.data_ptr(), out_features, out, ldy, threads)
        elif weight.dtype == torch.bfloat16:
            self._bf16(x, count, in_features, w, tiled, out_features, out, ldy, threads)
        else:
            self._f32(x, count, in_features, w, out_features, out, ldy, threads)

    def attention_supports(self, keys: torch.Tensor, head_dim: int) -> bool:
        """Whether decode_attention() reads this pool ([slots, kv_heads, head_dim], contiguous)."""
        return (
            keys.device.type == "cpu"
            and keys.dtype in (torch.float32, torch.bfloat16)
            and keys.is_contiguous()
            and head_dim % WIDTH == 0
            and head_dim <= self.attention_max_dim
        )

    def decode_attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        blocks: torch.Tensor,
        block_size: int,
        visible: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """One decode step's attention, float32 [rows, q_heads, head_dim]: each row's query heads
        `q` ([rows, q_heads, head_dim]) against its first `visible[r]` (>= 1) keys and values in
        the blocks `blocks[r]` ([rows, width] long) names, of one layer's pool ([slots, kv_heads,
        head_dim], float32 or bfloat16); scores times `scale`, a softmax, the values' weighted sum."""
        rows, q_heads, dim = q.shape
        kv_heads = keys.shape[1]
        if (
            not (self.attention_supports(keys, dim) and self.attention_supports(values, dim))
            or values.shape != keys.shape
        ):
            raise ValueError("this KV pool is not a layout the attention kernel reads")
        if q_heads % kv_heads or keys.shape[2] != dim or blocks.shape[0] != rows or visible.shape != (rows,):
            raise ValueError("queries, pool, block tables and lengths do not match")
        q = q.to(torch.float32).contiguous()
        blocks = blocks.to(torch.int64).contiguous()
        visible = visible.to(torch.int64).contiguous()
        out = torch.empty((rows, q_heads, dim), dtype=torch.float32)
        self._attention(
            q.data_ptr(), rows, q_heads, kv_heads, dim, keys.data_ptr(), values.data_ptr(),
            int(keys.dtype == torch.bfloat16), blocks.data_ptr(), blocks.shape[1], block_size,
            visible.data_ptr(), scale, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def check(self) -> None:
        """Compare each kernel with PyTorch's product on odd sizes (every tile and tail shape)."""
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(13, 24, generator=generator)
        scales = torch.rand(13, generator=generator) + 0.5
        for rows in (1, 2, 3, 4, 5, 7):
            x = torch.randn(rows, 24, generator=generator)
            cases = {
                "float32": (weight, None, weight),
                "bfloat16": (weight.bfloat16(), None, weight.bfloat16().float()),
                "int8": (weight.mul(10).round().to(torch.int8), scales, weight.mul(10).round() * scales[:, None]),
            }
            for name, (stored, scale, reference) in cases.items():
                if not torch.allclose(self.linear(x, stored, scale), x @ reference.t(), rtol=1e-4, atol=1e-4):
                    raise KernelBuildError(f"the {name} kernel disagrees with PyTorch's product")
        self._check_attention(generator)
        wide = torch.randn(8, 128, generator=generator)  # the tiled layout: two tiles, two int8 blocks
        x = torch.randn(5, 128, generator=generator)
        for stored, scale in ((wide.bfloat16(), None), (wide.mul(10).round().to(torch.int8), scales[:8])):
            if not torch.equal(self.linear(x, tiled(stored), scale), self.linear(x, stored, scale)):
                raise KernelBuildError(f"the tiled {stored.dtype} kernel disagrees with the one over rows")

    def _check_attention(self, generator: torch.Generator) -> None:
        """decode_attention() against PyTorch's attention on dense copies: 3 rows, grouped heads,
        a head size with a half AVX-512 register, blocks out of order, float32 and bfloat16."""
        block, dim, kv_heads, q_heads = 4, 24, 2, 4
        q = torch.randn(3, q_heads, dim, generator=generator)
        blocks = torch.tensor([[5, 1, 3], [2, 0, 0], [4, 6, 0]])
        visible = torch.tensor([11, 3, 6])
        for dtype in (torch.float32, torch.bfloat16):
            keys = torch.randn(7 * block, kv_heads, dim, generator=generator).to(dtype)
            values = torch.randn(7 * block, kv_heads, dim, generator=generator).to(dtype)
            got = self.decode_attention(q, keys, values, blocks, block, visible, 0.3)
            for r in range(3):
                slots = (blocks[r, :, None] * block + torch.arange(block)).reshape(-1)[: int(visible[r])]
                k, v = (t[slots].float().transpose(0, 1) for t in (keys, values))  # [kv_heads, T, dim]
                expected = torch.nn.functional.scaled_dot_product_attention(
                    q[r].view(kv_heads, q_heads // kv_heads, dim), k, v, scale=0.3
                ).reshape(q_heads, dim)
                if not torch.allclose(got[r], expected, rtol=1e-4, atol=1e-5):
                    raise KernelBuildError(f"the {dtype} attention kernel disagrees with PyTorch's attention")


class KernelLinear(torch.nn.Module):
    """A bias-free linear layer computed by the kernels. `weight` ([out, in], float32 or
    bfloat16) may be the embedding table a head is tied to, or a view into the checkpoint's
    mapping. `pack_now()` (DeferredPacking calls it after start-up, between steps) replaces a
    mapped weight by a copy of our own, and lays bfloat16 weights out in tiles (tiled()) unless
    `tile` is off (a tied table, which the embedding reads by rows)."""

    def __init__(self, weight: torch.Tensor, products: CpuProducts, *, tile: bool = True) -> None:
        super().__init__()
        self.out_features, self.in_features = matrix_shape(weight)
        self.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, False)
        if not products.supports(self.weight):
            raise ValueError("these weights are not a layout the kernels read")
        self.products = products
        self.tile = tile and (is_tiled(weight) or can_tile(weight))
        # DeferredPacking's log line when every layer is done
        self.SETTLED = (
            "copied {} weight matrices into our kernels' tiled layout"
            if self.tile
            else "copied {} weight matrices out of the checkpoint's mapping"
        )

    @property
    def is_packed(self) -> bool:
        """Whether the weight is in memory of our own, in its final layout (named for
        DeferredPacking's protocol)."""
        return not getattr(self.weight, IN_MAPPING, False) and (not self.tile or is_tiled(self.weight))

    def pack_now(self) -> None:
        """Copy the weight out of the file's mapping (tiled, for bfloat16) and let the mapping's
        pages go: our own memory goes on huge pages, which the kernels read 14% faster than the
        page cache's 4 KB pages (BENCHMARKS.md). The parameter stays the same object, so an
        embedding tied to it reads the copy too. Idempotent."""
        if self.is_packed:
            return
        view = self.weight.data
        self.weight.data = tiled(view) if self.tile else view.clone()
        if getattr(self.weight, IN_MAPPING, False):
            delattr(self.weight, IN_MAPPING)
            release_pages(view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.products.linear(x, self.weight.detach()).to(x.dtype)


class KernelProjection:
    """Several KernelLinear layers applied to the same input, outputs side by side (q/k/v,
    gate/up): each product writes its columns of one output, so the weights need not be fused
    into one matrix (a copy), and stay where they are: in the checkpoint's mapping, say."""

    def __init__(self, parts: list[KernelLinear]) -> None:
        self.parts = parts
        self.products = parts[0].products
        self.in_features = parts[0].in_features
        self.out_features = sum(part.out_features for part in parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.products.rows(x, self.in_features)
        y = torch.empty((rows.shape[0], self.out_features), dtype=torch.float32)
        start = 0
        for part in self.parts:
            end = start + part.out_features
            self.products.linear_into(y[:, start:end], rows, part.weight.detach())
            start = end
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


def kernel_projection(
    parent: torch.nn.Module, names: list[str], products: CpuProducts | None, *, tile: bool = True
) -> KernelLinear | KernelProjection | None:
    """The linear layers `parent.<name>` computed by the kernels: each replaced by a KernelLinear
    over its own weight (no copy; transformers' forward, the prefill, then computes with the
    kernels too), and one projection over all of them. Layers an earlier decoder already gave
    the kernels stay as they are. None (nothing changed) without `products`, or where a layer is
    not a plain bias-free nn.Linear the kernels take. `tile`: see KernelLinear."""
    modules = [getattr(parent, name) for name in names]
    if not all(isinstance(m, KernelLinear) for m in modules):
        if products is None or not all(
            type(m) is torch.nn.Linear and m.bias is None and products.supports(m.weight) for m in modules
        ):
            return None
        modules = [KernelLinear(m.weight, products, tile=tile) for m in modules]
        for name, module in zip(names, modules, strict=True):
            setattr(parent, name, module)
    return modules[0] if len(modules) == 1 else KernelProjection(modules)
