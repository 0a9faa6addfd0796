"""Our own matrix products for the native engine on x86-64 CPUs with AVX2 (products.cpp).

Why: a decode step is nearly all matrix products over a few rows, so at one client it runs at
the speed the weights stream from memory. On the 2-core AVX2 benchmark machine (AMD EPYC,
Zen 3), at MiniCPM-2B's shapes, per decoder layer (BENCHMARKS.md, "Our own CPU kernels"):

* float32 at one row: 11.1 ms (22 GB/s) against oneDNN's packed product's 19.3 and MKL's 20.8;
  llama.cpp's F32 decode reads its weights at about 16 GB/s on the same machine;
* float32 at 16 rows: 26-29 ms against packed's 35.5; at 64-128 rows level with it, and at 512
  rows (long prompts) 0.7x of it;
* bfloat16 weights (widened to float32 in registers): 6.9 ms at one row, where PyTorch has no
  fast bfloat16 product on AVX2 at all (oneDNN packs bfloat16 only with AVX512-BF16 or AMX);
* int8 weights with a float32 scale per output: 5.0 ms at one row against PyTorch's
  `_weight_int8pack_mm`'s 5.8, 19 ms at 16 rows against its 30.

They read weights as checkpoints store them ([out, in], row-major), so nothing is re-laid out
or copied: loading is a plain copy, and MiniCPM's output head reads the embedding table it is
tied to, with no 1.1 GB packed copy (packed.py). Each output is summed by one thread in one
order, so a row's result does not depend on the other rows in the batch.

The source is compiled once, on first use, with the system's C++ compiler (`CXX`, else g++ or
c++; -O3 -mavx2 -mfma -fopenmp, about 2 s) into the cache directory, named by a hash of the
source and flags. No compiler, a CPU without AVX2, a failed build, or a result that differs
from PyTorch's product: the engine says why once and uses PyTorch's products (packed.py) as
before. `--no-cpu-kernels` (MINICPM_CPU_KERNELS=false) chooses those.

The library links the same OpenMP runtime PyTorch loaded (libgomp.so.1, found already in the
process), so its threads are PyTorch's threads and follow torch.set_num_threads.
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

log = logging.getLogger("minicpm_server.engine.native.kernels")

SOURCE = Path(__file__).with_name("products.cpp")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# The CPU capabilities PyTorch reports that include AVX2 and FMA.
CAPABLE = {"AVX2", "AVX512"}
# Inner sizes must be a multiple of this (one AVX2 register of float32).
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


def kernel_cache_dir() -> Path:
    from minicpm_server.model.tiny import demo_cache_dir  # the project's cache root

    return demo_cache_dir() / "kernels"


@functools.cache
def _load() -> CpuProducts | None:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in CAPABLE:
        log.info("our CPU kernels need AVX2 (this CPU: %s); using PyTorch's products", capability)
        return None
    try:
        products = CpuProducts(ctypes.CDLL(str(build())))
        products.check()
    except (KernelBuildError, OSError, AttributeError) as exc:
        log.warning("our CPU kernels are unavailable (%s); using PyTorch's products", exc)
        return None
    return products


def compiler() -> str:
    found = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not found:
        raise KernelBuildError("no C++ compiler found (install g++, or set CXX)")
    return found


def build() -> Path:
    """The compiled library, built now unless the cache has it."""
    cxx = compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((cxx, *FLAGS)).encode()).hexdigest()[:16]
    target = kernel_cache_dir() / f"products-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:  # two servers building at once: last wins
        built = Path(staging) / target.name
        try:
            run = subprocess.run(
                [cxx, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelBuildError(f"{cxx} failed to run: {exc}") from exc
        if run.returncode != 0:
            detail = " ".join(run.stderr.strip().splitlines()[-3:])
            raise KernelBuildError(f"{cxx} exited with {run.returncode}: {detail}")
        os.replace(built, target)
    log.info("built our CPU kernels in %.1f s (%s)", time.perf_counter() - start, target)
    return target


class CpuProducts:
    """y = x @ W^T (times a scale per output for int8), W as stored: [out, in], row-major."""

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, size = ctypes.c_void_p, ctypes.c_long
        self._by_dtype = {
            torch.float32: library.minicpm_product_f32,
            torch.bfloat16: library.minicpm_product_bf16,
        }
        for function in self._by_dtype.values():
            function.argtypes = [pointer, size, size, pointer, size, pointer]
            function.restype = None
        self._int8 = library.minicpm_product_int8
        self._int8.argtypes = [pointer, size, size, pointer, pointer, size, pointer]
        self._int8.restype = None

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        return (
            weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16, torch.int8)
            and weight.dim() == 2
            and weight.is_contiguous()
            and weight.shape[1] % WIDTH == 0
        )

    def linear(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [..., out] from x [..., in] (any float dtype); `scales` (float32 [out]) for int8."""
        out_features, in_features = weight.shape
        if x.shape[-1] != in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the weight takes {in_features}")
        rows = x.reshape(-1, in_features).to(torch.float32).contiguous()
        y = torch.empty((rows.shape[0], out_features), dtype=torch.float32)
        if weight.dtype == torch.int8:
            if scales is None or scales.dtype != torch.float32 or not scales.is_contiguous():
                raise ValueError("int8 weights need contiguous float32 scales")
            self._int8(
                rows.data_ptr(), rows.shape[0], in_features, weight.data_ptr(), scales.data_ptr(), out_features,
                y.data_ptr(),
            )  # fmt: skip
        else:
            self._by_dtype[weight.dtype](
                rows.data_ptr(), rows.shape[0], in_features, weight.data_ptr(), out_features, y.data_ptr()
            )
        return y.view(*x.shape[:-1], out_features)

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


class KernelLinear(torch.nn.Module):
    """A bias-free linear layer computed by the kernels; `weight` ([out, in], float32 or
    bfloat16) may be a view into a fused matrix or the embedding table a head is tied to."""

    def __init__(self, weight: torch.Tensor, products: CpuProducts) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, False)
        self.products = products

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.products.linear(x, self.weight.detach()).to(x.dtype)


def kernel_projection(parent: torch.nn.Module, names: list[str], products: CpuProducts | None) -> KernelLinear | None:
    """The linear layers `parent.<name>` as one KernelLinear over their fused weights ([out, in],
    outputs side by side), each layer replaced by a KernelLinear over its rows of it, so no
    weight is held twice and transformers' forward (prefill) computes with the kernels too.
    Layers an earlier decoder already gave the kernels stay as they are. None (nothing changed)
    without `products`, or where a layer is not a plain bias-free nn.Linear the kernels take."""
    modules = [getattr(parent, name) for name in names]
    if all(isinstance(m, KernelLinear) for m in modules):
        return modules[0] if len(modules) == 1 else KernelLinear(_adjacent(modules), modules[0].products)
    if products is None or not all(
        type(m) is torch.nn.Linear and m.bias is None and products.supports(m.weight) for m in modules
    ):
        return None
    weights = [m.weight.detach() for m in modules]
    fused = weights[0] if len(weights) == 1 else torch.cat(weights)
    start = 0
    for name, module in zip(names, modules, strict=True):
        rows = module.out_features
        setattr(parent, name, KernelLinear(fused[start : start + rows], products))
        start += rows
    return getattr(parent, names[0]) if len(names) == 1 else KernelLinear(fused, products)


def _adjacent(parts: list[KernelLinear]) -> torch.Tensor:
    """The fused matrix whose consecutive row blocks are the parts' weights (kernel_projection
    made them so)."""
    first = parts[0].weight.detach()
    address = first.data_ptr()
    for part in parts:
        if part.weight.data_ptr() != address or not part.weight.is_contiguous():
            raise ValueError("these layers' weights are not consecutive rows of one matrix")
        address += part.weight.numel() * part.weight.element_size()
    rows = sum(part.out_features for part in parts)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))
