"""One optimizer step of each kind: an NTP batch, or an RLP batch (DESIGN.md section 1, steps 1-9).

The RLP step, top to bottom:
  1. draw contexts from document windows; S_ema: one teacher-forced, no-think forward of the EMA
     teacher per window scores all its sampled positions (and an optional position filter);
  2. sample G thoughts per context with the current policy (θ_old = θ: one update per rollout batch),
     one cached prefill per context shared by its G thoughts (`nemo_rlp.rollout.sampler`);
  3. one forward of the policy over the rows `context, <think>, c, </think>, x_t` gives, at once,
     log π_θ of every sampled thought token (with gradient) and S_pred = log p_θ(x_t | x_<t, c)
     (detached). Before any update θ_old = θ, so the behaviour log-probs are this forward's,
     detached, and the first ratio is exactly 1. The sampler computed both in its own pass too;
     they are kept as a check (`logp_mismatch_max`, `s_pred_mismatch_max`), not used, so that a
     difference between inference and training kernels cannot bias the ratio;
  4. reward, group-relative advantage and the clipped surrogate (`nemo_rlp.objective.rlp_loss`);
     only sampled thought tokens carry gradient;
  5. backward, optimizer step, EMA update (in `PolicyWithTeacher.optimizer_step`).
"""

from __future__ import annotations

import numpy as np
import torch

from nemo_rlp.config import RLPConfig
from nemo_rlp.data.sampling import ContextSampler, RLPContext, teacher_scorer
from nemo_rlp.models.handle import ModelHandle
from nemo_rlp.objective import rlp_loss
from nemo_rlp.rollout.sampler import Markers, SamplingParams, ThoughtBatch, sample_thoughts
from nemo_rlp.training.policy import PolicyWithTeacher


def ntp_step(model: PolicyWithTeacher, tokens: torch.Tensor) -> dict[str, float]:
    model.policy.train()
    model.zero_grad()
    loss = model.policy.ntp_loss(tokens)
    loss.backward()
    result = model.optimizer_step()
    return {"ntp_loss": float(loss.detach()), "grad_norm": result.grad_norm, "updated": float(result.updated)}


def sample_contexts(
    model: PolicyWithTeacher, sampler: ContextSampler, n: int, pad: int, device: torch.device
) -> tuple[list[RLPContext], torch.Tensor]:
    """Draw n contexts and their S_ema = log p̄_φ(x_t | x_<t) [n]: one teacher forward per document
    window scores every position sampled from it (and feeds the optional position filter)."""
    scorer = teacher_scorer(model.teacher.token_logprobs, pad, device)
    windows = sampler.sample_windows(n, scorer=scorer)
    contexts = [c for w in windows for c in w.contexts()]
    s_ema = torch.from_numpy(np.concatenate([w.s_ema() for w in windows])).to(device)
    return contexts, s_ema


def thought_logprobs(
    handle: ModelHandle, batch: ThoughtBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over the rows: log-probs of thought tokens [B*G, U], their mask, S_pred [B*G]."""
    logprobs = handle.token_logprobs(batch.tokens)
    index, mask = batch.thought_token_index()
    rows = torch.arange(batch.tokens.shape[0], device=batch.tokens.device)
    logp_thought = logprobs.gather(1, index - 1)
    s_pred = logprobs[rows, batch.answer_index - 1]
    return logp_thought, mask, s_pred


def rlp_step(
    model: PolicyWithTeacher,
    sampler: ContextSampler,
    num_contexts: int,
    cfg: RLPConfig,
    markers: Markers,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[dict[str, float], ThoughtBatch, torch.Tensor]:
    """Returns the step's metrics, the rollouts and their rewards [B, G] (for logging)."""
    # φ ← θ at the first RLP batch, before the teacher scores anything.
    model.seed_teacher()
    contexts, s_ema = sample_contexts(model, sampler, num_contexts, markers.pad, device)
    params = SamplingParams(
        group_size=cfg.group_size,
        max_thought_len=cfg.max_thought_len,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        mode=cfg.rollout_mode,
    )
    batch = sample_thoughts(
        model.policy,
        [c.prefix for c in contexts],
        [c.target for c in contexts],
        params,
        markers,
        generator,
        device,
    )

    model.policy.train()
    model.zero_grad()
    B, G = len(contexts), cfg.group_size
    logp_new, mask, s_pred = thought_logprobs(model.policy, batch)
    logp_ref = None
    if cfg.kl_beta > 0:
        with torch.no_grad():
            logp_ref = thought_logprobs(model.teacher, batch)[0].view(B, G, -1)
    loss, metrics = rlp_loss(
        logp_new.view(B, G, -1),
        logp_new.detach().view(B, G, -1),
        mask.view(B, G, -1),
        s_pred.detach().view(B, G),
        s_ema,
        cfg.eps_low,
        cfg.eps_high,
        kl_beta=cfg.kl_beta,
        logp_ref=logp_ref,
    )
    loss.backward()
    result = model.optimizer_step()

    out = {k: float(v) for k, v in metrics.items()}
    # The sampler's behaviour log-probs and S_pred against the training forward's: ~1e-6 in fp32;
    # on GPU a growing gap means inference and training kernels disagree.
    out["logp_mismatch_max"] = float(((logp_new.detach() - batch.behaviour_logprobs).abs() * mask).max())
    out["s_pred_mismatch_max"] = float((s_pred.detach() - batch.s_pred).abs().max())
    out.update(
        rlp_loss=float(loss.detach()),
        end_marker_rate=float(batch.end_sampled.float().mean()),
        thought_len_max=float(batch.thought_len.max()),
        grad_norm=result.grad_norm,
        updated=float(result.updated),
    )
    rewards = (s_pred.detach().view(B, G) - s_ema[:, None]).cpu()
    return out, batch, rewards
