"""The oracle values behind tests/test_private_selection.py::test_the_combined_bound_matches_dp_accounting.

Runs in a throwaway environment with Google's dp_accounting (not a dpnas dependency):

    python -m venv /tmp/oracle && /tmp/oracle/bin/pip install dp_accounting==0.6.0
    /tmp/oracle/bin/python benchmarks/oracle_dp_accounting.py

Known inputs: 4 runs (or the best of a random number with mean 5) of DP-SGD with q = 0.05, σ = 1.1, 200 steps,
and 10 validation releases per run of a sensitivity-1 count with Gaussian noise of std 5; δ = 1e-5.
RepeatAndSelectDpEvent is Papernot & Steinke's best-of-K (shape 1: geometric K, i.e. truncated negative binomial
with η = 1; shape inf: Poisson K).
"""

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp

# dpnas's orders (dpnas.dp.privacy.ORDERS): Opacus's defaults and a tail up to 512
ORDERS = sorted(set(np.round(np.arange(1.1, 11, 0.1), 10)) | set(range(12, 64))
                | {64, 72, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512})


def epsilon(event) -> float:
    accountant = rdp.RdpAccountant(ORDERS)
    accountant.compose(event)
    return accountant.get_epsilon(1e-5)


def main() -> None:
    ev = dp_accounting.dp_event
    run = ev.SelfComposedDpEvent(ev.PoissonSampledDpEvent(0.05, ev.GaussianDpEvent(1.1)), 200)
    scores = ev.SelfComposedDpEvent(ev.GaussianDpEvent(5.0), 10)
    print("fixed_training", epsilon(ev.SelfComposedDpEvent(run, 4)))
    print("fixed_validation", epsilon(ev.SelfComposedDpEvent(scores, 4)))
    print("tnb_training", epsilon(ev.RepeatAndSelectDpEvent(run, 5.0, 1.0)))
    print("tnb_validation", epsilon(ev.RepeatAndSelectDpEvent(scores, 5.0, 1.0)))
    print("poisson_training", epsilon(ev.RepeatAndSelectDpEvent(run, 5.0, float("inf"))))
    print("poisson_validation", epsilon(ev.RepeatAndSelectDpEvent(scores, 5.0, float("inf"))))


if __name__ == "__main__":
    main()
