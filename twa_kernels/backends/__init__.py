"""One module per backend; importing a module registers its kernels with twa_kernels._ops.

reference.py is the executable spec (plain torch, float64 accumulation); paper.py
re-implements the TWA papers' own code paths as the baseline that benchmarks beat.
"""
