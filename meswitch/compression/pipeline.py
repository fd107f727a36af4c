"""Compress one expert against its base: calibrate, compress layer by layer, tune, measure.

The work is done by layerwise.LayerwiseRun, one decoder layer at a time, so memory does not
grow with depth (see that module). Step sizes are tuned in one of three ways (`tune`):

- blockwise   each layer's step sizes and offsets are tuned as the layer is compressed, to bring
              its output on the student's own inputs to the expert layer's output (mean squared
              error); memory stays bounded;
- end-to-end  after all layers are compressed, every step size is tuned at once by distillation:
              KL(expert || base + compressed delta) of next-token distributions on the
              calibration samples. This loads the whole base model as the student, so it needs
              memory for the model in the model dtype plus autograd's activations;
- both        blockwise, then end-to-end.

`tune_steps` is the number of steps (one calibration sample each): per layer for blockwise, in
total for end-to-end. 0 turns tuning off.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoints import Checkpoint, check_compatible, fingerprint
from .calibration import load_samples, split_heldout, tokenize_samples
from .delta import CompressedDelta
from .layerwise import (EMBED, HEAD, TUNE_MODES, DeltaStore, LayerwiseRun, WorkState, _load_list, compare_heads,
                        compress_named, logprobs, run_key)
from .methods import CompressionSpec
from .student import build_student, tune_step_sizes

DEFAULT_TUNE = "blockwise"
BLOCKWISE_LR = 5e-3
END_TO_END_LR = 2e-3


@dataclass
class CalibrationConfig:
    path: str | None = None  # None: built-in samples
    max_len: int = 128
    max_samples: int = 64
    heldout_fraction: float = 0.25


@dataclass
class CompressedExpert:
    store: DeltaStore  # the compressed deltas, on disk in the work directory
    num_parameters: int
    nbytes: int  # tensor payloads; the bundle counts the file on disk
    dtype: torch.dtype
    workdir: Path
    quality: dict = field(default_factory=dict)
    tuning: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def deltas(self) -> dict[str, CompressedDelta]:
        """Every delta in memory (small experts, tests, benchmarks)."""
        return self.store.load()

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def compress_tensors(base: Checkpoint, expert: Checkpoint, spec: CompressionSpec, moments: dict[str, torch.Tensor],
                     progress: bool = True) -> dict[str, CompressedDelta]:
    """Every tensor's compressed delta, given the calibration moments of the whole model (the
    whole-model way, kept for benchmarks/evaluate.py; the CLI compresses layer by layer)."""
    names = expert.weight_names()
    return {n: compress_named(n, base, expert, spec, moments)
            for n in tqdm(names, desc="compress tensors", disable=not progress, leave=False)}


def compress_expert(
    base: Checkpoint,
    expert: Checkpoint,
    spec: CompressionSpec,
    calib: CalibrationConfig,
    tune_steps: int = 0,
    tune: str = DEFAULT_TUNE,
    device: str = "cpu",
    model_dtype: torch.dtype = torch.float32,
    name: str = "expert",
    workdir: str | Path | None = None,
    resume: bool = False,
    base_fingerprint: str | None = None,
    lr: float | None = None,
    progress: bool = True,
    log=print,
    stop_after_layer: int | None = None,
) -> CompressedExpert:
    """Compress `expert` into a DeltaStore under `workdir` (a temporary directory if None; the
    caller stages the result and calls cleanup()). With `resume`, finished steps found in
    `workdir` from an interrupted run with the same inputs and settings are kept."""
    t0 = time.time()
    spec.validate()
    if tune not in TUNE_MODES:
        raise ValueError(f"--tune must be one of {', '.join(TUNE_MODES)}, got {tune!r}")
    if spec.method in ("fp16", "svd-mixed"):
        tune_steps = 0  # nothing to tune (svd-mixed: its quantized singular vectors are not tuned)
    check_compatible(base, expert, name)
    fp = base_fingerprint or fingerprint(base)

    tokenizer = expert.load_tokenizer()
    samples = load_samples(calib.path)[: calib.max_samples]
    seqs = tokenize_samples(tokenizer, samples, calib.max_len)
    calib_seqs, heldout = split_heldout(seqs, calib.heldout_fraction)
    log(f"[{name}] calibration: {len(calib_seqs)} samples, held out for quality: {len(heldout)}")

    blockwise = tune_steps if tune in ("blockwise", "both") else 0
    end_to_end = tune_steps if tune in ("end-to-end", "both") else 0
    block_lr = lr or BLOCKWISE_LR
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"meswitch-{name}-"))
    key = run_key(fp, expert, spec, calib_seqs, heldout, tune if tune_steps else None, tune_steps, block_lr, model_dtype)
    state = WorkState.open(work, key, resume, log)
    run = LayerwiseRun(base, expert, spec, calib_seqs, heldout, work, state, blockwise_steps=blockwise, lr=block_lr,
                       model_dtype=model_dtype, device=device, progress=progress, name=name,
                       stop_after_layer=stop_after_layer)
    run.teacher_pass()
    run.student_pass()
    quality = state.result.get("quality", {})
    tuning = dict(state.result.get("tuning", {}))
    store = run.store
    if end_to_end:
        e2e_dir = work / "deltas_e2e"
        if not state.end_to_end:
            state.result["end_to_end"] = _tune_end_to_end(run, end_to_end, lr or END_TO_END_LR, e2e_dir, progress)
            state.end_to_end = True
            state.save()
        store = DeltaStore(e2e_dir)
        e2e = state.result["end_to_end"]
        quality = e2e["quality"]
        blockwise_kl = tuning
        tuning = {"mode": tune, **e2e["tuning"]}
        if blockwise_kl:
            tuning.update({"kl_before": blockwise_kl["kl_before"], "kl_blockwise": blockwise_kl["kl_after"],
                           "blockwise": blockwise_kl})
    if "kl_before" in tuning:
        log(f"[{name}] step-size tuning ({tuning['mode']}): calibration KL {tuning['kl_before']:.5f} -> "
            f"{tuning['kl_after']:.5f} ({tuning['tuned_matrices']} matrices)")
    return CompressedExpert(store=store, num_parameters=expert.num_parameters(), nbytes=store.nbytes,
                            dtype=run.weight_dtype, workdir=work, quality=quality, tuning=tuning,
                            seconds=time.time() - t0)


def _tune_end_to_end(run: LayerwiseRun, steps: int, lr: float, out: Path, progress: bool) -> dict:
    """Today's distillation on the whole student (base + every compressed delta): needs the
    whole base model in memory. Writes the tuned deltas to `out` (atomically, as a directory)."""
    deltas = run.store.load()
    tdir = run.work / "teacher"
    head = run.expert.get(run.expert.resolve(HEAD)).to(device=run.device, dtype=run.model_dtype)
    t_cal = _load_list(tdir / "final.safetensors", "cal", run.device)
    teacher_lp = logprobs(t_cal, head, torch.float16)  # float16 halves the targets' memory
    del t_cal, head
    student = build_student(run.base, deltas, run.expert.shape(EMBED)[0], run.device, run.weight_dtype, run.model_dtype)
    tuning = tune_step_sizes(student, run.base, deltas, run.calib, teacher_lp, steps, lr=lr, progress=progress,
                             weight_dtype=run.weight_dtype)
    del teacher_lp
    with torch.no_grad():
        f_held = [student.model(input_ids=ids[None].to(run.device), use_cache=False).last_hidden_state
                  for ids in run.heldout]
    w = student.lm_head.weight
    quality = compare_heads([(run.heldout, _load_list(tdir / "final_heldout.safetensors", "h", run.device), f_held)],
                            run.teacher_head(), lambda a, b: w[a:b], run.head_vocab, run.stack.hidden,
                            run.model_dtype, run.device)[0]
    del student
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DeltaStore(tmp).write("all", deltas)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"tuning": {**tuning, "lr": lr}, "quality": quality}
