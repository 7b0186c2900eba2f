"""Runtime module swap for quantised engines: `QuantLinear` holds a Linear's weight as the
checkpoint stores it (block FP8 or packed group INT4) and computes with the quantised GEMMs.

Quantisation has two verbs (gpt-fast): `formats.py` quantises a state dict offline; this module
swaps modules at runtime. A `QuantLinear` keeps the checkpoint's tensor names as buffers
(`weight` + `weight_scale_inv`, or `weight_packed` + `weight_scale` + `weight_shape`), so a
quantised checkpoint loads into it name for name and weight sync can write the same names.

Forward. On CUDA in `fast` alignment mode it calls the Triton kernels (`kernels/quant_gemm.py`:
FP8 W8A8 with per-token-group activation scales, INT4 W4A16). Everywhere else (CPU, or the
`invariant` mode, whose point is bitwise agreement with the trainer) it dequantises the weight to
the activations' dtype, exactly as dequantise-on-load does, and calls the model's linear kernel:
the result then equals the dense dequantised model's bit for bit, while memory holds only the
quantised weight. Note the FP8 kernel also quantises activations, so on CUDA in `fast` mode the
FP8 engine differs from the dequantised model by that rounding (as SGLang's and vLLM's do).

`dense_copy` turns a swapped model back into plain `Linear`s (the trainer's copy).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from miles_core.errors import MilesError
from miles_core.kernels import FAST_OPS, Ops, quant_gemm
from miles_core.models.layers import Linear
from miles_core.quant.fp8 import BLOCK_SIZE, FP8_DTYPE, dequantize_fp8_block
from miles_core.quant.formats import COMPANION_SUFFIXES, QuantSpec, is_quantized_weight, quantize_tensor
from miles_core.quant.int4 import PER_WORD, dequantize_int4, unpack_int4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class QuantLinear(nn.Module):
    """A `Linear` whose weight is stored quantised (`fmt` "fp8" or "int4"); buffers are
    allocated empty with the checkpoint's shapes and filled by loading or `load_dense`."""

    ops: Ops = FAST_OPS

    def __init__(self, fmt: str, in_features: int, out_features: int, *, group_size: int = 128,
                 bias: torch.Tensor | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fmt, self.in_features, self.out_features, self.group_size = fmt, in_features, out_features, group_size
        self.dense_dtype = dtype
        N, K = out_features, in_features
        if fmt == "fp8":
            self.register_buffer("weight", torch.empty(N, K, dtype=FP8_DTYPE, device=device))
            self.register_buffer("weight_scale_inv", torch.empty(_cdiv(N, BLOCK_SIZE), _cdiv(K, BLOCK_SIZE), device=device))
        elif fmt == "int4":
            self.register_buffer("weight_packed", torch.empty(N, K // PER_WORD, dtype=torch.int32, device=device))
            self.register_buffer("weight_scale", torch.empty(N, K // group_size, dtype=dtype, device=device))
            self.register_buffer("weight_shape", torch.tensor([N, K], dtype=torch.int64, device=device))
        else:
            raise ValueError(f"QuantLinear format must be 'fp8' or 'int4', got {fmt!r}")
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def like(cls, linear: nn.Linear, fmt: str, group_size: int = 128) -> QuantLinear:
        module = cls(fmt, linear.in_features, linear.out_features, group_size=group_size, bias=linear.bias,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        module.ops = getattr(linear, "ops", FAST_OPS)
        return module

    def spec(self) -> QuantSpec:
        return QuantSpec(self.fmt, self.group_size if self.fmt == "int4" else 128, ignore=())

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight (N, K) in `dtype`, as dequantise-on-load computes it."""
        if self.fmt == "fp8":
            return dequantize_fp8_block(self.weight, self.weight_scale_inv, torch.float32).to(dtype)
        q = unpack_int4(self.weight_packed, (self.out_features, self.in_features))
        return dequantize_int4(q, self.weight_scale).to(torch.float32).to(dtype)

    def quantized_tensors(self, weight: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """(buffer name, tensor) of a dense weight quantised as `miles quantize` does."""
        for name, tensor in quantize_tensor("m.weight", weight.detach(), self.spec()):
            yield name.removeprefix("m."), tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.ops.name == "fast" and quant_gemm.available():
            if self.fmt == "fp8":
                return quant_gemm.fp8_block_linear(x, self.weight, self.weight_scale_inv, self.bias)
            return quant_gemm.int4_group_linear(x, self.weight_packed, self.weight_scale, self.bias)
        return self.ops.linear(x, self.dequantized(x.dtype), self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        return f"{self.fmt}, in_features={self.in_features}, out_features={self.out_features}{group}"


def quantized_modules(names: Iterable[str], fmt: str) -> set[str]:
    """Module names a checkpoint of format `fmt` stores quantised (from its tensor names)."""
    suffix = ".weight_scale_inv" if fmt == "fp8" else ".weight_packed"
    return {name.removesuffix(suffix) for name in names if name.endswith(suffix)}


def swap_to_quantized(model: nn.Module, modules: set[str], fmt: str, group_size: int = 128) -> None:
    """Replace each named plain `Linear` of `model` by an empty `QuantLinear` of the same shape."""
    found = {name: module for name, module in model.named_modules() if name in modules}
    missing = sorted(modules - set(found))
    if missing:
        raise ValueError(f"the quantised checkpoint names modules the model lacks: {missing[:3]}")
    for name, module in found.items():
        if not isinstance(module, nn.Linear):
            raise ValueError(f"'{name}' is quantised in the checkpoint but is a {type(module).__name__}, not a Linear")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QuantLinear.like(module, fmt, group_size))


def holds_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def dense_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every `QuantLinear` turned back into a `Linear` holding its dequantised
    weight (in the dtype the model was built in): the model dequantise-on-load would have given."""
    model = copy.deepcopy(model)
    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, module in swaps:
        weight = module.dequantized(module.dense_dtype)
        linear = Linear(module.in_features, module.out_features, bias=module.bias is not None,
                        device="meta")
        linear.weight = nn.Parameter(weight)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().clone())
        linear.ops = module.ops
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    return model


def quantize_updates(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Weight-sync tensors for a model holding `QuantLinear`s: a dense `X.weight` aimed at a
    quantised module becomes that module's quantised tensors; everything else passes through."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, tensor in named_tensors:
        module = quantized.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if module is None or tensor.dtype == FP8_DTYPE:
            yield name, tensor
            continue
        prefix = name.removesuffix("weight")
        for part, value in module.quantized_tensors(tensor):
            yield prefix + part, value


def dense_updates(held: Mapping[str, torch.Tensor], named_tensors: list[tuple[str, torch.Tensor]]
                  ) -> list[tuple[str, torch.Tensor]]:
    """Weight-sync tensors for an engine that holds some modules dense (`held`: its tensors by
    name) while the sender quantised them (`sync.quantize` over `nccl` / `cuda_ipc`, as SGLang
    takes FP8 weights): each such module's parts (FP8 `weight` + `weight_scale_inv`, INT4
    `weight_packed` + `weight_scale` + `weight_shape`) become its dense `weight`, dequantised in
    fp32 as a dense round trip does; the rest pass through. The parts must travel in one call
    (`sync.protocol.buckets` keeps them together); a lone part is an error, never a bad copy."""
    if not any(_dense_target(held, n, t) for n, t in named_tensors):
        return named_tensors
    parts = dict(named_tensors)
    out = []
    for name, tensor in named_tensors:
        if name.endswith(COMPANION_SUFFIXES) and name not in held:
            _part(parts, _weight_of(name), name)  # consumed with its weight below
            continue
        if tensor.dtype == FP8_DTYPE and _dense_target(held, name, tensor):
            scale_inv = _part(parts, f"{name}_scale_inv", name)
            out.append((name, dequantize_fp8_block(tensor, scale_inv, torch.float32)))
        elif name.endswith(".weight_packed") and name not in held:
            module = name.removesuffix(".weight_packed")
            shape = tuple(int(v) for v in _part(parts, f"{module}.weight_shape", name))
            scale = _part(parts, f"{module}.weight_scale", name)
            out.append((f"{module}.weight", dequantize_int4(unpack_int4(tensor, shape), scale).float()))
        else:
            out.append((name, tensor))
    return out


def _dense_target(held: Mapping[str, torch.Tensor], name: str, tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a quantised weight's part aimed at a module the engine holds dense."""
    if tensor.dtype == FP8_DTYPE:
        target = held.get(name)
        return target is not None and target.dtype != FP8_DTYPE
    return name.endswith(COMPANION_SUFFIXES + (".weight_packed",)) and name not in held


def _weight_of(companion: str) -> str:
    """The quantised weight a companion completes: `X.weight` (FP8) or `X.weight_packed` (INT4)."""
    if companion.endswith(".weight_scale_inv"):
        return companion.removesuffix("_scale_inv")
    return companion.rsplit(".", 1)[0] + ".weight_packed"


def _part(parts: dict[str, torch.Tensor], name: str, other: str) -> torch.Tensor:
    if name not in parts:
        raise MilesError(f"update_weights: '{other}' came without '{name}' in the same update "
                         "(a quantised weight's parts travel together)")
    return parts[name]


def quantize_linears(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Swap, in place, every plain `Linear` whose weight `spec` quantises for a `QuantLinear` holding
    that weight quantised as `miles quantize` would write it; return their names."""
    chosen = [(name, m) for name, m in model.named_modules()
              if type(m) is Linear and is_quantized_weight(f"{name}.weight", tuple(m.weight.shape), spec)]
    for name, linear in chosen:
        module = QuantLinear.like(linear, spec.format, spec.group_size)
        for part, tensor in module.quantized_tensors(linear.weight):
            setattr(module, part, tensor.to(linear.weight.device))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
    return [name for name, _ in chosen]
