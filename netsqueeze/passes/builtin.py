"""Imports every built-in pass module so that their `@register_pass` decorators run."""

from netsqueeze.passes import dead_code, dependency, fold_bn, shape_inference, squeeze_fold, trim  # noqa: F401
