"""Compress one expert against its base: calibrate, compress tensor by tensor, tune, measure.

Memory: the expert model is loaded once for calibration and then released; deltas are then
computed one tensor at a time from lazy reads of base and expert (at most one base and one
expert tensor in memory beside the compressed results); the student (base + compressed delta)
is loaded once for tuning and quality. Base and expert are never whole in memory together.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..checkpoints import Checkpoint, check_compatible, is_vocab_tensor
from .calibration import collect_input_moments, load_samples, next_token_logprobs, split_heldout, tokenize_samples
from .delta import CompressedDelta, delta_to
from .methods import CompressionSpec, compress_matrix, dense_delta
from .quality import compare_to_expert
from .student import build_student, module_name, tune_step_sizes


@dataclass
class CalibrationConfig:
    path: str | None = None  # None: built-in samples
    max_len: int = 128
    max_samples: int = 64
    heldout_fraction: float = 0.25


@dataclass
class CompressedExpert:
    deltas: dict[str, CompressedDelta]
    num_parameters: int
    nbytes: int
    dtype: torch.dtype
    quality: dict = field(default_factory=dict)
    tuning: dict = field(default_factory=dict)
    seconds: float = 0.0  # nbytes counts tensor payloads; the bundle counts the file on disk


def _extra_rows(expert_t: torch.Tensor, base_rows: int, lossless: bool) -> torch.Tensor | None:
    """Rows an expert added to its vocabulary, stored whole in 16 bits (float32 only if the
    expert itself is float32 and the method is lossless)."""
    if expert_t.shape[0] == base_rows:
        return None
    extra = expert_t[base_rows:]
    if extra.dtype in (torch.float16, torch.bfloat16) or lossless:
        return extra.contiguous()
    return extra.to(torch.float16).contiguous()


def _col_weight(name: str, moments: dict[str, torch.Tensor], tied: bool) -> torch.Tensor | None:
    """Calibration second moments of the inputs that multiply this weight's columns."""
    if name.endswith("embed_tokens.weight"):
        # As an LM head (tied), the embedding multiplies the final hidden states.
        return moments.get("lm_head") if tied else None
    return moments.get(module_name(name))


def compress_tensors(
    base: Checkpoint,
    expert: Checkpoint,
    spec: CompressionSpec,
    moments: dict[str, torch.Tensor],
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, CompressedDelta]:
    """Every tensor's delta, compressed; quantization (the salient search and the clipping
    search) runs on `device`, and what is returned lives on the host."""
    deltas: dict[str, CompressedDelta] = {}
    device = torch.device(device)
    lossless = spec.method == "fp16"
    for name in tqdm(expert.weight_names(), desc="compress tensors", disable=not progress, leave=False):
        e = expert.get(name)
        b = base.get_for(name)
        rows = b.shape[0]
        e_base = e[:rows]
        delta = e_base.float() - b.float()
        extra = _extra_rows(e, rows, lossless)
        quantize = delta.dim() == 2 and not lossless and (spec.compress_embeddings or not is_vocab_tensor(name))
        if quantize:
            w = _col_weight(name, moments, expert.tied)
            d = compress_matrix(delta.to(device), spec, None if w is None else w.to(device))
            d = delta_to(d, "cpu")
        elif lossless:
            d = dense_delta(delta, b, e_base)
        else:
            d = dense_delta(delta)
        d.extra_rows = extra
        deltas[name] = d
        del e, b, delta
    return deltas


def compress_expert(
    base: Checkpoint,
    expert: Checkpoint,
    spec: CompressionSpec,
    calib: CalibrationConfig,
    tune_steps: int = 0,
    device: str = "cpu",
    model_dtype: torch.dtype = torch.float32,
    name: str = "expert",
    progress: bool = True,
    log=print,
) -> CompressedExpert:
    t0 = time.time()
    spec.validate()
    check_compatible(base, expert, name)

    tokenizer = expert.load_tokenizer()
    samples = load_samples(calib.path)[: calib.max_samples]
    seqs = tokenize_samples(tokenizer, samples, calib.max_len)
    calib_seqs, heldout = split_heldout(seqs, calib.heldout_fraction)
    log(f"[{name}] calibration: {len(calib_seqs)} samples, held out for quality: {len(heldout)}")

    model = expert.load_model(model_dtype, device)
    moments = collect_input_moments(model, calib_seqs, progress)
    heldout_lp = next_token_logprobs(model, heldout, progress, "expert (held-out)")
    calib_lp = (
        next_token_logprobs(model, calib_seqs, progress, "expert (calibration)", torch.float16) if tune_steps else []
    )
    del model
    gc.collect()

    deltas = compress_tensors(base, expert, spec, moments, progress, device)
    del moments

    vocab = int(expert.config.get("vocab_size") or expert.shape("model.embed_tokens.weight")[0])
    dtype = expert.dtype()
    student = build_student(base, deltas, vocab, device, dtype, model_dtype)
    tuning: dict = {}
    if tune_steps:
        tuning = tune_step_sizes(student, base, deltas, calib_seqs, calib_lp, tune_steps,
                                 progress=progress, weight_dtype=dtype)
        if "kl_before" in tuning:
            log(f"[{name}] step-size tuning: KL {tuning['kl_before']:.5f} -> {tuning['kl_after']:.5f} "
                f"over {tuning['steps']} steps ({tuning['tuned_matrices']} matrices)")
    quality = compare_to_expert(student, heldout, heldout_lp)
    del student
    gc.collect()

    nbytes = sum(d.nbytes for d in deltas.values())
    return CompressedExpert(
        deltas=deltas,
        num_parameters=expert.num_parameters(),
        nbytes=nbytes,
        dtype=dtype,
        quality=quality,
        tuning=tuning,
        seconds=time.time() - t0,
    )
