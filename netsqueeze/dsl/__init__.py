"""Policy language: Lark grammar, AST with source spans, parser and checker (imports only `errors`)."""

from netsqueeze.dsl.ast import Invocation, Policy
from netsqueeze.dsl.checker import Checker, OptionSchema, PassSchema, TypeDesc, check_policy
from netsqueeze.dsl.parser import load_policy, parse_policy, parse_value

__all__ = [
    "Checker", "Invocation", "OptionSchema", "PassSchema", "Policy", "TypeDesc",
    "check_policy", "load_policy", "parse_policy", "parse_value",
]
