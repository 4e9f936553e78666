"""The claim benchmark's report: per recipe, the rows over seeds (mean ± standard deviation, each member against its
twin), the family's cost, and the learning-rate sweeps of tuned runs (benchmarks/train_once.py --report)."""

from __future__ import annotations

import statistics

from lr_grid import LrSweep

TUNED = "@tuned_lr"  # the suffix of a recipe's name in the results when every arm trained at its own best rate


def _stats(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ±{statistics.stdev(values):.4f}"


def _row(name: str, params: int, active: int, flops: float, values: list[float], twin: list[float] | None = None):
    """One table row; `twin` adds the relative gap of the means and, over several seeds, the mean ± standard
    deviation of the per-seed gaps (each seed's member against its own twin: the spread a claim must beat)."""
    gap = ""
    if twin is not None:
        gap = f"{100 * (statistics.mean(values) / statistics.mean(twin) - 1):+.2f}%"
        if len(values) > 1:
            per_seed = [100 * (v / t - 1) for v, t in zip(values, twin, strict=True)]
            gap += f" (per seed {statistics.mean(per_seed):+.2f} ±{statistics.stdev(per_seed):.2f})"
    return f"| {name} | {params:,} | {active:,} | {flops / 1e12:.3f} | {_stats(values)} | {gap} |"


def budget_to_reach(member: dict) -> str | None:
    """The smallest measured distillation budget (fraction of the twin's compute) at which the cut member's
    validation loss is at or below its twin's; None for runs stored without a budget curve."""
    if "distill_curve" not in member:
        return None
    reached = [f for f, loss in member["distill_curve"] if loss <= member["twin"]]
    return f"{min(reached):.1%}" if reached else f"not within {member['distill_curve'][-1][0]:.1%}"


def family_costs(run: dict) -> dict[str, float]:
    """The family's cost (elastic run + every distillation) vs training each member and the full model alone."""
    members = run["rows"]["members"].values()
    family = run["rows"]["elastic"]["flops"] + sum(m["distill_flops"] for m in members)
    separate = run["rows"]["full_alone"]["flops"] + sum(m["twin_flops"] for m in members)
    minitron = run["rows"]["full_alone"]["flops"] + sum(m["minitron_flops"] for m in members)
    return {"family": family, "separate": separate, "minitron": minitron}


def _at(rows: list[dict], key: str) -> str:
    """` @ lr X` for a row of a tuned run (the rate its arm trained at; ` @ lr X, Y` if seeds differ)."""
    rates = sorted({row[key] for row in rows if key in row})
    return f" @ lr {', '.join(f'{lr:.3g}' for lr in rates)}" if rates else ""


def sweep_table(sweeps: dict[str, dict]) -> list[str]:
    """Markdown: one row per swept arm, its validation loss at every rate, the best in bold."""
    lines = [
        "| arm (tuned on seed) | validation loss by peak learning rate | best | bracketed |",
        "|---|---|---|---|",
    ]
    for entry in sorted(sweeps.values(), key=lambda e: e["arm"]):
        sweep = LrSweep.from_json(entry)
        cells = [
            f"**{lr:.3g}: {loss:.4f}**" if lr == sweep.best else f"{lr:.3g}: {loss:.4f}"
            for lr, loss in sorted(sweep.losses.items())
        ]
        lines.append(
            f"| {entry['arm']} ({entry['tuned_on_seed']}) | {', '.join(cells)} | {sweep.best:.3g} | "
            f"{'yes' if sweep.bracketed else 'no'} |"
        )
    return lines


def sweep_costs(run: dict, sweeps: dict[str, dict]) -> dict[str, float]:
    """The compute of the sweeps behind one tuned run, beyond the rate each arm kept: the family's (its elastic run
    and its distillations) and the separately trained models' (the full model alone and the twins)."""
    base = run["recipe"].removesuffix(TUNED).split("+")[0]
    specs = [m["spec"] for m in run["rows"]["members"].values()]
    family = {f"(a) elastic run {base}", *(f"(c) {spec} of {base}" for spec in specs)}
    separate = {f"(b) twin {spec}" for spec in specs}
    extra = {"family": 0.0, "separate": 0.0}
    for entry in sweeps.values():
        spent = entry["flops_per_rate"] * (len(entry["losses"]) - 1)
        if entry["arm"] in family:
            extra["family"] += spent
        elif entry["arm"] in separate or entry["arm"].startswith("(f) "):
            extra["separate"] += spent
    return extra


def report(runs: list[dict], sweeps: dict[str, dict] | None = None) -> str:
    """Markdown table per recipe: mean ± standard deviation over seeds, relative gaps to the twins; for tuned runs,
    each arm's learning rate, the sweep table and the cost including the sweeps."""
    sweeps = sweeps or {}
    lines = []
    for recipe in sorted({r["recipe"] for r in runs}):
        mine = [r for r in runs if r["recipe"] == recipe]
        first = mine[0]
        lines += [
            f"### Recipe `{recipe}`: seeds {sorted(r['seed'] for r in mine)}, {first['tokens']:,} tokens "
            f"({first['tokens_per_active_param']:.1f} per active parameter of the full model)",
            "",
            "| row | params | active | train TFLOP | val loss | vs twin |",
            "|---|---|---|---|---|---|",
        ]
        e, f = first["rows"]["elastic"], first["rows"]["full_alone"]
        full_alone = [r["rows"]["full_alone"]["val"] for r in mine]
        elastic = [r["rows"]["elastic"]["val"] for r in mine]
        elastic_name = "(a) elastic run, full model" + _at([r["rows"]["elastic"] for r in mine], "lr")
        full_name = "(f) full model alone" + _at([r["rows"]["full_alone"] for r in mine], "lr")
        lines.append(_row(elastic_name, e["params"], e["active"], e["flops"], elastic, full_alone))
        lines.append(_row(full_name, f["params"], f["active"], f["flops"], full_alone))
        # one block per (budget, architecture): the search may pick another member on another seed, and the
        # figures of different architectures do not average
        blocks = {(label, r["rows"]["members"][label]["spec"]): None for r in mine for label in r["rows"]["members"]}
        for label, spec in blocks:
            same = [r for r in mine if r["rows"]["members"][label]["spec"] == spec]
            m = same[0]["rows"]["members"][label]
            v = {
                key: [r["rows"]["members"][label][key] for r in same]
                for key in ("twin", "cut", "distilled", "minitron_cut", "minitron")
            }
            seeds = "" if len(same) == len(mine) else f" (seeds {', '.join(str(r['seed']) for r in same)})"
            size = (m["params"], m["active"])
            rows = [r["rows"]["members"][label] for r in same]
            lines += [
                f"| **{label}**: {spec}{seeds} | | | | | |",
                _row("(b) twin, trained alone" + _at(rows, "twin_lr"), *size, m["twin_flops"], v["twin"]),
                _row("(c) cut from (a)", *size, 0, v["cut"], v["twin"]),
                _row(
                    "(c) cut + distilled" + _at(rows, "distill_lr"),
                    *size,
                    m["distill_flops"],
                    v["distilled"],
                    v["twin"],
                ),
                _row("(m) pruned from (f)", *size, 0, v["minitron_cut"], v["twin"]),
                _row(
                    "(m) pruned + distilled" + _at(rows, "minitron_lr"),
                    *size,
                    m["minitron_flops"],
                    v["minitron"],
                    v["twin"],
                ),
            ]
            reach = [b for r in same if (b := budget_to_reach(r["rows"]["members"][label])) is not None]
            if reach:
                lines.append(
                    f"| distillation compute at which (c) first reaches (b), per seed: {', '.join(reach)} | | | | | |"
                )
        costs = [family_costs(r) for r in mine]
        ratio = statistics.mean(c["family"] / c["separate"] for c in costs)
        minitron = statistics.mean(c["minitron"] / c["separate"] for c in costs)
        lines += [
            "",
            f"Family cost (elastic run + distillations) / separate cost (the 4 twins + the full model alone): "
            f"**{ratio:.2f}**; Minitron family (full alone + distillations): {minitron:.2f}.",
            "",
        ]
        if recipe.endswith(TUNED) and sweeps:
            extra = [sweep_costs(r, sweeps) for r in mine]
            with_sweeps = statistics.mean(
                (c["family"] + x["family"]) / (c["separate"] + x["separate"]) for c, x in zip(costs, extra, strict=True)
            )
            lines += [
                f"Learning-rate sweeps (paid once per architecture, beyond the rate each arm kept): the family's "
                f"{extra[0]['family'] / 1e12:.2f} TFLOP (elastic run + its distillations), the separate models' "
                f"{extra[0]['separate'] / 1e12:.2f} TFLOP (full model alone + twins); family / separate cost with "
                f"the sweeps: {with_sweeps:.2f}.",
                "",
            ]
    if sweeps:
        lines += ["### Learning-rate sweeps", "", *sweep_table(sweeps), ""]
    return "\n".join(lines)
