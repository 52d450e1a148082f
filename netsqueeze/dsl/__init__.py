"""Policy language: Lark grammar, AST with source spans, parser and checker."""
