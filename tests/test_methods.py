import pytest
import torch

from meswitch.compression.delta import DenseDelta, QuantizedDelta, apply_delta
from meswitch.compression.methods import CompressionSpec, compress_matrix, dense_delta, quantize_matrix, select_salient


def delta_with_outliers(out=64, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    delta = 0.01 * torch.randn(out, cols, generator=g)
    x = torch.randn(512, cols, generator=g)
    big_delta = [5, 77]  # the fine-tune moved these input channels a lot
    big_act = [140, 201]  # these channels carry large activations
    delta[:, big_delta] *= 30
    x[:, big_act] *= 30
    return delta, x, sorted(big_delta + big_act)


def output_error(x, delta, d_hat):
    return float(((x @ (delta - d_hat).T) ** 2).sum())


def test_saliency_finds_planted_outlier_channels():
    delta, x, planted = delta_with_outliers()
    s = (x * x).sum(0)
    idx = select_salient(delta, bits=2, k=4, col_weight=s)
    assert idx.tolist() == planted
    # Without activation statistics only the large-delta channels stand out.
    assert set(select_salient(delta, bits=2, k=2).tolist()) == {5, 77}


def test_salient_columns_are_stored_exactly_in_16_bit():
    delta, x, planted = delta_with_outliers()
    q = quantize_matrix(delta, 2, salient_k=4, col_weight=(x * x).sum(0))
    d_hat = q.dequantize()
    assert torch.equal(d_hat[:, planted], delta[:, planted].half().float())
    assert q.codes().shape == (64, 252)


def effective_bits(q) -> float:
    return 8 * q.nbytes / (q.shape[0] * q.shape[1])


def test_mixed_beats_rtn_at_equal_effective_bits():
    delta, x, _ = delta_with_outliers()
    s = (x * x).sum(0)
    mixed = quantize_matrix(delta, 2, salient_k=4, col_weight=s)
    mb = effective_bits(mixed)
    # The cheapest RTN configuration that spends at least as many bits as mixed.
    candidates = [quantize_matrix(delta, 2, group_size=g, col_weight=s) for g in (256, 128, 64, 32, 16, 8)]
    rtn = min((c for c in candidates if effective_bits(c) >= mb), key=effective_bits)
    assert effective_bits(rtn) >= mb
    err_mixed = output_error(x, delta, mixed.dequantize())
    err_rtn = output_error(x, delta, rtn.dequantize())
    assert err_mixed < 0.5 * err_rtn, (mb, effective_bits(rtn), err_mixed, err_rtn)


def test_activation_weighting_lowers_output_error():
    delta, x, _ = delta_with_outliers()
    s = (x * x).sum(0)
    weighted = quantize_matrix(delta, 2, salient_k=0, col_weight=s)
    plain = quantize_matrix(delta, 2, salient_k=0)
    # The clipping search weighted by the input channels' second moments trades error on the
    # quiet channels for error on the loud ones (measured: 0.66x the unweighted output error).
    assert output_error(x, delta, weighted.dequantize()) < 0.8 * output_error(x, delta, plain.dequantize())


def test_bitdelta_is_sign_times_one_scale():
    delta = torch.randn(32, 48)
    q = compress_matrix(delta, CompressionSpec(method="bitdelta"))
    assert isinstance(q, QuantizedDelta) and q.bits == 1
    alpha = delta.abs().mean()
    d_hat = q.dequantize()
    assert torch.allclose(d_hat.abs(), torch.full_like(d_hat, float(alpha)), rtol=2e-3)
    assert torch.equal(torch.sign(d_hat), torch.where(delta > 0, 1.0, -1.0))
    assert effective_bits(q) < 1.1


def test_fp16_dense_delta_reproduces_bf16_expert_exactly():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 64, generator=g).bfloat16()
    expert = (base.float() + 0.01 * torch.randn(64, 64, generator=g)).bfloat16()
    expert[0, 0] = 1e-7  # a tiny weight far from its base value
    d = dense_delta(expert.float() - base.float(), base, expert)
    assert torch.equal(apply_delta(base, d, torch.bfloat16), expert)
    # float16 values, with exact patches for the few elements it cannot reproduce (tiny weights).
    assert d.values.dtype == torch.float16 and 0 in d.patch_index.tolist()
    assert d.patch_index.numel() < 0.01 * expert.numel()


def test_dense_delta_falls_back_to_float32_when_float16_is_not_exact():
    base = torch.tensor([[1.0, 3.0]])
    expert = torch.tensor([[1.0 + 2**-12 + 2**-23, 3.0]])  # a float32 delta with 12 significant bits
    d = dense_delta(expert - base, base, expert)
    assert isinstance(d, DenseDelta) and d.values.dtype == torch.float32 and d.patch_index is None
    assert torch.equal(apply_delta(base, d, torch.float32), expert)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "gptq"}, "unknown method"),
        ({"bits": 5}, "--bits"),
        ({"salient": 2.5}, "--salient"),
        ({"salient": -1}, "--salient"),
        ({"group_size": -4}, "--group-size"),
    ],
)
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionSpec(**kwargs).validate()


def test_salient_count_and_fraction():
    assert CompressionSpec(salient=0.01).salient_count(576) == 6
    assert CompressionSpec(salient=8).salient_count(576) == 8
    assert CompressionSpec(salient=8).salient_count(4) == 3  # one column stays quantized
    assert CompressionSpec(method="rtn", salient=8).salient_count(576) == 0


@pytest.mark.parametrize("method", ["mixed", "bitdelta", "lowrank"])
def test_tunable_layer_starts_at_the_stored_reconstruction(method):
    from torch import nn

    from meswitch.compression.student import TunableDeltaLinear

    torch.manual_seed(0)
    linear = nn.Linear(48, 32, bias=True)
    delta = 0.01 * torch.randn(32, 48)
    spec = CompressionSpec(method=method, bits=2, salient=3, group_size=16, rank_bits=4)
    q = compress_matrix(delta, spec, col_weight=torch.rand(48))
    base_weight = linear.weight.detach().clone()
    layer = TunableDeltaLinear(linear, base_weight, q)
    x = torch.randn(5, 48)
    want = nn.functional.linear(x, apply_delta(base_weight, q, torch.float32), linear.bias)
    assert torch.allclose(layer(x), want, atol=1e-6)
    p = layer.current_params()
    assert torch.equal(p.scale, q.params.scale) and torch.equal(p.offset, q.params.offset)

    # Only the step sizes and offsets are trainable; the base weight and bias are frozen buffers.
    names = ["scale_mult", "offset_shift"] + (["a_shift", "b_shift"] if method == "lowrank" else [])
    assert [n for n, t in layer.named_parameters() if t.requires_grad] == names
    if method == "lowrank":  # the factors start at the stored ones
        assert q.rank > 0
        fa, fb = layer.lowrank_factors()
        assert torch.equal(fa.half(), q.lowrank_a) and torch.equal(fb.half(), q.lowrank_b)
    with torch.no_grad():  # away from the starting point, so that no gradient is zero by symmetry
        layer.scale_mult.mul_(1.1)
        layer.offset_shift.add_(0.1)
    x.requires_grad_(True)
    (layer(x) ** 2).sum().backward()
    grads = layer.scale_mult.grad.clone(), layer.offset_shift.grad.clone(), x.grad.clone()
    if method == "lowrank":
        assert layer.a_shift.grad.abs().sum() > 0 and layer.b_shift.grad.abs().sum() > 0
    assert all(g.abs().min() > 0 for g in grads[:2])  # every step size and offset gets a gradient
    assert torch.equal(layer.base_q, base_weight[:, q.quantized_columns()]) and layer.base_q.grad is None
    # The hand-written backward (which keeps no weight-sized tensors) equals autograd's.
    layer.scale_mult.grad = layer.offset_shift.grad = x.grad = None
    w = base_weight + layer.delta()  # differentiable in scale_mult and offset_shift
    (nn.functional.linear(x, w, layer.bias) ** 2).sum().backward()
    for got, ref in zip(grads, (layer.scale_mult.grad, layer.offset_shift.grad, x.grad)):
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", [CompressionSpec(bits=2, salient=4), CompressionSpec(bits=3, salient=2, group_size=32),
                                  CompressionSpec(method="rtn", bits=2), CompressionSpec(method="bitdelta")])
def test_quantizing_chunk_by_chunk_gives_the_same_result(spec):
    """Huge tensors (embeddings, LM heads) are quantized a few rows at a time: same codes,
    step sizes and salient channels as in one piece."""
    from meswitch.compression.methods import DeltaRows

    delta, x, _ = delta_with_outliers(out=96)
    s = (x * x).sum(0)
    whole = compress_matrix(delta, spec, s)
    chunked = compress_matrix(DeltaRows.of(delta, chunk_elements=7 * 256), spec, s)  # 7 rows at a time
    assert torch.equal(whole.packed, chunked.packed) and torch.equal(whole.salient_idx, chunked.salient_idx)
    assert torch.equal(whole.params.scale, chunked.params.scale) and torch.equal(whole.params.offset, chunked.params.offset)
    assert torch.equal(whole.salient_values, chunked.salient_values)


def test_lossless_dense_delta_chunk_by_chunk_and_rebuilt_by_rows():
    from meswitch.compression.delta import apply_delta_rows
    from meswitch.compression.methods import DeltaRows, dense_rows

    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 24, generator=g).bfloat16()
    expert = (base.float() + 0.01 * torch.randn(40, 24, generator=g)).bfloat16()
    expert[3, 5] = expert[31, 0] = 1e-7  # patched elements in two different chunks
    delta = expert.float() - base.float()
    rows = DeltaRows((40, 24), lambda a, b: delta[a:b], 5 * 24, lambda a, b: (base[a:b], expert[a:b]))
    d = dense_rows(rows)
    want = dense_delta(delta, base, expert)
    assert torch.equal(d.values, want.values) and torch.equal(d.patch_index, want.patch_index)
    assert torch.equal(apply_delta(base, d, torch.bfloat16), expert)
    d.extra_rows = torch.randn(3, 24).bfloat16()
    whole = apply_delta(base, d, torch.bfloat16)
    for a, b in [(0, 7), (3, 32), (38, 43), (40, 43)]:  # across the patches and into the added rows
        assert torch.equal(apply_delta_rows(base[a:min(b, 40)], d, a, b, torch.bfloat16), whole[a:b])
    q = compress_matrix(delta, CompressionSpec(bits=2, salient=2))
    assert torch.equal(apply_delta_rows(base[5:17], q, 5, 17, torch.float32), apply_delta(base, q, torch.float32)[5:17])
