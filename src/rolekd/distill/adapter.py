"""The channel adapter that lets KD-SVD, MHGD and II-KD distil between networks of different widths.

KD-SVD and MHGD compare the leading right singular vectors of each tap's ``(HW x C)`` feature matrix,
vectors in the *channel* space, so the student's and the teacher's maps must have the same channel
count. Their reference code never meets unequal widths (``sseung0703/KD_methods_with_TF`` and
``bigaidream-projects/role-kd`` distil between ResNets of equal widths: ``Align_rsv`` multiplies the two
vector sets, ``Attention_head`` reuses one set of weights for both), but the role-wise KD paper's
Table 4 distils WRN-28-10 into WRN-16-2, WRN-16-4 and PreResNet56. The same code base bridges unequal
widths for its other feature methods with a trainable linear map on the channels (``Multiple.FitNet``'s
``Map`` fully-connected layer, ``AB_distillation``'s 1x1 ``connector`` conv); we do the same, with the
smallest such map: per tap whose widths differ, a bias-free 1x1 convolution ``W (C_teacher x C_student)``
applied to the student's map before its singular vectors are taken. It is trained with the student by
the KD loss (the objective's extra parameters; its gradient is never clipped) and saved with the
objective. Taps of equal width are compared as they are (no adapter).

``W`` starts as a fixed random Gaussian map with variance ``1 / C_student`` (seeded by the tap's name and
widths, so runs are repeatable and do not draw from the global random stream).
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn


def _key(name: str) -> str:
    return str(name).replace(".", "_")


def channels(f: torch.Tensor) -> int:
    """The channel count of a tap as :func:`rolekd.distill.svd.feature_matrix` reads it: ``(B, C, H, W)``
    and ``(B, C)`` -> ``C``; ``(B, HW, C)`` -> ``C``."""
    return int(f.shape[-1] if f.dim() == 3 else f.shape[1])


class ChannelAdapter(nn.Module):
    """Per-tap bias-free 1x1 convolutions mapping a student's feature map to the teacher's width."""

    def __init__(self):
        super().__init__()
        self.maps = nn.ParameterDict()

    def __len__(self) -> int:
        return len(self.maps)

    def build(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> bool:
        """Add a map for every tap present in both dicts whose channel counts differ (existing maps of the
        right shape are kept). Returns True if a parameter was added."""
        added = False
        for name, t in teacher.items():
            s = student.get(name)
            if s is None:
                continue
            cs, ct = channels(s), channels(t)
            k = _key(name)
            if cs == ct:
                if k in self.maps:
                    del self.maps[k]
                continue
            if k in self.maps and tuple(self.maps[k].shape) == (ct, cs):
                continue
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{cs}:{ct}".encode()))
            w = torch.randn(ct, cs, generator=g, dtype=torch.float32) / cs ** 0.5
            self.maps[k] = nn.Parameter(w.to(s.device))
            added = True
        return added

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The student's taps, those with a map projected to the teacher's width (others unchanged)."""
        if not len(self.maps):
            return features
        out = {}
        for name, f in features.items():
            w = self.maps[_key(name)] if _key(name) in self.maps else None
            if w is None:
                out[name] = f
            elif f.dim() == 4:  # (B, C, H, W)
                out[name] = F.conv2d(f, w.to(f.dtype)[:, :, None, None])
            else:  # (B, C) or (B, HW, C): channels last, as rolekd.distill.svd.feature_matrix reads them
                out[name] = f @ w.to(f.dtype).t()
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a resumed run: create the maps the checkpoint has (their shapes are in the tensors)
        head = prefix + "maps."
        for key, value in state_dict.items():
            if key.startswith(head) and "." not in key[len(head):]:
                k = key[len(head):]
                if k not in self.maps or self.maps[k].shape != value.shape:
                    device = next((p.device for p in self.maps.values()), value.device)
                    self.maps[k] = nn.Parameter(torch.empty(value.shape, dtype=value.dtype, device=device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
