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
from .quantizer import AffineParams, expand_groups, grouped, num_groups


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

    The weight is kept split by input columns: the quantized columns, W_q = base[:, cols] +
    codes * scale + offset (rebuilt at each call from the base columns in the model's dtype and
    the uint8 codes: a few element-wise passes, no scatter), and the salient columns, W_s =
    base[:, salient] + their 16-bit delta (fixed), so y = x[:, cols] W_q^T + x[:, salient] W_s^T
    + b. Autograd keeps only the layer's input between forward and backward (`_DeltaLinearFn`
    rebuilds W_q in backward): tuning holds no weight-sized activations."""

    def __init__(self, linear: nn.Linear, base_weight: torch.Tensor, qd: QuantizedDelta):
        super().__init__()
        dev, dtype = linear.weight.device, linear.weight.dtype
        base = base_weight.to(device=dev)
        cols, sal = qd.quantized_columns().to(dev), qd.salient_idx.long().to(dev)
        self.shape = tuple(base.shape)
        # The bias is frozen: a buffer, not a parameter.
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)
        self.register_buffer("base_q", base[:, cols].to(dtype).contiguous(), persistent=False)
        self.register_buffer("weight_s", (base[:, sal].float() + qd.salient_values.float().to(dev)).to(dtype),
                             persistent=False)
        self.register_buffer("codes", qd.codes().to(dev), persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.register_buffer("salient_idx", sal, persistent=False)
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

    def delta(self, scale_mult: torch.Tensor | None = None, offset_shift: torch.Tensor | None = None) -> torch.Tensor:
        """The whole delta [out, in] with the current (or given) step sizes: the reference the
        split computation must equal (and, through autograd, the reference for its gradients)."""
        scale_mult = self.scale_mult if scale_mult is None else scale_mult
        offset_shift = self.offset_shift if offset_shift is None else offset_shift
        n = self.codes.shape[1]
        scale = expand_groups(self.scale0 * scale_mult, n, self.group_size)
        offset = expand_groups(self.offset0 + self.scale0 * offset_shift, n, self.group_size)
        deq = self.codes.float() * scale + offset
        out, cols = self.shape
        d = torch.zeros(out, cols, device=deq.device).index_copy(1, self.cols, deq.expand(out, n))
        if self.salient_idx.numel():
            d = d.index_copy(1, self.salient_idx, self.salient_values)
        if self.rank:
            a, b = self.lowrank_factors()
            d = d + a @ b
        return d

    def weight_q(self, dtype: torch.dtype) -> torch.Tensor:
        """The quantized columns of W_base + delta with the current step sizes, in `dtype`."""
        with torch.no_grad():
            n = self.codes.shape[1]
            scale = expand_groups(self.scale0 * self.scale_mult, n, self.group_size)
            offset = expand_groups(self.offset0 + self.scale0 * self.offset_shift, n, self.group_size)
            w = torch.addcmul(offset, self.codes.float(), scale)
            return w.add_(self.base_q).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DeltaLinearFn.apply(x, self.scale_mult, self.offset_shift, self)
        if self.rank:  # + x (A B)^T as two thin products; autograd differentiates the factors
            a, b = self.lowrank_factors()
            y = y + F.linear(F.linear(x, b.to(x.dtype)), a.to(x.dtype))
        return y


class _DeltaLinearFn(torch.autograd.Function):
    """The linear map of a TunableDeltaLinear, differentiable in its step sizes.

    dL/dW_q = grad_y^T x[:, cols]; W_q[r, c] = base + codes * scale0 * scale_mult + offset0 +
    scale0 * offset_shift, so dL/dscale_mult[r, g] = scale0[r, g] * sum over c in g of
    dL/dW_q[r, c] * codes[r, c], and dL/doffset_shift[r, g] = scale0[r, g] * sum over c in g of
    dL/dW_q[r, c] (summed over rows too when one step size serves them all)."""

    @staticmethod
    def forward(ctx, x, scale_mult, offset_shift, layer: TunableDeltaLinear):
        ctx.layer = layer
        ctx.save_for_backward(x)
        y = F.linear(x.index_select(-1, layer.cols), layer.weight_q(x.dtype), layer.bias)
        if layer.salient_idx.numel():
            y = y + F.linear(x.index_select(-1, layer.salient_idx), layer.weight_s.to(x.dtype))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        layer: TunableDeltaLinear = ctx.layer
        xq = x.index_select(-1, layer.cols)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x)
            grad_x.index_copy_(-1, layer.cols, grad_y @ layer.weight_q(x.dtype))
            if layer.salient_idx.numel():
                grad_x.index_copy_(-1, layer.salient_idx, grad_y @ layer.weight_s.to(x.dtype))
        out, n = layer.codes.shape
        g = grad_y.reshape(-1, out).float().T @ xq.reshape(-1, n).float()  # dL/dW_q, [out, n]
        d_offset = _group_sums(g, layer.group_size) * layer.scale0
        d_scale = _group_sums(g.mul_(layer.codes), layer.group_size) * layer.scale0
        if layer.scale0.shape[0] == 1:  # one step size per matrix (bitdelta)
            d_scale, d_offset = d_scale.sum(0, keepdim=True), d_offset.sum(0, keepdim=True)
        return grad_x, d_scale, d_offset, None


def _group_sums(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[rows, n] -> [rows, groups]: sums over each group's columns (one group if group_size is 0)."""
    if num_groups(x.shape[1], group_size) == 1:
        return x.sum(dim=1, keepdim=True)
    return grouped(x, group_size, pad_value=0.0).sum(dim=-1)


def wrap_quantized_linears(root: nn.Module, deltas: dict[str, CompressedDelta], base_get, prefix: str = "") -> dict[str, TunableDeltaLinear]:
    """Replace each nn.Linear of `root` whose weight has a QuantizedDelta by a TunableDeltaLinear.
    Module names inside `root` get `prefix` to form tensor names (`model.layers.3.` for a layer)."""
    modules = dict(root.named_modules())
    wrapped: dict[str, TunableDeltaLinear] = {}
    for mname, mod in modules.items():
        d = deltas.get(f"{prefix}{mname}.weight")
        if not (isinstance(mod, nn.Linear) and isinstance(d, QuantizedDelta) and d.extra_rows is None):
            continue
        if mod.weight.shape[0] != d.shape[0]:
            continue
        wrapped[mname] = TunableDeltaLinear(mod, base_get(f"{prefix}{mname}.weight"), d)
        _set_module(root, mname, wrapped[mname])  # at once: the plain weight is freed before the next
    for p in root.parameters():
        p.requires_grad_(False)
    for w in wrapped.values():
        for p in w.trainable():
            p.requires_grad_(True)
    return wrapped


def unwrap_quantized_linears(root: nn.Module, wrapped: dict[str, TunableDeltaLinear], deltas: dict[str, CompressedDelta],
                             base_get, weight_dtype: torch.dtype, prefix: str = "") -> None:
    """Store what was learned (rounded to float16) in `deltas` and put plain linears back, their
    weights rebuilt from the checkpoint's own base tensor exactly as build_student and
    materialize make them. Empties `wrapped`."""
    with torch.no_grad():
        for mname in list(wrapped):
            w = wrapped.pop(mname)  # each wrapper (its base weight and codes) goes once replaced
            name = f"{prefix}{mname}.weight"
            d = deltas[name]
            assert isinstance(d, QuantizedDelta)
            d.params = w.current_params()
            if w.rank:
                d.lowrank_a, d.lowrank_b = (f.detach().cpu().to(torch.float16).contiguous() for f in w.lowrank_factors())
            # A shell on the meta device (no random init), then the rebuilt weight.
            linear = nn.Linear(w.shape[1], w.shape[0], bias=w.bias is not None, device="meta")
            rebuilt = apply_delta(base_get(name), d, weight_dtype)
            linear.weight = nn.Parameter(rebuilt.to(device=w.base_q.device, dtype=w.base_q.dtype), requires_grad=False)
            if w.bias is not None:
                linear.bias = nn.Parameter(w.bias, requires_grad=False)
            _set_module(root, mname, linear)
            del w


def _set_module(root: nn.Module, mname: str, module: nn.Module) -> None:
    parent_name, _, child = mname.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


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
    wrapped = wrap_quantized_linears(student, deltas, base.get_for)
    if not wrapped:
        return {"steps": 0, "tuned_matrices": 0}
    params = [p for w in wrapped.values() for p in w.trainable()]

    kl_before = mean_kl(student, seqs, teacher)
    opt = torch.optim.Adam(params, lr=lr)
    device = next(student.parameters()).device
    bar = tqdm(range(steps), desc="tune step sizes", disable=not progress, leave=False)
    logits = loss = None
    for step in bar:
        i = step % len(seqs)
        logits = student(input_ids=seqs[i][None].to(device), use_cache=False).logits[0]
        loss = _kl_to_teacher(logits, teacher[i].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(kl=f"{loss.item():.4f}")

    tuned = len(wrapped)
    del opt, params, logits, loss  # the last step's graph holds the wrappers
    unwrap_quantized_linears(student, wrapped, deltas, base.get_for, weight_dtype)
    kl_after = mean_kl(student, seqs, teacher)
    return {"kl_before": kl_before, "kl_after": kl_after, "steps": steps, "tuned_matrices": tuned}
