"""Ptychography: ePIE/rPIE refinement, its constraints, probe modes, probe starts and PINE."""
