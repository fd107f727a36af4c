"""Quality of a reconstruction against the uncompressed expert, on held-out samples.

Per token position t (predicting token t+1 of the sample):
- KL(expert || reconstruction) of the next-token distributions (nats, mean over positions);
- top-1 agreement: both put their highest probability on the same token;
- perplexity of each model on the sample's actual next tokens.
"""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def compare_to_expert(model: nn.Module, seqs: list[torch.Tensor], expert_logprobs: list[torch.Tensor]) -> dict:
    if not seqs:
        return {}
    device = next(model.parameters()).device
    kl_sum = agree = nll_e = nll_r = 0.0
    for ids, t_lp in zip(seqs, expert_logprobs, strict=True):
        s_lp = torch.log_softmax(model(input_ids=ids[None].to(device), use_cache=False).logits[0].float(), -1).cpu()
        t_lp = t_lp.float()
        kl_sum += float((t_lp.exp() * (t_lp - s_lp)).sum(-1).sum())
        agree += float((t_lp.argmax(-1) == s_lp.argmax(-1)).sum())
        targets = ids[1:]
        nll_e -= float(t_lp[:-1].gather(1, targets[:, None]).sum())
        nll_r -= float(s_lp[:-1].gather(1, targets[:, None]).sum())
    return quality_summary(kl_sum, agree, nll_e, nll_r, [len(ids) for ids in seqs])


def quality_summary(kl_sum: float, agree: float, nll_expert: float, nll_reconstructed: float, lengths: list[int]) -> dict:
    """Means over positions: KL and top-1 agreement over every position of every sample, the
    perplexities over the positions that have a next token (all but each sample's last)."""
    positions = sum(lengths)
    predicted = positions - len(lengths)
    return {
        "kl": kl_sum / positions,
        "top1_agreement": agree / positions,
        "ppl_expert": math.exp(nll_expert / predicted),
        "ppl_reconstructed": math.exp(nll_reconstructed / predicted),
        "heldout_samples": len(lengths),
        "heldout_tokens": positions,
    }
