"""archscale: scaling laws that see the architecture, for inference-efficient LLMs.

The package is one folder per stage; a stage imports only the stages above it in this list
(tests/test_layout.py holds the table and checks every import, lazy ones included):

  main      the command line: a table of modes
  study     sweeps and their launchers, results table, laws and fits, search, pipeline, report
  interop   Hugging Face export and lm-evaluation-harness
  train     the training step, loss, checkpoints, monitoring and loop
  serve     generation, the decode harness, the cost model, throughput sources
  model     ArchSpec and accounting, the Flax decoder, kernels, sharding, HF weight format
  data      sources, tokenizers, prepared datasets, batches
  core      paths and atomic I/O, locks, exit statuses, config schema, hardware table, figures

`train` and `serve` do not import each other, nor do `model` and `data`.

Array names carry their shapes as suffixes, with one legend for the whole package (`x_BTD` is
[batch, positions, d_model]; a lone suffix such as `y_R` is one axis):

  model     B batch rows        T query positions     S cached (key) positions
            D d_model           F d_ff                V vocabulary          L layers
            N query heads       K KV heads            G query heads per KV head
            H d_head            C positions of one chunk (a loss chunk or an attention block)
            O generated (output) positions
            M batch shards (the devices a batch is split over)
  fitter    R results-table rows                      P law parameters
            I starting points of a fit                E bootstrap replicates
            J fit jobs (start x replicate)            W solver lanes
            Q points of a grid over (x, r)            A architectures compared
"""
