"""The paper's architecture sweep at four scales, emitted as one cluster command per run.

`python -m archscale.main --config=configs/sweep.py --mode=sweep --workdir=DIR` plans, at each
scale N (non-embedding parameters : layers : head size), the 5 x 5 grid of d_model/sqrt(N) and
r = MLP/attention parameters at GQA 4, each trained on 100 x N tokens, and writes
DIR/launch_commands.sh: one `--mode=sweep --config.sweep.only=<run_id>` command per run, which
trains that run into DIR/runs/<run_id>/ and appends its row to DIR/results.jsonl. Run them in any
order, concurrently, on any cluster; rerunning one that finished does nothing.

The paper fixes depth and head size per scale: 16 layers and d_head 64 at 1B (LLaMA-3.2-1B's N,
973M) are published; the depths used here for 80M, 145M and 297M (12, 12, 16) are this config's
choice. Set data.source to your corpus (the paper trains on Dolma) and data.tokenizer to the
LLaMA-3 tokenizer.json; a learning rate tuned per scale is advisable (one is used here).
"""

from archscale.core import config_lib


def get_config():
  c = config_lib.make_config("llama3_2_1b")
  c.name = "sweep_paper"
  c.mode = "sweep"
  c.data.source = ""                       # e.g. "/data/dolma/*.json.gz"
  c.data.tokenizer = ""                    # e.g. "/models/llama3/tokenizer.json"
  c.data.seq_len = 2048
  c.compute.dtype = "bfloat16"
  c.train.global_batch_size = 256
  c.train.lr = 1e-3
  c.train.warmup_steps = 1000
  c.train.schedule = "cosine"
  c.train.eval_every = 1000
  c.train.eval_batches = 16
  c.train.checkpoint_every = 1000

  c.sweep.scales = "80M:12:64,145M:12:64,297M:16:64,973146112:16:64"
  c.sweep.tokens_per_param = 100.0
  c.sweep.d_over_sqrt_n = (0.04, 0.06, 0.08, 0.1, 0.12)
  c.sweep.r = (0.5, 1.0, 2.0, 3.0, 5.0)
  c.sweep.gqa = (4,)
  c.sweep.design = "grid"
  c.sweep.d_model_multiple = 64
  c.sweep.d_ff_multiple = 64              # fine enough to put every run within 1.1% of its N
  c.sweep.launch = "emit"
  c.sweep.isolation = "process"
  return c
