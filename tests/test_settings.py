"""Typed config sections: one home per default, errors naming the field, opt-out identity."""

import dataclasses

import ml_collections
import pytest

from archscale.core import config_lib, settings
from archscale.core.settings import ModelOptions
from archscale.study import sweep


def test_make_config_takes_every_default_from_the_typed_sections():
  c = config_lib.make_config("demo")
  for cls in settings.SECTIONS:
    typed = cls.from_config(c)
    for f in dataclasses.fields(cls):
      if not (cls is settings.BenchConfig and f.name == "archs"):
        assert getattr(typed, f.name) == f.default, (cls.SECTION, f.name)
  assert ModelOptions.from_config(c) == ModelOptions()


@pytest.mark.parametrize("section,field,value,message", [
    ("train", "steps", 0, "train.steps must be a positive integer"),
    ("train", "lr", -1.0, "train.lr must be a positive number"),
    ("train", "schedule", "linear", "train.schedule must be one of"),
    ("train", "grad_accum", 3, "must be divisible by train.grad_accum=3"),
    ("sweep", "launch", "cloud", "sweep.launch must be one of"),
    ("sweep", "n_tolerance", 0.0, "sweep.n_tolerance must be a positive number"),
    ("search", "r_range", (2.0, 1.0), "search.r_range must be (low, high)"),
    ("search", "d_head", 63, "search.d_head must be even"),
    ("fit", "form", "cubic", "fit.form must be one of"),
    ("bench", "repeats", 0, "bench.repeats must be a positive integer"),
    ("data", "seq_len", 0, "data.seq_len must be a positive integer"),
])
def test_a_bad_value_names_its_field(section, field, value, message):
  c = config_lib.make_config("demo")
  c[section][field] = value
  cls = next(s for s in settings.SECTIONS if s.SECTION == section)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    cls.from_config(c)


def test_an_unknown_field_is_refused_with_the_known_ones():
  c = config_lib.make_config("demo")
  c.train.learning_rate = 1e-3
  with pytest.raises(ValueError, match=r"train: unknown field\(s\) \['learning_rate'\]"):
    settings.TrainConfig.from_config(c)


def test_a_new_training_field_changes_the_run_id_without_other_edits(monkeypatch):
  """Identity is every field not marked bookkeeping, so an added knob cannot miss the hash."""
  c = config_lib.make_config("demo")
  c.sweep.update(scales="50k:2:16", tokens=4096, d_over_sqrt_n=(0.2,), r=(1.0,), gqa=(2,),
                 d_model_multiple=8, d_ff_multiple=16, n_tolerance=0.1, r_tolerance=0.3)
  before = [r.run_id for r in sweep.plan(c)[0]]

  extended = dataclasses.make_dataclass(
      "TrainConfig", [("label_smoothing", float, 0.1)], bases=(settings.TrainConfig,),
      frozen=True)
  monkeypatch.setattr(settings, "TrainConfig", extended)
  c.train.label_smoothing = 0.1
  after = [r.run_id for r in sweep.plan(c)[0]]
  assert len(after) == len(before) == 1 and after != before
  c.train.label_smoothing = 0.0
  assert [r.run_id for r in sweep.plan(c)[0]] != after

  # A bookkeeping field does not: logging cadence, checkpoint layout, where data sits.
  monkeypatch.undo()
  c = config_lib.make_config("demo")
  c.sweep.update(scales="50k:2:16", tokens=4096, d_over_sqrt_n=(0.2,), r=(1.0,), gqa=(2,),
                 d_model_multiple=8, d_ff_multiple=16, n_tolerance=0.1, r_tolerance=0.3)
  c.train.checkpoint_every = 7
  c.data.path = "/elsewhere"
  c.compute.remat = "full"
  assert [r.run_id for r in sweep.plan(c)[0]] == before


def test_sections_read_plain_dicts_too():
  train = settings.TrainConfig.from_config({"train": {"lr": 1e-3}})
  assert train.lr == 1e-3 and train.steps == settings.TrainConfig().steps
  assert isinstance(config_lib.make_config("demo").train, ml_collections.ConfigDict)
