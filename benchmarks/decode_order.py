"""Device experiment: does the decode kernel get L2 reuse when slots that share an expert run
next to each other? Times ``fused_moe_decode`` on the same multiset of expert ids in random
slot order and sorted by expert (Mixtral and Qwen3 shapes, CUDA graphs).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/decode_order.py
"""

from __future__ import annotations

import torch

from w4a16moe.bench.timing import time_calls
from w4a16moe.kernels.decode import DecodeWorkspace, fused_moe_decode
from w4a16moe.kernels.tune import MODEL_SHAPES, random_packed_experts

DEV = torch.device("cuda")


def main() -> int:
    for name, ms in (("mixtral-8x7b", (2, 4, 8)), ("qwen3-30b-a3b", (8, 16))):
        s = MODEL_SHAPES[name]
        ex = random_packed_experts(s, torch.bfloat16, DEV, seed=1)
        for m in ms:
            gen = torch.Generator().manual_seed(m)
            ids = torch.stack([torch.randperm(s.num_experts, generator=gen)[:s.top_k]
                               for _ in range(m)]).to(torch.int32)
            flat = ids.flatten()
            sorted_ids = flat.sort().values.view(m, s.top_k)  # same multiset, grouped
            w = torch.softmax(torch.randn(m, s.top_k, generator=gen), -1).to(DEV)
            x = torch.randn(m, s.hidden_size, generator=gen).to(DEV, torch.bfloat16)
            ws = DecodeWorkspace.create(ex, s.top_k, m)
            y = torch.empty(m, s.hidden_size, device=DEV, dtype=torch.bfloat16)
            res = {}
            for label, t in (("random order", ids), ("sorted by expert", sorted_ids)):
                t = t.to(DEV)
                def call(t=t, x=x, ex=ex, w=w, y=y, ws=ws):
                    return fused_moe_decode(x, ex, w, t, out=y, workspace=ws)

                res[label] = time_calls([call], DEV, target_ms=200).median_us
            distinct = int(torch.unique(flat).numel())
            per_slot_mb = 3 * s.hidden_size * s.intermediate_size / 2 / 1e6
            print(f"{name} M={m}: {m * s.top_k} slots, {distinct} distinct experts "
                  f"({per_slot_mb:.0f} MB each): random {res['random order']:.1f} us, "
                  f"sorted {res['sorted by expert']:.1f} us; all slots from DRAM "
                  f"{m * s.top_k * per_slot_mb / 3.0:.1f} us, distinct once "
                  f"{distinct * per_slot_mb / 3.0:.1f} us at 3 TB/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
