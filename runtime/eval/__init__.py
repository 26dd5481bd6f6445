"""The evaluation harness: DAM and baselines against dense attention, through the runtime's public API.

* :mod:`.methods`: the method registry (``dam``, ``streaming``, ``oracle``, ``minference``,
  ``element``, named artifacts, parameterised variants such as ``dam:last_query=0.1``);
* :mod:`.evaluate`: fidelity, retrieval and recall of every method on the same inputs;
* :mod:`.recall`: attention-mass recall and density of the layouts that really ran;
* :mod:`.baselines`: the baseline methods' layouts and artifacts;
* :mod:`.bench`: whole-model and attention-only speed, DAM vs dense, side by side;
* :mod:`.record`: the provenance every recorded result carries.

Not needed to serve: nothing in ``dam.runtime`` outside this package imports it.
"""

from .evaluate import METHODS, TASKS, EvalConfig, EvalReport, EvalSample, MethodResult, evaluate
from .methods import REGISTRY, Method, MethodSpec, register

__all__ = ["METHODS", "REGISTRY", "TASKS", "EvalConfig", "EvalReport", "EvalSample", "Method", "MethodResult",
           "MethodSpec", "evaluate", "register"]
