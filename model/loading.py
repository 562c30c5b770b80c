"""`load_model`: a published checkpoint into the kit's network, full precision or k-bit."""

from __future__ import annotations

import ctypes
import logging
import os

import torch
from transformers import BitsAndBytesConfig
from transformers.utils import logging as hf_logging

from model.attention import resolve_attn_impl
from model.checkpoint import check_weights, read_config, resolve_checkpoint
from model.modeling import ReplitForCausalLM

# bitsandbytes logs at import, on CPUs with AVX512-BF16, that its optional `kernels` package
# is missing. load_model switches that CPU kernel off (it has no backward), so the advice
# does not apply to the kit: keep it out of the output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`torch.bfloat16` or one of the names in `DTYPES` ("bf16", "fp32", ...) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name_or_path: str | os.PathLike,
    *,
    quantization: str | None = None,
    compute_dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
    attn_impl: str = "auto",
    device: str | torch.device | None = None,
    quant_storage: str | torch.dtype | None = None,
) -> ReplitForCausalLM:
    """Load replit-code-v1-3b (or a checkpoint in its layout) with no remote code.

    quantization: None, "nf4" (4-bit NormalFloat, double quantization) or "int8".
    compute_dtype: dtype of activations and unquantized weights; default bf16 on
        CUDA, fp32 on CPU.
    max_seq_len: raise the context beyond the config's (ALiBi has no weight that
        depends on it).
    attn_impl: "auto" (fastest here), "eager", "sdpa", "flash" or "flex".
    device: default CUDA when available, else CPU.
    quant_storage: dtype the packed 4-bit weights are stored in (default uint8); FSDP
        and DeepSpeed ZeRO-3 need it equal to the compute dtype to shard them.

    On CPU this turns on flush-to-zero for denormal floats and sets glibc's mmap
    threshold to 128 KiB, both process-wide (see below).

    The checkpoint's names and shapes are checked first, so a bad file fails with a
    message naming it; weights then stream tensor by tensor into the target dtype or
    quantization, never holding a second full-precision copy of the model.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if compute_dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = parse_dtype(compute_dtype)
    impl = resolve_attn_impl(attn_impl, device, dtype)
    path = resolve_checkpoint(name_or_path)
    config = read_config(path)
    check_weights(path, config)
    if max_seq_len is not None:
        if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        config.max_seq_len = max_seq_len

    if quantization == "nf4":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=parse_dtype(quant_storage) if quant_storage else torch.uint8,
        )
    elif quantization == "int8":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    elif quantization is None:
        quant = None
    else:
        raise ValueError(f"quantization must be None, 'nf4' or 'int8'; got {quantization!r}")

    # The published config names the remote-code class; the weights are what we check above.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = ReplitForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            quantization_config=quant,
            device_map={"": device},
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if device.type == "cpu":
        # Far-apart tokens' ALiBi weights underflow to denormal floats, which the CPU
        # handles in microcode: SDPA's backward ran 3.4x slower at 2048 tokens (measured).
        # Flushing them to zero changes no result beyond 1e-38; the mode is process-wide.
        torch.set_flush_denormal(True)
        _return_freed_memory()
    if quantization == "nf4" and device.type == "cpu":
        _keep_4bit_differentiable(model)
    model.attn_impl = impl
    return model.eval()


def _keep_4bit_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, the first no-grad forward in eval mode (an evaluation
    pass) repacks each `Linear4bit` into a kernel with no backward; gradients then
    silently stop flowing through every base layer, so LoRA trains on wrong
    gradients for the rest of the run. Turning the repacking off avoids it.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024


def _return_freed_memory() -> None:
    """Let freed activation buffers go back to the OS at once (glibc only; else a no-op).

    glibc serves a large allocation with mmap and returns it on free, but after the
    first such free it raises its threshold (up to 32 MiB) and keeps later buffers in
    its heap. A CPU training step frees hundreds of MB of activations and logits per
    layer, so RSS stayed about 0.45 GB above live memory at 2048 tokens (measured,
    bench/train.py). Fixing the threshold at glibc's initial 128 KiB keeps RSS at live
    memory. The price is page faults on fresh buffers: the QLoRA step's time did not
    change; a full-weight fp32 step took 7% longer at 2048 tokens and no longer at 4096,
    for 1.1 and 1.0 GB less step memory (bench/allocator.py).
    A threshold the user set for glibc (MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES) wins.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
