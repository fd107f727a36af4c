"""Per-matrix relative reconstruction error ||D - D_hat||^2 / ||D||^2 (unweighted: s = ones, no
calibration) of svd-mixed, lowrank and mixed at about 1 bit, on the real SmolLM2 math expert:

    OMP_NUM_THREADS=1 python benchmarks/svd_mixed_error.py [BASE] [EXPERT]

(defaults: /work/cache/base, /work/cache/eval-compress/experts/math). Each cell is error@bits,
the bits counting every stored byte of the matrix. A rough check of the compressors, not of the
model's quality (benchmarks/evaluate.py measures that).
"""
import sys
import time

from meswitch.checkpoints import Checkpoint
from meswitch.compression.lowrank import lowrank_matrix
from meswitch.compression.methods import quantize_matrix
from meswitch.compression.svd_mixed import svd_mixed_matrix

base = Checkpoint.open(sys.argv[1] if len(sys.argv) > 1 else "/work/cache/base")
exp = Checkpoint.open(sys.argv[2] if len(sys.argv) > 2 else "/work/cache/eval-compress/experts/math")
names = [f"model.layers.{i}.{m}.weight" for i in (0, 15, 29)
         for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def bits(q) -> float:
    return 8 * q.nbytes / (q.shape[0] * q.shape[1])


def err(d, q) -> float:
    return float(((d - q.dequantize()) ** 2).sum() / (d ** 2).sum())


print(f"{'matrix':40s} {'svd-1':>14s} {'svd-2':>14s} {'lowrank-1 r.2':>14s} {'mixed-1 s0':>14s} {'mixed-1 s.01':>14s}")
tot = {}
for n in names:
    d = exp.get(n).float() - base.get(base.resolve(n)).float()
    row = []
    for key, f in (("svd-1", lambda: svd_mixed_matrix(d, 1)), ("svd-2", lambda: svd_mixed_matrix(d, 2)),
                   ("lowrank-1", lambda: lowrank_matrix(d, 1, 0.2, 0)),
                   ("mixed-1 s0", lambda: quantize_matrix(d, 1, 0, 0)),
                   ("mixed-1 s.01", lambda: quantize_matrix(d, 1, 0, round(0.01 * d.shape[1])))):
        q = f()
        e, b = err(d, q), bits(q)
        tot.setdefault(key, []).append((e, b, d.numel()))
        row.append(f"{e:.3f}@{b:.2f}")
    print(f"{n:40s} " + " ".join(f"{c:>14s}" for c in row), flush=True)
print("mean over matrices (error, bits):")
for k, v in tot.items():
    print(f"  {k:14s} err {sum(e for e, _, _ in v) / len(v):.4f}  bits {sum(b * m for _, b, m in v) / sum(m for *_, m in v):.3f}")
n = "model.embed_tokens.weight"
d = exp.get(n).float() - base.get(base.resolve(n)).float()
t = time.time(); q = svd_mixed_matrix(d, 1); t = time.time() - t
print("embedding svd-1", f"{err(d, q):.4f}@{bits(q):.3f}", f"{t:.1f}s", [(b.rank, b.bits) for b in q.blocks])
q = quantize_matrix(d, 1, 0, 0); print("embedding mixed-1 s0", f"{err(d, q):.4f}@{bits(q):.3f}")
q = quantize_matrix(d, 1, 0, 6); print("embedding mixed-1 s.01", f"{err(d, q):.4f}@{bits(q):.3f}")
