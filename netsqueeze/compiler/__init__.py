"""The compiler: compile(), policy resolution, pass manager, calibration and report."""

# importing the compiler installs the policy checker's option validation into `Pass.__post_init__`, so pass
# options built from Python are checked like a policy's (passes may not import the dsl themselves)
import netsqueeze.compiler.plan  # noqa: F401
