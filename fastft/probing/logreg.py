"""Multinomial logistic regression over a grid of C, full-batch L-BFGS with warm starts.

The objective is scikit-learn's ``LogisticRegression(C=C)`` (multinomial, lbfgs), divided by
``C * n`` (the same minimiser)::

    mean cross-entropy(X W + b, y) + ||W||^2 / (2 C n)

(the intercept is not penalised). The grid is solved from the smallest C (the strongest
penalty, the easiest problem) up, each solve starting from the previous solution, in
float64 so that the optimum is reached to scikit-learn's precision.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from fastft.errors import FastFTValueError
from fastft.probing.heads import Features, HeadResult, accuracy, choose, small_ops

__all__ = ["logreg_path", "logreg_head"]

#: scikit-learn's default ``tol``: a solve that stops on its iteration limit with a larger
#: gradient entry is one scikit-learn would warn about (ConvergenceWarning).
SK_TOL = 1e-4


def logreg_path(
    X: torch.Tensor,
    y: torch.Tensor,
    Cs: Sequence[float],
    num_classes: int,
    *,
    max_iter: int = 300,
    tol: float = 1e-5,
) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    """``{C: (W [D, K], b [K])}`` minimising the objective of the module docstring for each C.

    ``max_iter`` bounds the L-BFGS iterations of one C; ``tol`` is the gradient's largest
    absolute entry at which a solve stops. A solve that reaches ``max_iter`` with a gradient
    entry above ``max(tol, SK_TOL)`` warns (a RuntimeWarning naming the C), as
    scikit-learn's ConvergenceWarning does.
    """
    if any(not 0 < float(c) < math.inf for c in Cs):  # NaN too; inf is no regularisation at all
        raise FastFTValueError(f"every C must be positive and finite; got {list(Cs)}.")
    X = X.to(torch.float64)
    y = y.to(X.device, torch.long)
    n, d = X.shape
    W = torch.zeros(d, num_classes, dtype=torch.float64, device=X.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, device=X.device, requires_grad=True)
    out: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    unconverged: list[float] = []
    max_eval = max_iter * 5 // 4
    for C in sorted(set(float(c) for c in Cs)):
        opt = torch.optim.LBFGS(
            [W, b],
            lr=1.0,
            max_iter=max_iter,
            max_eval=max_eval,
            tolerance_grad=tol,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )
        penalty = 1.0 / (2.0 * C * n)

        def closure(opt=opt, penalty=penalty):
            opt.zero_grad()
            loss = F.cross_entropy(X @ W + b, y) + penalty * (W * W).sum()
            loss.backward()
            return loss

        with small_ops(X):
            opt.step(closure)
            state = opt.state[W]
            spent = state.get("n_iter", 0) >= max_iter or state.get("func_evals", 0) >= max_eval
            if spent:
                closure()  # the gradient where the solve stopped
                if max(float(W.grad.abs().max()), float(b.grad.abs().max())) > max(tol, SK_TOL):
                    unconverged.append(C)
        out[C] = (W.detach().clone(), b.detach().clone())
    if unconverged:
        warnings.warn(
            f"logistic regression did not converge in {max_iter} L-BFGS iterations for C in "
            f"{unconverged} (features of very different scales: the problem is ill-conditioned); "
            "its accuracy there may differ from scikit-learn's. Standardize the features, or "
            "raise max_iter.",
            RuntimeWarning,
            stacklevel=2,
        )
    return out


def predict(weights: tuple[torch.Tensor, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """Class predictions of logistic-regression ``weights`` on features ``X``."""
    W, b = weights
    return torch.addmm(b, X.to(W.device, W.dtype), W).argmax(-1)


def logreg_head(feats: Features, *, Cs: Sequence[float], max_iter: int = 300) -> HeadResult:
    """Fit the C grid on the fit rows, choose C on the validation rows, score the test rows."""
    t0 = time.perf_counter()
    path = logreg_path(feats.fit, feats.y_fit, Cs, feats.num_classes, max_iter=max_iter)
    grid_Cs = list(path)
    val = feats.val.to(torch.float64)  # once, not once per C
    with small_ops(val):
        val_acc = [accuracy(predict(path[C], val), feats.y_val) for C in grid_Cs]
        best = choose(val_acc)
        C = grid_Cs[best]
        test_acc = accuracy(predict(path[C], feats.test), feats.y_test)
    return HeadResult(
        "logreg",
        {"C": C},
        val_acc[best],
        test_acc,
        time.perf_counter() - t0,
        [{"C": c, "val_accuracy": a} for c, a in zip(grid_Cs, val_acc)],
        path[C],
    )
