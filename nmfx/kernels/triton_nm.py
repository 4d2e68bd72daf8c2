"""Triton kernels for ``nmfx::nm_linear`` on GPUs (and on CPU tensors under ``TRITON_INTERPRET=1``).

``nm_linear_triton(x, values, indices, bias, n, m, index_bits)`` computes ``x @ W.T + bias`` for a weight
in nmfx's packed N:M format (:class:`nmfx.packed.PackedNMWeight`), with exactly the arguments and
semantics of :func:`nmfx.inference_ops.nm_linear_reference`: any ``N:M`` with ``M <= 32``, float32 /
float16 / bfloat16, ``x`` of shape ``[..., in]``, optional bias, fp32 accumulation, result in x's dtype.

Two kernels, picked by the number of rows ``B`` of the flattened ``x``:

* **decode / GEMV** (``B <= 16``, :func:`_nm_gemv_kernel`): grid ``(cdiv(out, BLOCK_O), split_k,
  cdiv(B, BLOCK_B))``. A program owns ``BLOCK_O`` output rows and a range of kept values; per step it
  loads a ``[BLOCK_O, BLOCK_K]`` tile of ``values`` (contiguous along K) and the matching index bits,
  decodes every kept value's dense column ``(k // N) * M + pos``, gathers ``x[b, col]`` for all
  ``BLOCK_B`` (power of two >= B, <= 16) batch rows at once (a ``[BLOCK_B, BLOCK_O, BLOCK_K]`` tile; x is
  small and stays in L1/L2) and accumulates ``sum_k x * v`` in fp32. Each weight byte is read exactly
  once per call, which is the bound at batch 1-16. When there are too few row blocks to fill the GPU
  (``out`` small, K long) K is split: each split writes an fp32 partial ``[split, B, out]`` (no atomics,
  so results are deterministic and autotuning may re-run the kernel), and torch sums the partials and
  adds the bias; with one split the bias add and the cast are fused into the kernel's store.
* **prefill / tiled** (``B > 16``, :func:`_nm_tiled_kernel`): a GEMM tile ``[BLOCK_T, BLOCK_O]`` with a
  grouped (L2-friendly) program order. Per step of ``BLOCK_IN`` dense input columns (``G = BLOCK_IN /
  MP`` groups, ``MP`` = M rounded up to a power of two) it decodes the sparse weight tile into a dense
  ``[BLOCK_O, G, MP]`` register tile, ``where(pos == j, value, tile)`` over the N kept values of each
  group (exact: no arithmetic, a kept position appears once per group), reshapes it to ``[BLOCK_O,
  BLOCK_IN]`` and feeds ``tl.dot`` (tensor cores for fp16/bf16, IEEE fp32 for fp32) with the matching
  ``[BLOCK_T, BLOCK_IN]`` tile of x. This does the dense FLOPs (prefill is compute-bound, so sparsity
  saves weight bytes and memory, not FLOPs, here); the decode is redone for every T tile.

Both kernels are ``triton.autotune``d on CUDA, keyed by (batch bucket, out, in, K, N, M); the configs
are the ``_GEMV_CONFIGS`` / ``_TILED_CONFIGS`` lists below, and register-hungry ones are pruned per batch
bucket (every remaining config was compiled offline for sm_90 with :func:`compile_offline` and checked
with cuobjdump: no GEMV config spills; a few tiled ones spill <= 200 B). Under the interpreter one small
fixed config is used (autotuning there would only be slow). Speed is unmeasured on a GPU so far; see
``benchmarks/bench_gpu.py``.

Bounds: every load is masked to its tensor (``col < in_features`` for x). Positions are not checked
against ``M`` on the host (that would cost a device sync per call; ``nmfx.load`` checks them once):
a stored position ``>= M`` contributes nothing in either kernel (GEMV masks it; the tiled kernel's
``pos == j`` decode never places it in a real column), where the C++ kernel and the reference raise.

Index layout: **the kernels read the stored bit-packed ``indices`` directly** (``index_bits = b =
ceil(log2 M)``): kept value ``k``'s position lives at stream bits ``[k*b, (k+1)*b)``; the kernel loads
byte ``(k*b) >> 3`` (and, when ``b`` does not divide 8, i.e. b = 3 or 5, the next byte, which the
same warp already has in L1), forms a 16-bit word and shifts/masks. The byte-per-position layout
(``index_bits = 8``, :meth:`PackedNMWeight.positions`) is accepted too (one byte load). Why bit-packed:
at batch 1 the kernel is bound by weight bytes, ``2 B`` per kept fp16 value plus ``b/8 B`` of index
(plus the tiny x): per kept value 1:8 reads 2.375 B bit-packed vs 3 B byte-per-position (the dense fp16
weight costs 16 B for the same 8 inputs: 6.7x vs 5.3x fewer bytes); 1:16 2.5 vs 3 B (12.8x vs 10.7x
vs dense); 1:32 2.625 vs 3 B (24.4x vs 21.3x); 2:4 2.25 vs 3 B per kept (1.78x vs 1.33x). The
bit-packed read costs a few integer ops per kept value, which are free in a memory-bound kernel, and
no second copy of the indices is needed on the device.

Interpreter: ``TRITON_INTERPRET`` is read by Triton when a function is *decorated*, and Triton's own
standard library (``tl.zeros``, ``tl.sum``, ``tl.cdiv``, ...) is decorated when ``triton.language`` is
first imported. So the interpreter works only if ``TRITON_INTERPRET=1`` is in the environment before
the process first imports triton (torch may import it too); setting it later is detected and refused
with that explanation (:func:`unavailable_reason`) instead of failing inside the kernel. This module
decorates its own kernels lazily, once per mode, reading the mode at each call, so importing nmfx
never fixes the mode. The tests run the interpreter cases in a subprocess for that reason.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import torch

from nmfx.kernels.nm_linear_args import check_nm_linear_args

try:  # ``tl`` is needed at module level: the kernel bodies below reference it as a global.
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["available", "unavailable_reason", "nm_linear_triton", "interpreting", "GEMV_MAX_BATCH"]

#: Flattened batch sizes up to this use the GEMV (decode) kernel; larger ones the tiled (prefill) kernel.
GEMV_MAX_BATCH = 16


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter now (``TRITON_INTERPRET=1``)."""
    if triton is not None:
        try:
            return bool(triton.knobs.runtime.interpret)
        except AttributeError:  # older triton without knobs
            pass
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _stdlib_interpreted() -> bool:
    """Whether triton.language's own jit functions were decorated for the interpreter (at its import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(tl.zeros, InterpretedFunction)
    except Exception:  # pragma: no cover - layout of another triton version
        return interpreting()


def available() -> bool:
    """Triton importable and either CUDA available or the interpreter on (``TRITON_INTERPRET=1``, set
    before triton was imported; see the module docstring)."""
    if triton is None:
        return False
    if interpreting():
        return _stdlib_interpreted()
    return torch.cuda.is_available() and not _stdlib_interpreted()


def unavailable_reason(*tensors: torch.Tensor) -> Optional[str]:
    """None when the kernels can run on these tensors now, else a sentence saying why not."""
    if triton is None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if interpreting():
        if not _stdlib_interpreted():
            return (
                "TRITON_INTERPRET=1 was set after triton was imported, and Triton decorates its standard "
                "library (tl.zeros, tl.sum, ...) at import: set TRITON_INTERPRET=1 in the environment before "
                "the process first imports triton (or torch.compile / inductor imports it)"
            )
        return None
    if _stdlib_interpreted():
        return "triton was imported with TRITON_INTERPRET=1 but it is unset now: compiled kernels cannot run in this process"
    if not torch.cuda.is_available():
        return "CUDA is not available (to run the Triton kernels on CPU tensors, start the process with TRITON_INTERPRET=1)"
    devices = {t.device for t in tensors if t is not None}
    if any(d.type != "cuda" for d in devices) or len(devices) > 1:
        return f"the Triton kernels need all tensors on one CUDA device, got {sorted(map(str, devices))}"
    return None


# --------------------------------------------------------------------------------------------------
# Kernels: plain functions, decorated lazily (see the module docstring). Keep them free of calls to
# other user functions: a callee would have to be decorated in the same mode.
# --------------------------------------------------------------------------------------------------
def _nm_gemv_kernel(
    x_ptr, v_ptr, idx_ptr, bias_ptr, y_ptr,
    B, OUT, IN, K, IDX_ROW, K_PER_SPLIT,
    N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_mask = offs_o < OUT
    b_mask = offs_b < B
    rows = offs_o.to(tl.int64)
    v_rows = v_ptr + rows[:, None] * K
    i_rows = idx_ptr + rows[:, None] * IDX_ROW
    x_rows = x_ptr + offs_b.to(tl.int64)[:, None, None] * IN
    acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_hi
        mask = o_mask[:, None] & k_ok[None, :]
        v = tl.load(v_rows + kk[None, :], mask=mask, other=0.0).to(tl.float32)
        if BITS == 8:  # byte-per-position layout
            pos = tl.load(i_rows + kk[None, :], mask=mask, other=0).to(tl.int32)
        else:  # bit-packed, LSB first; b in {3, 5} may straddle a byte boundary
            bit = kk * BITS
            byte = bit >> 3
            word = tl.load(i_rows + byte[None, :], mask=mask, other=0).to(tl.int32)
            if (8 % BITS) != 0:
                hi_ok = mask & ((byte + 1) < IDX_ROW)[None, :]
                word = word | (tl.load(i_rows + byte[None, :] + 1, mask=hi_ok, other=0).to(tl.int32) << 8)
            pos = (word >> (bit & 7)[None, :]) & ((1 << BITS) - 1)
        col = (kk // N * M)[None, :] + pos
        # A stored position >= M (corrupted indices) is never read: it contributes nothing.
        x_ok = mask & (pos < M) & (col < IN)
        xg = tl.load(x_rows + col[None, :, :], mask=b_mask[:, None, None] & x_ok[None, :, :], other=0.0)
        acc += tl.sum(xg.to(tl.float32) * v[None, :, :], axis=2)
    out_mask = b_mask[:, None] & o_mask[None, :]
    if PARTIAL:  # fp32 [split, B, OUT]; the host sums the splits and adds the bias
        base = y_ptr + pid_k.to(tl.int64) * B * OUT
        tl.store(base + offs_b.to(tl.int64)[:, None] * OUT + offs_o[None, :], acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
        y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_b.to(tl.int64)[:, None] * OUT + offs_o[None, :], y, mask=out_mask)


def _nm_tiled_kernel(
    x_ptr, v_ptr, idx_ptr, bias_ptr, y_ptr,
    T, OUT, IN, K, IDX_ROW, T_BUCKET,
    N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_IN: tl.constexpr, GROUP_T: tl.constexpr,
):
    # Grouped program order (as in Triton's matmul tutorial): GROUP_T row blocks of x share weight tiles in L2.
    pid = tl.program_id(0)
    num_t = tl.cdiv(T, BLOCK_T)
    num_o = tl.cdiv(OUT, BLOCK_O)
    span = GROUP_T * num_o
    first_t = (pid // span) * GROUP_T
    group = tl.minimum(num_t - first_t, GROUP_T)
    pid_t = first_t + (pid % span) % group
    pid_o = (pid % span) // group

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    t_mask = offs_t < T
    o_mask = offs_o < OUT
    rows = offs_o.to(tl.int64)
    v_rows = v_ptr + rows[:, None] * K
    i_rows = idx_ptr + rows[:, None] * IDX_ROW
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * IN

    G: tl.constexpr = BLOCK_IN // MP  # groups per step
    NG = IN // M
    g_loc = tl.arange(0, G)
    jj = tl.arange(0, MP)
    cols = tl.arange(0, BLOCK_IN)
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for g0 in range(0, NG, G):
        g = g0 + g_loc
        w_mask = o_mask[:, None] & (g < NG)[None, :]
        dense = tl.zeros((BLOCK_O, G, MP), dtype=v_ptr.dtype.element_ty)
        for n in tl.static_range(N):
            kk = g * N + n
            v = tl.load(v_rows + kk[None, :], mask=w_mask, other=0.0)
            if BITS == 8:
                pos = tl.load(i_rows + kk[None, :], mask=w_mask, other=0).to(tl.int32)
            else:
                bit = kk * BITS
                byte = bit >> 3
                word = tl.load(i_rows + byte[None, :], mask=w_mask, other=0).to(tl.int32)
                if (8 % BITS) != 0:
                    hi_ok = w_mask & ((byte + 1) < IDX_ROW)[None, :]
                    word = word | (tl.load(i_rows + byte[None, :] + 1, mask=hi_ok, other=0).to(tl.int32) << 8)
                pos = (word >> (bit & 7)[None, :]) & ((1 << BITS) - 1)
            dense = tl.where(pos[:, :, None] == jj[None, None, :], v[:, :, None], dense)
        w = tl.reshape(dense, (BLOCK_O, BLOCK_IN))
        if MP == M:  # contiguous dense columns
            col = g0 * M + cols
            x_mask = t_mask[:, None] & (col < IN)[None, :]
        else:  # padded groups: column j >= M of a group does not exist
            gi = g0 + cols // MP
            jm = cols % MP
            col = gi * M + jm
            x_mask = t_mask[:, None] & ((gi < NG) & (jm < M))[None, :]
        xt = tl.load(x_rows + col[None, :], mask=x_mask, other=0.0)
        if DOT_F32:  # fp32 inputs (IEEE, not TF32), or bf16 under the interpreter (its dot can't do bf16)
            acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    out_ptrs = y_ptr + offs_t.to(tl.int64)[:, None] * OUT + offs_o[None, :]
    tl.store(out_ptrs, y, mask=t_mask[:, None] & o_mask[None, :])


# --------------------------------------------------------------------------------------------------
# Configs and lazy decoration
# --------------------------------------------------------------------------------------------------
def _cfg(num_warps: int, num_stages: int, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


def _gemv_configs():
    # (BLOCK_O, BLOCK_K, warps): long K tiles keep a row's values streaming in 256-1024 B bursts; the
    # small tiles with 8 warps are for BLOCK_B = 8..16, where the gather tile is BLOCK_B x BLOCK_O x BLOCK_K.
    shapes = [(1, 512, 4), (2, 512, 4), (4, 256, 4), (4, 512, 4), (8, 128, 4), (8, 256, 4), (16, 64, 4),
              (8, 512, 8), (1, 256, 4), (2, 256, 4), (8, 64, 4), (4, 256, 8), (8, 128, 8), (16, 64, 8)]
    return [_cfg(w, 2, BLOCK_O=o, BLOCK_K=k) for (o, k, w) in shapes]


def _tiled_configs():
    # Checked offline for sm_90 (fp16; 2:4, 1:8, 3:8, 1:32) with cuobjdump: none of these spills more than
    # a few dozen bytes; the 4-warp 128x64 / 64x128 tiles (255 registers + ~700 B of stack) were dropped.
    shapes = [  # (BLOCK_T, BLOCK_O, BLOCK_IN, warps, stages)
        (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3),
        (128, 64, 32, 4, 3), (64, 64, 32, 4, 4), (64, 64, 64, 4, 3), (32, 64, 64, 4, 3), (16, 64, 64, 4, 3),
    ]
    return [_cfg(w, s, BLOCK_T=t, BLOCK_O=o, BLOCK_IN=i, GROUP_T=8) for (t, o, i, w, s) in shapes]


def _arg(named, kwargs, name):
    return named[name] if name in named else kwargs[name]


def _gemv_tile_fits(bb: int, c) -> bool:
    """The [BLOCK_B, BLOCK_O, BLOCK_K] gather tile at <= 64 fp32 per thread (BLOCK_B=16 with 1x512 on 4
    warps compiles to 160 registers for sm_90, no spills), and at least 1 row x 64 values per thread."""
    elems = bb * c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_K"]
    return elems <= 64 * 32 * c.num_warps and c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_K"] >= 64 * c.num_warps


def _prune_gemv(configs, named_args, **kwargs):
    bb = _arg(named_args, kwargs, "BLOCK_B")
    kept = [c for c in configs if _gemv_tile_fits(bb, c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_K"])]


def _prune_tiled(configs, named_args, **kwargs):
    mp = _arg(named_args, kwargs, "MP")
    t_bucket = _arg(named_args, kwargs, "T_BUCKET")
    kept = [c for c in configs if c.kwargs["BLOCK_IN"] >= mp and c.kwargs["BLOCK_T"] <= max(16, t_bucket)]
    return kept or [c for c in configs if c.kwargs["BLOCK_IN"] >= mp][-1:]


def _do_bench(fn, quantiles=None):
    """Autotuning timer: shorter than Triton's default (25 ms warm-up, 100 ms) so a new key costs well
    under a second per config; the split-K partial buffer makes every run idempotent."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_lock = threading.Lock()
_kernels: dict = {}


def _kernel(name: str, interpret: bool):
    key = (name, interpret)
    fn = _kernels.get(key)
    if fn is None:
        with _lock:
            fn = _kernels.get(key)
            if fn is None:
                raw = {"gemv": _nm_gemv_kernel, "tiled": _nm_tiled_kernel}[name]
                fn = triton.jit(raw)  # an InterpretedFunction while TRITON_INTERPRET=1, else a JITFunction
                if not interpret:
                    if name == "gemv":
                        fn = triton.autotune(
                            _gemv_configs(), key=["BLOCK_B", "OUT", "IN", "K", "N", "M"],
                            prune_configs_by={"early_config_prune": _prune_gemv}, do_bench=_do_bench,
                        )(fn)
                    else:
                        fn = triton.autotune(
                            _tiled_configs(), key=["T_BUCKET", "OUT", "IN", "K", "N", "M"],
                            prune_configs_by={"early_config_prune": _prune_tiled}, do_bench=_do_bench,
                        )(fn)
                _kernels[key] = fn
    return fn


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_k(out: int, k: int, device: torch.device) -> int:
    """K splits for the GEMV kernel: enough programs for ~2 waves when out is small, >= 1024 kept per split."""
    row_blocks = triton.cdiv(out, 8)
    want = triton.cdiv(2 * _sm_count(device), row_blocks)
    return int(max(1, min(want, k // 1024, 32)))


def compile_offline(path: str, dtype: str, n: int, m: int, bits: int, config: dict, *, num_warps: int = 4,
                    num_stages: int = 3, arch: int = 90, partial: bool = False):
    """Compile one kernel variant for ``sm_<arch>`` without a GPU (Triton's bundled ptxas); returns the
    ``CompiledKernel`` (``.asm["cubin"]``, ``.asm["ptx"]``). Catches what the interpreter cannot: type
    and layout errors of the real compiler. ``dtype``: ``"fp16" | "bf16" | "fp32"``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mp = _next_pow2(m)
    if path == "gemv":
        fn = triton.jit(_nm_gemv_kernel)
        ints = ["B", "OUT", "IN", "K", "IDX_ROW", "K_PER_SPLIT"]
        const = dict(N=n, M=m, BITS=bits, HAS_BIAS=True, PARTIAL=partial, BLOCK_B=1, **config)
        out_ty = "*fp32" if partial else "*" + dtype
    else:
        fn = triton.jit(_nm_tiled_kernel)
        ints = ["T", "OUT", "IN", "K", "IDX_ROW", "T_BUCKET"]
        const = dict(N=n, M=m, MP=mp, BITS=bits, HAS_BIAS=True, DOT_F32=dtype == "fp32", **{"GROUP_T": 8, **config})
        out_ty = "*" + dtype
    sig = {"x_ptr": "*" + dtype, "v_ptr": "*" + dtype, "idx_ptr": "*u8", "bias_ptr": "*" + dtype, "y_ptr": out_ty}
    sig.update({name: "i32" for name in ints})
    sig.update({name: "constexpr" for name in const})
    return triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


# --------------------------------------------------------------------------------------------------
# Host entry point
# --------------------------------------------------------------------------------------------------
def nm_linear_triton(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: Optional[torch.Tensor], n: int, m: int,
    index_bits: int, *,
    path: Optional[str] = None,
    config: Optional[dict] = None,
    split_k: Optional[int] = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with the Triton kernels; same arguments and result as ``nm_linear_reference``.

    ``path``: ``None`` picks by the flattened batch (``<= GEMV_MAX_BATCH`` -> ``"gemv"``, else
    ``"tiled"``); tests may force either. ``config`` (a dict of the kernel's block sizes, e.g.
    ``{"BLOCK_O": 16, "BLOCK_K": 32}``) bypasses autotuning; ``split_k`` forces the GEMV K split.
    Raises ``RuntimeError`` when the kernels cannot run here (see :func:`unavailable_reason`).
    """
    out, k, inp = check_nm_linear_args(x, values, indices, bias, n, m, index_bits)
    why = unavailable_reason(x, values, indices, bias)
    if why is not None:
        raise RuntimeError(f"nm_linear_triton: {why}")
    if path not in (None, "gemv", "tiled"):
        raise ValueError(f"nm_linear_triton: path must be None, 'gemv' or 'tiled', got {path!r}")
    interpret = interpreting()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, inp).contiguous()
    rows = x2.shape[0]
    if rows == 0 or out == 0:
        return x.new_zeros((*lead, out))
    values = values.contiguous()
    indices = indices.contiguous()
    bias_arg = bias.contiguous() if bias is not None else values  # dummy pointer when HAS_BIAS is False
    idx_row = indices.shape[1]
    bits = int(index_bits)
    path = path or ("gemv" if rows <= GEMV_MAX_BATCH else "tiled")
    device_ctx = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()

    with device_ctx:
        if path == "gemv":
            block_b = min(_next_pow2(rows), GEMV_MAX_BATCH)
            splits = int(split_k) if split_k else (1 if interpret else _split_k(out, k, x.device))
            k_per_split = triton.cdiv(triton.cdiv(k, splits), 512) * 512 if splits > 1 else k
            splits = triton.cdiv(k, k_per_split)
            partial = splits > 1
            y = torch.empty((splits, rows, out) if partial else (rows, out), device=x.device,
                            dtype=torch.float32 if partial else x.dtype)
            meta = dict(N=n, M=m, BITS=bits, HAS_BIAS=bias is not None, PARTIAL=partial, BLOCK_B=block_b)
            kern = _kernel("gemv", interpret)
            if config is None and interpret:
                config = {"BLOCK_O": 16, "BLOCK_K": 32}
            if config is not None:
                fn = kern.fn if hasattr(kern, "configs") else kern
                grid = (triton.cdiv(out, config["BLOCK_O"]), splits, triton.cdiv(rows, block_b))
                fn[grid](x2, values, indices, bias_arg, y, rows, out, inp, k, idx_row, k_per_split, **meta, **config)
            else:
                grid = lambda meta_: (triton.cdiv(out, meta_["BLOCK_O"]), splits, triton.cdiv(rows, block_b))  # noqa: E731
                kern[grid](x2, values, indices, bias_arg, y, rows, out, inp, k, idx_row, k_per_split, **meta)
            if partial:
                y = y.sum(0)
                if bias is not None:
                    y += bias.float()
                y = y.to(x.dtype)
        else:
            mp = _next_pow2(m)
            y = torch.empty((rows, out), device=x.device, dtype=x.dtype)
            t_bucket = min(_next_pow2(rows), 4096)
            meta = dict(N=n, M=m, MP=mp, BITS=bits, HAS_BIAS=bias is not None, 
                        DOT_F32=x.dtype == torch.float32 or (interpret and x.dtype == torch.bfloat16))
            kern = _kernel("tiled", interpret)
            if config is None and interpret:
                config = {"BLOCK_T": 16, "BLOCK_O": 16, "BLOCK_IN": max(32, mp), "GROUP_T": 4}
            if config is not None:
                config = {"GROUP_T": 8, **config}
                fn = kern.fn if hasattr(kern, "configs") else kern
                grid = (triton.cdiv(rows, config["BLOCK_T"]) * triton.cdiv(out, config["BLOCK_O"]),)
                fn[grid](x2, values, indices, bias_arg, y, rows, out, inp, k, idx_row, t_bucket, **meta, **config)
            else:
                grid = lambda meta_: (triton.cdiv(rows, meta_["BLOCK_T"]) * triton.cdiv(out, meta_["BLOCK_O"]),)  # noqa: E731
                kern[grid](x2, values, indices, bias_arg, y, rows, out, inp, k, idx_row, t_bucket, **meta)
    return y.reshape(*lead, out)

