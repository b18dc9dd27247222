"""The refine stage: ePIE/rPIE (and PINE) refinement of each scan, live and to convergence."""
