"""Imports every built-in pass module so that their `@register_pass` decorators run."""

import netsqueeze.passes.dependency
import netsqueeze.passes.trim  # noqa: F401
from netsqueeze.passes import dead_code, fold_bn, shape_inference  # noqa: F401
