"""Markdown tables of reports/gpu/issue12 from the runs' JSON (no GPU needed).

    python reports/gpu/issue12/make_tables.py > reports/gpu/issue12/tables.md

run3 (commit 10e5001) is the final kernel: its column "rb8 3/SM" is the launch rule that pick_config returns
from 4f3eea2 on (same code path and configuration); its column "current" is the 168-register rule (RB=1), the
idle-GPU optimum, and "v0" the rule committed before issue 12. run2 adds v0 end to end.
"""

import json
from pathlib import Path

HERE = Path(__file__).parent
R3 = json.loads((HERE / "run3" / "tail.json").read_text())
E3 = json.loads((HERE / "run3" / "e2e.json").read_text())
E2 = json.loads((HERE / "run2" / "e2e.json").read_text())
DEF, RB1, V0 = "rb8 3/SM", "current", "v0"


def kernel_table():
    out = ["| in x out | s | cuBLAS | TEAL | ours | ours RB=1 | v0 | TEAL/ours | TEAL/RB=1 | p99/median ours, TEAL |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in R3["rows"]:
        o, d = r["ours"], r["dist"]
        out.append(f"| {r['K']}x{r['N']} | {r['sparsity']:.0%} | {r['us_dense']:.1f} | {r['us_teal']:.1f} | "
                   f"{o[DEF]['us']:.1f} | {o[RB1]['us']:.1f} | {o[V0]['us']:.1f} | "
                   f"**{r['us_teal'] / o[DEF]['us']:.2f}x** | {r['us_teal'] / o[RB1]['us']:.2f}x | "
                   f"{d[DEF]['quiet']['p99_over_median']:.2f}, {d['teal']['quiet']['p99_over_median']:.2f} |")
    return out


def load_table():
    out = ["| in x out | s | slot load: ours | RB=1 | TEAL | ours vs TEAL | copy load p99: ours | RB=1 | TEAL |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in R3["rows"]:
        d = r["dist"]
        out.append(f"| {r['K']}x{r['N']} | {r['sparsity']:.0%} | {d[DEF]['slots']['median']:.1f} "
                   f"(p99 {d[DEF]['slots']['p99']:.1f}) | {d[RB1]['slots']['median']:.1f} | "
                   f"{d['teal']['slots']['median']:.1f} | {d['teal']['slots']['median'] / d[DEF]['slots']['median']:.2f}x | "
                   f"{d[DEF]['copy']['p99']:.0f} | {d[RB1]['copy']['p99']:.0f} | {d['teal']['copy']['p99']:.0f} |")
    return out


def goal1():
    cells = R3["rows"]
    met = [r for r in cells if r["us_teal"] / r["ours"][DEF]["us"] >= 1.05]
    met1 = [r for r in cells if r["us_teal"] / r["ours"][RB1]["us"] >= 1.05]
    mono = []
    for shape in {(r["K"], r["N"]) for r in cells}:
        rs = sorted((r for r in cells if (r["K"], r["N"]) == shape), key=lambda r: r["sparsity"])
        for a, b in zip(rs, rs[1:]):
            if b["ours"][DEF]["us"] > 1.05 * a["ours"][DEF]["us"]:
                mono.append((shape, b["sparsity"]))
    p99 = max(r["dist"][DEF]["quiet"]["p99_over_median"] for r in cells)
    ratios = [r["us_teal"] / r["ours"][DEF]["us"] for r in cells]
    return [f"- >= 1.05x TEAL: {len(met)} of {len(cells)} cells (RB=1: {len(met1)}); ratio range "
            f"{min(ratios):.2f}-{max(ratios):.2f}x",
            f"- time rising with sparsity by more than 5%: {mono or 'never'}",
            f"- largest p99/median, idle GPU: {p99:.2f}"]


def fused_table():
    out = ["| launch | s | cuBLAS | ours | RB=1 | v0 | ours vs cuBLAS |", "|---|---|---|---|---|---|---|"]
    for r in R3["fused"]:
        o = r["ours"]
        out.append(f"| {r['launch']} | {r['sparsity']:.0%} | {r['us_dense']:.1f} | {o[DEF]['us']:.1f} | "
                   f"{o[RB1]['us']:.1f} | {o[V0]['us']:.1f} | {r['us_dense'] / o[DEF]['us']:.2f}x |")
    return out


def bf16_table():
    out = ["| in x out | s | cuBLAS | ours | speedup | RB=1 |", "|---|---|---|---|---|---|"]
    for r in R3["bf16"]:
        o = r["ours"]
        out.append(f"| {r['K']}x{r['N']} | {r['sparsity']:.0%} | {r['us_dense']:.1f} | {o[DEF]['us']:.1f} | "
                   f"{r['us_dense'] / o[DEF]['us']:.2f}x | {o[RB1]['us']:.1f} |")
    return out


def batch_table():
    out = ["| in x out | B | s | rows read | cuBLAS | ours | dispatched to | dispatched vs cuBLAS |",
           "|---|---|---|---|---|---|---|---|"]
    for r in R3["batch"]:
        out.append(f"| {r['K']}x{r['N']} | {r['batch']} | {r['sparsity']:.0%} | {r['union_keep']:.2f} | "
                   f"{r['us_dense']:.1f} | {r['us_ours']:.1f} | {'ours' if r['dispatch_sparse'] else 'dense x @ Wt'} | "
                   f"{r['speedup_dispatched']:.2f}x |")
    return out


def e2e_table():
    out = ["| model | variant | achieved | tok/s (ours) | vs dense | of floor | RB=1 tok/s, vs dense | run2: v0 vs dense |",
           "|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["variant"], r["step"]): r for r in E3["rows"]}
    by2 = {(r["model"], r["variant"], r["step"]): r for r in E2["rows"]}
    for r in E3["rows"]:
        if r["step"] != DEF:
            continue
        k = (r["model"], r["variant"])
        rb1 = by.get(k + ("current",))
        v0 = by2.get(k + ("committed launch rule (v0)",))
        out.append(f"| {r['model']} | {r['variant']} | {r['achieved_mean_sparsity']:.2f} | {r['tok_s']:.1f} | "
                   f"{r['speedup']:.2f}x | {r['of_floor']:.0%} | {rb1['tok_s']:.1f}, {rb1['speedup']:.2f}x | "
                   + (f"{v0['tok_s']:.1f}, {v0['speedup']:.2f}x |" if v0 else "- |"))
    return out


def main():
    m = R3["meta"]
    print(f"# Issue 12 tables (generated by make_tables.py from run3 and run2)\n")
    print(f"- device: {m['device']} (copy bandwidth {R3['copy_bw'] / 1e12:.2f} TB/s), {m['date']}; torch {m['torch']}, "
          f"triton {m['triton']}; TEAL {m['teal_commit']}")
    print(f"- kernel command: `{m['command']}` (run from .teal/ours, a copy of commit 10e5001); e2e: "
          f"`{E3['meta']['command']}`")
    print("- 'ours' = the final launch rule (RB=8, 3 programs per SM; run3 column 'rb8 3/SM'); 'RB=1' = the "
          "168-register rule (run3 'current'); 'v0' = the rule before issue 12; TEAL = TEAL's own "
          "splitk_sparse_gemv (its autotuner, one tuning per shape and sparsity, output zeroing included)")
    print("- us per call, median over CUDA-graph replays rotating > 512 MB of weight copies; p99/median over >= 1500 "
          "calls timed one by one (an event between every two calls in a graph)\n")
    print("## Single projection, fp16, batch 1\n")
    print("\n".join(kernel_table()))
    print("\n" + "\n".join(goal1()))
    print("\n## Under a concurrent load (us per call)\n")
    print("Slot load: one small program per SM on a second stream (holds one program slot on every SM for 2.5 ms "
          "at a time); copy load: 256 MB device copies on a second stream.\n")
    print("\n".join(load_table()))
    print("\n## Fused launches, fp16, batch 1\n")
    print("\n".join(fused_table()))
    print("\n## bf16, batch 1 (TEAL's kernel has no bf16 path: its output is fp16)\n")
    print("\n".join(bf16_table()))
    print("\n## Batch 2-8 (one threshold, independent random masks), fp16\n")
    print("\n".join(batch_table()))
    print("\n## End to end, batch-1 greedy decoding, fp16, random weights of the real shapes\n")
    print("\n".join(e2e_table()))


if __name__ == "__main__":
    main()
