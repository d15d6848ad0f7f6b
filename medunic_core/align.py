"""Language-disentangled alignment state (DESIGN.md, "Federated alignment").

CTR works centrally because every BatchNorm of the text path and CTR's cross-correlation
C = Z_A^T Z_B / N are statistics of a population that mixes the language communities.
A hospital sees one community only, so this module keeps, per community, sums that
aggregate by addition:

- for every BatchNorm input x of the text heads (P_l, P_d; the image head with
  ``align.image``): ``n``, ``sum x`` and ``sum x^2``, one entry per call of the layer in a
  forward pass (P_d runs twice, once per dropout view);
- CTR's cross-moment ``sum u_A u_B^T`` of P_d's output before its last BatchNorm.

Two uses. In training (``align.train_norm = mixed``) a site of community c normalises every
listed BatchNorm with the mixture p_c * (live batch moments) + sum_c' p_c' * (stored moments
of c'), and CTR's C is the same mixture, so that gradients see a mixed population while
only the live part carries gradients. A site whose batches hold several communities (a
site of ``en+es``) mixes in only the communities its batch lacks: with all of them live it
normalises as centralized training does, over the batch. At inference (``align.eval_norm = community``) a
report is normalised with its own community's statistics.

Everything here is plain torch: the federated code moves :class:`AlignmentState` as a flat
dict of arrays (:meth:`AlignmentState.to_flat`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

CROSS_KEY = "ctr.cross"  # sum u_A u_B^T of P_d's last BatchNorm input (views A and B)
CTR_NORM = "ctr_head.norm"  # the BatchNorm whose two calls are views A and B
TEXT_HEADS = ("text_head.", "ctr_head.")
IMAGE_HEADS = ("image_head.",)
MODES = ("record", "local", "mixed", "community")


@dataclass
class AlignmentState:
    """Per-community sums: ``sums[community][key] -> tensor`` (float64).

    Keys are ``"<layer>#<call>.n|sum|sumsq"`` for BatchNorm inputs and :data:`CROSS_KEY`.
    Sums of the same community add; communities are never mixed here.
    """

    sums: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def communities(self) -> list[str]:
        return sorted(self.sums)

    def count(self, community: str) -> float:
        """Samples behind the community's statistics (the largest ``n`` it holds)."""
        ns = [float(v) for k, v in self.sums.get(community, {}).items() if k.endswith(".n")]
        return max(ns, default=0.0)

    def add(self, community: str, key: str, value: torch.Tensor, decay: float = 1.0) -> None:
        value = value.detach().to("cpu", torch.float64)
        bucket = self.sums.setdefault(community, {})
        old = bucket.get(key)
        bucket[key] = value.clone() if old is None else old * decay + value

    def merged(self, other: "AlignmentState") -> "AlignmentState":
        """A new state: the sums of both, added per community and key."""
        out = AlignmentState({c: {k: v.clone() for k, v in b.items()} for c, b in self.sums.items()})
        for c, bucket in other.sums.items():
            for k, v in bucket.items():
                out.add(c, k, v)
        return out

    def replaced_by(self, other: "AlignmentState") -> "AlignmentState":
        """This state with the communities present in ``other`` replaced by other's sums."""
        out = AlignmentState({c: dict(b) for c, b in self.sums.items()})
        out.sums.update({c: dict(b) for c, b in other.sums.items()})
        return out

    def only(self, communities: Sequence[str]) -> "AlignmentState":
        """This state with the sums of ``communities`` alone."""
        return AlignmentState({c: dict(b) for c, b in self.sums.items() if c in communities})

    def moments(self, community: str, key: str) -> Optional[tuple[float, torch.Tensor, torch.Tensor]]:
        """(n, mean, E[x^2]) of one BatchNorm input of one community, or None if absent."""
        bucket = self.sums.get(community, {})
        if f"{key}.n" not in bucket:
            return None
        n = float(bucket[f"{key}.n"])
        if n <= 0:
            return None
        return n, bucket[f"{key}.sum"] / n, bucket[f"{key}.sumsq"] / n

    def to_flat(self) -> dict[str, np.ndarray]:
        """``{"<community>/<key>": array}``, float32, for the wire and for checkpoints."""
        return {
            f"{c}/{k}": v.numpy().astype(np.float32).reshape(v.shape or (1,))
            for c, bucket in sorted(self.sums.items())
            for k, v in sorted(bucket.items())
        }

    @classmethod
    def from_flat(cls, flat: Mapping[str, np.ndarray]) -> "AlignmentState":
        state = cls()
        for name, value in flat.items():
            community, sep, key = name.partition("/")
            if not sep or not key:
                raise ValueError(f"alignment entry '{name}' is not '<community>/<key>'")
            t = torch.as_tensor(np.asarray(value), dtype=torch.float64)
            state.sums.setdefault(community, {})[key] = t.reshape(()) if key.endswith(".n") else t
        return state


class AlignableBatchNorm1d(nn.BatchNorm1d):
    """A BatchNorm1d that an :class:`Aligner` can observe and re-normalise.

    Without an attached aligner it is exactly ``nn.BatchNorm1d`` (same parameters, buffers
    and state-dict keys), so centralized code and checkpoints never notice it.
    """

    aligner: Optional["Aligner"] = None
    align_name: str = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aligner is None:
            return super().forward(x)
        return self.aligner.normalize(self, x)

    def _apply_norm(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y


class Aligner:
    """Records per-community BatchNorm sums and, when asked, normalises with mixed moments.

    ``mode``:
      - ``"record"``: ordinary BatchNorm; only collects sums into :attr:`collected`.
      - ``"local"``: training standardises each community's rows on their own batch
        moments (a batch of one community, a one-language site's: plain BatchNorm).
      - ``"mixed"``: training normalises with the mixture of the live batch and the
        moments from ``others`` of the communities the batch lacks (weights ``weights``,
        summing to 1), and :meth:`mixed_cross` gives CTR's C for the mixed population; a
        batch of every community is plain BatchNorm.
      - ``"community"``: evaluation normalises each row with its own community's
        moments from ``others`` (``align.eval_norm = community``).

    ``decay`` < 1 turns the collected sums into exponential moving sums (centralized
    training keeps a recent window); federated rounds use 1 (plain sums of the round).
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "record",
        others: Optional[AlignmentState] = None,
        weights: Optional[Mapping[str, float]] = None,
        decay: float = 1.0,
        include_image: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown alignment mode '{mode}' ({', '.join(MODES)})")
        self.mode, self.others, self.decay = mode, others or AlignmentState(), decay
        self.weights = dict(weights or {})
        prefixes = TEXT_HEADS + (IMAGE_HEADS if include_image else ())
        self.layers = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, AlignableBatchNorm1d) and name.startswith(prefixes)
        ]
        if not self.layers:
            raise ValueError("the model has no alignable BatchNorm layers in its heads")
        self.collected = AlignmentState()
        self._communities: list[str] = []
        self._calls: dict[str, int] = {}
        self._ctr_inputs: list[torch.Tensor] = []
        self._ctr_moments: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._live: frozenset[str] = frozenset()

    # -- lifecycle ---------------------------------------------------------------------
    @contextmanager
    def attached(self) -> Iterator["Aligner"]:
        """Route the listed BatchNorms through this aligner for the duration of the block."""
        for name, m in self.layers:
            m.aligner, m.align_name = self, name
        try:
            yield self
        finally:
            for _, m in self.layers:
                m.aligner = None

    def begin_batch(self, communities: Sequence[str]) -> None:
        """Declare the community of every row of the next forward pass."""
        self._communities = list(communities)
        self._calls.clear()
        self._ctr_inputs.clear()
        self._ctr_moments.clear()
        self._live = frozenset(self._communities)

    # -- the BatchNorm hook ------------------------------------------------------------
    def normalize(self, bn: AlignableBatchNorm1d, x: torch.Tensor) -> torch.Tensor:
        call = self._calls.get(bn.align_name, 0)
        self._calls[bn.align_name] = call + 1
        key = f"{bn.align_name}#{call}"
        if len(self._communities) != x.shape[0]:
            raise ValueError(
                f"{key}: begin_batch() declared {len(self._communities)} rows, the batch has {x.shape[0]}"
            )
        if bn.training:
            self._record(key, x)
        mean_var = None
        if self.mode == "mixed" and bn.training:
            mean_var = self._mixed_moments(key, x)
        elif self.mode == "community" and not bn.training:
            return self._community_norm(bn, key, x, self.others)
        elif self.mode == "local" and bn.training and len(self._live) > 1:
            return self._community_norm(bn, key, x, None)
        if mean_var is None:  # ordinary BatchNorm (no stored moments for this layer yet)
            y = nn.BatchNorm1d.forward(bn, x)
            if bn.align_name == CTR_NORM and bn.training:
                self._ctr_moments.append((x.mean(0), x.var(0, unbiased=False)))
            return y
        mean, var = mean_var
        _track(bn, mean, var)
        if bn.align_name == CTR_NORM:
            self._ctr_moments.append((mean, var))
        return bn._apply_norm(x, mean, var)

    def _record(self, key: str, x: torch.Tensor) -> None:
        xd = x.detach().double()
        for c in sorted(set(self._communities)):
            rows = [i for i, rc in enumerate(self._communities) if rc == c]
            xc = xd[rows]
            self.collected.add(c, f"{key}.n", torch.tensor(float(len(rows))), self.decay)
            self.collected.add(c, f"{key}.sum", xc.sum(0), self.decay)
            self.collected.add(c, f"{key}.sumsq", (xc * xc).sum(0), self.decay)
        if key.startswith(CTR_NORM + "#"):
            self._ctr_inputs.append(xd)
            if len(self._ctr_inputs) == 2:
                u_a, u_b = self._ctr_inputs
                for c in sorted(set(self._communities)):
                    rows = [i for i, rc in enumerate(self._communities) if rc == c]
                    self.collected.add(c, CROSS_KEY, u_a[rows].t() @ u_b[rows], self.decay)

    def _mix(self) -> list[tuple[str, float]]:
        """(community, weight) of the communities the batch lacks; the live batch's weight
        is the rest."""
        others = [c for c in self.others.communities if c not in self._live]
        if self.weights:
            return [(c, float(self.weights.get(c, 0.0))) for c in others]
        counts = {c: self.others.count(c) for c in others}
        live_n = sum(self.others.count(c) for c in self._live) or float(len(self._communities))
        total = live_n + sum(counts.values())
        return [(c, counts[c] / total) for c in others]

    def live_weight(self) -> float:
        return 1.0 - sum(w for _, w in self._mix())

    def _mixed_moments(self, key: str, x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        mix = self._mix()
        stored = [(w, self.others.moments(c, key)) for c, w in mix]
        if not stored or any(m is None for _, m in stored):
            return None  # round 1 or a layer nobody reported yet: plain local BatchNorm
        p = self.live_weight()
        mean = p * x.mean(0)
        second = p * (x * x).mean(0)
        for w, (_, m, q) in stored:
            mean = mean + w * m.to(x)
            second = second + w * q.to(x)
        return mean, second - mean * mean

    def _community_norm(
        self, bn: AlignableBatchNorm1d, key: str, x: torch.Tensor, stats: Optional[AlignmentState]
    ) -> torch.Tensor:
        """Each community's rows standardised with that community's moments: stored ones
        (``stats``) or, when None, the rows' own batch moments (in training the running
        statistics follow the whole batch, the population ``eval_norm = global`` assumes)."""
        if stats is None and bn.training:
            _track(bn, x.mean(0), x.var(0))
        out = torch.empty_like(x)
        for c in sorted(set(self._communities)):
            rows = [i for i, rc in enumerate(self._communities) if rc == c]
            if stats is None:
                mean, var = x[rows].mean(0), x[rows].var(0, unbiased=False)
            else:
                m = stats.moments(c, key)
                if m is None:
                    raise ValueError(
                        f"no '{c}' statistics for {key}: eval_norm=community needs the alignment "
                        f"state of every community (has: {stats.communities})"
                    )
                mean, var = m[1].to(x), (m[2] - m[1] * m[1]).clamp_min(0).to(x)
            out[rows] = bn._apply_norm(x[rows], mean, var)
        return out

    # -- CTR ---------------------------------------------------------------------------
    def mixed_cross(self, z_a: torch.Tensor, z_b: torch.Tensor) -> Optional[torch.Tensor]:
        """C_mix = p_c Z_A^T Z_B / n + sum_c' p_c' C_c' (D x D), or None when not mixing.

        Each C_c' is re-centred and re-scaled from the stored raw sums with the same mixed
        moments that standardised Z_A and Z_B, so C_mix equals the C of the concatenated
        mixed batch.
        """
        if self.mode != "mixed" or len(self._ctr_moments) != 2:
            return None
        mix = self._mix()
        if not mix:
            return None
        (mu_a, var_a), (mu_b, var_b) = self._ctr_moments
        eps = next(m for n, m in self.layers if n == CTR_NORM).eps
        sd_a, sd_b = torch.sqrt(var_a + eps), torch.sqrt(var_b + eps)
        c = self.live_weight() * (z_a.t() @ z_b) / z_a.shape[0]
        for community, w in mix:
            bucket = self.others.sums.get(community, {})
            if CROSS_KEY not in bucket:
                return None
            n = float(bucket[f"{CTR_NORM}#0.n"])
            m_a = (bucket[f"{CTR_NORM}#0.sum"] / n).to(z_a)
            m_b = (bucket[f"{CTR_NORM}#1.sum"] / n).to(z_a)
            cross = (bucket[CROSS_KEY] / n).to(z_a)
            centred = cross - m_a[:, None] * mu_b[None, :] - mu_a[:, None] * m_b[None, :] + mu_a[:, None] * mu_b[None, :]
            c = c + w * centred / (sd_a[:, None] * sd_b[None, :])
        return c


def _track(bn: nn.BatchNorm1d, mean: torch.Tensor, var: torch.Tensor) -> None:
    """One update of ``bn``'s running statistics, as a normalisation outside its own forward."""
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            m = bn.momentum if bn.momentum is not None else 0.1
            bn.running_mean.mul_(1 - m).add_(m * mean.detach())
            bn.running_var.mul_(1 - m).add_(m * var.detach())
            bn.num_batches_tracked += 1


def alignment_layout(model: nn.Module, ctr: bool = True, include_image: bool = False,
                     heads: Sequence[str] = TEXT_HEADS) -> dict[str, tuple[int, ...]]:
    """Keys and wire shapes of one community's sums from a training round
    (:meth:`AlignmentState.to_flat` without the community prefix).

    Each listed BatchNorm contributes ``n`` (1,), ``sum`` and ``sumsq`` (features,) per call
    in one forward pass of MedUniC: P_l once; P_d twice with ``ctr`` (one call per dropout
    view), plus CTR's cross-moment (D, D); P_V twice with ``include_image`` (weak and strong
    views). The coordinator validates the sums a site sends against it.
    """
    calls = {"text_head.": 1, "ctr_head.": 2 if ctr else 0, "image_head.": 2 if include_image else 0}
    prefixes = tuple(heads) + (IMAGE_HEADS if include_image else ())
    out: dict[str, tuple[int, ...]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, AlignableBatchNorm1d) or not name.startswith(prefixes):
            continue
        for call in range(calls[name[: name.index(".") + 1]]):
            out[f"{name}#{call}.n"] = (1,)
            out[f"{name}#{call}.sum"] = (m.num_features,)
            out[f"{name}#{call}.sumsq"] = (m.num_features,)
    if ctr and "ctr_head." in prefixes:
        features = model.get_submodule(CTR_NORM).num_features
        out[CROSS_KEY] = (features, features)
    return out


@torch.no_grad()
def community_statistics(model: nn.Module, features: torch.Tensor, communities: Sequence[str]) -> AlignmentState:
    """Per-community statistics of P_l for ``align.eval_norm = community``.

    ``features`` are F_l outputs (N, d) of reports (eval mode, no dropout) and
    ``communities`` their languages. Every BatchNorm of P_l standardises each community on
    its own moments while the sums are taken, so that each layer's statistics describe the
    inputs it will see at inference. Buffers (running statistics) are left untouched.
    """
    head = model.text_head
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    was_training = head.training
    aligner = Aligner(model, mode="local")
    try:
        head.train()
        with aligner.attached():
            aligner.begin_batch(communities)
            head(features)
    finally:
        head.load_state_dict(saved)
        head.train(was_training)
    return AlignmentState(
        {c: {k: v for k, v in b.items() if k.startswith("text_head.")} for c, b in aligner.collected.sums.items()}
    )
