"""Multi-head graph distillation (Lee & Song, "Graph-based Knowledge Distillation by Multi-head
Attention Network", BMVC 2019), after the authors' TensorFlow code (``sseung0703/KD_methods_with_TF``:
``nets/Relation.py::MHGD`` with ``op_util.Optimizer_w_MHGD``; ``sseung0703/Knowledge_distillation_via_TF2.0``:
``nets/Relation.py::MHGD``). Read for the definitions; the code here is our own.

Knowledge: per tap, the top right singular vector of each sample's ``(HW x C)`` feature matrix (teacher
top-1 with a canonical sign; the student's best match among its top-4, aligned, as in KD-SVD, see
:mod:`rolekd.distill.svd`). For each pair of consecutive taps ``(l-1, l)`` an attention network maps
the batch's vectors to ``H = 8`` graphs over the *samples* of the batch::

    K = BN(W_k v_l)   reshaped (B, D, H),   Q = BN(W_q v_{l-1})   reshaped (B, D, H),   D = (C_l + C_{l-1}) // 2
    G[h] = K[:, :, h] @ Q[:, :, h]^T          # (B, B) per head, no scaling

The KD loss is ``KL(softmax(tanh G_S) || softmax(tanh G_T))`` over each graph row, summed over the rows
(the batch), the heads and the tap pairs, as upstream's ``kld_loss`` (one ``tf.reduce_sum`` over
heads, rows and entries; role-kd ``pba/kd/nets/Relation.py``, ``KD_methods_with_TF`` ``nets/Relation.py``).
Like KD-SVD's, the loss grows with the batch size. Upstream clips the KD gradient to the task
gradient's norm (``op_util.Optimizer_w_MHGD``), so ``MHGD.clip_kd_grad = True``. Taps of different
widths go through a :class:`~rolekd.distill.adapter.ChannelAdapter` (the attention network is built on
the teacher's widths).

The attention network is trained first, on the frozen teacher only (upstream: 40 "init" epochs of SGD
with momentum 0.9, Nesterov, LR 0.1 and weight decay 5e-4, before the student's KD training): an
estimator predicts ``v_l`` from ``v_{l-1}`` through the graphs,
``normalize(W_o [softmax(G) * head_dropout] @ ReLU(BN(W_e v_{l-1})))``, and the loss is
``mean(1 - <estimate, v_l>)``. Upstream feeds the estimator ``softmax(G)`` and the KD loss
``softmax(tanh G)``; we keep both. :meth:`MHGD.prepare` does that training (``prepare_epochs`` epochs
over the batches given) and then freezes the network (eval-mode BatchNorm, no gradients), so during KD
only the student learns. Note: the role-wise KD authors' released code reportedly never runs this
training phase (their attention network stays at its random initialisation); we train it as the MHGD
paper and its code do.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models.taps import FeatureTaps
from .adapter import ChannelAdapter
from .base import Distiller, register
from .svd import SingularPair, canonical_sign, feature_matrix, singular_pairs, top_right_singular_many


# The frozen attention network's graphs from linear maps with its BatchNorm folded in (the same function, rounded
# differently; docs/RECIPE.md); False computes them as while training (linear, BatchNorm, per-head product).
FOLD_FROZEN_ATTENTION = True


class GraphAttention(nn.Module):
    """The multi-head attention between two consecutive taps (plus the estimator used to train it)."""

    def __init__(self, c_cur: int, c_prev: int, heads: int = 8):
        super().__init__()
        self.heads = int(heads)
        self.dim = d = (int(c_cur) + int(c_prev)) // 2
        self.key = nn.Sequential(nn.Linear(c_cur, d * heads, bias=False), nn.BatchNorm1d(d * heads))
        self.query = nn.Sequential(nn.Linear(c_prev, d * heads, bias=False), nn.BatchNorm1d(d * heads))
        self.est_in = nn.Sequential(nn.Linear(c_prev, d, bias=False), nn.BatchNorm1d(d), nn.ReLU())
        self.est_out = nn.Linear(d * heads, c_cur)

    def graph(self, v_cur: torch.Tensor, v_prev: torch.Tensor) -> torch.Tensor:
        """Raw attention logits ``(H, B, B)`` from vectors ``(B, C_l)`` and ``(B, C_{l-1})``.

        Frozen and in evaluation mode (the KD loss) each BatchNorm is an affine map, folded into its linear
        layer once (:meth:`_folded`, remade when a weight or statistic changes): keys and queries come per
        head straight from one ``baddbmm`` each, 6 operators a graph instead of 13 (and their backward) - the
        same function, rounded differently (float64: equal to ~1e-15, test_distill)."""
        b = v_cur.shape[0]
        if FOLD_FROZEN_ATTENTION and not self.training and not any(p.requires_grad for p in self._fold_inputs()):
            wk, bk, wq, bq = self._folded()
            h, c_cur, c_prev = wk.shape[0], v_cur.shape[-1], v_prev.shape[-1]
            k = torch.baddbmm(bk, v_cur.expand(h, b, c_cur), wk)  # (H, B, D)
            q = torch.baddbmm(bq, wq, v_prev.t().expand(h, c_prev, b))  # (H, D, B)
            return torch.bmm(k, q)
        k = self.key(v_cur).view(b, self.dim, self.heads).permute(2, 0, 1)  # (H, B, D)
        q = self.query(v_prev).view(b, self.dim, self.heads).permute(2, 1, 0)  # (H, D, B)
        return torch.bmm(k, q)  # one operator (``@`` adds its views and their backward nodes)

    def _fold_inputs(self) -> tuple[torch.Tensor, ...]:
        (lk, bnk), (lq, bnq) = self.key, self.query
        return (lk.weight, bnk.weight, bnk.bias, bnk.running_mean, bnk.running_var,
                lq.weight, bnq.weight, bnq.bias, bnq.running_mean, bnq.running_var)

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The key's and the query's evaluation-mode BatchNorm folded into their linear maps, per head: key weight
        ``(H, C_l, D)`` and bias ``(H, 1, D)``, query weight ``(H, D, C_{l-1})`` and bias ``(H, D, 1)``; made again
        when one of the tensors it is made from is replaced or changed in place (a load, ``.to()``)."""
        inputs = self._fold_inputs()
        # each tensor's object, version, storage, dtype and device (``.to()`` keeps a parameter's object and can
        # keep its version: its storage and dtype or device change)
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in inputs)
        made = self.__dict__.get("_fold")
        if made is None or not all(a is b for a, b in zip(inputs, made[0])) or made[1] != key:
            with torch.no_grad():
                out = []
                for lin, bn in (self.key, self.query):
                    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (D*H,), unit j = d * H + h
                    w = (lin.weight * scale[:, None]).view(self.dim, self.heads, -1)  # (D, H, C)
                    bias = (bn.bias - bn.running_mean * scale).view(self.dim, self.heads)  # (D, H)
                    out.append((w, bias))
                (wk, bk), (wq, bq) = out
                folded = (wk.permute(1, 2, 0).contiguous(), bk.t().unsqueeze(1).contiguous(),
                          wq.permute(1, 0, 2).contiguous(), bq.t().unsqueeze(2).contiguous())
            self.__dict__["_fold"] = made = (inputs, key, folded)
        return made[2]

    def estimate(self, v_prev: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Estimate ``v_l`` (B, C_l), unit norm, from ``v_{l-1}`` and the raw graphs ``g`` (H, B, B)."""
        h, b, _ = g.shape
        a = torch.softmax(g, dim=-1)
        noise = torch.randn(h, b, 1, device=g.device, dtype=g.dtype)  # random head dropout per sample
        a = a * (noise - noise.mean(0, keepdim=True) > 0).to(a.dtype)
        x = self.est_in(v_prev)  # (B, D)
        x = (a @ x).permute(1, 0, 2).reshape(b, h * self.dim)  # (B, H*D)
        return F.normalize(self.est_out(x), dim=-1)


def graph_kl(g_s: torch.Tensor, g_t: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(tanh g_s) || softmax(tanh g_t))`` per graph row, summed over rows and heads."""
    log_p_s = F.log_softmax(torch.tanh(g_s), dim=-1)
    log_p_t = F.log_softmax(torch.tanh(g_t), dim=-1)
    return (log_p_s.exp() * (log_p_s - log_p_t)).sum()


@register("mhgd")
class MHGD(Distiller):
    """Multi-head graph distillation; call :meth:`prepare` on the teacher before KD training."""

    needs_features = True
    needs_prepare = True
    clip_kd_grad = True

    def __init__(self, heads: int = 8, candidates: int = 4, prepare_epochs: int = 40, prepare_lr: float = 0.1,
                 prepare_momentum: float = 0.9, prepare_weight_decay: float = 5e-4, eps: float = 1e-4):
        super().__init__()
        if heads < 1 or candidates < 1 or prepare_epochs < 0:
            raise UserError(f"mhgd: need heads >= 1, candidates >= 1, prepare_epochs >= 0 "
                            f"(got {heads}, {candidates}, {prepare_epochs})")
        self.num_heads = int(heads)
        self.candidates = int(candidates)
        self.prepare_epochs = int(prepare_epochs)
        self.prepare_lr = float(prepare_lr)
        self.prepare_momentum = float(prepare_momentum)
        self.prepare_weight_decay = float(prepare_weight_decay)
        self.eps = float(eps)
        self.attention = nn.ModuleList()  # one GraphAttention per consecutive tap pair, built on first use
        self.register_buffer("channels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("prepared", torch.zeros((), dtype=torch.bool))
        # the two buffers as Python values (kept in step by build/freeze/loading): every KD step checks them,
        # and reading a device tensor there would make a CUDA host wait for the device (issue 32)
        self._channels: list[int] = []
        self._prepared = False
        self.prepare_history: list[float] = []  # mean estimator loss per prepare epoch
        self.adapter = ChannelAdapter()  # student -> teacher widths where they differ

    # ------------------------------------------------------------------ structure
    @property
    def built(self) -> bool:
        return len(self.attention) > 0

    @property
    def is_prepared(self) -> bool:
        return self._prepared

    def build(self, channels: list[int]) -> None:
        """Create the attention networks for taps of these channel counts (shallow to deep)."""
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise UserError("mhgd needs at least two feature taps (it relates consecutive layers)")
        device = self.prepared.device
        self.attention = nn.ModuleList(
            GraphAttention(c, cp, self.num_heads) for cp, c in zip(channels[:-1], channels[1:])).to(device)
        self.channels = torch.tensor(channels, dtype=torch.long, device=device)
        self._channels = channels

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ch = state_dict.get(prefix + "channels")
        if ch is not None and ch.numel() and (not self.built or ch.tolist() != self._channels):
            self.build(ch.tolist())  # a resumed run: rebuild the networks, then load their weights
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._channels = [int(c) for c in self.channels.tolist()]  # once per load, not per step
        self._prepared = bool(self.prepared)
        if self.is_prepared:  # a trained network stays frozen
            self.attention.requires_grad_(False)
            self.attention.eval()

    def freeze(self) -> None:
        """Fix the attention networks: eval-mode BatchNorm, no gradients."""
        for p in self.attention.parameters():
            p.grad = None
        self.attention.requires_grad_(False)
        self.attention.eval()
        self.prepared.fill_(True)
        self._prepared = True

    def train(self, mode: bool = True):
        super().train(mode)
        if self.is_prepared:
            self.attention.eval()
        return self

    # ------------------------------------------------------------------ vectors
    def teacher_vectors(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Top right singular vector (canonical sign) of each tap, ``[(B, C_l)]``, no gradient; the taps'
        eigen-problems of one size solved in one call (:func:`~rolekd.distill.svd.top_right_singular_many`)."""
        with torch.no_grad():
            found = top_right_singular_many([feature_matrix(f) for f in features.values()],
                                            [1] * len(features), self.eps)
            return [canonical_sign(v)[..., 0] for v, _ in found]

    def pairs_from(self, student_features, teacher_features) -> list[SingularPair]:
        """Aligned singular pairs of (already adapted) student features and teacher features."""
        return singular_pairs(student_features, teacher_features, 1, self.candidates, self.eps, method="mhgd")

    def pairs(self, student, teacher) -> list[SingularPair]:
        return self.pairs_from(self.adapter(student.features), teacher.features)

    # ------------------------------------------------------------------ training the attention network
    def estimation_loss(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """Upstream's ``MHA_loss``: ``sum_l mean(1 - <estimate(v_{l-1}), v_l>)`` (attention in train mode)."""
        loss = vectors[0].new_zeros(())
        for att, v_prev, v_cur in zip(self.attention, vectors[:-1], vectors[1:]):
            est = att.estimate(v_prev, att.graph(v_cur, v_prev))
            loss = loss + (1 - (est * v_cur).sum(-1)).mean()
        return loss

    def prepare(self, teacher_model: nn.Module, batches: Iterable[torch.Tensor], epochs: int | None = None) -> None:
        """Train the attention networks on the frozen teacher's features, then freeze them.

        ``batches``: a re-iterable of normalised image tensors (or ``(images, labels)`` pairs), e.g. a
        list or a data loader; ``epochs`` defaults to ``prepare_epochs``. With 0 epochs the networks are
        only built (from the first batch) and frozen untrained.
        """
        epochs = self.prepare_epochs if epochs is None else int(epochs)
        if epochs > 1 and iter(batches) is batches:
            raise UserError("mhgd.prepare needs a re-iterable of batches (a list or a data loader) for several "
                            "epochs, not a one-shot iterator")
        try:
            device = next(teacher_model.parameters()).device
        except StopIteration:
            device = self.prepared.device
        self.to(device)
        was_training = teacher_model.training
        teacher_model.eval()
        taps = FeatureTaps(teacher_model, features=True, embedding=False)
        opt = None
        self.prepare_history = []
        try:
            for _ in range(max(epochs, 1)):
                total, count = 0.0, 0
                for batch in batches:
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    with torch.no_grad():
                        feats = taps(x.to(device)).features
                    vectors = self.teacher_vectors(feats)
                    if not self.built or [v.shape[1] for v in vectors] != self._channels:
                        self.build([v.shape[1] for v in vectors])
                        opt = None
                    if epochs == 0:
                        break
                    if vectors[0].shape[0] < 2:
                        continue  # BatchNorm needs two samples
                    if opt is None:
                        self.attention.requires_grad_(True)
                        opt = torch.optim.SGD(self.attention.parameters(), lr=self.prepare_lr,
                                              momentum=self.prepare_momentum, nesterov=self.prepare_momentum > 0,
                                              weight_decay=self.prepare_weight_decay)
                    self.attention.train()
                    loss = self.estimation_loss(vectors)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                    count += 1
                if epochs == 0:
                    break
                self.prepare_history.append(total / max(count, 1))
        finally:
            taps.remove()
            teacher_model.train(was_training)
        if not self.built:
            raise UserError("mhgd.prepare got no batches: give it the training images")
        self.freeze()

    # ------------------------------------------------------------------ KD loss
    def _check_ready(self, pairs: list[SingularPair]) -> None:
        if not self.built or not self.is_prepared:
            raise UserError("mhgd: the attention network is not trained yet; call prepare(teacher, batches) "
                            "(KDObjective.prepare) before KD training")
        chans = [p.teacher.shape[1] for p in pairs]
        if chans != self._channels:
            raise UserError(f"mhgd: taps have channels {chans} but the attention network was built for "
                            f"{self._channels}")

    def loss_from_pairs(self, pairs: list[SingularPair]) -> torch.Tensor:
        self._check_ready(pairs)
        if self.attention.training:
            self.attention.eval()
        g_s, g_t = [], []
        for att, prev, cur in zip(self.attention, pairs[:-1], pairs[1:]):
            g_s.append(att.graph(cur.student[..., 0], prev.student[..., 0]))
            with torch.no_grad():
                g_t.append(att.graph(cur.teacher[..., 0], prev.teacher[..., 0]))
        if not g_s:
            return pairs[0].student.new_zeros(())
        # every pair's graphs (all (H, B, B)) in one KL, summed over rows, heads and pairs: 8 operators, not 8 a pair
        return graph_kl(torch.stack(g_s), torch.stack(g_t))

    def forward(self, student, teacher, labels):
        return self.loss_from_pairs(self.pairs(student, teacher))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, candidates={self.candidates}, prepare_epochs={self.prepare_epochs}, "
                f"channels={self._channels}, prepared={self.is_prepared}")
