"""Next-item training losses, shared by every model that turns item sequences into user states.

Shapes: B = batch, L = positions, d = hidden, k = negatives, V = n_items + 1 rows of the item table
(row 0 is padding and never a target). A loss takes user states (B, L, d), the item table (V, d),
targets (B, L) with 0 where a position has no target, and, where it samples, negatives (B, S, k)
drawn by `uniform_negatives` (S = L: per position; S = 1: shared by every position of a row).
A caller with flat (N, d) states passes them as (N, 1, d).

- `bce`     SASRec's loss (Kang & McAuley, ICDM 2018): sigmoid cross-entropy of the target against
            uniform negatives, one per position in the original.
- `gbce`    gSASRec's generalised BCE (Petrov & Macdonald, RecSys 2023). With k negatives out of
            |I| - 1 items (sampling rate a = k / (|I| - 1)) BCE learns overconfident scores; gBCE
            raises the target's probability to the power b = a (t (1 - 1/a) + 1/a): t = 0 is plain
            BCE, t = 1 calibrates towards the full softmax. -log(sigmoid(s)^b) = b softplus(-s), so
            no transformed logit is needed.
- `sampled` softmax over the target and k uniform negatives; with logQ correction a negative's
            logit becomes s - log(k q(i)), q the sampling probability, so the sampled partition
            sum estimates the full one (Bengio & Senecal, 2008).
- `ce`      softmax over the whole catalogue (Klenitskiy & Vasilev, RecSys 2023).
- `x+y`     a mixture: loss x plus `mix_weight` times loss y (e.g. `ce+bce`).

Every loss is the mean over target positions. Nothing here loops in Python over positions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

BASE_LOSSES = ("bce", "gbce", "sampled", "ce")
# Negatives per position (bce, SASRec's one) or per row (gbce and sampled share theirs over the
# row's positions: gSASRec draws 256 per position, which needs B*L*k*d floats of gathered rows).
DEFAULT_NEGATIVES = {"bce": 1, "gbce": 256, "sampled": 256, "ce": 0}
PER_POSITION = {"bce": True, "gbce": False, "sampled": False, "ce": False}


@dataclass
class LossConfig:
    name: str = "gbce"  # a base loss or a mixture "x+y"
    n_negatives: int = 0  # 0 = the loss's default (DEFAULT_NEGATIVES)
    gbce_t: float = 0.75  # gSASRec's calibration t (its paper's default)
    logq: bool = False  # logQ correction of sampled-softmax negatives
    mix_weight: float = 1.0  # weight of the second loss in a mixture

    def components(self) -> list[str]:
        parts = self.name.split("+")
        unknown = [p for p in parts if p not in BASE_LOSSES]
        if unknown or not 1 <= len(parts) <= 2:
            raise ValueError(f"unknown loss {self.name!r}; known: {', '.join(BASE_LOSSES)} or a mixture 'x+y'")
        return parts

    def negatives(self, component: str) -> int:
        return self.n_negatives or DEFAULT_NEGATIVES[component]

    def to_dict(self) -> dict:
        return asdict(self)


# -- negatives ------------------------------------------------------------------------------------
def _in_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, M) bool: is values[b, j] among rows[b, :]? One sort and one binary search per row."""
    ordered = rows.sort(dim=1).values.contiguous()  # (B, T)
    idx = torch.searchsorted(ordered, values.contiguous()).clamp_(max=ordered.shape[1] - 1)  # (B, M)
    return ordered.gather(1, idx) == values


def uniform_negatives(avoid: torch.Tensor, n_items: int, k: int, positions: int,
                      generator: torch.Generator | None = None, redraws: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, positions, k) item ids drawn uniformly from 1..n_items, and a (B, positions, k) bool
    `valid` that is False where a draw is among the row's `avoid` items (B, T) — its inputs and
    targets, as SASRec avoids the user's own items. Collisions are redrawn `redraws` times; the
    few left (a user who saw much of the catalogue) are masked out rather than looped over."""
    B = avoid.shape[0]
    device = generator.device if generator is not None else avoid.device
    avoid = avoid.to(device)
    negs = torch.randint(1, n_items + 1, (B, positions * k), generator=generator, device=device)
    hit = _in_rows(negs, avoid)
    for _ in range(redraws):
        if not bool(hit.any()):
            break
        fresh = torch.randint(1, n_items + 1, negs.shape, generator=generator, device=device)
        negs = torch.where(hit, fresh, negs)
        hit = _in_rows(negs, avoid)
    return negs.view(B, positions, k), ~hit.view(B, positions, k)


# -- logits ---------------------------------------------------------------------------------------
def target_logits(states: torch.Tensor, item_emb: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, L) score of each position's target."""
    return (states * item_emb[targets]).sum(-1)


def negative_logits(states: torch.Tensor, item_emb: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """(B, L, k) scores of negatives (B, S, k), S = L or S = 1 (shared by the row's positions)."""
    rows = item_emb[negatives]  # (B, S, k, d)
    if negatives.shape[1] == 1:
        return torch.bmm(states, rows[:, 0].transpose(1, 2))  # (B, L, k), rows gathered once per row
    return (states.unsqueeze(2) * rows).sum(-1)  # (B, L, k)


# -- losses on logits -----------------------------------------------------------------------------
def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def bce_loss(pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor,
             beta: float = 1.0) -> torch.Tensor:
    """-beta log sigmoid(s+) - sum log(1 - sigmoid(s-)), mean over positions; beta = 1 is SASRec's BCE."""
    per_position = beta * F.softplus(-pos) + (F.softplus(neg) * valid).sum(-1)  # (B, L)
    return _masked_mean(per_position, mask)


def gbce_beta(k: int, n_items: int, t: float) -> float:
    """gSASRec's exponent for k negatives out of n_items - 1 candidates at calibration t."""
    alpha = k / max(1, n_items - 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def sampled_softmax_loss(pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor,
                         log_q: torch.Tensor | float | None = None) -> torch.Tensor:
    """Cross-entropy of the target among itself and its negatives; `log_q` (log of each negative's
    expected count among the draws, k q(i)) is subtracted from negative logits when given."""
    if log_q is not None:
        neg = neg - log_q
    neg = neg.masked_fill(~valid, float("-inf"))
    logits = torch.cat([pos.unsqueeze(-1), neg], dim=-1)  # (B, L, 1 + k)
    return _masked_mean(torch.logsumexp(logits, dim=-1) - pos, mask)


def full_softmax_loss(states: torch.Tensor, item_emb: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the catalogue at every target position (padding is never a candidate)."""
    keep = targets > 0
    logits = states[keep] @ item_emb.T  # (P, V)
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets[keep])


# -- one entry point ------------------------------------------------------------------------------
def sequence_loss(cfg: LossConfig, states: torch.Tensor, item_emb: torch.Tensor, targets: torch.Tensor,
                  avoid: torch.Tensor, n_items: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The configured loss of states (B, L, d) against targets (B, L); `avoid` (B, T) are the row's
    own items, never drawn as its negatives (pass the inputs and targets)."""
    mask = (targets > 0).to(states.dtype)
    pos = None
    total = states.new_zeros(())
    for i, name in enumerate(cfg.components()):
        weight = 1.0 if i == 0 else cfg.mix_weight
        if name == "ce":
            total = total + weight * full_softmax_loss(states, item_emb, targets)
            continue
        k = cfg.negatives(name)
        negs, valid = uniform_negatives(avoid, n_items, k, targets.shape[1] if PER_POSITION[name] else 1, generator)
        negs, valid = negs.to(states.device), valid.to(states.device)
        valid = valid.expand(-1, targets.shape[1], -1).to(states.dtype)  # (B, L, k)
        if pos is None:
            pos = target_logits(states, item_emb, targets)
        neg = negative_logits(states, item_emb, negs)
        if name == "bce":
            term = bce_loss(pos, neg, mask, valid)
        elif name == "gbce":
            term = bce_loss(pos, neg, mask, valid, beta=gbce_beta(k, n_items, cfg.gbce_t))
        else:
            log_q = torch.log(torch.tensor(k / n_items)) if cfg.logq else None  # uniform: q(i) = 1 / n_items
            term = sampled_softmax_loss(pos, neg, mask, valid.bool(), log_q)
        total = total + weight * term
    return total
