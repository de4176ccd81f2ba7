"""surefire_3b: the paper's Table 1 architecture (arXiv 2510.18245)."""

from archscale.core import config_lib


def get_config():
  return config_lib.make_config("surefire_3b")
