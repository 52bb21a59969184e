"""LoraHub's weight search (Huang et al., 2023, github.com/sail-sg/lorahub), driven over stdin/stdout by
the customization benchmark (benches/suite.rs), which merges each candidate into the model and measures
its loss on the user's examples.

As published: nevergrad's NGOpt over one weight per adapter in [-1.5, 1.5], starting from 0, a budget
of 40 evaluations, the objective = mean loss on the examples + 0.05 * mean |w| (LoraHub's default L1
term), and the final weights = the optimizer's recommendation. The composition (Σ w A)(Σ w B) is done on
the Rust side (crayon::pool::merge::Composition::Factors).

Protocol (one JSON object per line):
  in:  {"dim": N, "budget": 40, "seed": 0}
  out: {"ask": [w...]}            in: {"loss": x}          (budget times)
  out: {"best": [w...]}
"""

import json
import os
import sys
import traceback
import warnings

import nevergrad as ng
import numpy as np


def main() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)  # scipy's COBYLA notes on its own defaults
    setup = json.loads(sys.stdin.readline())
    dim, budget = int(setup["dim"]), int(setup["budget"])
    seed = int(setup.get("seed", 0)) % 2**32
    np.random.seed(seed)
    param = ng.p.Array(init=[0.0] * dim, lower=[-1.5] * dim, upper=[1.5] * dim)
    param.random_state.seed(seed)
    opt = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    for _ in range(budget):
        cand = opt.ask()
        w = [float(x) for x in cand.value]
        print(json.dumps({"ask": w}), flush=True)
        loss = float(json.loads(sys.stdin.readline())["loss"])
        opt.tell(cand, loss + 0.05 * sum(abs(x) for x in w) / dim)
    best = [float(x) for x in opt.provide_recommendation().value]
    print(json.dumps({"best": best}), flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        # nevergrad's worker threads would keep a failed process alive: leave at once.
        os._exit(1)
