"""The "student": base model + compressed deltas, used to measure and tune a compression.

`build_student` loads the base model and writes W_base + dequantized delta into its weights
(the same arithmetic as materialization). `tune_step_sizes` instead wraps the quantized linear
layers in TunableDeltaLinear, whose weight is rebuilt from the frozen codes and salient columns
with learnable step sizes and offsets, and minimises KL(expert || student) on the calibration
samples (a distillation against the uncompressed expert's cached next-token distributions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checkpoints import Checkpoint
from .delta import CompressedDelta, QuantizedDelta, apply_delta
from .quantizer import AffineParams, expand_groups


def module_name(tensor_name: str) -> str:
    return tensor_name.rsplit(".", 1)[0]


def build_student(
    base: Checkpoint, deltas: dict[str, CompressedDelta], vocab_size: int, device: str = "cpu",
    weight_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The base model with every delta applied, each weight rounded to `weight_dtype` (the
    expert's own dtype: exactly what materialization writes), run in `compute_dtype`."""
    model = base.load_model(compute_dtype, device)
    if model.get_input_embeddings().weight.shape[0] != vocab_size:
        model.resize_token_embeddings(vocab_size)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, d in deltas.items():
            if name not in params:
                raise KeyError(f"the model has no parameter {name}")
            w = apply_delta(base.get_for(name), d, weight_dtype).to(compute_dtype)
            params[name].data.copy_(w.to(device))
    return model


class TunableDeltaLinear(nn.Module):
    """y = x (W_base + delta(scale, offset))^T + b, with only scale and offset trainable.

    Step sizes are learned as scale = scale0 * scale_mult and offset = offset0 + scale0 *
    offset_shift, so both parameters start at (1, 0) and are of order one for the optimiser.
    The base weight is kept in the model's dtype; the weight is assembled in float32 and cast
    to the input's dtype for the matmul."""

    def __init__(self, linear: nn.Linear, base_weight: torch.Tensor, qd: QuantizedDelta):
        super().__init__()
        self.bias = linear.bias
        dev = linear.weight.device
        self.register_buffer("base_weight", base_weight.to(device=dev, dtype=linear.weight.dtype), persistent=False)
        self.register_buffer("codes", qd.codes().to(dev), persistent=False)
        self.register_buffer("cols", qd.quantized_columns().to(dev), persistent=False)
        self.register_buffer("salient_idx", qd.salient_idx.long().to(dev), persistent=False)
        self.register_buffer("salient_values", qd.salient_values.float().to(dev), persistent=False)
        self.register_buffer("scale0", qd.params.scale.float().to(dev), persistent=False)
        self.register_buffer("offset0", qd.params.offset.float().to(dev), persistent=False)
        self.group_size = qd.params.group_size
        self.scale_mult = nn.Parameter(torch.ones_like(self.scale0))
        self.offset_shift = nn.Parameter(torch.zeros_like(self.offset0))
        # A low-rank part (--method lowrank) is tuned too, as A0 + unit * shift with one unit per
        # column of each factor (mean |entry|), so that its steps are of the size of the others'.
        self.rank = qd.rank
        if self.rank:
            a0, b0 = qd.lowrank_a.float().to(dev), qd.lowrank_b.float().to(dev)
            self.register_buffer("a0", a0, persistent=False)
            self.register_buffer("b0", b0, persistent=False)
            self.register_buffer("a_unit", a0.abs().mean(0, keepdim=True).clamp_min(1e-12), persistent=False)
            self.register_buffer("b_unit", b0.abs().mean(0, keepdim=True).clamp_min(1e-12), persistent=False)
            self.a_shift = nn.Parameter(torch.zeros_like(a0))
            self.b_shift = nn.Parameter(torch.zeros_like(b0))

    def trainable(self) -> list[nn.Parameter]:
        extra = [self.a_shift, self.b_shift] if self.rank else []
        return [self.scale_mult, self.offset_shift, *extra]

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a0 + self.a_unit * self.a_shift, self.b0 + self.b_unit * self.b_shift

    def current_params(self) -> AffineParams:
        scale = (self.scale0 * self.scale_mult).detach().cpu()
        offset = (self.offset0 + self.scale0 * self.offset_shift).detach().cpu()
        # A step size must stay positive; float16 is what gets stored.
        scale = scale.abs().clamp_min(torch.finfo(torch.float16).tiny)
        return AffineParams(scale.to(torch.float16), offset.to(torch.float16), self.group_size)

    def delta(self) -> torch.Tensor:
        n = self.codes.shape[1]
        scale = expand_groups(self.scale0 * self.scale_mult, n, self.group_size)
        offset = expand_groups(self.offset0 + self.scale0 * self.offset_shift, n, self.group_size)
        deq = self.codes.float() * scale + offset
        out, cols = self.base_weight.shape
        d = torch.zeros(out, cols, device=deq.device).index_copy(1, self.cols, deq.expand(out, n))
        if self.salient_idx.numel():
            d = d.index_copy(1, self.salient_idx, self.salient_values)
        if self.rank:
            a, b = self.lowrank_factors()
            d = d + a @ b
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, (self.base_weight.float() + self.delta()).to(x.dtype), self.bias)


def _kl_to_teacher(logits: torch.Tensor, teacher_lp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student)."""
    t = teacher_lp.float()
    return (t.exp() * (t - torch.log_softmax(logits.float(), dim=-1))).sum(-1).mean()


@torch.no_grad()
def mean_kl(model: nn.Module, seqs: list[torch.Tensor], teacher: list[torch.Tensor]) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, t in zip(seqs, teacher, strict=True):
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0]
        total += float(_kl_to_teacher(logits, t.to(device))) * len(ids)
        count += len(ids)
    return total / max(count, 1)


def tune_step_sizes(
    student: nn.Module,
    base: Checkpoint,
    deltas: dict[str, CompressedDelta],
    seqs: list[torch.Tensor],
    teacher: list[torch.Tensor],
    steps: int,
    lr: float = 2e-3,
    progress: bool = True,
    weight_dtype: torch.dtype = torch.float32,
) -> dict:
    """Learn the step sizes and offsets of every quantized linear delta by distillation.

    Updates `deltas` in place (new float16 scale/offset, same codes) and the student's weights.
    Returns {"kl_before", "kl_after", "steps", "tuned_matrices"} (KL on the calibration samples)."""
    modules = dict(student.named_modules())
    wrapped: dict[str, TunableDeltaLinear] = {}
    for name, d in deltas.items():
        mname = module_name(name)
        mod = modules.get(mname)
        if isinstance(d, QuantizedDelta) and isinstance(mod, nn.Linear) and d.extra_rows is None and name.endswith(".weight"):
            if mod.weight.shape[0] != d.shape[0]:
                continue
            wrapped[mname] = TunableDeltaLinear(mod, base.get_for(name), d)
    if not wrapped:
        return {"steps": 0, "tuned_matrices": 0}
    for mname, w in wrapped.items():
        parent_name, _, child = mname.rpartition(".")
        setattr(modules[parent_name] if parent_name else student, child, w)
    for p in student.parameters():
        p.requires_grad_(False)
    params = [p for w in wrapped.values() for p in w.trainable()]
    for p in params:
        p.requires_grad_(True)

    kl_before = mean_kl(student, seqs, teacher)
    opt = torch.optim.Adam(params, lr=lr)
    device = next(student.parameters()).device
    bar = tqdm(range(steps), desc="tune step sizes", disable=not progress, leave=False)
    for step in bar:
        i = step % len(seqs)
        logits = student(input_ids=seqs[i][None].to(device), use_cache=False).logits[0]
        loss = _kl_to_teacher(logits, teacher[i].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(kl=f"{loss.item():.4f}")

    # Store what was learned (rounded to float16) and put plain linears back.
    with torch.no_grad():
        for mname, w in wrapped.items():
            name = mname + ".weight"
            d = deltas[name]
            assert isinstance(d, QuantizedDelta)
            d.params = w.current_params()
            if w.rank:
                d.lowrank_a, d.lowrank_b = (f.detach().cpu().to(torch.float16).contiguous() for f in w.lowrank_factors())
            # A shell on the meta device (no random init), then the rebuilt weight from the
            # checkpoint's own base tensor, exactly as build_student and materialize make it.
            linear = nn.Linear(w.base_weight.shape[1], w.base_weight.shape[0], bias=w.bias is not None, device="meta")
            rebuilt = apply_delta(base.get_for(name), d, weight_dtype).to(device=device, dtype=w.base_weight.dtype)
            linear.weight = nn.Parameter(rebuilt, requires_grad=False)
            if w.bias is not None:
                linear.bias = w.bias
            parent_name, _, child = mname.rpartition(".")
            setattr(modules[parent_name] if parent_name else student, child, linear)
    kl_after = mean_kl(student, seqs, teacher)
    return {"kl_before": kl_before, "kl_after": kl_after, "steps": steps, "tuned_matrices": len(wrapped)}
