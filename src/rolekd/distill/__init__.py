"""Knowledge-distillation losses (one small module per method, a registry by name) and the KD objective.

Methods: ``soft`` (Hinton), ``dml`` (deep mutual learning), ``rkd`` (relational KD), ``kdsvd``
(KD-SVD), ``mhgd`` (multi-head graph distillation), ``iikd`` (the role-wise KD paper's
``rkd + mhgd + kdsvd``). Build one with :func:`create_distiller` or a whole trainer objective with
:func:`build_kd_objective`.
"""

from .adapter import ChannelAdapter
from .base import DISTILLERS, Distiller, create_distiller, distiller_class, list_distillers, register
from .dml import DeepMutualLearning, mutual_kl
from .iikd import IIKD
from .kdsvd import KDSVD, kdsvd_loss, kdsvd_loss_from_pairs, rbf_relation
from .mhgd import MHGD, GraphAttention, graph_kl
from .objective import CLIP_LAM, KDObjective, MutualKDObjective, build_kd_objective, clip_factor
from .rkd import RelationalKD, rkd_loss
from .soft import SoftLabel, soft_label_loss
from .svd import align_rsv, canonical_sign, feature_matrix, singular_pairs, top_right_singular

__all__ = [
    "DISTILLERS", "Distiller", "create_distiller", "distiller_class", "list_distillers", "register",
    "SoftLabel", "soft_label_loss", "DeepMutualLearning", "mutual_kl", "RelationalKD", "rkd_loss",
    "KDSVD", "kdsvd_loss", "kdsvd_loss_from_pairs", "rbf_relation", "MHGD", "GraphAttention", "graph_kl", "IIKD",
    "KDObjective", "MutualKDObjective", "build_kd_objective", "clip_factor", "CLIP_LAM", "ChannelAdapter",
    "align_rsv", "canonical_sign", "feature_matrix", "singular_pairs", "top_right_singular",
]
