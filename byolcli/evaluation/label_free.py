"""Judging embeddings without labels: how many directions they use, how close two views of an image
land, how evenly the images spread, and who is whose neighbour.

- RankMe (Garrido et al. 2023): exp of the entropy of the embedding matrix's normalised singular
  values, from 1 (every image on one line) to the dimension (all directions used alike). Higher is
  better; a collapsed encoder scores near 1.
- Alignment (Wang & Isola 2020): the mean squared distance between the L2-normalised embeddings of
  two augmented views of one image, from 0 (views agree) to 4. Lower is better.
- Uniformity (Wang & Isola 2020): log of the mean of exp(−2·‖zᵢ − zⱼ‖²) over pairs of normalised
  embeddings, from 0 (all images at one point) down to about −4. Lower is better.
- View retrieval: the share of images whose second view is, of all the images' second views, the
  nearest to their first. It asks alignment and spread at once: a collapsed encoder aligns views
  perfectly and retrieves at chance, a noisy one spreads evenly and retrieves nothing. Higher is better.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK = 4096


def effective_rank(matrix: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007): 1 when every row
    lies on one line, the dimension when all directions are used alike."""
    # On the CPU, in float64: MPS has neither SVD in the torches byolcli takes, nor float64 at all.
    singular = torch.linalg.svdvals(matrix.cpu().double())
    p = singular / singular.sum().clamp_min(1e-12)
    return math.exp(-(p * p.clamp_min(1e-12).log()).sum().item())


def rankme(features: torch.Tensor) -> float:
    """RankMe: the effective rank of the embedding matrix itself, uncentred, as Garrido et al. define it."""
    return effective_rank(features)


def alignment(view1: torch.Tensor, view2: torch.Tensor) -> float:
    z1, z2 = F.normalize(view1.float(), dim=1), F.normalize(view2.float(), dim=1)
    return (z1 - z2).pow(2).sum(1).mean().item()


def view_retrieval(view1: torch.Tensor, view2: torch.Tensor) -> float:
    similarity = F.normalize(view1.float(), dim=1) @ F.normalize(view2.float(), dim=1).T
    return (similarity.argmax(1) == torch.arange(len(similarity), device=similarity.device)).float().mean().item()


def uniformity(features: torch.Tensor, t: float = 2.0) -> float:
    z = F.normalize(features.float(), dim=1)
    n = len(z)
    total = 0.0
    for start in range(0, n, CHUNK):
        squared = torch.cdist(z[start : start + CHUNK], z).pow(2)
        total += (-t * squared).exp().sum().item()
    pairs = n * (n - 1)
    return math.log(max((total - n) / pairs, 1e-30))  # the diagonal's n ones are not pairs


def nearest(features: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rows most cosine-similar to each query row (itself excluded): (indices, similarities)."""
    z = F.normalize(features.float(), dim=1)
    similarity = z[queries] @ z.T
    similarity[torch.arange(len(queries)), queries] = -math.inf
    top = similarity.topk(min(k, len(z) - 1), dim=1)
    return top.indices, top.values
