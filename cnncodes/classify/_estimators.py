"""The normalisers and classifiers of a run, fitted with retries; top-class scores."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils._param_validation import StrOptions

from ..errors import UsageError


NORMALISERS = ("l2", "standard", "sqrt", "none")


CLASSIFIERS = ("svm", "softmax")


def signed_sqrt(X):
    """Signed square root ``sign(x) * sqrt(|x|)``, element-wise (keeps the dtype)."""
    X = np.asarray(X)
    return np.sign(X) * np.sqrt(np.abs(X))


def make_normaliser(norm: str = "l2"):
    """The sklearn transformer of a code normalisation.

    Parameters
    ----------
    norm : {"l2", "standard", "sqrt", "none"}
        ``"sqrt"`` is the signed square root followed by L2.

    Returns
    -------
    transformer
        An unfitted sklearn transformer (or pipeline of transformers).

    Raises
    ------
    UsageError
        For an unknown name.
    """
    if norm == "l2":
        return Normalizer(norm="l2")
    if norm == "standard":
        return StandardScaler()
    if norm == "sqrt":
        return Pipeline([
            ("ssqrt", FunctionTransformer(signed_sqrt, feature_names_out="one-to-one")),
            ("l2", Normalizer(norm="l2")),
        ])
    if norm == "none":
        return FunctionTransformer(feature_names_out="one-to-one")
    raise UsageError(f"The normaliser must be one of {', '.join(NORMALISERS)}. Got {norm!r} instead.")


_SOFTMAX_TOL = 1e-6


class CodesLinearSVC(LinearSVC):
    """:class:`~sklearn.svm.LinearSVC` whose default ``dual="by_C"`` picks the solver from C at fit time.

    ``dual="by_C"``: the dual (coordinate descent) for ``C <= 1``, the primal (trust-region
    Newton) above. Both solve the same problem (squared hinge, L2, regularised intercept);
    only the time differs (measured: ``benchmarks/bench_search.py --solvers``; the dual is
    faster at small C in every shape tried, and crawls or fails to converge at large C).
    Deciding at fit time keeps the rule after ``set_params(C=...)`` or in a search over C,
    where a ``dual`` fixed at construction would silently keep the solver of another C.
    ``dual=True/False/"auto"`` behave as in LinearSVC. After fit, ``dual_`` is the solver used.
    """

    _parameter_constraints: dict = {**LinearSVC._parameter_constraints,
                                    "dual": ["boolean", StrOptions({"auto", "by_C"})]}

    def __init__(self, penalty="l2", loss="squared_hinge", *, dual="by_C", tol=1e-4, C=1.0, multi_class="ovr",
                 fit_intercept=True, intercept_scaling=1, class_weight=None, verbose=0, random_state=None,
                 max_iter=1000):
        super().__init__(penalty=penalty, loss=loss, dual=dual, tol=tol, C=C, multi_class=multi_class,
                         fit_intercept=fit_intercept, intercept_scaling=intercept_scaling,
                         class_weight=class_weight, verbose=verbose, random_state=random_state, max_iter=max_iter)

    def fit(self, X, y, sample_weight=None):
        """Fit with the solver ``dual`` names; ``"by_C"`` is resolved from ``self.C`` now."""
        if self.dual != "by_C":
            super().fit(X, y, sample_weight=sample_weight)
            self.dual_ = self.dual
            return self
        self.dual = bool(self.C <= 1.0)  # LinearSVC.fit reads self.dual; restored below
        try:
            super().fit(X, y, sample_weight=sample_weight)
            self.dual_ = self.dual
        finally:
            self.dual = "by_C"
        return self


def make_classifier(
    clf: str,
    C: float = 1.0,
    *,
    n_samples: int | None = None,
    n_features: int | None = None,
    max_iter: int = 1000,
    seed: int = 0,
    warm_start: bool = False,
):
    """An unfitted linear classifier.

    Parameters
    ----------
    clf : {"svm", "softmax"}
        ``"svm"``: :class:`CodesLinearSVC` (LinearSVC choosing the dual solver for C <= 1 and
        the primal above, at fit time); ``"softmax"``: multinomial LogisticRegression (lbfgs).
    C : float
        Inverse regularisation strength.
    n_samples, n_features : int, optional
        Unused (kept for callers).
    max_iter : int
    seed : int
        ``random_state`` of LinearSVC's coordinate descent.
    warm_start : bool
        For softmax: start from the previous solution (used along the C grid).

    Raises
    ------
    UsageError
        For an unknown classifier name or a non-positive C.
    """
    if not (isinstance(C, (int, float, np.floating)) and np.isfinite(C) and C > 0):
        raise UsageError(f"The 'C' parameter must be a float > 0. Got {C!r} instead.")
    if clf == "svm":
        return CodesLinearSVC(C=float(C), max_iter=int(max_iter), random_state=seed)
    if clf == "softmax":
        # tol 1e-6, not sklearn's 1e-4: at 1e-4 lbfgs stops where the loss is still falling, and that
        # stopping point, not the data, decided test predictions (flowers5 Lite0 pool, C=10: float16 vs
        # float32 codes gave 3 different test predictions at 1e-4, none at 1e-6; 1.5x the iterations)
        return LogisticRegression(C=float(C), solver="lbfgs", tol=_SOFTMAX_TOL, max_iter=int(max_iter),
                                  warm_start=warm_start)
    raise UsageError(f"The classifier must be one of {', '.join(CLASSIFIERS)}. Got {clf!r} instead.")


def make_pipeline(norm: str, clf: str, C: float = 1.0, **kwargs) -> Pipeline:
    """``Pipeline([("norm", make_normaliser(norm)), ("clf", make_classifier(clf, C, **kwargs))])``."""
    return Pipeline([("norm", make_normaliser(norm)), ("clf", make_classifier(clf, C, **kwargs))])


_SMALL_PROBLEM = 4_000_000  # entries of X below which BLAS/OpenMP threads cost more than they give


def _threads_for(X):
    """One BLAS/OpenMP thread for small problems: on a busy machine, two spinning threads made a
    1,800 x 64 lbfgs fit 27x slower (1.46 s vs 0.054 s)."""
    if np.asarray(X).size >= _SMALL_PROBLEM:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def fit_with_retries(est, X, y, *, max_iter_cap: int = 16000, param: str = "max_iter") -> dict:
    """Fit ``est``; on a ``ConvergenceWarning`` multiply ``max_iter`` by 4 (up to a cap) and refit.

    Works for a classifier and for a :class:`~sklearn.pipeline.Pipeline` whose last step
    is named ``clf``. Other warnings are re-emitted.

    Returns
    -------
    dict
        ``{"converged": bool, "max_iter": int, "message": str}``; the message says
        what happened when more iterations were needed or the fit did not converge.
    """
    name = f"clf__{param}" if isinstance(est, Pipeline) else param
    it = int(est.get_params()[name])
    first = it
    while True:
        with warnings.catch_warnings(record=True) as caught, _threads_for(X):
            warnings.simplefilter("always")
            est.fit(X, y)
        conv_msgs = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if not conv_msgs:
            msg = "" if it == first else f"converged after raising max_iter from {first} to {it}"
            return {"converged": True, "max_iter": it, "message": msg}
        if it >= max_iter_cap:
            return {
                "converged": False, "max_iter": it,
                "message": f"did not converge with max_iter={it} (the cap): {conv_msgs[-1].splitlines()[0]}",
            }
        it = min(it * 4, max_iter_cap)
        est.set_params(**{name: it})


def top_scores(est, X) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class indices and the score of the predicted class.

    The score is the top ``predict_proba`` value when the estimator has one
    (softmax), else the top ``decision_function`` value (for a binary SVM: ``|d|``).
    """
    if hasattr(est, "predict_proba") and _final(est).__class__ is LogisticRegression:
        P = est.predict_proba(X)
        idx = np.argmax(P, axis=1)
        return est.classes_[idx], P[np.arange(len(idx)), idx]
    D = est.decision_function(X)
    if D.ndim == 1:
        pred = est.classes_[(D > 0).astype(int)]
        return pred, np.abs(D)
    idx = np.argmax(D, axis=1)
    return est.classes_[idx], D[np.arange(len(idx)), idx]


def _final(est):
    return est[-1] if isinstance(est, Pipeline) else est
