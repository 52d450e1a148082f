"""netsqueeze: a declarative model-compression compiler for PyTorch and ONNX models."""

from netsqueeze.compiler.api import CompileResult, compile, import_model
from netsqueeze.compiler.pipeline import Step, run_pipeline
from netsqueeze.compiler.report import CompileReport
from netsqueeze.compiler.stored import load, save
from netsqueeze.errors import (
    BudgetError,
    CaptureError,
    Diagnostic,
    FileError,
    InputMismatchError,
    InternalError,
    NetsqueezeError,
    NonFiniteError,
    PassBudgetError,
    PassError,
    PassInputMismatchError,
    PassNonFiniteError,
    PassUserCodeError,
    PolicyError,
    SolverError,
    SourceSpan,
    UnsupportedOpError,
    UserCodeError,
    VerifyError,
)
from netsqueeze.ir import Graph
from netsqueeze.passes import (
    AnalysisPass,
    Pass,
    PassContext,
    PassResult,
    TransformPass,
    get_pass,
    register_pass,
)

__all__ = [
    "AnalysisPass", "BudgetError", "CaptureError", "CompileReport", "CompileResult", "Diagnostic", "FileError", "Graph",
    "InputMismatchError", "InternalError", "NetsqueezeError", "NonFiniteError", "Pass", "PassBudgetError",
    "PassContext", "PassError", "PassInputMismatchError", "PassNonFiniteError", "PassResult", "PassUserCodeError",
    "PolicyError", "SolverError", "SourceSpan", "Step", "TransformPass", "UnsupportedOpError", "UserCodeError",
    "VerifyError", "compile", "get_pass", "import_model", "load", "register_pass", "run_pipeline", "save",
]
__version__ = "0.1.0"
