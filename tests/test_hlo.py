"""Reading compiled programs (`planner/hlo.py`): loop trips, matmul FLOPs, main-memory bytes and
copies, on a small hand-written scheduled module whose every count is worked out below."""

from phi4_jax.planner import hlo

# A one-token step: a row of the embedding sliced out, 8 trips of a loop multiplying it by a
# [512, 256] weight, that weight staged into VMEM (S(1)) once and copied within main memory once,
# and one cache slot written in place.
PROGRAM = """\
HloModule synthetic

%fused_row (param_0: bf16[1024,512]) -> bf16[1,512] {
  %param_0 = bf16[1024,512]{1,0} parameter(0)
  %c = s32[] constant(3)
  ROOT %row = bf16[1,512]{1,0} dynamic-slice(%param_0, %c, %c), dynamic_slice_sizes={1,512}
}

%fused_write (param_0.1: bf16[4096,128], param_1.1: bf16[1,128]) -> bf16[4096,128] {
  %param_0.1 = bf16[4096,128]{1,0} parameter(0)
  %param_1.1 = bf16[1,128]{1,0} parameter(1)
  %z = s32[] constant(0)
  ROOT %slot = bf16[4096,128]{1,0} dynamic-update-slice(%param_0.1, %param_1.1, %z, %z)
}

%body (p: (s32[], bf16[1,512], bf16[512,256])) -> (s32[], bf16[1,512], bf16[512,256]) {
  %p = (s32[], bf16[1,512], bf16[512,256]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[1,512]{1,0} get-tuple-element(%p), index=1
  %w = bf16[512,256]{1,0} get-tuple-element(%p), index=2
  %d = bf16[1,256]{1,0:S(1)} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[1,512], bf16[512,256]) tuple(%next, %x, %w)
}

%cond (q: (s32[], bf16[1,512], bf16[512,256])) -> pred[] {
  %q = (s32[], bf16[1,512], bf16[512,256]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(8)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (embedding: bf16[1024,512], cache: bf16[4096,128], new: bf16[1,128], w0: bf16[512,256]) -> bf16[4096,128] {
  %embedding = bf16[1024,512]{1,0} parameter(0)
  %cache = bf16[4096,128]{1,0} parameter(1)
  %new = bf16[1,128]{1,0} parameter(2)
  %w0 = bf16[512,256]{1,0} parameter(3)
  %row = bf16[1,512]{1,0} fusion(%embedding), kind=kLoop, calls=%fused_row
  %zero = s32[] constant(0)
  %init = (s32[], bf16[1,512], bf16[512,256]) tuple(%zero, %row, %w0)
  %loop = (s32[], bf16[1,512], bf16[512,256]) while(%init), condition=%cond, body=%body
  %staged = (bf16[512,256]{1,0:S(1)}, bf16[512,256]{1,0}, u32[]{:S(2)}) copy-start(%w0)
  %done = bf16[512,256]{1,0:S(1)} copy-done(%staged)
  %dup = bf16[512,256]{1,0} copy(%w0)
  ROOT %written = bf16[4096,128]{1,0} fusion(%cache, %new), kind=kLoop, calls=%fused_write
}
"""


def test_a_counted_loop_runs_its_body_as_many_times_as_its_bound():
    program = hlo.parse(PROGRAM)
    assert program.runs["%body"] == 8 and program.runs["%cond"] == 9 and program.runs["%main"] == 1
    assert program.fused == {"%fused_row", "%fused_write"}
    assert hlo.matmul_flops(program) == 8 * 2 * 256 * 512


def test_main_memory_bytes_count_slices_in_place_updates_and_staging_at_their_main_memory_end():
    row, weight, slot = 512 * 2, 512 * 256 * 2, 128 * 2
    expected = (
        2 * row  # the embedding row read (not the table), written out
        + 8 * (row + weight)  # each trip's dot reads both; its result lies in VMEM
        + 8 * (4 + 4) + 9 * (4 + 1)  # the loop counter's add, the condition's compare
        + weight  # staged into VMEM: read from main memory, written to VMEM
        + 2 * weight  # copied within main memory: read and written
        + 2 * slot  # the new slot read and written in place (not the whole cache)
    )
    assert hlo.main_memory_bytes(hlo.parse(PROGRAM)) == expected


def test_the_copy_count_sees_a_copy_within_main_memory_and_not_one_to_or_from_vmem():
    assert hlo.memory_copy_bytes(hlo.parse(PROGRAM)) == 512 * 256 * 2
    evicted = ("ENTRY %e (w: bf16[256,512]) -> bf16[256,512] {\n"
               "  %w = bf16[256,512]{1,0:T(8,128)(2,1)} parameter(0)\n"
               "  %v = bf16[256,512]{1,0:T(8,128)(2,1)S(1)} fusion(%w), kind=kLoop, calls=%f\n"
               "  %e = (bf16[256,512]{1,0:T(8,128)(2,1)}, bf16[256,512]{1,0}, u32[]{:S(2)}) copy-start(%v)\n}")
    assert hlo.memory_copy_bytes(hlo.parse(evicted)) == 0


def test_a_trip_count_xla_noted_wins_and_a_bound_inside_a_fusion_is_read():
    """GPU's compile notes each counted loop's trips, and fuses its condition's compare."""
    def module(note: str) -> str:
        return ("%fused_compare (c: s32[]) -> pred[] {\n  %c = s32[] parameter(0)\n  %n = s32[] constant(6)\n"
                "  ROOT %lt = pred[] compare(%c, %n), direction=LT\n}\n"
                "%cond (q: (s32[])) -> pred[] {\n  %q = (s32[]) parameter(0)\n"
                "  %j = s32[] get-tuple-element(%q), index=0\n"
                "  ROOT %f = pred[] fusion(%j), kind=kLoop, calls=%fused_compare\n}\n"
                "%body (p: (s32[])) -> (s32[]) {\n  ROOT %p = (s32[]) parameter(0)\n}\n"
                "ENTRY %main (x: (s32[])) -> (s32[]) {\n  %x = (s32[]) parameter(0)\n"
                f"  ROOT %loop = (s32[]) while(%x), condition=%cond, body=%body{note}\n}}\n")
    assert hlo.parse(module("")).runs["%body"] == 6
    assert hlo.parse(module(', backend_config={"known_trip_count":{"n":"4"},"known_init_step":{}}')).runs["%body"] == 4


def test_a_batched_matmul_written_as_a_convolution_counts_only_the_taps_that_meet_an_input():
    """TPU's form of grouped-query attention's scores: KV heads as a dilated spatial dimension (each
    output meets its own head alone) and query groups as a padded one (one tap in 3 meets it)."""
    text = ("ENTRY %main (q: bf16[2,4,16,1], k: bf16[4,2,3,16]) -> bf16[2,4,4,3] {\n"
            "  %q = bf16[2,4,16,1]{3,2,1,0} parameter(0)\n  %k = bf16[4,2,3,16]{3,2,1,0} parameter(1)\n"
            "  ROOT %s = bf16[2,4,4,3]{3,2,1,0} convolution(%q, %k), window={size=2x3 pad=0_0x2_2 lhs_dilate=2x1 "
            "rhs_reversal=0x1}, dim_labels=0bf1_o01i->0bf1\n}\n")
    heads, groups, rows, keys, head_dim = 2, 3, 4, 4, 16
    assert hlo.matmul_flops(hlo.parse(text)) == 2 * heads * groups * rows * keys * head_dim


# A batch of 4 rows, each writing its new slot at its own position: the scatter XLA makes of a
# vmapped dynamic-update-slice, fused, updating the cache in place.
SCATTER = """\
HloModule rows

%keep (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  ROOT %b = bf16[] parameter(1)
}

%fused_rows (param_0: bf16[4,4096,128], param_1: s32[4,2], param_2: bf16[4,1,1,128]) -> bf16[4,4096,128] {
  %param_0 = bf16[4,4096,128]{2,1,0} parameter(0)
  %param_1 = s32[4,2]{1,0} parameter(1)
  %param_2 = bf16[4,1,1,128]{3,2,1,0} parameter(2)
  ROOT %slots = bf16[4,4096,128]{2,1,0} scatter(%param_0, %param_1, %param_2), update_window_dims={1,2,3}, inserted_window_dims={}, scatter_dims_to_operand_dims={0,1}, index_vector_dim=1, to_apply=%keep
}

ENTRY %main (cache: bf16[4,4096,128], where: s32[4,2], new: bf16[4,1,1,128]) -> bf16[4,4096,128] {
  %cache = bf16[4,4096,128]{2,1,0} parameter(0)
  %where = s32[4,2]{1,0} parameter(1)
  %new = bf16[4,1,1,128]{3,2,1,0} parameter(2)
  ROOT %written = bf16[4,4096,128]{2,1,0} fusion(%cache, %where, %new), kind=kLoop, calls=%fused_rows
}
"""  # noqa: E501  (an HLO line as XLA writes it)


def test_a_scatter_into_its_operand_counts_the_rows_it_writes_not_the_whole_cache():
    slots, where = 4 * 128 * 2, 4 * 2 * 4
    assert hlo.main_memory_bytes(hlo.parse(SCATTER)) == where + 2 * slots  # the indices; each slot read, written
