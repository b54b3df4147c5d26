"""``align_block_size`` on the GPU: small Triton kernels, no host synchronisation.

The (token, k) *slots* ``s = token * top_k + k`` of ``topk_ids [M, top_k]`` are cut into
chunks of ``CHUNK`` consecutive slots (one program each):

1. :func:`_align_count_kernel` (grid: chunks): the histogram of the chunk's expert ids,
   written as row ``c`` of ``counts [chunks, E]``; each program also fills its share of
   ``sorted_token_ids`` with the sentinel ``M * top_k``.
2. :func:`_align_scan_kernel` (one program): per expert, the exclusive prefix sum of the
   counts over chunks (written back in place: where chunk ``c``'s slots of expert ``e``
   start within that expert's run), the padded run lengths ``ceil(count / block) * block``,
   their cumulative starts and ends, and ``num_tokens_post_padded``.
3. :func:`_align_scatter_kernel` (grid: chunks): every slot goes to
   ``start[e] + prefix[c, e] + rank``, ``rank`` = slots of the same expert earlier in the
   chunk (a pairwise count), so within an expert the slots keep their flat order, exactly
   like a stable sort; each program also writes the expert id of its share of the blocks
   (the number of runs that end at or before the block's first row, mapped through
   ``expert_map``; -1 past ``num_tokens_post_padded``).

Up to :data:`SINGLE_PROGRAM_SLOTS` slots (decode and mid-M batches; up to
:data:`SINGLE_PROGRAM_CHAIN_SLOTS` as a dependent in the prefill PDL chain) one program does all
three steps instead (:func:`_align_sort_kernel`, by sorting the slots by expert): one launch
instead of three, the same outputs.

All shapes depend only on ``M * top_k``, the block size and E, so the launches can be
captured in a CUDA graph; with preallocated outputs and scratch nothing is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..routing import AlignedBlocks, max_num_tokens_padded
from .pdl import prefill_pdl_args, wait_upstream_release_next

#: largest E handled (the scan holds one row of E counts in registers)
MAX_EXPERTS = 4096
#: up to this many slots (and fewer than SINGLE_PROGRAM_EXPERTS experts) one program aligns
#: them by default (:func:`_align_sort_kernel`); SINGLE_PROGRAM_MAX_SLOTS is the most it
#: takes when asked (``single_program=True``). H100, benchmarks/layer_small_kernels_ab.py
#: (results/h100_align_ab_session13*.json): qwen3-30b (E=128) 7.1 -> 2.3 us at 8 slots,
#: 9.5 -> 3.2 at 256 (the three kernels: 9.6), 8.4 -> 4.2 at 512; Mixtral 3.8 -> 2.4 at
#: 128, 6.6 -> 3.7 at 512; at 1024 slots the three kernels are as fast or faster (qwen3 9.5
#: vs 8.9, Mixtral 6.5 vs 8.1) and at 2048 far faster (10 vs 27)
SINGLE_PROGRAM_SLOTS = 512
#: ... and up to this many when the launch is a dependent in the prefill PDL chain
#: (``pdl.prefill_pdl_args``): the one program joins the chain, the three kernels launch
#: outside it. H200 layer (session 35, ``benchmarks/prefill_mma_ab.py``
#: ``prefill_align_one_program_to_1024_slots``, router included): qwen3-30b M=72 / 96 / 120
#: (576-960 slots) -2.2 / -1.8 / -1.9 %, olmoe M=72 / 96 -1.3 / -1.3 %, deepseek-v2-lite M=96 /
#: 120 -1.9 / -1.1 %; outside the chain the standalone times above still hold
SINGLE_PROGRAM_CHAIN_SLOTS = 1024
SINGLE_PROGRAM_MAX_SLOTS = 4096
SINGLE_PROGRAM_EXPERTS = 1024
#: from COUNT_RANK_MIN_SLOTS slots up to COUNT_RANK_MAX_TOKENS tokens (and top_k <= 15) the
#: one-program alignment ranks the slots by counting rather than sorting
#: (:func:`_align_sort_kernel`, :func:`count_words`): the prefill chain's layers when it was
#: measured (the chain, ``pdl.PREFILL_MAX_TOKENS``, reached 64 tokens until session 35, 120
#: since; 65-120 were not measured here). Per call in the chain on the H100
#: (``benchmarks/chain_small_kernels.py``, counting against sorting): qwen3-30b M=8-32
#: 1.81-2.43 against 2.14-2.80 us, M=64 3.94 against 3.82; deepseek-v2-lite M=4-64 0.04-0.37
#: us less; Mixtral 32-128 slots even to 0.19 us less; below 32 slots (qwen3 M <= 2,
#: Mixtral M <= 8, deepseek M=1) counting was 0.06-0.19 us slower
COUNT_RANK_MIN_SLOTS = 32
COUNT_RANK_MAX_TOKENS = 64
#: from this many slots (more than the program's 128 threads) the counting rank reads the
#: count words back as one coalesced load of the whole ``[E, words]`` table and a gather
#: instead of each slot loading its expert's words (``COUNT_TABLE``). Per call in the chain
#: on the H100 (``benchmarks/chain_small_kernels.py``, session 29, table against each slot's
#: own loads): qwen3-30b M=64 3.16 against 3.58 us, M=32 2.29 against 2.42, M=48 3.02
#: against 2.92; deepseek-v2-lite M=64 2.51 against 2.87, M=48 2.44 against 2.54, M=32
#: 2.03 against 1.91; olmoe M=32-64 0.05-0.37 us less. Below 256 slots the kernel is
#: instruction for instruction the one before the table (sm_90 SASS)
COUNT_TABLE_MIN_SLOTS = 256
#: most entries (experts x words, each rounded up to a power of two) the table takes: 16
#: int64 a thread in registers and 16 KiB of shared memory for the gather; more experts
#: (E > 256 at 8 words) keep each slot loading its own words
COUNT_TABLE_MAX_ENTRIES = 2048


def chunk_size(num_slots: int) -> int:
    """Slots per program: 128 up to 16K slots, 256 up to 256K, then 512 (the pairwise rank
    costs CHUNK^2 per program; the single-program scan costs chunks * E). H100 sweep
    (benchmarks/notes_prefill.md): 256 beat 128 and 512 at 32K-128K slots, 64/128 beat 256
    at 8K slots."""
    if num_slots <= 16384:
        return 128
    if num_slots <= 262144:
        return 256
    return 512


def count_words(num_tokens: int, top_k: int) -> int:
    """int32 words an expert of the one-program alignment's counting rank takes for
    ``num_tokens`` tokens of ``top_k`` slots (a 4-bit field a token: eight a word), or 0
    where it does not apply (fewer than :data:`COUNT_RANK_MIN_SLOTS` slots, more than
    :data:`COUNT_RANK_MAX_TOKENS` tokens, or ``top_k`` above 15, where a token's field could
    overflow): then the program sorts."""
    if (not 1 <= top_k <= 15 or num_tokens > COUNT_RANK_MAX_TOKENS
            or num_tokens * top_k < COUNT_RANK_MIN_SLOTS):
        return 0
    return triton.cdiv(num_tokens, 8)


def count_table(num_slots: int, num_experts: int, words: int) -> bool:
    """Whether the counting rank of :func:`count_words` ``words`` a slot reads the count words
    back as one table (``COUNT_TABLE``): from :data:`COUNT_TABLE_MIN_SLOTS` slots, for at
    most :data:`COUNT_TABLE_MAX_ENTRIES` table entries."""
    return (words > 0 and _next_pow2(max(16, num_slots)) >= COUNT_TABLE_MIN_SLOTS
            and _next_pow2(num_experts) * _next_pow2(words) <= COUNT_TABLE_MAX_ENTRIES)


def scratch_numel(num_slots: int, num_experts: int, chunk: int | None = None) -> int:
    """int32 entries of the scratch buffer for ``num_slots`` slots over ``num_experts``
    (chunks of ``chunk`` slots, default :func:`chunk_size`): ``counts [chunks, E]`` then run
    starts ``[E]`` and ends ``[E]``; at least the count words of the one-program
    alignment's counting rank (``[E, count_words(...)]`` from the start)."""
    chunks = max(1, triton.cdiv(num_slots, chunk or chunk_size(num_slots)))
    words = triton.cdiv(min(num_slots, COUNT_RANK_MAX_TOKENS), 8)
    return max(chunks * num_experts + 2 * num_experts, words * num_experts)



#: BLOCK_SIZE_M values that :class:`AlignmentBuffers` are sized for (every power of two a
#: config may use)
ALIGN_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class AlignmentBuffers:
    """Preallocated outputs of :func:`~w4a16moe.routing.align_block_size` (and its Triton
    kernels' scratch) for up to ``num_slots`` slots over up to ``num_experts`` experts, at any
    block size in :data:`ALIGN_BLOCK_SIZES`: int32 ``sorted_ids``, ``expert_ids``,
    ``num_post_padded [1]`` and ``scratch``. :meth:`views` hands out the slices one call
    needs, so a layer that aligns into them allocates nothing (CUDA-graph capture)."""

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_post_padded: torch.Tensor
    scratch: torch.Tensor
    num_experts: int

    @classmethod
    def allocate(cls, num_slots: int, num_experts: int,
                 device: torch.device | str) -> AlignmentBuffers:
        if num_slots < 0 or num_experts < 1:
            raise ValueError(f"num_slots={num_slots} and num_experts={num_experts}; expected "
                             "num_slots >= 0 and num_experts >= 1")
        sizes = [max_num_tokens_padded(num_slots, b, num_experts) for b in ALIGN_BLOCK_SIZES]
        blocks = max(n // b for n, b in zip(sizes, ALIGN_BLOCK_SIZES, strict=True))
        kw = {"dtype": torch.int32, "device": device}
        return cls(sorted_ids=torch.empty(max(sizes), **kw),
                   expert_ids=torch.empty(blocks, **kw),
                   num_post_padded=torch.empty(1, **kw),
                   scratch=torch.empty(scratch_numel(num_slots, num_experts), **kw),
                   num_experts=num_experts)

    @property
    def max_blocks(self) -> int:
        return self.expert_ids.numel()

    def views(self, slots: int, block_size: int, num_experts: int
              ) -> tuple[AlignedBlocks, torch.Tensor] | None:
        """(outputs, scratch) of ``align_block_size`` for ``slots`` slots over
        ``num_experts`` experts in blocks of ``block_size``, as views of these buffers; None
        where they are too small (the caller then allocates)."""
        if num_experts > self.num_experts:
            return None
        n = max_num_tokens_padded(slots, block_size, num_experts)
        need = scratch_numel(slots, num_experts)
        if (n > self.sorted_ids.numel() or n // block_size > self.expert_ids.numel()
                or need > self.scratch.numel()):
            return None
        return (AlignedBlocks(self.sorted_ids[:n], self.expert_ids[: n // block_size],
                              self.num_post_padded), self.scratch[:need])


@triton.jit
def _align_count_kernel(
    topk_ids_ptr, counts_ptr, sorted_ids_ptr,
    num_slots, num_experts, num_sorted, fill_per_program,
    CHUNK: tl.constexpr, NUM_BINS: tl.constexpr, FILL_BLOCK: tl.constexpr,
):
    """counts[c, e] = #slots of chunk ``c`` routed to ``e``; sentinel fill of a share of
    ``sorted_token_ids``. topk_ids: ``[num_slots]`` (flat), counts: int32 ``[chunks, E]``."""
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    # lanes past the end count into bin E, which is never stored
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_slots, other=num_experts).to(tl.int32)
    hist = tl.histogram(ids, NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    tl.store(counts_ptr + pid * num_experts + bins, hist, mask=bins < num_experts)

    f_start = pid * fill_per_program
    f_end = tl.minimum(f_start + fill_per_program, num_sorted)
    sentinel = tl.full((FILL_BLOCK,), 0, tl.int32) + num_slots
    for f in range(f_start, f_end, FILL_BLOCK):
        offs_f = f + tl.arange(0, FILL_BLOCK)
        tl.store(sorted_ids_ptr + offs_f, sentinel, mask=offs_f < f_end)


@triton.jit
def _align_scan_kernel(
    counts_ptr, starts_ptr, ends_ptr, total_ptr,
    num_chunks, num_experts, block_size,
    E_POW2: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: counts[c, e] -> exclusive prefix over c (in place); starts/ends int32
    ``[E]`` of each expert's padded run; total int32 ``[1]`` = the last end."""
    offs_e = tl.arange(0, E_POW2)
    e_mask = offs_e < num_experts
    carry = tl.zeros((E_POW2,), dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c < num_chunks)[:, None] & e_mask[None, :]
        ptrs = counts_ptr + offs_c[:, None] * num_experts + offs_e[None, :]
        cnt = tl.load(ptrs, mask=mask, other=0)
        inclusive = tl.cumsum(cnt, axis=0)
        tl.store(ptrs, inclusive - cnt + carry[None, :], mask=mask)
        carry += tl.sum(cnt, axis=0)
    padded = (carry + block_size - 1) // block_size * block_size
    ends = tl.cumsum(padded, axis=0)
    tl.store(starts_ptr + offs_e, ends - padded, mask=e_mask)
    tl.store(ends_ptr + offs_e, ends, mask=e_mask)
    tl.store(total_ptr, tl.sum(padded, axis=0))


@triton.jit
def _align_scatter_kernel(
    topk_ids_ptr, counts_ptr, starts_ptr, ends_ptr, total_ptr, expert_map_ptr,
    sorted_ids_ptr, expert_ids_ptr,
    num_slots, num_experts, block_size, num_blocks, blocks_per_program,
    HAS_MAP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_J: tl.constexpr,
    E_POW2: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Scatter the chunk's slots to their sorted positions (stable within an expert) and
    write ``expert_ids`` of blocks ``[pid * blocks_per_program, ...)``."""
    pid = tl.program_id(0)
    base = pid * CHUNK
    local = tl.arange(0, CHUNK)
    offs = base + local
    mask = offs < num_slots
    ids = tl.load(topk_ids_ptr + offs, mask=mask, other=-1).to(tl.int32)
    # rank = earlier slots of the chunk with the same expert
    rank = tl.zeros((CHUNK,), dtype=tl.int32)
    for j0 in range(0, CHUNK, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        ids_j = tl.load(topk_ids_ptr + base + offs_j, mask=base + offs_j < num_slots,
                        other=-1).to(tl.int32)
        same = (ids[:, None] == ids_j[None, :]) & (offs_j[None, :] < local[:, None])
        rank += tl.sum(same.to(tl.int32), axis=1)
    safe = tl.where(mask, ids, 0)
    dest = (tl.load(starts_ptr + safe, mask=mask, other=0)
            + tl.load(counts_ptr + pid * num_experts + safe, mask=mask, other=0) + rank)
    tl.store(sorted_ids_ptr + dest, offs.to(tl.int32), mask=mask)

    total = tl.load(total_ptr)
    offs_e = tl.arange(0, E_POW2)
    ends = tl.load(ends_ptr + offs_e, mask=offs_e < num_experts, other=2147483647)
    b_start = pid * blocks_per_program
    b_end = tl.minimum(b_start + blocks_per_program, num_blocks)
    for b0 in range(b_start, b_end, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        first_row = offs_b * block_size
        expert = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        expert = tl.minimum(expert, num_experts - 1)
        if HAS_MAP:
            expert = tl.load(expert_map_ptr + expert).to(tl.int32)
        expert = tl.where(first_row < total, expert, -1)
        tl.store(expert_ids_ptr + offs_b, expert, mask=offs_b < b_end)


@triton.jit
def _fill(ptr, n, value, BLOCK: tl.constexpr):
    """``ptr[0:n] = value`` (int32), ``BLOCK`` entries a step."""
    fill = tl.full((BLOCK,), 0, tl.int32) + value
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(ptr + offs, fill, mask=offs < n)


@triton.jit
def _fill_outputs(total_ptr, total, sorted_ids_ptr, num_sorted, num_slots, expert_ids_ptr,
                  num_blocks, block_size, FILL_BLOCK: tl.constexpr):
    """What a one-program alignment writes before it scatters the slots: ``total`` (the
    padded slot count), the sentinel ``num_slots`` over all of ``sorted_ids`` and -1 as the
    expert of every block at or past ``total``."""
    tl.store(total_ptr, total)
    _fill(sorted_ids_ptr, num_sorted, num_slots, FILL_BLOCK)
    none = tl.full((FILL_BLOCK,), -1, tl.int32)
    for b0 in range(0, num_blocks, FILL_BLOCK):
        offs_b = b0 + tl.arange(0, FILL_BLOCK)
        tl.store(expert_ids_ptr + offs_b, none,
                 mask=(offs_b < num_blocks) & (offs_b * block_size >= total))


@triton.jit
def _nibble_sum(words):
    """The sum of the eight 4-bit fields of each int32 word (at most 120)."""
    pairs = (words & 0x0F0F0F0F) + ((words >> 4) & 0x0F0F0F0F)  # bytes of at most 30
    return ((pairs * 0x01010101) >> 24) & 0xFF


@triton.jit
def _align_sort_kernel(
    topk_ids_ptr, scratch_ptr, expert_map_ptr, sorted_ids_ptr, expert_ids_ptr,
    total_ptr, num_slots, num_experts, block_size, num_sorted, num_blocks,
    HAS_MAP: tl.constexpr, CHUNK: tl.constexpr, NUM_BINS: tl.constexpr,
    FILL_BLOCK: tl.constexpr, TOP_K: tl.constexpr = 0, COUNT_WORDS: tl.constexpr = 0,
    COUNT_TABLE: tl.constexpr = False, WORDS_P2: tl.constexpr = 1,
    EXPERTS_P2: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """All of align_block_size in one program for ``num_slots <= CHUNK``. The histogram
    gives each expert's padded run; a slot goes to its run's start plus its *rank*, the
    number of earlier slots (in flat order) of the same expert, so within an expert the
    slots keep their flat order. A slot that starts a block (every block of a run starts
    with a real slot) writes that block's expert id; the blocks past the runs get -1.

    The rank, two ways:

    * ``COUNT_WORDS == 0``: the keys ``expert * CHUNK + slot`` sorted
      (:func:`triton.language.sort`) list the slots by expert, so sorted position ``p``
      goes to row ``p + offsets[expert]`` (its run's start minus the expert's first sorted
      position; ``offsets`` int32 ``[E]`` is stored at ``scratch_ptr``, then read back per
      slot after a barrier). O(CHUNK log^2 CHUNK) work behind a CTA barrier a step: 1.0-1.9
      us of the one-program launch at 128-512 slots (H200, ``benchmarks/notes_prefill.md``,
      session 28).
    * ``COUNT_WORDS > 0`` (at most ``8 * COUNT_WORDS`` tokens of ``TOP_K`` slots, ``TOP_K
      <= 15``): every slot adds one to its token's 4-bit field of its expert's
      ``COUNT_WORDS`` int32 words at ``scratch_ptr`` (``[E, COUNT_WORDS]``, zeroed first;
      relaxed atomics, whose order does not change the sums). After a barrier a slot's
      rank is the sum of its expert's fields of the earlier tokens plus the earlier slots
      of its own token with the same expert (``TOP_K - 1`` loads of its neighbours). One
      round trip instead of the sort. The fields come back either by each slot loading its
      expert's words (one scattered L2 request a word and slot), or, with ``COUNT_TABLE``,
      by one coalesced load of the whole ``[E, COUNT_WORDS]`` table (``EXPERTS_P2 x
      WORDS_P2`` in registers), each word's sum of the words before it, and one gather of
      (that sum, the word) a slot. Counting, the slots are taken one a thread per step
      (``max_contiguous`` 1), the layout of the scattered stores: 512 slots in 128 threads
      otherwise took four a thread, and the stores changed layout through shared memory
      (nine CTA barriers more in the sm_90 SASS)."""
    if PDL:
        wait_upstream_release_next()
    local = tl.arange(0, CHUNK)
    if COUNT_WORDS > 0:
        # one slot a thread per step, like the scattered stores below, which then need no
        # layout change (a barrier and a shared-memory round trip each)
        local = tl.max_contiguous(local, 1)
    mask = local < num_slots
    # lanes past the end count into bin E (never stored) and sort after every real slot
    ids = tl.load(topk_ids_ptr + local, mask=mask, other=num_experts).to(tl.int32)
    if COUNT_WORDS > 0:
        # the same token's earlier slots (loaded with the ids: one round trip)
        k_of = local % TOP_K
        same_token = tl.zeros((CHUNK,), tl.int32)
        for j in tl.static_range(1, TOP_K):
            prev = tl.load(topk_ids_ptr + local - j, mask=mask & (k_of >= j),
                           other=-1).to(tl.int32)
            same_token += (prev == ids).to(tl.int32)
    counts = tl.histogram(ids, NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    padded = tl.where(bins < num_experts, (counts + block_size - 1) // block_size * block_size,
                      0)
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    if COUNT_WORDS == 0:
        first = tl.cumsum(counts, axis=0) - counts  # each expert's first sorted position
        tl.store(scratch_ptr + bins, ends - padded - first, mask=bins < num_experts)
    else:
        _fill(scratch_ptr, num_experts * COUNT_WORDS, 0, FILL_BLOCK)
    _fill_outputs(total_ptr, total, sorted_ids_ptr, num_sorted, num_slots, expert_ids_ptr,
                  num_blocks, block_size, FILL_BLOCK)
    # the fill and the offsets (or the zeroed count words) must land before this program's
    # threads scatter and read them
    tl.debug_barrier()
    # masked lanes: expert 0 (nothing is stored for them)
    safe = tl.where(mask, ids, 0)
    if COUNT_WORDS == 0:
        keys = tl.sort(ids * CHUNK + local)
        expert = keys // CHUNK
        slot = keys - expert * CHUNK
        # sorted position p < num_slots holds a real slot: the masked lanes sorted last
        safe = tl.where(mask, expert, 0)
        dest = local + tl.load(scratch_ptr + safe, mask=mask, other=0)
    else:
        token = local // TOP_K
        word = token // 8
        shift = (token % 8) * 4
        words_ptr = scratch_ptr + safe * COUNT_WORDS
        tl.atomic_add(words_ptr + word, tl.full((CHUNK,), 1, tl.int32) << shift, mask=mask,
                      sem="relaxed")
        tl.debug_barrier()
        if COUNT_TABLE:
            # every expert's words in one coalesced load (a slot loading its own expert's words
            # sent up to 8 scattered requests to the L2), then a slot gathers its expert's
            # fields of the words before its token's and that word itself
            rows = tl.arange(0, EXPERTS_P2)[:, None]
            w = tl.arange(0, WORDS_P2)[None, :]
            table = tl.load(scratch_ptr + rows * COUNT_WORDS + w,
                            mask=(rows < num_experts) & (w < COUNT_WORDS), other=0, volatile=True)
            sums = _nibble_sum(table)
            before = tl.cumsum(sums, axis=1) - sums  # the fields of the expert's earlier words
            packed = (before.to(tl.int64) << 32) | (table.to(tl.int64) & 0xFFFFFFFF)
            entry = tl.gather(tl.reshape(packed, [EXPERTS_P2 * WORDS_P2]),
                              safe * WORDS_P2 + word, 0)
            own = entry.to(tl.int32) & ((1 << shift) - 1)  # the earlier tokens of the word
            rank = same_token + (entry >> 32).to(tl.int32) + _nibble_sum(own)
        else:  # a slot loads the words of its expert up to its token's
            rank = same_token
            for w in tl.static_range(COUNT_WORDS):
                fields = tl.load(words_ptr + w, mask=mask & (w <= word), other=0,
                                 volatile=True)
                # the earlier tokens' fields: all of an earlier word, the low ones of the
                # token's
                fields = tl.where(w < word, fields, fields & ((1 << shift) - 1))
                rank += _nibble_sum(fields)
        dest = tl.gather(ends - padded, safe, 0) + rank
        slot = local
    tl.store(sorted_ids_ptr + dest, slot, mask=mask)
    starts_block = mask & (dest % block_size == 0)
    if HAS_MAP:
        safe = tl.load(expert_map_ptr + safe, mask=starts_block, other=-1).to(tl.int32)
    tl.store(expert_ids_ptr + dest // block_size, safe, mask=starts_block)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _check_buffer(name: str, t: torch.Tensor, numel: int, device: torch.device,
                  exact: bool = True) -> None:
    ok = (t.dtype == torch.int32 and t.dim() == 1 and t.device == device and t.stride(0) == 1
          and (t.numel() == numel if exact else t.numel() >= numel))
    if not ok:
        need = f"{numel}" if exact else f"at least {numel}"
        raise ValueError(f"{name} has dtype {t.dtype}, shape {tuple(t.shape)} on {t.device}; "
                         f"expected a contiguous int32 tensor of {need} entries on {device}")


def one_program_slots(*, chained: bool) -> int:
    """The most slots :func:`align_block_size_triton` aligns in one program by default:
    :data:`SINGLE_PROGRAM_CHAIN_SLOTS` when its launch is a dependent in the prefill PDL chain
    (``chained``), else :data:`SINGLE_PROGRAM_SLOTS`."""
    return SINGLE_PROGRAM_CHAIN_SLOTS if chained else SINGLE_PROGRAM_SLOTS


def align_block_size_triton(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    expert_map: torch.Tensor | None,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_padded: torch.Tensor,
    scratch: torch.Tensor | None = None,
    *,
    chunk: int | None = None,
    scan_rows: int | None = None,
    single_program: bool | None = None,
) -> None:
    """Fill the three outputs of :func:`w4a16moe.routing.align_block_size` in place.

    Args:
        topk_ids: ``[M, top_k]`` int32/int64 global expert ids (made contiguous if not).
        block_size, num_experts, expert_map: as for ``align_block_size`` (already checked).
        sorted_token_ids: int32 ``[max_num_tokens_padded(M*top_k, block_size, E)]``.
        expert_ids: int32 ``[len(sorted_token_ids) / block_size]``.
        num_tokens_post_padded: int32 ``[1]``.
        scratch: optional int32 buffer of at least :func:`scratch_numel` entries (allocated
            here when None).
        chunk: slots per program (a power of two >= 16; default :func:`chunk_size`).
        scan_rows: chunk rows the scan loads per step (power of two; default: all chunks,
            at most a ``[rows, E]`` tile of 16K entries).
        single_program: one launch of :func:`_align_sort_kernel` (only for at most
            :data:`SINGLE_PROGRAM_MAX_SLOTS` slots and fewer than
            :data:`SINGLE_PROGRAM_EXPERTS` experts) or the three kernels; default: one
            launch up to :func:`one_program_slots` slots (more when the launch is a
            dependent in the prefill PDL chain) when ``chunk`` is not given.

    One or three launches on the current stream; nothing is read back to the host.
    """
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"num_experts is {num_experts}; the Triton align kernel handles at "
                         f"most {MAX_EXPERTS}")
    device = topk_ids.device
    flat = topk_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    num_slots = flat.numel()
    num_sorted = sorted_token_ids.numel()
    num_blocks = expert_ids.numel()
    single_fits = (num_slots <= SINGLE_PROGRAM_MAX_SLOTS
                   and num_experts < SINGLE_PROGRAM_EXPERTS)
    chain_args = prefill_pdl_args(device)
    if single_program is None:
        single_program = chunk is None and single_fits and num_slots <= one_program_slots(
            chained=bool(chain_args))
    if single_program and not single_fits:
        raise ValueError(f"single_program=True with {num_slots} slots over {num_experts} "
                         f"experts; one program aligns at most {SINGLE_PROGRAM_MAX_SLOTS} "
                         f"slots over fewer than {SINGLE_PROGRAM_EXPERTS} experts")
    chunk = chunk or chunk_size(num_slots)
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk is {chunk}; expected a power of two >= 16")
    chunks = max(1, triton.cdiv(num_slots, chunk))
    need = scratch_numel(num_slots, num_experts, chunk)
    if scratch is None:
        scratch = torch.empty(need, dtype=torch.int32, device=device)
    else:
        _check_buffer("scratch", scratch, need, device, exact=False)
    counts = scratch[: chunks * num_experts]
    starts = scratch[chunks * num_experts: chunks * num_experts + num_experts]
    ends = scratch[chunks * num_experts + num_experts: need]
    e_pow2 = max(16, _next_pow2(num_experts))
    emap = expert_map if expert_map is not None else starts  # dummy pointer without a map
    if single_program:
        top_k = topk_ids.shape[-1] if topk_ids.dim() == 2 else 1
        words = count_words(num_slots // top_k, top_k) if top_k else 0
        _align_sort_kernel[(1,)](
            flat, scratch, emap, sorted_token_ids, expert_ids, num_tokens_post_padded,
            num_slots, num_experts, block_size, num_sorted, num_blocks,
            HAS_MAP=expert_map is not None, CHUNK=max(16, _next_pow2(num_slots)),
            NUM_BINS=max(16, _next_pow2(num_experts + 1)), FILL_BLOCK=1024,
            TOP_K=top_k if words else 0, COUNT_WORDS=words,
            COUNT_TABLE=count_table(num_slots, num_experts, words),
            WORDS_P2=_next_pow2(max(words, 1)), EXPERTS_P2=_next_pow2(num_experts),
            num_warps=4,
            **chain_args)
        return

    _align_count_kernel[(chunks,)](
        flat, counts, sorted_token_ids, num_slots, num_experts, num_sorted,
        triton.cdiv(num_sorted, chunks),
        CHUNK=chunk, NUM_BINS=max(16, _next_pow2(num_experts + 1)), FILL_BLOCK=1024,
        num_warps=4)
    if scan_rows is None:
        # the whole [chunks, E] table in one step when it fits ~16K entries (the steps are
        # serial: each waits for its loads); wider tiles than the table only cost time
        scan_rows = max(2, min(_next_pow2(chunks), 16384 // e_pow2))
    _align_scan_kernel[(1,)](
        counts, starts, ends, num_tokens_post_padded, chunks, num_experts, block_size,
        E_POW2=e_pow2, BLOCK_C=scan_rows, num_warps=8)
    _align_scatter_kernel[(chunks,)](
        flat, counts, starts, ends, num_tokens_post_padded, emap, sorted_token_ids,
        expert_ids, num_slots, num_experts, block_size, num_blocks,
        triton.cdiv(num_blocks, chunks),
        HAS_MAP=expert_map is not None, CHUNK=chunk, BLOCK_J=32, E_POW2=e_pow2,
        BLOCK_B=max(1, min(128, 8192 // e_pow2)), num_warps=4)


__all__ = ["ALIGN_BLOCK_SIZES", "AlignmentBuffers", "COUNT_RANK_MAX_TOKENS",
           "COUNT_RANK_MIN_SLOTS", "COUNT_TABLE_MAX_ENTRIES", "COUNT_TABLE_MIN_SLOTS",
           "MAX_EXPERTS", "SINGLE_PROGRAM_CHAIN_SLOTS", "SINGLE_PROGRAM_EXPERTS",
           "SINGLE_PROGRAM_MAX_SLOTS", "SINGLE_PROGRAM_SLOTS", "align_block_size_triton",
           "chunk_size", "count_table", "count_words", "one_program_slots", "scratch_numel"]
