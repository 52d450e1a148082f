"""Policy language: Lark grammar, AST with source spans, parser and checker (imports only `errors`)."""

from netsqueeze.dsl.ast import Invocation, Policy
from netsqueeze.dsl.parser import load_policy, parse_policy, parse_value

__all__ = ["Invocation", "Policy", "load_policy", "parse_policy", "parse_value"]
