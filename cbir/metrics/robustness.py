"""Robustness of codes to image perturbations (thesis §3.3.2, Fig. 3.7).

Pairs ``(codes_clean[i], codes_perturbed[i])`` are the codes of image ``i`` before and after a
perturbation (colour jitter, occlusion, ...). Bit 0 is the most important bit (see
:mod:`cbir.codes`), so the truncation to the first ``d`` bits is the code's prefix of depth ``d``.
"""

from __future__ import annotations

import numpy as np

from cbir.codes import Codes, xor_prefix_length

__all__ = ["pairwise_common_prefix", "code_retention", "bit_flip_rate"]


def _check_pair(codes_clean, codes_perturbed) -> tuple[Codes, Codes]:
    for name, c in (("codes_clean", codes_clean), ("codes_perturbed", codes_perturbed)):
        if not isinstance(c, Codes):
            raise ValueError(
                f"{name} must be a cbir.codes.Codes, got {type(c).__name__}; wrap bits with Codes.from_bits(bits)"
            )
    if codes_clean.nbits != codes_perturbed.nbits:
        raise ValueError(
            f"bit counts differ ({codes_clean.nbits} vs {codes_perturbed.nbits}); encode both with the same model"
        )
    if len(codes_clean) != len(codes_perturbed):
        raise ValueError(
            f"{len(codes_clean)} clean codes but {len(codes_perturbed)} perturbed codes; pass one "
            "perturbed code per clean image, in the same order"
        )
    if len(codes_clean) == 0:
        raise ValueError("need at least one image")
    return codes_clean, codes_perturbed


def pairwise_common_prefix(codes_clean: Codes, codes_perturbed: Codes) -> np.ndarray:
    """``(N,)`` int64: number of leading bits on which ``codes_clean[i]`` and
    ``codes_perturbed[i]`` agree (``B`` when the codes are identical)."""
    a, b = _check_pair(codes_clean, codes_perturbed)
    return xor_prefix_length(a.packed ^ b.packed, a.nbits)


def code_retention(codes_clean: Codes, codes_perturbed: Codes) -> np.ndarray:
    """Hash-code retention per depth: ``(B,)`` float64.

    Element ``d - 1`` (``d = 1..B``) is the fraction of images whose code truncated to its first
    ``d`` bits is unchanged by the perturbation, i.e. ``mean_i [cpl_i >= d]`` where ``cpl_i`` is
    the common-prefix length of the clean and perturbed codes of image ``i``. Non-increasing in
    ``d``; the last element is the fraction of fully unchanged codes.
    """
    cpl = pairwise_common_prefix(codes_clean, codes_perturbed)
    depths = np.arange(1, codes_clean.nbits + 1)
    return (cpl[None, :] >= depths[:, None]).mean(axis=1)


def bit_flip_rate(codes_clean: Codes, codes_perturbed: Codes) -> np.ndarray:
    """``(B,)`` float64: per bit, the fraction of images whose bit ``j`` flipped."""
    a, b = _check_pair(codes_clean, codes_perturbed)
    return (a.to_bits() != b.to_bits()).mean(axis=0, dtype=np.float64)
