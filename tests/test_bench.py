"""The benchmark suite's arithmetic and records: roofline work counted from the model itself, records
that agree with their own numbers, and greedy tokens identical to transformers' in the comparison."""

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi4_jax import Phi4Config, Phi4ForCausalLM
from phi4_jax.model.attention import causal_mask

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts' own modules, as when they run
from phi4_jax.planner.roofline import decode_step_bytes, decode_step_flops, prefill_flops  # noqa: E402
SHAPE = dict(model_type="phi3", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             original_max_position_embeddings=256)


def bench_module(name: str):
    """bench/<name>.py imported as a module (bench/ on the path, as when it runs as a script)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "bench"))


def params_of(config):
    model = Phi4ForCausalLM(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    return {"/".join(map(str, path)): leaf for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("batch,context", [(1, 10), (3, 17.5)])
def test_decode_step_bytes_are_the_weights_read_once_plus_the_kv_cache(tied, batch, context):
    config = Phi4Config.from_dict(dict(SHAPE, tie_word_embeddings=tied))
    params = params_of(config)
    table = next(v for k, v in params.items() if "embed_tokens" in k)
    every_weight = sum(v[...].nbytes for v in params.values())
    # The input embedding is read one row per sequence; a tied table is read whole by the head.
    weights = every_weight - table[...].nbytes + (table[...].nbytes if tied else batch * 64 * 4)
    kv_token = 2 * 2 * 2 * 16 * 4  # (keys, values) x layers x kv_heads x head_dim x float32
    assert decode_step_bytes(config, batch, context, 4) == weights + batch * (context + 1) * kv_token
    # A sliding window of 6 (the new token and 5 cached ones) caps what a step reads.
    windowed = Phi4Config.from_dict(dict(SHAPE, tie_word_embeddings=tied, sliding_window=6))
    assert decode_step_bytes(windowed, batch, context, 4) == weights + batch * 6 * kv_token


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_flops_count_the_projections_and_the_scores_the_mask_keeps(window):
    config = Phi4Config.from_dict(dict(SHAPE, sliding_window=window))
    length, batch = 12, 2
    params = params_of(config)
    projections = sum(v[...].size for k, v in params.items() if "_proj/" in k)
    positions = jnp.arange(length)[None]
    kept = int(causal_mask(positions, positions, config.window).sum())
    heads, head_dim = 4, 16
    expected = batch * (2 * projections * length + 2 * (2 * 2 * heads * head_dim * kept) + 2 * 64 * 96)
    assert prefill_flops(config, batch, length) == pytest.approx(expected)


@pytest.mark.parametrize("window", [None, 5])
def test_decode_step_flops_count_the_projections_the_visible_keys_and_the_logits(window):
    config = Phi4Config.from_dict(dict(SHAPE, sliding_window=window))
    params = params_of(config)
    projections = sum(v[...].size for k, v in params.items() if "_proj/" in k)
    batch, context = 3, 9
    keys = context + 1 if window is None else window  # the new token and what it sees
    heads, head_dim = 4, 16
    expected = batch * (2 * projections + 2 * 2 * 2 * heads * head_dim * keys + 2 * 64 * 96)
    assert decode_step_flops(config, batch, context) == pytest.approx(expected)


# What bench/generate.py's records are checked against, injected: its clock, the engine's work and
# the roofline readings. Each reading of the clock is TICK after the one before, plus the work done in
# between: a prefill PREFILL_S times 1, 4 or 2 by turns (so any three in a row have a median of 2),
# the n-th decode step of a generation n x STEP_S.
TICK, PREFILL_S, STEP_S = 1e-3, 0.1, 0.01
# Readings by turns, (jitted_sum, jitted_matvec) bytes/s and FLOP/s at (256, 512): the medians of any
# three in a row are (20e9, 25e9) and (2e9, 4e9), though the fastest single readings are 40e9 and 6e9.
READS = [(10e9, 5e9), (30e9, 40e9), (20e9, 25e9)]
MATMULS = [(1e9, 4e9), (5e9, 2e9), (2e9, 6e9)]


class Clock:
    """`time` for bench/generate.py (its perf_counter), moved by TICK per reading and by the work."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += TICK
        return self.now


class Reader:
    """A roofline reader (roofline.ReadBandwidth or MatmulPeak) that returns the next of READS or
    MATMULS, in the form the real one's `measure` has."""

    made = []

    def __init__(self, *args):
        self.args, self.taken, self.closed = args, 0, False
        Reader.made.append(self)

    def close(self):
        self.closed = True


class ReadBandwidth(Reader):
    def measure(self, repeats):
        rates = dict(zip(("jitted_sum", "jitted_matvec"), READS[self.taken % 3]))
        self.taken += 1
        best = max(rates, key=rates.get)
        return {"read_bytes_per_s": rates[best], "read_method": best, "read_buffer_bytes": self.args[0],
                "read_rates": rates}


class MatmulPeak(Reader):
    def measure(self, repeats):
        dtype, sizes = self.args
        rates = dict(zip(map(str, sizes), MATMULS[self.taken % 3]))
        self.taken += 1
        best = max(rates, key=rates.get)
        return {"matmul_flop_per_s": rates[best], "matmul_dtype": dtype, "matmul_size": int(best),
                "matmul_rates": rates}


def timed_engine(clock):
    """The real engine (the products part reads its weights) whose generations take set times."""
    from phi4_jax import ModelRunner

    class Generation:
        def __init__(self):
            self.steps = 0

        def advance(self, n):
            for _ in range(n):
                self.steps += 1
                clock.now += STEP_S * self.steps

    class TimedEngine(ModelRunner):
        def __init__(self, model):
            super().__init__(model)
            self.starts = 0

        def start(self, prompts, params, stops):
            clock.now += PREFILL_S * (1, 4, 2)[self.starts % 3]
            self.starts += 1
            return Generation()

    return TimedEngine


def test_generate_bench_records_agree_with_their_numbers(tmp_path, monkeypatch):
    """bench/generate.py's records from injected timings and readings (above): each number is then
    known, and each record holds the median of its timed runs and of the readings taken before each
    of them. The products run for real on tiny's weights; the compile part's two children report set
    first-token times. gpu.sh's dry run checks the same arithmetic on real timings, and the compile
    part runs for real below."""
    import phi4_jax
    import roofline

    generate = bench_module("generate")
    clock, children = Clock(), []
    Reader.made = []
    child = {"cold": dict(first_s=3.0, second_s=0.02, trace_s=0.2, lower_s=0.3, compile_s=2.0, cache_load_s=0.0),
             "warm": dict(first_s=0.5, second_s=0.02, trace_s=0.2, lower_s=0.3, compile_s=0.05, cache_load_s=0.1)}

    def run(command, env, **_):  # a compile-part child: the cold one first, then the warm one
        children.append((command, env, sorted(os.listdir(env["PHI4_JAX_COMPILATION_CACHE"]))))
        result = child["cold" if len(children) == 1 else "warm"]
        return types.SimpleNamespace(returncode=0, stdout=json.dumps(result) + "\n", stderr="")

    monkeypatch.setattr(generate, "time", clock)
    monkeypatch.setattr(generate, "subprocess", types.SimpleNamespace(run=run))
    monkeypatch.setattr(phi4_jax, "ModelRunner", timed_engine(clock))
    monkeypatch.setattr(roofline, "ReadBandwidth", ReadBandwidth)
    monkeypatch.setattr(roofline, "MatmulPeak", MatmulPeak)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "elsewhere"))  # the children must not see it
    out = tmp_path / "generate.jsonl"
    assert generate.main(["--model", "tiny", "--batch", "1", "2", "--prefill-len", "32", "--new-tokens", "6",
                          "--repeats", "3", "--read-buffer-mb", "64", "--matmul-sizes", "256", "512",
                          "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    parts = [(r["part"], r["batch"]) for r in records]
    assert parts == [("prefill", 1), ("decode", 1), ("decode", 2), ("products", 1), ("products", 2), ("compile", 1)]
    config = generate.model_config(argparse.Namespace(model="tiny", layers=None))
    for r in records:
        assert r["schema"] == generate.SCHEMA
        assert {"jax", "jaxlib", "device", "mesh", "dtype", "attention", "git_commit", "weights"} <= set(r)
    # One reader per measurement, made with the command line's sizes, and freed after it.
    assert [(type(r), r.args, r.closed) for r in Reader.made] == [
        (MatmulPeak, ("float32", (256, 512)), True), *[(ReadBandwidth, (64 * 2**20,), True)] * 4]
    prefill = records[0]  # its three timed runs took 4, 2 and 1 x PREFILL_S
    assert prefill["seconds"] == pytest.approx(TICK + 2 * PREFILL_S)
    assert prefill["best_seconds"] == pytest.approx(TICK + PREFILL_S)
    assert prefill["tokens_per_s"] == pytest.approx(32 / prefill["seconds"])
    assert prefill["matmul_rates"] == {"256": 2e9, "512": 4e9} and prefill["matmul_size"] == 512
    assert prefill["matmul_readings"] == 3 and "read_rates" not in prefill
    assert prefill["matmul_flop_per_s"] == max(prefill["matmul_rates"].values()) == 4e9
    assert prefill["mfu"] == pytest.approx(prefill_flops(config, 1, 32) / prefill["seconds"] / 4e9)
    steps = [TICK + STEP_S * n for n in range(1, 6)]  # the host looks at each of the 5 steps
    for r in records[1:3]:
        assert r["time_to_first_token_s"] == pytest.approx(TICK + 2 * PREFILL_S)
        assert r["decode_seconds"] == pytest.approx(TICK + 15 * STEP_S) == r["best_decode_seconds"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 5 / r["decode_seconds"])
        assert [r[f"latency_p{q}_ms"] for q in (50, 90, 99)] == pytest.approx(
            [1e3 * np.percentile(steps, q) for q in (50, 90, 99)])
        assert r["latency_p50_ms"] <= r["latency_p90_ms"] <= r["latency_p99_ms"]
        assert r["read_buffer_bytes"] == 64 * 2**20 and r["read_readings"] == 3
        assert r["read_rates"] == {"jitted_sum": 20e9, "jitted_matvec": 25e9} and r["read_method"] == "jitted_matvec"
        assert r["read_bytes_per_s"] == max(r["read_rates"].values()) and "matmul_rates" not in r
        step = decode_step_bytes(config, r["batch"], 16 + 2, 4)  # 5 steps read 16 .. 20 cached tokens
        assert r["mbu"] == pytest.approx(step * r["tokens_per_s"] / r["batch"] / r["read_bytes_per_s"])
    # The products read every weight matrix a step reads: all parameters but the norms' vectors,
    # and the input embedding when the head is a table of its own.
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    untied = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    for r in records[3:5]:
        assert r["weight_bytes"] == 4 * (config.num_parameters - norms - untied)
        assert r["products_ms"] == pytest.approx(1e3 * TICK)  # nothing but the clock's reading in between
        assert r["products_gb_per_s"] == pytest.approx(r["weight_bytes"] / r["products_ms"] * 1e3 / 1e9)
        assert r["read_readings"] == 6 and r["read_bytes_per_s"] == 25e9  # 3 before each of the two forms
        assert r["products_of_read_bandwidth"] == pytest.approx(r["products_gb_per_s"] * 1e9 / 25e9)
    # Two children, the first with an empty cache folder that the second shares, and no other folder.
    assert [command[-5:] for command, _, _ in children] == [["--model", "tiny", "--quantize", "none",
                                                             "--first-token-child"]] * 2
    assert children[0][2] == [] and children[0][1]["PHI4_JAX_COMPILATION_CACHE"] == children[1][1][
        "PHI4_JAX_COMPILATION_CACHE"] and all("JAX_COMPILATION_CACHE_DIR" not in env for _, env, _ in children)
    compile_ = records[-1]
    assert compile_["warm_speedup"] == pytest.approx(compile_["cold_first_token_s"] / compile_["warm_first_token_s"])
    assert (compile_["cold_first_token_s"], compile_["warm_first_token_s"], compile_["run_first_token_s"]) == (
        3.0, 0.5, 0.02)
    for when in ("cold", "warm"):  # JAX's phases of each child's first token
        assert {k: compile_[f"{when}_{k}"] for k in generate.PHASES.values()} == {
            k: child[when][k] for k in generate.PHASES.values()}


@pytest.mark.slow  # two fresh processes; the arithmetic is tested with injected timings above
def test_generate_bench_compile_part_times_a_cold_and_a_warm_fresh_process(tmp_path):
    """The compile part for real: two fresh processes share an empty compilation cache; the first
    compiles, the second loads the programs from the cache."""
    generate = bench_module("generate")
    out = tmp_path / "generate.jsonl"
    assert generate.main(["--model", "tiny", "--layers", "1", "--parts", "compile", "--new-tokens", "2",
                          "--output", str(out)]) == 0
    (compile_,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert compile_["part"] == "compile" and compile_["schema"] == generate.SCHEMA
    assert compile_["cold_compile_s"] > compile_["warm_compile_s"] and compile_["warm_cache_load_s"] > 0
    assert compile_["warm_speedup"] == pytest.approx(compile_["cold_first_token_s"] / compile_["warm_first_token_s"])


def test_roofline_readings_combine_as_each_method_s_median_and_the_fastest_of_those():
    from roofline import median_reading

    reading = lambda a, b: {"read_rates": {"sum": a, "matvec": b}, "read_bytes_per_s": max(a, b),  # noqa: E731
                            "read_method": "sum" if a > b else "matvec", "read_buffer_bytes": 8}
    combined = median_reading([reading(10.0, 12.0), reading(11.0, 9.0), reading(14.0, 10.0)])
    assert combined["read_rates"] == {"sum": 11.0, "matvec": 10.0}
    assert (combined["read_bytes_per_s"], combined["read_method"], combined["read_readings"]) == (11.0, "sum", 3)
    matmul = lambda a, b: {"matmul_rates": {"1024": a, "2048": b}, "matmul_dtype": "float32"}  # noqa: E731
    combined = median_reading([matmul(5.0, 7.0), matmul(6.0, 6.0)])
    assert (combined["matmul_flop_per_s"], combined["matmul_size"], combined["matmul_readings"]) == (6.5, 2048, 2)
    both = median_reading([{**reading(10.0, 12.0), **matmul(5.0, 7.0)}, {**reading(11.0, 9.0), **matmul(6.0, 6.0)}])
    assert (both["read_bytes_per_s"], both["matmul_flop_per_s"]) == (10.5, 6.5)


@pytest.mark.parametrize("flags, message", [
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--prefill-len", "4096"], "do not fit tiny's context of 2048"),
    # every model is checked before the first is measured
    (["--model", "tiny", "tiny-phi-4", "--prefill-len", "100"], "do not fit tiny-phi-4's context of 64"),
])
def test_generate_bench_refuses_what_it_cannot_measure_before_writing(tmp_path, capsys, flags, message):
    generate = bench_module("generate")
    out = tmp_path / "generate.jsonl"
    with pytest.raises(SystemExit):
        generate.main(["--model", "tiny", "--output", str(out), *flags])
    assert message in capsys.readouterr().err and not out.exists()


def test_plot_draws_each_figure_from_the_newest_records(tmp_path):
    pytest.importorskip("matplotlib")
    plot = bench_module("plot")
    base = dict(device="cpu", model="tiny", layers=2, dtype="float32", mesh="", prompt_len=16)
    records = [dict(base, part="decode", batch=b, tokens_per_s=t, mbu=0.5) for b, t in ((1, 1.0), (4, 2.0), (1, 3.0))]
    records += [dict(base, part="prefill", batch=1, prompt_len=n, seconds=n / 100, mesh=m)
                for n in (64, 128) for m in ("", "seq=2")]
    assert plot.series(plot.newest(records), "decode", "batch", "tokens_per_s") == {
        "cpu tiny (2 layers) float32, prompt 16": ([1, 4], [3.0, 2.0])}
    lines = plot.series(plot.newest(records), "prefill", "prompt_len", "seconds")
    assert set(lines) == {"cpu tiny (2 layers) float32", "cpu tiny (2 layers) float32, mesh seq=2"}
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot.main(["--input", str(src), "--output-dir", str(tmp_path)]) == 0
    for name in ("decode_tokens_per_s.png", "decode_mbu.png", "prefill_seconds.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compare_transformers_generates_the_same_tokens_as_transformers(tmp_path):
    compare = bench_module("compare_transformers")
    out = tmp_path / "compare.jsonl"
    code = compare.main(["--model", "tiny", "--batch", "2", "--prefill-len", "32", "--new-tokens", "6",
                         "--repeats", "1", "--read-buffer-mb", "64", "--matmul-sizes", "256", "512",
                         "--output", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    decode = [r for r in records if r["part"] == "decode"]
    assert code == 0 and {r["engine"] for r in records} == set(compare.ENGINES)
    assert all(r["tokens_identical_to_eager"] for r in decode) and len(decode) == 3
    ours = next(r for r in decode if r["engine"] == "phi4_jax" and r["batch"] == 2)
    sdpa = next(r for r in decode if r["engine"] == "transformers-sdpa" and r["batch"] == 2)
    assert ours["speedup_vs_sdpa"] == pytest.approx(ours["tokens_per_s"] / sdpa["tokens_per_s"])
    # One roofline reading per round, shared by every engine's record of that measurement.
    prefill = next(r for r in records if r["part"] == "prefill")
    assert prefill["roofline_tokens_per_s"] == pytest.approx(prefill["matmul_flop_per_s"] * 32 / prefill["flops"])
    generate = bench_module("generate")
    config = generate.model_config(argparse.Namespace(model="tiny", layers=None))
    step = decode_step_bytes(config, 2, 16 + 2, 4)  # 5 steps read 16 .. 20 cached tokens
    assert ours["read_readings"] == 1
    assert ours["bandwidth_bound_tokens_per_s"] == pytest.approx(2 * ours["read_bytes_per_s"] / step)
    assert ours["flop_bound_tokens_per_s"] == pytest.approx(
        2 * ours["matmul_flop_per_s"] / decode_step_flops(config, 2, 16 + 2))
    assert ours["roofline_tokens_per_s"] == min(ours["bandwidth_bound_tokens_per_s"], ours["flop_bound_tokens_per_s"])
    assert {r["read_bytes_per_s"] for r in decode if r["batch"] == 2} == {ours["read_bytes_per_s"]}


@pytest.mark.slow
def test_startup_bench_times_fresh_processes_cold_and_warm_with_the_same_tokens(tmp_path):
    """bench/startup.py on the demo folder: transformers' script and the CLI, cold then warm."""
    startup = bench_module("startup")
    out = tmp_path / "startup.jsonl"
    code = startup.main(["--model", str(ROOT / "phi4_jax" / "demo_model"), "--max-tokens", "3", "--repeats", "1",
                         "--warm-up", "0", "--output", str(out)])
    records = {r["run"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert code == 0 and set(records) == set(startup.RUNS)
    assert all(r["tokens_identical"] for r in records.values())
    cold, warm, reference = records["phi4_jax-cold"], records["phi4_jax-warm"], records["transformers"]
    assert cold["compile_cache_seconds"] == 0 < warm["compile_cache_seconds"] <= warm["compile_seconds"]
    assert warm["vs_transformers"] == pytest.approx(warm["wall_s"] / reference["wall_s"])


def test_startup_records_hold_each_run_s_median_against_transformers_s_and_whether_its_tokens_agree():
    """bench/startup.py's records from set rounds: each run's median wall time and statistics, the
    ratio of the medians to transformers', and whether every round's tokens equal transformers' first."""
    startup = bench_module("startup")
    args = argparse.Namespace(max_tokens=3, repeats=3, prompt="Hi")
    same, other = [5, 6, 7], [5, 6, 8]
    runs = {"transformers": [dict(wall_s=s, tokens=same) for s in (4.0, 2.0, 3.0)],
            "phi4_jax-cold": [dict(wall_s=s, tokens=same, compile_seconds=c, compile_cache_seconds=0.0)
                              for s, c in ((9.0, 5.0), (6.0, 4.0), (7.0, 6.0))],
            "phi4_jax-warm": [dict(wall_s=s, tokens=t, compile_seconds=0.5, compile_cache_seconds=d)
                              for s, t, d in ((1.0, same, 0.3), (1.5, other, 0.1), (5.0, same, 0.2))]}
    records = {r["run"]: r for r in startup.records_of(args, "tiny", runs)}
    assert set(records) == set(startup.RUNS) and all(r["schema"] == startup.SCHEMA for r in records.values())
    reference, cold, warm = records["transformers"], records["phi4_jax-cold"], records["phi4_jax-warm"]
    assert (reference["wall_s"], cold["wall_s"], warm["wall_s"]) == (3.0, 7.0, 1.5)
    assert warm["wall_s_rounds"] == [1.0, 1.5, 5.0] and warm["rounds"] == 3
    assert (reference["vs_transformers"], cold["vs_transformers"], warm["vs_transformers"]) == pytest.approx(
        (1.0, 7.0 / 3.0, 0.5))
    assert reference["tokens_identical"] and cold["tokens_identical"] and not warm["tokens_identical"]
    assert (cold["compile_seconds"], cold["compile_cache_seconds"], warm["compile_cache_seconds"]) == (5.0, 0.0, 0.2)
    assert "compile_seconds" not in reference


def test_compare_finds_the_first_differing_token():
    compare = bench_module("compare_transformers")
    assert compare.first_difference([[1, 2], [3, 4]], [[1, 2], [3, 4]]) is None
    assert compare.first_difference([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == [1, 1]


@pytest.fixture(scope="module")
def gpu_dry_run(tmp_path_factory):
    """bench/gpu.sh --dry-run, run once for the tests that read its records (one xdist group): the
    records' folder. Its steps' processes share the tests' compilation cache: three of them compile
    tiny's same programs."""
    out = tmp_path_factory.mktemp("gpu")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_BUDGET_S": "600"}
    if jax.config.jax_compilation_cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("bench_gpu_dry_run")
def test_gpu_script_runs_every_step_on_tiny_shapes(gpu_dry_run):
    """bench/gpu.sh --dry-run: the GPU check's steps on tiny presets on this CPU, each record written."""
    steps = [json.loads(line) for line in (gpu_dry_run / "steps.jsonl").read_text().splitlines()]
    assert [(s["step"], s["rc"]) for s in steps] == [(name, 0) for name in (
        "parity", "generate-mini-xla", "generate-big", "int8", "memory")]  # (no cuDNN step: it needs cuDNN)
    parity, memory = (json.loads(line) for line in (gpu_dry_run / "gpu_check.jsonl").read_text().splitlines())
    assert parity["tokens_identical"] and parity["bf16_max_relative_logit_error"] <= parity["bf16_tolerance"]
    assert memory["cache_slots"] == memory["context"] == 512 and memory["planned_needed_bytes"] > 0
    records = [json.loads(line) for line in (gpu_dry_run / "generate.jsonl").read_text().splitlines()]
    runs = [(r["model"], r["quantize"], r["part"], r["batch"] if r["part"] == "decode" else r["prompt_len"])
            for r in records]
    assert runs == [("tiny", None, "prefill", 16), ("tiny", None, "decode", 1), ("tiny", None, "decode", 2),
                    ("tiny-phi-4", None, "prefill", 16), ("tiny-phi-4", None, "decode", 1),
                    ("tiny-phi-4", None, "decode", 2),
                    ("tiny", None, "decode", 1), ("tiny", "int8", "decode", 1)]  # the int8 step: float, then int8
    # MBU counts the int8 weights at a byte: the int8 step reads a quarter of float32's weight bytes.
    float_step, int8_step = records[-2]["step_bytes"], records[-1]["step_bytes"]
    assert int8_step < 0.5 * float_step
    assert all(0 < r.get("mbu", r.get("mfu")) for r in records)


@pytest.mark.slow
@pytest.mark.xdist_group("bench_gpu_dry_run")
def test_gpu_dry_run_generate_records_agree_with_their_real_timings(gpu_dry_run):
    """bench/generate.py's records from gpu.sh's dry run (real timings and roofline readings, one
    timed run and one reading per measurement): each number follows from the others."""
    generate = bench_module("generate")
    for r in map(json.loads, (gpu_dry_run / "generate.jsonl").read_text().splitlines()):
        assert r["schema"] == generate.SCHEMA
        assert {"jax", "jaxlib", "device", "mesh", "dtype", "attention", "git_commit", "weights"} <= set(r)
        config = generate.model_config(argparse.Namespace(model=r["model"], layers=None))
        if r["part"] == "prefill":
            assert r["matmul_readings"] == 1 and "read_rates" not in r
            assert r["matmul_flop_per_s"] == max(r["matmul_rates"].values())
            assert r["tokens_per_s"] == pytest.approx(16 / r["seconds"])
            assert r["mfu"] == pytest.approx(prefill_flops(config, 1, 16) / r["seconds"] / r["matmul_flop_per_s"])
        else:
            assert r["part"] == "decode"
            assert r["read_buffer_bytes"] == 64 * 2**20 and r["read_readings"] == 1
            assert r["read_bytes_per_s"] == max(r["read_rates"].values()) and "matmul_rates" not in r
            assert r["tokens_per_s"] == pytest.approx(r["batch"] * 5 / r["decode_seconds"])
            assert r["latency_p50_ms"] <= r["latency_p90_ms"] <= r["latency_p99_ms"]
            # 5 steps read 16 .. 20 cached tokens (float32); int8 weights count a byte each
            step = decode_step_bytes(config, r["batch"], 16 + 2, 1 if r["quantize"] else 4, cache_bytes=4)
            assert r["step_bytes"] == pytest.approx(step)
            assert r["mbu"] == pytest.approx(step * r["tokens_per_s"] / r["batch"] / r["read_bytes_per_s"])


def test_gpu_parity_check_fails_on_differing_tokens(tmp_path, monkeypatch):
    """The parity check's verdict comes from the tokens of both sides: a difference on one side fails
    it (and the command), as does a bf16 error beyond the tolerance. The tokens and the error are
    injected here; gpu.sh's dry run runs the check for real."""
    check = bench_module("gpu_check")
    asked = []

    def greedy_on(device, config, prompts, n):  # the accelerator's tokens, then the CPU's: one differs
        asked.append((device, [len(p) for p in prompts], n))
        tokens = [[3 + (7 * row + t) % 50 for t in range(n)] for row in range(len(prompts))]
        if len(asked) == 2:
            tokens[1][5] += 1
        return tokens

    monkeypatch.setattr(check, "_greedy_on", greedy_on)
    monkeypatch.setattr(check, "_bf16_error", lambda device, config, prompt: 0.01)
    assert check.main(["parity", "--new-tokens", "8", "--output", str(tmp_path / "c.jsonl")]) == 1
    assert asked == [(jax.devices()[0], [7, 12], 8), (jax.devices("cpu")[0], [7, 12], 8)]
    record = json.loads((tmp_path / "c.jsonl").read_text())
    assert record["first_difference"] == [1, 5] and not record["passed"]
    assert not record["tokens_identical"] and record["bf16_within_tolerance"] and record["new_tokens"] == 8
    same, changed = [[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]]
    assert check.verdict(changed, same, 0.0)["first_difference"] == [1, 1]  # either side
    assert check.verdict(same, same, check.BF16_TOLERANCE)["passed"]
    over = check.verdict(same, same, 2 * check.BF16_TOLERANCE)
    assert over["tokens_identical"] and not over["bf16_within_tolerance"] and not over["passed"]


def test_serve_bench_schedule_bound_fills_rows_as_the_clients_allow():
    """bench/serve.py's bound: clients send their next request the step after the last ended; every
    running request gets a token a step; no more than the slots run."""
    serve = bench_module("serve")
    mix = [{"prompt": [1] * n, "max_tokens": m} for n, m in ((4, 3), (2, 1), (6, 1), (8, 3))]
    # Client A: 3 tokens (steps 0-2); client B: 1 (step 0), 1 (step 1), then 3 (steps 2-4).
    assert serve.mean_rows(mix, 2) == (5, 8 / 5)
    assert serve.mean_rows(mix, 1) == (8, 1.0)
    assert serve.mean_rows(mix, 4, slots=2) == (5, 8 / 5)  # (the slots bound it as two clients would)
    offline = {"decode_tokens_per_s": 160.0, "packed_prefill_tokens_per_s": 20.0}  # a 0.1 s step
    bound = serve.schedule_bound(mix, 2, offline)
    assert bound["bound_steps"] == 5 and bound["bound_without_prefill_tokens_per_s"] == pytest.approx(8 / 0.5)
    assert bound["bound_tokens_per_s"] == pytest.approx(8 / (0.5 + 20 / 20.0))
