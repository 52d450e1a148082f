"""The compiler: compile(), policy resolution, pass manager, calibration and report."""
