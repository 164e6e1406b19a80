"""Finding what nobody annotated: explanation strategies (SpRAy) and error slices (Domino).

Both work on what the map keeps per image, never on images: the Grad-CAM map pooled to a small
grid, and the explained layer's activations averaged over space (for a network ending in global
average pooling, exactly its penultimate features).

- Strategies (Lapuschkin et al., Nat. Commun. 2019): per class, the normalised maps are clustered
  with k-means; the number of clusters is the one with the best silhouette (one cluster when no
  split reaches `min_silhouette`).
- Slices (Eyuboglu et al., ICLR 2022): per class, an error-aware mixture model over the embeddings,
  as Domino's: each component is a diagonal Gaussian over the (PCA-reduced, standardised)
  embedding and a Bernoulli over "the model was wrong", whose log-likelihood is weighted by
  `error_weight`, fitted by EM. Within one class Domino's label term is constant, so this is its
  model restricted to a class. The error term only guides the fit: membership of a slice is then
  decided by the embedding alone, so a slice is a region of the model's feature space and its
  accuracy is measured, not selected for.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp
from scipy.stats import binomtest
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

MIN_PER_CLUSTER = 10  # a class with fewer images than 2x this is not clustered
SILHOUETTE_SAMPLE = 2000  # silhouette on a seeded sample of this many points (O(n^2) otherwise)
TYPICAL = 6  # most typical images kept per strategy and slice (for the report's gallery)


@dataclass(frozen=True)
class SliceSettings:
    """How slices are searched: components per class, the error term's weight, the minimum size."""

    components: int = 2  # per class: the region the model fails on, and the rest
    error_weight: float = 3.0
    pca_dims: int = 16
    min_size: int = 20
    iterations: int = 100


def accuracy_estimate(correct: np.ndarray) -> dict[str, float | int | None]:
    """Accuracy with a Wilson 95% interval (scipy), and the count."""
    n = int(correct.size)
    if n == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    k = int(correct.sum())
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return {"value": k / n, "ci_low": float(ci.low), "ci_high": float(ci.high), "n": n}


def normalized_maps(maps: np.ndarray) -> np.ndarray:
    """Each (flattened) map scaled to unit sum, so clusters differ by where, not how much."""
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    total = flat.sum(axis=1, keepdims=True)
    return np.divide(flat, total, out=np.zeros_like(flat), where=total > 0)


def choose_clusters(
    points: np.ndarray, seed: int, max_k: int = 6, min_silhouette: float = 0.15
) -> np.ndarray:
    """k-means labels with k chosen by silhouette (k = 1 when no k >= 2 reaches the floor)."""
    n = len(points)
    best_labels, best_score = np.zeros(n, dtype=np.int64), min_silhouette
    for k in range(2, min(max_k, n // MIN_PER_CLUSTER) + 1):
        with warnings.catch_warnings():  # duplicate maps (e.g. all zero): checked just below
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(points)
        if np.unique(labels).size < k or np.bincount(labels).min() < 2:
            continue  # duplicate points: fewer distinct clusters than asked
        sample = None if n <= SILHOUETTE_SAMPLE else SILHOUETTE_SAMPLE
        try:
            score = silhouette_score(points, labels, sample_size=sample, random_state=seed)
        except ValueError:  # the seeded sample drew a single cluster
            continue
        if score > best_score:
            best_labels, best_score = labels.astype(np.int64), score
    return best_labels


def strategies(
    maps: np.ndarray, labels: np.ndarray, correct: np.ndarray, classes: list[str], seed: int
) -> list[dict]:
    """Per class, clusters of its images' explanation maps: size, accuracy, mean map, members."""
    found = []
    points = normalized_maps(maps)
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2 * MIN_PER_CLUSTER:
            continue
        assignment = choose_clusters(points[idx], seed)
        for k in range(int(assignment.max()) + 1):
            members = idx[assignment == k]
            centre = points[members].mean(axis=0)
            distance = ((points[members] - centre) ** 2).sum(axis=1)
            found.append(
                {
                    "class": name,
                    "cluster": k,
                    "size": int(members.size),
                    "share_of_class": members.size / idx.size,
                    "accuracy": accuracy_estimate(correct[members]),
                    "mean_map": centre,
                    "members": members,
                    "typical": members[np.argsort(distance, kind="stable")[:TYPICAL]],
                }
            )
    return found


@dataclass
class ErrorMixture:
    """Diagonal Gaussian x weighted Bernoulli mixture, fitted by EM (see the module docstring)."""

    means: np.ndarray  # (K, d)
    variances: np.ndarray  # (K, d)
    error_rates: np.ndarray  # (K,)
    weights: np.ndarray  # (K,)

    def embedding_log_likelihood(self, z: np.ndarray) -> np.ndarray:
        """log p(z, component) for every point and component, (N, K)."""
        diff = z[:, None, :] - self.means[None]
        log_gauss = -0.5 * (
            (diff**2 / self.variances[None]).sum(axis=2)
            + np.log(2 * np.pi * self.variances).sum(axis=1)[None]
        )
        return log_gauss + np.log(self.weights)[None]

    def assign(self, z: np.ndarray) -> np.ndarray:
        """Each point's component by its embedding alone."""
        return self.embedding_log_likelihood(z).argmax(axis=1)


def fit_error_mixture(
    z: np.ndarray, errors: np.ndarray, settings: SliceSettings, seed: int
) -> ErrorMixture:
    """EM for the error-aware mixture, started from k-means on the embeddings (seeded)."""
    k = min(settings.components, len(z))
    start = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(z)
    resp = np.eye(k)[start]
    e = errors.astype(np.float64)
    floor = 1e-3 * z.var(axis=0).mean() + 1e-9
    model = None
    for _ in range(settings.iterations):
        mass = resp.sum(axis=0) + 1e-9
        means = resp.T @ z / mass[:, None]
        variances = resp.T @ z**2 / mass[:, None] - means**2 + floor
        rates = np.clip((resp.T @ e + 0.5) / (mass + 1.0), 1e-3, 1 - 1e-3)
        model = ErrorMixture(means, np.maximum(variances, floor), rates, mass / mass.sum())
        log_bern = e[:, None] * np.log(rates)[None] + (1 - e[:, None]) * np.log1p(-rates)[None]
        joint = model.embedding_log_likelihood(z) + settings.error_weight * log_bern
        new = np.exp(joint - logsumexp(joint, axis=1, keepdims=True))
        if np.abs(new - resp).max() < 1e-6:
            break
        resp = new
    return model


def reduce_embeddings(embeddings: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """Standardised PCA coordinates (whitened), so every kept direction counts alike."""
    x = embeddings.astype(np.float64)
    x = x - x.mean(axis=0)
    dims = max(1, min(dims, x.shape[1], len(x) - 1))
    z = PCA(n_components=dims, random_state=seed, svd_solver="full").fit_transform(x)
    scale = z.std(axis=0)
    return z / np.where(scale > 0, scale, 1.0)


def error_slices(
    embeddings: np.ndarray,
    labels: np.ndarray,
    correct: np.ndarray,
    classes: list[str],
    settings: SliceSettings,
    seed: int,
) -> list[dict]:
    """Per class, the mixture's components as slices: members, accuracy, and gap to the rest."""
    found = []
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2 * settings.min_size:
            continue
        z = reduce_embeddings(embeddings[idx], settings.pca_dims, seed)
        mixture = fit_error_mixture(z, ~correct[idx], settings, seed)
        log_likelihood = mixture.embedding_log_likelihood(z)
        assignment = log_likelihood.argmax(axis=1)
        for k in np.unique(assignment):
            inside = assignment == k
            if inside.sum() < settings.min_size or (~inside).sum() == 0:
                continue
            accuracy = accuracy_estimate(correct[idx][inside])
            rest = accuracy_estimate(correct[idx][~inside])
            typical = np.argsort(-log_likelihood[inside, k], kind="stable")[:TYPICAL]
            found.append(
                {
                    "class": name,
                    "members": idx[inside],
                    "typical": idx[inside][typical],
                    "size": int(inside.sum()),
                    "accuracy": accuracy,
                    "rest_of_class": rest,
                    "gap": accuracy["value"] - rest["value"],
                }
            )
    found.sort(key=lambda s: (s["gap"], s["class"]))
    return found


def overlap(members: np.ndarray, group_members: np.ndarray) -> dict[str, float]:
    """Precision and recall of a slice (positions) against an annotated group (positions)."""
    common = np.intersect1d(members, group_members).size
    precision = common / members.size if members.size else 0.0
    recall = common / group_members.size if group_members.size else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def best_matches(
    members: np.ndarray, groups: dict[str, np.ndarray], top: int = 3
) -> list[dict[str, float | str]]:
    """The annotated groups (name -> member positions) a slice coincides with best, by F1."""
    scored = [{"group": name, **overlap(members, pos)} for name, pos in groups.items()]
    scored.sort(key=lambda m: (-m["f1"], m["group"]))
    return scored[:top]
