"""The Triton align_block_size (w4a16moe.kernels.align) against the torch implementation and
the invariants of test_routing.check_aligned. On CPU the kernels run under the interpreter;
sizes stay small (one chunk is 128 slots; a few chunks per case)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from test_routing import check_aligned

from w4a16moe.kernels import align as align_mod
from w4a16moe.kernels.align import chunk_size, count_words, scratch_numel
from w4a16moe.routing import AlignedBlocks, align_block_size, max_num_tokens_padded


def random_ids(m, top_k, num_experts, skew=False, dtype=torch.int32):
    if skew:   # most slots on expert 1: one expert's run spans several chunks
        ids = torch.where(torch.rand(m, top_k) < 0.8, 1,
                          torch.randint(0, num_experts, (m, top_k)))
    else:
        ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(m)])
    return ids.to(dtype).to(DEVICE)


def both(ids, block_size, num_experts, expert_map=None):
    tri = align_block_size(ids, block_size, num_experts, expert_map, backend="triton")
    ref = align_block_size(ids, block_size, num_experts, expert_map, backend="torch")
    for name, a, b in zip(AlignedBlocks._fields, tri, ref, strict=True):
        assert a.dtype == b.dtype == torch.int32, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs:\n{a}\n{b}"
    cpu_map = None if expert_map is None else expert_map.cpu()
    check_aligned(ids.cpu(), block_size, num_experts, AlignedBlocks(*(t.cpu() for t in tri)),
                  expert_map=cpu_map)
    return tri


@pytest.mark.parametrize(
    "m, top_k, num_experts, block_size",
    [(1, 1, 1, 1), (1, 2, 8, 16), (5, 2, 4, 4), (33, 4, 8, 16), (64, 8, 16, 64),
     (7, 3, 64, 2), (16, 2, 3, 1), (100, 1, 2, 32), (3, 4, 4, 128), (70, 4, 16, 16),
     (45, 6, 64, 32), (9, 2, 300, 8)],
)
def test_triton_matches_torch(m, top_k, num_experts, block_size):
    both(random_ids(m, top_k, num_experts), block_size, num_experts)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_skewed_runs_span_chunks(dtype):
    ids = random_ids(100, 3, 6, skew=True, dtype=dtype)      # 300 slots: 3 chunks of 128
    assert chunk_size(ids.numel()) < (ids == 1).sum().item()
    both(ids, 16, 6)


def test_duplicate_ids_exact_order():
    ids = torch.tensor([[3, 3], [3, 0], [3, 3], [0, 3], [3, 3]], dtype=torch.int32,
                       device=DEVICE)
    out = both(ids, 4, 6)
    assert out.sorted_token_ids[:12].tolist() == [3, 6, 10, 10, 0, 1, 2, 4, 5, 7, 8, 9]
    assert out.expert_ids.tolist() == [0, 3, 3, -1, -1, -1, -1]


@pytest.mark.parametrize("map_dtype", [torch.int32, torch.int64])
def test_expert_map(map_dtype):
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1, -1, 3], dtype=map_dtype, device=DEVICE)
    both(random_ids(40, 3, 8), 8, 8, expert_map)


@pytest.mark.parametrize("top_k", [1, 4])
def test_no_tokens(top_k):
    out = both(torch.zeros(0, top_k, dtype=torch.int32, device=DEVICE), 16, 4)
    assert out.num_tokens_post_padded.tolist() == [0]
    assert (out.sorted_token_ids == 0).all() and (out.expert_ids == -1).all()


def test_non_contiguous_ids():
    ids = random_ids(30, 6, 16)[:, ::2]                      # [30, 3], stride 6
    assert not ids.is_contiguous()
    both(ids, 8, 16)


def test_writes_into_poisoned_buffers_and_scratch():
    ids = random_ids(50, 4, 8)
    slots, bs, e = ids.numel(), 16, 8
    size = max_num_tokens_padded(slots, bs, e)
    out = AlignedBlocks(torch.full((size,), -7, dtype=torch.int32, device=DEVICE),
                        torch.full((size // bs,), -7, dtype=torch.int32, device=DEVICE),
                        torch.full((1,), -7, dtype=torch.int32, device=DEVICE))
    scratch = torch.full((scratch_numel(slots, e) + 5,), -7, dtype=torch.int32, device=DEVICE)
    got = align_block_size(ids, bs, e, out=out, scratch=scratch, backend="triton")
    assert all(a is b for a, b in zip(got, out, strict=True))
    ref = align_block_size(ids, bs, e, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
    # a second call into the same (now dirty) buffers gives the same answer
    ids2 = random_ids(50, 4, 8)
    align_block_size(ids2, bs, e, out=out, scratch=scratch, backend="triton")
    ref2 = align_block_size(ids2, bs, e, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(out, ref2, strict=True))
    # the torch path fills given buffers too
    poisoned = AlignedBlocks(*(torch.full_like(t, -7) for t in out))
    align_block_size(ids, bs, e, out=poisoned, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(poisoned, ref, strict=True))


def test_rejects_bad_buffers_and_backend():
    ids = random_ids(4, 2, 4)
    size = max_num_tokens_padded(8, 16, 4)
    good = AlignedBlocks(torch.empty(size, dtype=torch.int32, device=DEVICE),
                         torch.empty(size // 16, dtype=torch.int32, device=DEVICE),
                         torch.empty(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"backend is 'cuda'; expected one of"):
        align_block_size(ids, 16, 4, backend="cuda")
    bad = good._replace(expert_ids=torch.empty(size // 16 + 1, dtype=torch.int32,
                                                device=DEVICE))
    with pytest.raises(ValueError, match=rf"out.expert_ids has dtype torch.int32, shape "
                                         rf"\({size // 16 + 1},\).*expected a contiguous "
                                         rf"int32 tensor of shape \({size // 16},\)"):
        align_block_size(ids, 16, 4, out=bad)
    bad = good._replace(sorted_token_ids=good.sorted_token_ids.long())
    with pytest.raises(ValueError, match=r"out.sorted_token_ids has dtype torch.int64"):
        align_block_size(ids, 16, 4, out=bad)
    small = torch.empty(scratch_numel(8, 4) - 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"scratch has dtype torch.int32, shape .*expected a "
                                         r"contiguous int32 tensor of at least"):
        align_block_size(ids, 16, 4, scratch=small, backend="triton")


class _Recorder:
    """A kernel stand-in that records its name when launched and runs the kernel."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(self.name)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_scratch_numel_and_chunks():
    assert chunk_size(1) == 128 and chunk_size(16384) == 128 and chunk_size(16385) == 256
    assert chunk_size(262_144) == 256 and chunk_size(262_145) == 512
    assert scratch_numel(0, 8) == 8 + 16                       # one chunk row + starts + ends
    # the count words of the one-program alignment (64 tokens at most: 8 words an expert)
    # outgrow three chunk rows + starts + ends here, not at many chunks
    assert scratch_numel(300, 8) == 8 * 8
    assert scratch_numel(40_000, 8) == 157 * 8 + 16
    assert scratch_numel(20, 8) == max(8 + 16, 3 * 8)


def test_count_words():
    """The counting rank covers 32 slots to 64 tokens of at most 15 slots; else the program
    sorts."""
    assert [count_words(m, 8) for m in (1, 3, 4, 8, 9, 64)] == [0, 0, 1, 1, 2, 8]
    assert count_words(65, 8) == 0 and count_words(0, 8) == 0 and count_words(32, 1) == 4
    assert count_words(64, 15) == 8 and count_words(64, 16) == 0 and count_words(31, 1) == 0


def test_count_table():
    """The counting rank reads its words back as one table from 256 slots (the program's
    CHUNK, a power of two), up to 2048 entries (experts x words, powers of two)."""
    from w4a16moe.kernels.align import count_table

    assert count_table(512, 128, 8) and count_table(256, 128, 4) and count_table(129, 8, 2)
    assert count_table(512, 256, 8) and count_table(384, 60, 8)
    assert not count_table(128, 128, 2) and not count_table(512, 128, 0)
    assert not count_table(512, 257, 8) and not count_table(512, 512, 8)


@pytest.mark.parametrize("m, top_k, num_experts, block_size, dup",
                         [(32, 1, 4, 4, False), (8, 8, 128, 8, False), (9, 8, 128, 8, False),
                          (33, 2, 8, 16, True), (64, 8, 128, 8, False), (64, 15, 16, 4, True),
                          (40, 6, 64, 16, True), (63, 4, 5, 1, True), (64, 8, 256, 8, False),
                          (64, 16, 32, 8, False)])
@pytest.mark.parametrize("table_from", [16, 1 << 20])
def test_one_program_rank_by_counting(m, top_k, num_experts, block_size, dup, table_from,
                                      monkeypatch):
    """The one-program alignment ranks slots by counting (32 slots to 64 tokens, top_k <=
    15) or by sorting (the last case): the same outputs as the torch implementation, tokens
    past a word boundary (8 a word) and duplicate experts within a token included; the
    counts read back as the whole table (``table_from=16``) or a slot's own words."""
    monkeypatch.setattr(align_mod, "COUNT_TABLE_MIN_SLOTS", table_from)
    assert (count_words(m, top_k) > 0) == (top_k <= 15)
    if dup:   # with replacement: a token may list an expert twice or more
        ids = torch.randint(0, num_experts, (m, top_k), dtype=torch.int32).to(DEVICE)
    else:
        ids = random_ids(m, top_k, num_experts)
    both(ids, block_size, num_experts)


@pytest.mark.parametrize("m, top_k, num_experts, block_size, mapped",
                         [(1, 2, 8, 16, False), (16, 2, 8, 16, True), (64, 2, 8, 32, False),
                          (16, 8, 128, 16, True), (0, 2, 4, 16, False), (21, 6, 64, 64, True),
                          (64, 2, 8, 128, False), (5, 3, 1000, 8, True), (64, 8, 128, 16, False),
                          (300, 6, 64, 16, True), (512, 8, 128, 32, False)])
def test_single_program_matches_the_three_kernels(m, top_k, num_experts, block_size, mapped):
    """One program (sorting the slots by expert) gives the same outputs, into poisoned
    buffers, as the count / scan / scatter kernels, with and without an expert map, up to
    SINGLE_PROGRAM_MAX_SLOTS slots."""
    from w4a16moe.kernels.align import align_block_size_triton

    ids = random_ids(m, top_k, num_experts) if m else torch.empty(
        0, top_k, dtype=torch.int32, device=DEVICE)
    expert_map = None
    if mapped:
        expert_map = torch.randperm(num_experts, device=DEVICE).to(torch.int32)
        expert_map[::3] = -1
    slots = ids.numel()
    size = max_num_tokens_padded(slots, block_size, num_experts)
    outs = []
    for single in (True, False):
        out = AlignedBlocks(torch.full((size,), -7, dtype=torch.int32, device=DEVICE),
                            torch.full((size // block_size,), -7, dtype=torch.int32,
                                       device=DEVICE),
                            torch.full((1,), -7, dtype=torch.int32, device=DEVICE))
        align_block_size_triton(ids, block_size, num_experts, expert_map, *out,
                                single_program=single)
        outs.append(out)
    for name, a, b in zip(AlignedBlocks._fields, *outs, strict=True):
        assert torch.equal(a, b), f"{name}:\n{a}\n{b}"
    ref = align_block_size(ids, block_size, num_experts, expert_map, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(outs[0], ref, strict=True))


def test_one_program_takes_more_slots_in_the_prefill_chain(monkeypatch):
    """Inside the prefill PDL chain (its launch a dependent) one program aligns up to
    SINGLE_PROGRAM_CHAIN_SLOTS slots by default, outside it up to SINGLE_PROGRAM_SLOTS; the
    launches below record which kernels ran, with the chain's launch arguments dropped (the
    interpreter has no PDL)."""
    from w4a16moe.kernels.align import (
        SINGLE_PROGRAM_CHAIN_SLOTS,
        SINGLE_PROGRAM_SLOTS,
        align_block_size_triton,
        one_program_slots,
    )

    assert one_program_slots(chained=False) == SINGLE_PROGRAM_SLOTS
    assert one_program_slots(chained=True) == SINGLE_PROGRAM_CHAIN_SLOTS > SINGLE_PROGRAM_SLOTS
    launched = []

    class Chained(_Recorder):
        def __getitem__(self, grid):
            def launch(*args, chained_launch=False, **kwargs):
                self.log.append((self.name, chained_launch))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_align_sort_kernel", "_align_count_kernel"):
        monkeypatch.setattr(align_mod, name, Chained(getattr(align_mod, name), name, launched))
    slots = SINGLE_PROGRAM_SLOTS + 2
    for chained, expected in ((False, ("_align_count_kernel", False)),
                              (True, ("_align_sort_kernel", True))):
        monkeypatch.setattr(align_mod, "prefill_pdl_args",
                            lambda device, on=chained: {"chained_launch": True} if on else {})
        ids = random_ids(slots // 2, 2, 8)
        size = max_num_tokens_padded(ids.numel(), 16, 8)
        out = AlignedBlocks(torch.full((size,), -7, dtype=torch.int32, device=DEVICE),
                            torch.full((size // 16,), -7, dtype=torch.int32, device=DEVICE),
                            torch.full((1,), -7, dtype=torch.int32, device=DEVICE))
        align_block_size_triton(ids, 16, 8, None, *out)
        assert launched[-1] == expected
        ref = align_block_size(ids, 16, 8, backend="torch")
        assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def test_single_program_refuses_large_batches(monkeypatch):
    """Past SINGLE_PROGRAM_MAX_SLOTS slots (or at 1024+ experts) one program is refused; by
    default it runs up to SINGLE_PROGRAM_SLOTS slots and the three kernels above."""
    from w4a16moe.kernels import align as align_mod
    from w4a16moe.kernels.align import SINGLE_PROGRAM_MAX_SLOTS, align_block_size_triton

    launched = []
    for name in ("_align_sort_kernel", "_align_count_kernel"):
        kernel = getattr(align_mod, name)
        monkeypatch.setattr(align_mod, name, _Recorder(kernel, name, launched))
    for slots, expected in ((align_mod.SINGLE_PROGRAM_SLOTS, "_align_sort_kernel"),
                            (align_mod.SINGLE_PROGRAM_SLOTS + 2, "_align_count_kernel")):
        ids = random_ids(slots // 2, 2, 8)
        size = max_num_tokens_padded(ids.numel(), 16, 8)
        out = AlignedBlocks(torch.empty(size, dtype=torch.int32, device=DEVICE),
                            torch.empty(size // 16, dtype=torch.int32, device=DEVICE),
                            torch.empty(1, dtype=torch.int32, device=DEVICE))
        align_block_size_triton(ids, 16, 8, None, *out)
        assert launched[-1] == expected
    ids = random_ids(SINGLE_PROGRAM_MAX_SLOTS // 2 + 1, 2, 8)
    size = max_num_tokens_padded(ids.numel(), 16, 8)
    out = AlignedBlocks(torch.empty(size, dtype=torch.int32, device=DEVICE),
                        torch.empty(size // 16, dtype=torch.int32, device=DEVICE),
                        torch.empty(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=rf"single_program=True with {ids.numel()} slots over "
                                         r"8 experts; one program aligns at most"):
        align_block_size_triton(ids, 16, 8, None, *out, single_program=True)
    few = random_ids(3, 2, 1024)
    with pytest.raises(ValueError, match=r"with 6 slots over 1024 experts"):
        align_block_size_triton(few, 16, 1024, None, *out, single_program=True)
    align_block_size_triton(ids, 16, 8, None, *out)   # the three kernels
    ref = align_block_size(ids, 16, 8, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
