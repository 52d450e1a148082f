"""Analysis and transform passes, their base classes and the registry."""

from netsqueeze.passes.base import AnalysisPass, Pass, PassContext, PassResult, TransformPass
from netsqueeze.passes.registry import all_passes, get_pass, register_pass, unregister_pass

__all__ = [
    "AnalysisPass", "Pass", "PassContext", "PassResult", "TransformPass",
    "all_passes", "get_pass", "register_pass", "unregister_pass",
]
