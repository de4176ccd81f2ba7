"""Algorithm 1: the paper's numbers, feasibility rules, GQA early stopping, Pareto, outputs."""

import json
import math
import pathlib

import numpy as np
import pytest

from archscale.core import config_lib
from archscale.model.arch import ArchSpec
from archscale.serve import throughput
from archscale.study import candidates, law, search
from archscale.train import trainer as train

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
PAPER = {"a0": 2.697, "a1": 0.0974, "a2": 0.0078, "b0": 0.3870, "b1": 0.0063, "b2": 0.0065}
LLAMA = ArchSpec.from_dict(config_lib.ARCHS["llama3_2_1b"])
PANDA = ArchSpec.from_dict(config_lib.ARCHS["panda_1b"])


@pytest.fixture(scope="module")
def paper_search(tmp_path_factory):
  """configs/search.py with a hand-written fit.json holding only `form` and `params`."""
  workdir = tmp_path_factory.mktemp("search")
  fit = workdir / "hand_fit.json"
  fit.write_text(json.dumps({"form": "multiplicative", "params": PAPER}))
  c = config_lib.load_config_file(CONFIGS / "search.py")
  c.search.law = str(fit)
  out = search.run_search(c, workdir)
  return c, workdir, out


def budget_1b():
  fixed = tuple((k, getattr(LLAMA, k)) for k in search.FIXED_FIELDS)
  return candidates.Budget(LLAMA.params_nonembed, 100 * LLAMA.params_nonembed, 16, 64, fixed)


def test_paper_coefficients_give_panda_1b(paper_search):
  _, _, out = paper_search
  panda = out["panda"]
  assert abs(panda["d_over_sqrt_n"] / 0.080 - 1) < 0.05
  assert abs(panda["mlp_attn_ratio"] / 1.03 - 1) < 0.05
  fields = [f for f in PANDA.to_dict()]
  assert {k: panda[k] for k in fields} == PANDA.to_dict()
  assert out["law"]["optimum"]["d_over_sqrt_n"] == pytest.approx(0.0801, abs=1e-4)
  assert out["law"]["optimum"]["r"] == pytest.approx(1.0317, abs=1e-4)


def test_with_64_wide_steps_the_optimum_is_panda_1b_s_nearest_neighbour():
  model = law.load_law({"form": "multiplicative", "params": PAPER})
  space = candidates.Space(d_model_multiple=64, d_ff_multiple=256)
  budget = budget_1b()
  specs, _ = candidates.enumerate_specs(budget, space, range(1984, 3200, 64), 4)
  best = specs[int(np.argmin(candidates.predict_losses(model, specs, budget.tokens)))]
  assert abs(best.d_over_sqrt_n / 0.080 - 1) < 0.05
  assert abs(best.mlp_attn_ratio / 1.03 - 1) < 0.05
  assert abs(best.d_model - PANDA.d_model) <= 64 and best.d_ff == PANDA.d_ff
  assert abs(best.n_kv_heads - PANDA.n_kv_heads) <= 1 and best.gqa == PANDA.gqa


def test_chosen_architecture_beats_llama_on_an_a100_at_4096_1024(paper_search):
  _, _, out = paper_search
  base, sure = out["baseline"], out["surefire"]
  assert out["target"] == pytest.approx(base["predicted_loss"])
  assert out["loss_units"] == "factor"  # no Chinchilla params: relative to L_opt
  assert out["scenario"]["accelerator"] == "a100-40gb"
  assert (out["scenario"]["input_len"], out["scenario"]["output_len"]) == (4096, 1024)
  assert sure["predicted_loss"] <= out["target"] and sure["fits"]
  assert sure["throughput"] > base["throughput"]
  assert abs(sure["params_nonembed"] / LLAMA.params_nonembed - 1) <= 0.05
  # Surefire is the fastest of the candidates that meet the target.
  ok = [c for c in out["candidates"] if c["meets_target"] and c["fits"]]
  assert sure["throughput"] == max(c["throughput"] for c in ok)


def test_search_json_candidates_obey_the_feasibility_rules(paper_search):
  c, _, out = paper_search
  for key in ("candidates", "pareto", "panda", "surefire", "baseline"):
    assert key in out
  assert out["candidates"]
  for cand in out["candidates"] + [out["panda"], out["surefire"]]:
    spec = ArchSpec.from_dict({k: cand[k] for k in LLAMA.to_dict()})
    assert isinstance(cand["n_heads"], int) and isinstance(cand["n_kv_heads"], int)
    assert spec.n_heads % spec.n_kv_heads == 0 and cand["gqa"] == spec.gqa
    assert spec.d_ff % c.search.d_ff_multiple == 0
    assert spec.d_model % c.search.d_model_multiple == 0
    assert (spec.n_layers, spec.d_head) == (16, 64)
    assert abs(spec.params_nonembed / LLAMA.params_nonembed - 1) <= c.search.n_tolerance
    assert 0.5 <= spec.mlp_attn_ratio <= 5.0
    assert cand["mlp_attn_ratio"] == pytest.approx(spec.mlp_attn_ratio)
    assert cand["d_over_sqrt_n"] == pytest.approx(spec.d_over_sqrt_n)
    assert 0 < cand["gqa"] <= c.search.gqa_max or cand["origin"] == "grid"
  # The frontier: loss increases while throughput increases, and nothing dominates it.
  front = out["pareto"]
  assert all(a["predicted_loss"] <= b["predicted_loss"] and a["throughput"] < b["throughput"]
             for a, b in zip(front, front[1:], strict=False))
  for p in front:
    assert not any(c["predicted_loss"] < p["predicted_loss"] and c["throughput"] > p["throughput"]
                   for c in out["candidates"] if c["fits"])


def test_written_configs_are_accepted_by_train_and_decode_bench(paper_search):
  c, workdir, out = paper_search
  assert (workdir / "pareto.png").stat().st_size > 0
  for name in ("panda", "surefire"):
    path = workdir / f"{name}.py"
    loaded = config_lib.load_config_file(path)
    spec = ArchSpec.from_config(loaded)
    assert spec.to_dict() == {k: out[name][k] for k in spec.to_dict()}
    train.validate(loaded)
    assert loaded.mode == "train"
    tokens = loaded.train.steps * loaded.train.global_batch_size * loaded.data.seq_len
    assert tokens >= 100 * LLAMA.params_nonembed
    # decode_bench resolves bench.archs through arch_config: the file names itself.
    assert ArchSpec.from_dict(config_lib.arch_config(loaded.bench.archs)) == spec


def test_make_spec_enforces_integer_heads_dividing_gqa_and_budget():
  budget, space = budget_1b(), candidates.Space(128, 256)
  spec, why = candidates.make_spec(budget, space, 2560, 72, 18)
  assert why is None and spec == PANDA
  for heads, kv in ((72, 16), (72, 0), (0, 1)):
    spec, why = candidates.make_spec(budget, space, 2560, heads, kv)
    assert spec is None and why.startswith("heads")
  spec, why = candidates.make_spec(budget, space, 2560, 8, 8)  # almost no attention: r far above 5
  assert spec is None and "r outside" in why
  spec, why = candidates.make_spec(budget, space, 2560, 400, 400)  # attention alone is over budget
  assert spec is None and "exceeds the budget" in why
  specs, dropped = candidates.enumerate_specs(budget, space, [2048, 2560], 4)
  assert specs and all(s.n_heads == 4 * s.n_kv_heads for s in specs)
  assert sum(dropped.values()) > 0
  assert len({(s.d_model, s.n_kv_heads) for s in specs}) == len(specs)


class RatioLaw:
  """A stand-in law whose loss is r itself: GQA steps that raise r degrade it."""

  output = "factor"

  def predict(self, n, d, x, r):
    return np.asarray(r, np.float64)


def walk(target, throughput, patience=2, gqa_max=0):
  budget = budget_1b()
  space = candidates.Space(128, 256, (0.5, 50.0), 0.05)
  calls = []

  def rate(spec):
    calls.append(spec)
    return throughput(spec), True

  ev = candidates.Evaluator(RatioLaw(), budget.tokens, target, rate)
  start = ev(PANDA, "grid")
  calls.clear()
  visited, stops = candidates.gqa_walk(start, budget, space, ev, patience, gqa_max)
  return start, visited, stops, calls


def test_gqa_walk_stops_at_the_first_variant_over_the_target():
  # 72 query heads: GQA steps up through 6, 8, 9, 12, ...; refilling d_ff raises r each time
  # (1.07 at GQA 4, then 1.21, 1.26, 1.35, ...).
  start, visited, stops, calls = walk(target=1.3, throughput=lambda s: 1.0 / s.n_kv_heads)
  up = [c for c in visited if c.spec.gqa > start.spec.gqa]
  assert [c.spec.gqa for c in up] == [6, 8, 9]
  assert all(c.meets_target for c in up[:-1]) and not up[-1].meets_target
  assert up[-1].predicted_loss > 1.3 and stops["up"] == "loss"
  assert all(c.spec.n_heads == 72 and 72 % c.spec.n_kv_heads == 0 for c in visited)
  # Nothing beyond the stopping variant was evaluated.
  assert max(s.gqa for s in calls) == up[-1].spec.gqa
  for c in visited:
    assert abs(c.spec.params_nonembed / PANDA.params_nonembed - 1) < 0.05


def test_gqa_walk_patience_and_ceiling():
  # Throughput falling with GQA: each direction gives up after `patience` steps without a gain.
  _, visited, stops, _ = walk(target=100.0, throughput=lambda s: float(s.n_kv_heads), patience=2)
  assert stops["up"] == "patience"
  assert len([c for c in visited if c.spec.gqa > 4]) == 2
  _, visited, stops, _ = walk(target=100.0, throughput=lambda s: 1.0 / s.n_kv_heads, gqa_max=8)
  assert stops["up"] == "gqa_max" and max(c.spec.gqa for c in visited) == 8
  assert stops["down"] == "patience"  # going down only adds KV heads: slower


def test_pareto_front_keeps_only_undominated_points():
  spec = PANDA
  cands = [candidates.Candidate(spec, loss, "grid", speed, True)
           for loss, speed in ((1.0, 10.0), (1.1, 20.0), (1.05, 5.0), (1.2, 20.0), (1.3, 30.0))]
  cands.append(candidates.Candidate(spec, 0.9, "grid", 100.0, False))  # does not fit: excluded
  front = candidates.pareto_front(cands)
  assert [(c.predicted_loss, c.throughput) for c in front] == [(1.0, 10.0), (1.1, 20.0),
                                                                (1.3, 30.0)]


def test_target_and_throughput_fields_are_checked_before_any_work(tmp_path):
  c = config_lib.load_config_file(CONFIGS / "search.py")
  assert search.parse_target("2.75") == (2.75, None)
  assert search.parse_target("baseline:llama3_2_1b") == (None, "llama3_2_1b")
  for field, value in (("target", "fast"), ("target", "baseline:no_such_model"),
                       ("throughput", "model:tpu-v99"), ("throughput", "guess"),
                       ("batch_size", 0), ("r_range", (5.0, 0.5)), ("law", "/no/such/fit.json")):
    bad = c.copy_and_resolve_references()
    bad.search[field] = value
    with pytest.raises(ValueError, match=f"search.{field}"):
      search.run_search(bad, tmp_path)
  assert not (tmp_path / search.SEARCH_JSON).exists()


def test_numeric_target_and_absolute_law(tmp_path):
  # With Chinchilla parameters the law predicts absolute losses, and a number is a loss.
  params = dict(PAPER, E=1.8, A=400.0, B=400.0, alpha=0.34, beta=0.28)
  fit = tmp_path / "fit.json"
  fit.write_text(json.dumps({"form": "multiplicative", "params": params}))
  c = config_lib.load_config_file(CONFIGS / "search.py")
  c.search.law = str(fit)
  model = law.load_law(fit)
  llama_loss = float(model.predict(LLAMA.params_nonembed, 100 * LLAMA.params_nonembed,
                                   LLAMA.d_over_sqrt_n, LLAMA.mlp_attn_ratio))
  c.search.target = str(llama_loss)
  out = search.run_search(c, tmp_path)
  assert out["loss_units"] == "loss" and out["baseline"] is None
  assert out["target"] == pytest.approx(llama_loss)
  assert out["surefire"]["predicted_loss"] <= llama_loss
  assert all(math.isfinite(x["predicted_loss"]) and x["predicted_loss"] > 1.8
             for x in out["candidates"])
  # A target every candidate meets, or none, is refused before any throughput: here a loss given
  # to a law of L / L_opt factors (about 1), and a loss below the best candidate's.
  relative = config_lib.load_config_file(CONFIGS / "search.py")
  relative.search.target = "2.803"
  with pytest.raises(ValueError, match=r"search.target=2.803 is outside the factors .* meet it"):
    search.run_search(relative, tmp_path / "units")
  c.search.target = str(0.9 * min(x["predicted_loss"] for x in out["candidates"]))
  with pytest.raises(ValueError, match=r"outside the losses .* miss it"):
    search.run_search(c, tmp_path / "low")
  assert not (tmp_path / "units" / search.SEARCH_JSON).exists()


def test_measured_throughput_times_once_and_caches(tmp_path):
  spec = ArchSpec.from_dict(config_lib.ARCHS["demo"])
  source = throughput.MeasuredThroughput(throughput.Scenario(2, 16, 8), "float32", 1,
                                     tmp_path / throughput.MEASURE_CACHE)
  speed, fits = source(spec)
  assert fits and speed > 0
  again = throughput.MeasuredThroughput(throughput.Scenario(2, 16, 8), "float32", 1,
                                    tmp_path / throughput.MEASURE_CACHE)
  assert again(spec) == (speed, True)  # read back from the cache, not re-measured
  assert len((tmp_path / throughput.MEASURE_CACHE).read_text().splitlines()) == 1


def test_a_measurement_that_fails_other_than_out_of_memory_stops_the_search(tmp_path,
                                                                             monkeypatch):
  from archscale.serve import decode_bench

  spec = ArchSpec.from_dict(config_lib.ARCHS["demo"])
  source = throughput.MeasuredThroughput(throughput.Scenario(2, 16, 8), "float32", 1,
                                     tmp_path / throughput.MEASURE_CACHE)
  rows = {"oom": [{"error": "out of memory: 3 GB"}], "bug": [{"error": "TypeError: bad"}]}
  monkeypatch.setattr(decode_bench, "bench_archs", lambda *a, **k: rows["oom"])
  assert source(spec) == (None, False)  # does not fit: a result, cached
  monkeypatch.setattr(decode_bench, "bench_archs", lambda *a, **k: rows["bug"])
  with pytest.raises(RuntimeError, match="TypeError: bad"):
    source(spec.replace(n_kv_heads=1))
  assert len((tmp_path / throughput.MEASURE_CACHE).read_text().splitlines()) == 1


def test_measure_refuses_to_time_too_many_candidates(tmp_path):
  c = config_lib.load_config_file(CONFIGS / "search.py")
  fit = tmp_path / "fit.json"
  fit.write_text(json.dumps({"form": "multiplicative", "params": PAPER}))
  c.search.law = str(fit)
  c.search.throughput = "measure"
  c.search.max_measure = 5
  with pytest.raises(ValueError, match="search.max_measure"):
    search.run_search(c, tmp_path)
  assert not (tmp_path / throughput.MEASURE_CACHE).exists()


def test_a_measured_source_times_only_candidates_that_can_be_chosen():
  model = law.load_law({"form": "multiplicative", "params": PAPER})
  budget, space = budget_1b(), candidates.Space(128, 256)
  timed = []

  def source(spec):
    timed.append(spec)
    return 1e4 / spec.n_kv_heads, True

  d_models = candidates.d_model_grid(budget.n_nonembed, [0.08], (0.8, 1.25), 128)
  result = candidates.search(model, budget, space, 1.0032, source, d_models, 4, top_k=2,
                         rate_all=False)
  meeting = [c for c in result.candidates if c.origin == "grid" and c.meets_target]
  assert 0 < len(meeting) < result.stats["enumerated"] / 4
  # Timed: the grid candidates meeting the target, then the variants of two GQA walks.
  assert all(c.meets_target or c.origin == "gqa" for c in map(result_of(result), timed))
  assert len(timed) == len(set(timed))
  assert result.panda.meets_target and result.panda.throughput is not None
  assert result.surefire.throughput == max(c.throughput for c in result.candidates
                                           if c.meets_target and c.fits)
  assert result.stats["gqa_walks"] == 2


def result_of(result):
  by_spec = {c.spec: c for c in result.candidates}
  return lambda spec: by_spec[spec]


def _fit_json(tmp_path, **extra):
  path = tmp_path / "fit.json"
  path.write_text(json.dumps({"form": "multiplicative", "params": PAPER, **extra}))
  c = config_lib.load_config_file(CONFIGS / "search.py")
  c.search.law = str(path)
  return c


def test_picks_stay_within_the_support_unless_extrapolating(tmp_path):
  """The paper's optimum (x 0.080, r 1.03) lies outside these rows' support: without
  search.extrapolate no candidate leaves it; with it, Panda moves there and is marked."""
  support = {"d_over_sqrt_n": [0.1, 0.2], "r": [1.5, 3.0]}
  c = _fit_json(tmp_path, support=support)
  c.search.support_margin = 0.0
  out = search.run_search(c, tmp_path / "inside")
  assert out["support"]["d_over_sqrt_n"] == pytest.approx([0.1, 0.2])
  assert out["support"]["rows"] == support and out["support"]["extrapolate"] is False
  for cand in out["candidates"] + [out["panda"], out["surefire"]]:
    assert 0.1 <= cand["d_over_sqrt_n"] <= 0.2 and 1.5 <= cand["mlp_attn_ratio"] <= 3.0
    assert cand["extrapolated"] is False
  assert any(k.startswith("outside the rows' support") for k in out["stats"]["dropped"])
  c.search.extrapolate = True
  wide = search.run_search(c, tmp_path / "wide")
  assert wide["panda"]["extrapolated"] is True
  assert abs(wide["panda"]["d_over_sqrt_n"] / 0.080 - 1) < 0.05
  for cand in wide["candidates"]:
    outside = not (0.1 <= cand["d_over_sqrt_n"] <= 0.2 and 1.5 <= cand["mlp_attn_ratio"] <= 3.0)
    assert cand["extrapolated"] is outside
  margin = _fit_json(tmp_path, support=support)
  margin.search.support_margin = 0.5  # log-width of [0.1, 0.2] is ln 2: +-0.5 ln 2 each side
  assert search.run_search(margin, tmp_path / "margin")["support"]["d_over_sqrt_n"] == \
      pytest.approx([0.1 / 2**0.5, 0.2 * 2**0.5])


WIDE = {"d_over_sqrt_n": [0.02, 0.5], "r": [0.3, 6.0]}


def test_gqa_the_rows_never_varied_is_refused_or_marked(tmp_path):
  """Rows all at GQA 4 (the baseline's): the walk stays there, saying why; with
  search.extrapolate its picks may leave it, marked `gqa`; a GQA the rows lack is refused."""
  c = _fit_json(tmp_path, support={**WIDE, "gqa": [4, 4]})
  out = search.run_search(c, tmp_path / "held")
  assert {cand["gqa"] for cand in out["candidates"]} == {4}
  assert out["stats"]["gqa_stops"].get("support", 0) > 0
  assert any("GQA 4 only" in line for line in out["uncertainty"]["statements"])
  c.search.extrapolate = True
  free = search.run_search(c, tmp_path / "free")
  assert free["surefire"]["gqa"] != 4 and free["surefire"]["extrapolated_axes"] == ["gqa"]
  assert all(("gqa" in cand["extrapolated_axes"]) is (cand["gqa"] != 4)
             for cand in free["candidates"])
  other = _fit_json(tmp_path, support={**WIDE, "gqa": [1, 1]})
  with pytest.raises(ValueError, match=r"search.gqa=4 .*\(1\).*sweep.gqa.*search.extrapolate"):
    search.run_search(other, tmp_path / "refused")


def test_a_budget_beyond_the_trained_runs_is_flagged_with_its_factor(tmp_path):
  rows = {"n_params": [1e7, 1.25e8], "tokens": [2e8, 2.5e9], "gqa": [1, 8]}
  progressive = [{"test_scale": 1.25e8, "mse": 4e-4}]
  c = _fit_json(tmp_path, support={**WIDE, **rows}, metrics={"progressive": progressive})
  out = search.run_search(c, tmp_path / "far")
  n, d = out["budget"]["n_nonembed"], out["budget"]["tokens"]
  lines = out["uncertainty"]["statements"]
  assert any(f"{n / 1.25e8:.3g}x the largest trained run" in line for line in lines)
  assert any(f"{d / 2.5e9:.3g}x the largest trained run" in line for line in lines)
  assert any("RMSE 0.02" in line for line in lines)
  assert all({"n_params", "tokens"} <= set(cand["extrapolated_axes"])
             for cand in out["candidates"])
  c.search.n_nonembed, c.search.tokens = 1e8, 2e9  # inside: nothing flagged on N or D
  near = search.run_search(c, tmp_path / "near")
  assert not any("trained run" in line for line in near["uncertainty"]["statements"])
  assert not any({"n_params", "tokens"} & set(cand["extrapolated_axes"])
                 for cand in near["candidates"])


def test_picks_say_whether_their_advantage_exceeds_the_fit_uncertainty(tmp_path):
  keys = ["a0", "a1", "a2", "b1", "b2"]
  for scale, within in ((1e-14, False), (1e-2, True)):
    cov = {"params": keys, "matrix": (scale * np.eye(5)).tolist()}
    c = _fit_json(tmp_path, covariance=cov, interval_level=0.9)
    out = search.run_search(c, tmp_path / f"cov{scale}")
    unc = out["uncertainty"]
    lo, hi = unc["panda"]["interval"]
    assert lo <= out["panda"]["predicted_loss"] <= hi and unc["panda"]["level"] == 0.9
    assert unc["panda"]["difference"] == pytest.approx(
        out["panda"]["predicted_loss"] - out["baseline"]["predicted_loss"], rel=1e-6)
    assert unc["panda"]["within_uncertainty"] is within
    line = [s for s in unc["statements"] if s.startswith("panda:")][0]
    assert ("cannot tell it from the baseline" in line) is within
  hand = search.run_search(_fit_json(tmp_path), tmp_path / "hand")
  assert hand["support"] is None and "panda" not in hand["uncertainty"]
  assert any("no covariance" in s for s in hand["uncertainty"]["statements"])
