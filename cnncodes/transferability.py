"""Transferability scores: how well frozen codes will serve a new labelled task, without training.

All four work on what the HDF5 cache already holds (no forward pass, no torch):

* :func:`logme` — LogME (You et al., ICML 2021): for each class, the log marginal likelihood
  (evidence) of a Bayesian linear regression from the codes to that class's one-hot column,
  maximised over the prior precision alpha and the noise precision beta by MacKay's fixed point;
  the mean over classes, divided by the number of rows. Higher is better; it is the score used to
  rank layers.
* :func:`hscore` — H-score (Bao et al., ICIP 2019): ``tr(cov(F)^+ cov(E[F | y]))``.
* :func:`leep` — LEEP (Nguyen et al., ICML 2020): the mean log-likelihood of the labels under the
  "empirical predictor" that maps ImageNet's softmax through P(y | z) estimated on the data.
* :func:`nce` — NCE (Tran et al., ICCV 2019): ``-H(Y | Z)`` with Z the ImageNet top-1 class.

LEEP and NCE need ImageNet class scores (a ``logits`` layer). :func:`nce_normalised` turns NCE
into the fraction of the label entropy that ImageNet's top-1 class explains (0 = none, 1 = all),
which does not depend on the number of classes.

LogME implementation
--------------------
With ``F`` (n x D) and one one-hot target column ``y``, the evidence is ::

    L(alpha, beta) = n/2 log beta + D/2 log alpha - n/2 log 2 pi
                     - beta/2 ||F m - y||^2 - alpha/2 m'm - 1/2 log|A|,
    A = alpha I + beta F'F,   m = beta A^-1 F'y,

and the fixed point is ``gamma = sum_i beta s_i / (alpha + beta s_i)``, ``alpha <- gamma / m'm``,
``beta <- (n - gamma) / ||F m - y||^2`` (s_i the eigenvalues of F'F). One eigendecomposition of the
D x D Gram matrix (or of the n x n one when n < D) serves every class; in its eigenbasis every
quantity above is a sum over eigenvalues, so all classes iterate together as vectors (a class that
has converged keeps its values, exactly as if it were iterated alone). ``log|A|`` counts the D - k
zero eigenvalues of F'F (``log alpha`` each), as the paper's formula does; the authors' fixed-point
code (thuml/LogME ``_fit_fixed_point``) leaves them out, which matters only when n < D or F is rank
deficient. Cost: O(n D^2 + D^3) once, then O(k K) per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import TrainingDataError, UsageError

__all__ = ["LogMEResult", "GramEigen", "gram_eigen", "logme", "hscore", "softmax", "leep", "nce", "nce_normalised",
           "label_entropy", "head_confidence"]

_EPS = 1e-5  # as the authors' code: keeps alpha and beta finite when m'm or the residual is ~0


@dataclass
class LogMEResult:
    """LogME of one feature matrix: the score and the per-class fixed points."""

    score: float
    evidence: np.ndarray  # (K,) per-class evidence / n
    alpha: np.ndarray  # (K,) prior precision
    beta: np.ndarray  # (K,) noise precision
    iterations: np.ndarray  # (K,) fixed-point iterations until convergence


def _check(F: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    F = np.asarray(F, dtype=np.float64)
    y = np.asarray(y)
    if F.ndim != 2 or y.ndim != 1 or len(F) != len(y):
        raise UsageError(f"Expected features (n, D) and labels (n,); got {F.shape} and {y.shape}.")
    if len(y) < 2 or np.unique(y).size < 2:
        raise TrainingDataError(f"Transferability needs at least two classes; got labels {np.unique(y).tolist()}.")
    if not np.isfinite(F).all():
        raise TrainingDataError("The features hold NaN or inf: leave out the rows whose image failed to decode.")
    return F, y


def _one_hot(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes, inv = np.unique(y, return_inverse=True)
    Y = np.zeros((len(y), classes.size))
    Y[np.arange(len(y)), inv] = 1.0
    return classes, Y


@dataclass
class GramEigen:
    """The non-zero eigenpairs of F's Gram matrix: ``s`` (k,) and ``basis`` (k orthonormal columns): the right
    singular vectors V (D x k, from F'F, ``primal``) or the left ones U (n x k, from FF', when n < D)."""

    s: np.ndarray
    basis: np.ndarray
    primal: bool

    def left(self, F: np.ndarray) -> np.ndarray:
        """U (n x k), the left singular vectors of F: ``F V / sqrt(s)`` in the primal case."""
        return (F @ self.basis) / np.sqrt(self.s) if self.primal else self.basis


def gram_eigen(F: np.ndarray) -> GramEigen:
    """One eigendecomposition of the D x D Gram matrix F'F (of the n x n FF' when n < D), zero eigenvalues
    dropped: what :func:`logme` needs, kept so that other fits on the same codes can reuse it."""
    F = np.asarray(F, dtype=np.float64)
    n, D = F.shape
    s, B = np.linalg.eigh(F.T @ F) if n >= D else np.linalg.eigh(F @ F.T)
    keep = s > s.max() * 1e-12 if s.max() > 0 else np.zeros_like(s, dtype=bool)
    return GramEigen(s[keep], B[:, keep], n >= D)


def _spectrum(F: np.ndarray, Y: np.ndarray, eig: GramEigen | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-zero eigenvalues ``s`` of F'F, the targets' coordinates ``x = U'Y`` in the left singular
    basis of F, and ``||Y||^2 - ||x||^2`` (the part of each target outside the span of F)."""
    eig = eig or gram_eigen(F)
    s = eig.s
    if eig.primal:
        x = (eig.basis.T @ (F.T @ Y)) / np.sqrt(s)[:, None]  # U'Y with U = F V / sqrt(s)
    else:
        x = eig.basis.T @ Y
    outside = (Y ** 2).sum(axis=0) - (x ** 2).sum(axis=0)
    return s, x, np.maximum(outside, 0.0)


def logme(F: np.ndarray, y: np.ndarray, *, max_iter: int = 100, tol: float = 1e-6,
          eig: GramEigen | None = None) -> LogMEResult:
    """LogME of features ``F`` (n x D) for class labels ``y`` (n,), all classes at once.

    Parameters
    ----------
    F : array (n, D)
        Codes (any float dtype; computed in float64). Rows are samples.
    y : array (n,)
        Class labels (any values; each distinct value is a class).
    max_iter, tol : int, float
        The fixed point stops for a class once ``alpha / beta`` changes by at most ``tol``
        (relative), or after ``max_iter`` iterations.
    eig : GramEigen, optional
        :func:`gram_eigen` of these ``F`` (as float64), when the caller keeps it for other uses.

    Returns
    -------
    LogMEResult
        ``score`` is the mean over classes of the maximised evidence divided by n.
    """
    F, y = _check(F, y)
    n, D = F.shape
    _, Y = _one_hot(y)
    s, x, outside = _spectrum(F, Y, eig)
    s_col, x2 = s[:, None], x ** 2
    K = Y.shape[1]
    alpha, beta = np.ones(K), np.ones(K)
    active = np.ones(K, dtype=bool)
    iters = np.zeros(K, dtype=int)
    for _ in range(max_iter):
        t = alpha / beta
        a_new, b_new = _fixed_point_step(t, s_col, x2, outside, n)
        t_new = a_new / b_new
        alpha = np.where(active, a_new, alpha)
        beta = np.where(active, b_new, beta)
        iters += active
        active &= np.abs(t_new - t) / t > tol
        if not active.any():
            break
    ev = _evidence(alpha, beta, s_col, x2, outside, n, D)
    return LogMEResult(float(ev.mean()), ev, alpha, beta, iters)


def _fixed_point_step(t, s_col, x2, outside, n):
    """One MacKay update of (alpha, beta) for every class, given t = alpha / beta."""
    gamma = (s_col / (s_col + t)).sum(axis=0)
    m2 = (s_col * x2 / (s_col + t) ** 2).sum(axis=0)  # m'm
    res2 = (x2 * (t / (s_col + t)) ** 2).sum(axis=0) + outside  # ||F m - y||^2
    return gamma / (m2 + _EPS), (n - gamma) / (res2 + _EPS)


def _evidence(alpha, beta, s_col, x2, outside, n, D):
    t = alpha / beta
    m2 = (s_col * x2 / (s_col + t) ** 2).sum(axis=0)
    res2 = (x2 * (t / (s_col + t)) ** 2).sum(axis=0) + outside
    k = s_col.shape[0]
    logdet = np.log(alpha + beta * s_col).sum(axis=0) + (D - k) * np.log(alpha)
    ev = (D / 2 * np.log(alpha) + n / 2 * np.log(beta) - n / 2 * np.log(2 * np.pi)
          - beta / 2 * res2 - alpha / 2 * m2 - logdet / 2)
    return ev / n


def hscore(F: np.ndarray, y: np.ndarray) -> float:
    """H-score ``tr(pinv(cov(F)) cov(g))`` with ``g`` each row's class mean (Bao et al. 2019).

    Unstable when n is not much larger than D (the covariance is then near singular).
    """
    F, y = _check(F, y)
    _, Y = _one_hot(y)
    means = (Y.T @ F) / Y.sum(axis=0)[:, None]
    G = Y @ means
    cov_f = np.cov(F, rowvar=False)
    cov_g = np.cov(G, rowvar=False)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-15, hermitian=True) @ cov_g))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _joint(P: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Empirical joint P(y, z) (K x Z) from source probabilities (n x Z)."""
    _, Y = _one_hot(y)
    return Y.T @ P / len(y)


def leep(source_probs: np.ndarray, y: np.ndarray) -> float:
    """LEEP: ``mean_i log sum_z P(y_i | z) theta(x_i)_z`` (Nguyen et al. 2020).

    Parameters
    ----------
    source_probs : array (n, Z)
        The source (ImageNet) model's softmax on each target image.
    y : array (n,)
    """
    P, y = _check(source_probs, y)
    _, Y = _one_hot(y)
    joint = _joint(P, y)
    p_y_given_z = joint / np.maximum(joint.sum(axis=0, keepdims=True), 1e-300)
    eep = P @ p_y_given_z.T  # (n, K): the empirical predictor's distribution over target labels
    return float(np.mean(np.log((eep * Y).sum(axis=1))))


def nce(source_labels: np.ndarray, y: np.ndarray) -> float:
    """NCE: ``-H(Y | Z)`` in nats, Z the source model's top-1 class (Tran et al. 2019)."""
    z = np.asarray(source_labels)
    _, y = _check(np.zeros((len(z), 1)), y)
    _, Y = _one_hot(y)
    _, Z = _one_hot(z)
    joint = Y.T @ Z / len(y)  # (K, Z')
    p_z = joint.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = np.where(joint > 0, joint * np.log(joint / p_z), 0.0)
    return float(cond.sum())


def label_entropy(y: np.ndarray) -> float:
    """H(Y) in nats of the empirical label distribution."""
    _, counts = np.unique(np.asarray(y), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def nce_normalised(source_labels: np.ndarray, y: np.ndarray) -> float:
    """``(H(Y) + NCE) / H(Y) = I(Y; Z) / H(Y)``: the share of the label entropy that the source
    model's top-1 class explains (0: none, 1: the top-1 class determines the label)."""
    h = label_entropy(y)
    return float((h + nce(source_labels, y)) / h)


def head_confidence(logits: np.ndarray) -> dict:
    """How sure the ImageNet head is on the data: mean top-1 probability, mean entropy of its
    softmax (divided by log of the number of source classes, so 0 = certain, 1 = uniform), and
    the number of distinct top-1 classes."""
    P = softmax(logits)
    top = P.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(P > 0, P * np.log(P), 0.0).sum(axis=1)
    return {"mean_top1_prob": float(top.mean()), "median_top1_prob": float(np.median(top)),
            "mean_entropy_norm": float(ent.mean() / np.log(P.shape[1])),
            "distinct_top1": int(np.unique(P.argmax(axis=1)).size)}
