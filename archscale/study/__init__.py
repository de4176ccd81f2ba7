"""The paper's method end to end: sweeps (`planning`, one attempt at a run in `runner`, rows in
`attempts`, launchers in `sweep` and `slurm`), the results table, the laws and their JAX fitter
(`law`, `solver`, `fitting`, `diagnostics`, `fit`), whether the data support a recommendation
(`verdict`), Algorithm 1 (`candidates`, and the mode in `search`), figures, and the
`pipeline` with its report. The top stage: it may import every other one.
"""
