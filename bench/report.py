"""The results table (printed), results.json and the PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

from bench.rankstart import WATCH


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "missed")


def summary_rows(r: dict) -> list[tuple[str, str, str, str]]:
    """(measure, result, target, verdict) for every part that ran."""
    rows = [(f"{name} FAILED", msg.strip().splitlines()[-1][:80] if msg.strip() else "", "-", "missed")
            for name, msg in r.get("failed", {}).items()]
    if "vs_hf" in r:
        v = r["vs_hf"]
        m = v["median"]
        rows.append(("1 vs HF Trainer (padded): hpcft packed, examples isolated, non-pad tokens/s",
                     f"{v['ratio']:.2f}x ({m['hpcft_packing']:,.0f} vs {m['hf_trainer']:,.0f}); same batching "
                     f"{v['ratio_same_batching']:.2f}x", f">= {v['target']}x", verdict(v["ratio"] >= v["target"])))
        if "hpcft_concat" in m:
            rows.append(("1 ... hpcft packed as one stream (packing_mode: concat, cross-contaminated)",
                         f"{m['hpcft_concat'] / m['hf_trainer']:.2f}x ({m['hpcft_concat']:,.0f})", "-", ""))
    if "mfu" in r:
        for precision, v in r["mfu"]["by_precision"].items():
            rows.append((f"2 CPU-MFU {precision}", f"{v['mfu']:.0%} of {v['peak_per_rank'] / 1e9:,.0f} GFLOP/s per rank",
                         ">= 50%", verdict(v["mfu"] >= 0.5)))
    if "profile" in r:
        for precision in ("fp32", "bf16"):
            v = r["profile"][precision]
            rows.append((f"2 matmul share of a 1-rank step, {precision}", f"{v['matmul_share']:.0%} "
                         f"({v['step_s']:.2f} s/step)", "bounds MFU", ""))
        a = r["profile"]["allreduce"]
        rows.append(("3 one gradient all-reduce, 2 ranks, gloo", f"{a['seconds']:.3f} s ({a['floats'] * 4 / 2**20:.0f} MiB)",
                     "-", ""))
    if "scaling" in r:
        v = r["scaling"]
        rows.append(("3 2 ranks vs 2 x 1 rank", f"{v['efficiency_2_ranks']:.2f}", ">= 0.90",
                     verdict(v["efficiency_2_ranks"] >= 0.9)))
        rows.append(("3 (2 independent 1-rank runs at once) / (2 x 1 rank)", f"{v['hardware_ceiling']:.2f}",
                     "the machine's ceiling", ""))
        rows.append(("3 2 nodes vs 1 node x 2 ranks", f"{v['nodes_vs_one_node']:.3f}", "within 5%",
                     verdict(abs(v["nodes_vs_one_node"] - 1) <= 0.05)))
        spe = ", ".join(f"{k}: {n}" for k, n in v["steps_per_epoch"].items())
        rows.append(("3 steps per epoch", spe, "shrink with ranks", verdict(
            v["steps_per_epoch"]["2 ranks, 1 node"] < v["steps_per_epoch"]["1 rank"])))
    if "launch" in r:
        v = r["launch"]
        m = v["median"]
        rows.append(("4 submit -> first step", f"{v['ratio']:.2f}x ({m['hpcft submit']:.1f} s vs "
                     f"{m['sbatch + torchrun']:.1f} s)", "<= 1.1x", verdict(v["ratio"] <= 1.1)))
        if "rank_start" in v:
            s = v["rank_start"]
            now, before = s["median"]["now"], s["median"]["before"]
            rows.append((f"4 one rank: start -> first step, now vs {s['before']}",
                         f"{s['ratio_first_step']:.2f}x ({now['to_first_step_s']:.1f} s vs {before['to_first_step_s']:.1f} s)",
                         "< 1x", verdict(s["ratio_first_step"] < 1)))
            rows.append(("4 one rank: import time (whole process)", f"{s['ratio_import']:.2f}x ({now['import_s']:.1f} s vs "
                         f"{before['import_s']:.1f} s); imported now: {', '.join(s['imported']['now']) or 'none of ' + '/'.join(WATCH)}"
                         f"; before: {', '.join(s['imported']['before'])}", "< 1x", verdict(s["ratio_import"] < 1)))
    if "memory" in r:
        for row in r["memory"]["rows"]:
            key = f"{row['case']} {row['precision']}"
            ok = r["memory"]["meets"].get(key)
            rows.append((f"5 memory {key}", f"{row['bytes_per_rank'] / 2**20:,.0f} MiB/rank, {row['of_ddp']:.2f} of DDP",
                         "<= 0.55 of DDP" if ok is not None else "-", verdict(ok) if ok is not None else ""))
    if "logs" in r:
        v = r["logs"]
        big = v["sizes"][max(v["sizes"], key=int)]
        rows.append((f"6 logs: name failing rank, {v['ranks']} x {max(v['sizes'], key=int)} lines",
                     f"{v['ratio']:.2f}x grep ({big['hpcft_logs_s']:.2f} s vs {big['grep_s']:.2f} s, "
                     f"{big['bytes'] / 2**30:.2f} GiB)", "<= 2x", verdict(v["ratio"] <= 2)))
        rows.append(("6 logs: peak memory, 10x more log", f"{v['rss_growth']:.2f}x "
                     f"({big['hpcft_logs_peak_rss'] / 2**20:.0f} MiB)", "flat", verdict(v["rss_growth"] < 1.2)))
    if "strategies" in r:
        for row in r["strategies"]["rows"]:
            ok = row["tokens_per_s"] is not None
            rows.append((f"7 {row['strategy']} {row['precision']}{' LoRA' if row['lora'] else ''}",
                         f"{row['tokens_per_s']:,.0f} tokens/s" if ok else "FAILED (see results.json)", "-",
                         "" if ok else "missed"))
    if "watchdog" in r:
        v = r["watchdog"]
        m = v["median_step_s"]
        rows.append(("8 watchdog on / off: step time", f"{v['ratio']:.3f}x ({m['on']:.3f} s vs {m['off']:.3f} s); phase "
                     f"marks {v['phase_mark_s'] * 1e6:.2f} us each, {v['phase_marks_share']:.1e} of a step",
                     "<= 1.01x", verdict(v["ratio"] <= 1.01)))
    if "data" in r:
        rows += data_rows(r["data"])
    if "compile" in r:
        v = r["compile"]
        m = v["median"]
        rows.append(("10 train.compile vs HF Trainer, same padded batches, fp32", f"{v['ratio']:.2f}x ({m['hpcft_compile']:,.0f} vs "
                     f"{m['hf_trainer']:,.0f}); without compile {v['ratio_eager']:.2f}x", f">= {v['target']}x",
                     verdict(v["ratio"] >= v["target"])))
        if "ratio_bf16" in v:
            rows.append(("10 train.compile vs HF Trainer, same padded batches, bf16", f"{v['ratio_bf16']:.2f}x "
                         f"({m['hpcft_compile_bf16']:,.0f} vs {m['hf_trainer_bf16']:,.0f})", f">= {v['target']}x",
                         verdict(v["ratio_bf16"] >= v["target"])))
        rows.append(("10 CPU-MFU bf16 (packed), train.compile", f"{v['mfu']['bf16_compile']:.0%} ({v['bf16_compile_speedup']:.2f}x "
                     f"eager's {v['mfu']['bf16_eager']:.0%})", f">= {v['mfu_target']:.0%}",
                     verdict(v["mfu"]["bf16_compile"] >= v["mfu_target"])))
    if "checkpoint" in r:
        for row in r["checkpoint"]["rows"]:
            a, b = row["async"], row["sync"]
            rows.append((f"11 checkpoint, {row['strategy']}: training held up by a save, async vs sync",
                         f"{row['blocked_ratio']:.2f}x ({a['blocked_s']:.2f} s vs {b['blocked_s']:.2f} s; the async "
                         f"write took {a['write_s']:.2f} s; a step is {b['step_s']:.2f} s)", "smaller",
                         verdict(row["blocked_ratio"] < 1)))
            rows.append((f"11 checkpoint, {row['strategy']}: the step after a save, extra time, async vs sync",
                         f"{row['stall_ratio']:.2f}x ({a['stall_s']:.2f} s vs {b['stall_s']:.2f} s)", "-", ""))
            rows.append((f"11 checkpoint, {row['strategy']}: the run's extra wall time per save, async vs sync",
                         f"{row['cost_ratio']:.2f}x ({a['cost_per_save_s']:.2f} s vs {b['cost_per_save_s']:.2f} s)",
                         "-", ""))
    return rows


def data_rows(v: dict) -> list[tuple[str, str, str, str]]:
    gib = 2**30
    n = f"{v['examples']:,} examples ({v['file_mib']:,.0f} MiB), 2 nodes x 2 ranks"
    old = v["old"]
    if old["did_not_fit"]:
        old_text = (f"did not fit: stopped at {max(old['peak_rss_per_rank']) / gib:.1f} GiB on a rank after "
                    f"{old['stopped_after_s']:.0f} s, before its first step")
    else:
        old_text = f"{old['to_first_step_s']:.0f} s, peak {max(old['peak_rss_per_rank']) / gib:.2f} GiB per rank"
    cold, warm = v["new_cold"], v["new_warm"]
    worst = max(v["data_rss_per_rank_warm"]) / 2**20
    worst_cold = max(v["data_rss_per_rank_cold"]) / 2**20
    return [
        (f"9 data, today's path ({v['old_commit']}): submit -> first step, {n}", old_text, "-", ""),
        ("9 data, new path, cache cold: submit -> first step",
         f"{cold['to_first_step_s']:.0f} s, peak {max(cold['peak_rss_per_rank']) / gib:.2f} GiB per rank; "
         f"{cold['tokenizations']} tokenization for the job", "tokenized once per job",
         verdict(cold["tokenizations"] == 1)),
        ("9 data, new path: per-rank RSS attributable to data (1M job's peak minus a 1,000-example job's)",
         f"{worst:.0f} MiB (warm), {worst_cold:.0f} MiB (cold)", "<= 300 MiB", verdict(max(worst, worst_cold) <= 300)),
        ("9 data, cache-hit start: 1M examples vs 1,000",
         f"{v['cache_hit_start_gap_s']:+.1f} s ({warm['to_first_step_s']:.1f} s vs "
         f"{v['small_warm']['to_first_step_s']:.1f} s)", "within 10 s", verdict(v["cache_hit_start_gap_s"] <= 10)),
    ]


def print_table(rows, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="hpcft benchmarks (medians; ratios measured side by side in this run)")
    for col in ("measure", "result", "target", ""):
        table.add_column(col)
    for m, res, target, v in rows:
        style = "green" if v == "MET" else ("red" if v == "missed" else "")
        table.add_row(m, res, target, f"[{style}]{v}[/]" if style else v)
    (console or Console(width=160)).print(table)


def markdown(rows) -> str:
    lines = ["| measure | result | target | |", "|---|---|---|---|"]
    lines += [f"| {m} | {res} | {t} | {v} |" for m, res, t, v in rows]
    return "\n".join(lines) + "\n"


def plots(r: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        made.append(out / name)

    if "vs_hf" in r:
        m = r["vs_hf"]["median"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = ["hpcft (packed,\nisolated)", "hpcft (padding)", "HF Trainer\n(padding)"]
        vals = [m["hpcft_packing"], m["hpcft_padding"], m["hf_trainer"]]
        if "hpcft_concat" in m:
            names.append("hpcft (packed,\nconcat)")
            vals.append(m["hpcft_concat"])
        ax.bar(names, vals, color=["C0", "C9", "C1", "C7"][:len(names)])
        ax.set_ylabel("non-pad tokens/s (2 ranks)")
        ax.set_title(f"vs HF Trainer: {r['vs_hf']['ratio']:.2f}x")
        save(fig, "vs_hf.png")
    if "scaling" in r:
        v = r["scaling"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
        keys = list(v["median"])
        a1.bar([k.replace(" 1-rank runs", "\n1-rank runs").replace(", ", ",\n").replace(" x ", "\nx ") for k in keys],
               [v["median"][k] for k in keys],
               color="C0")
        a1.tick_params(axis="x", labelsize=7)
        a1.axhline(2 * v["median"]["1 rank"] * 0.9, color="r", ls="--", label="0.9 x 2 x 1 rank")
        a1.set_ylabel("tokens/s")
        a1.legend()
        a1.set_title("scaling")
        a2.bar(list(v["steps_per_epoch"]), list(v["steps_per_epoch"].values()), color="C2")
        a2.set_ylabel("optimizer steps per epoch")
        a2.set_title("steps per epoch shrink with ranks")
        save(fig, "scaling.png")
    if "memory" in r:
        rows = r["memory"]["rows"]
        fig, ax = plt.subplots(figsize=(10, 3.8))
        labels = [f"{x['case'].replace(' ', chr(10))}\n{x['precision']}" for x in rows]
        ax.bar(labels, [x["bytes_per_rank"] / 2**20 for x in rows], color=["C1" if "bf16" in lbl else "C0" for lbl in labels])
        for prec, style in (("fp32", "--"), ("bf16", ":")):
            ddp = next((x["bytes_per_rank"] for x in rows if x["case"] == "ddp" and x["precision"] == prec), None)
            if ddp:
                ax.axhline(ddp / 2 * 1.1 / 2**20, color="r", ls=style, label=f"DDP/2 + 10% ({prec})")
        ax.set_ylabel("MiB per rank (params + grads + optimizer)")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=8)
        save(fig, "memory.png")
    if "strategies" in r:
        rows = r["strategies"]["rows"]
        strategies = list(dict.fromkeys(x["strategy"] for x in rows))
        combos = list(dict.fromkeys((x["precision"], x["lora"]) for x in rows))
        fig, ax = plt.subplots(figsize=(10, 3.8))
        width = 0.8 / len(combos)
        for j, (prec, lora) in enumerate(combos):
            vals = [next(x["tokens_per_s"] or 0 for x in rows if x["strategy"] == s and x["precision"] == prec
                         and x["lora"] == lora) for s in strategies]
            ax.bar([i + j * width for i in range(len(strategies))], vals, width,
                   label=f"{prec}{' + LoRA' if lora else ''}")
        ax.set_xticks([i + width * (len(combos) - 1) / 2 for i in range(len(strategies))], strategies)
        ax.set_ylabel("tokens/s (2 ranks)")
        ax.legend(fontsize=8)
        save(fig, "strategies.png")
    if "logs" in r:
        v = r["logs"]["sizes"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3))
        xs = sorted(v, key=int)
        a1.plot([int(x) for x in xs], [v[x]["hpcft_logs_s"] for x in xs], "o-", label="hpcft logs --failure-only")
        a1.plot([int(x) for x in xs], [v[x]["grep_s"] for x in xs], "o-", label="grep -l Traceback")
        a1.set_xlabel("lines per rank (1,024 ranks)")
        a1.set_ylabel("seconds")
        a1.legend(fontsize=8)
        a2.plot([int(x) for x in xs], [v[x]["hpcft_logs_peak_rss"] / 2**20 for x in xs], "o-")
        a2.set_xlabel("lines per rank")
        a2.set_ylabel("hpcft logs peak RSS, MiB")
        a2.set_ylim(bottom=0)
        save(fig, "logs.png")
    return made


def write_json(r: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(r, indent=1) + "\n")
    tmp.replace(out / "results.json")
    return out / "results.json"


def write(r: dict, out: Path) -> list[Path]:
    write_json(r, out)
    rows = summary_rows(r)
    (out / "results.md").write_text(markdown(rows))
    return [out / "results.json", out / "results.md", *plots(r, out)]
