r"""Tune the generator's sampler before the 50,000-sample run: sample a grid of (cfg, temperature) settings on a few
samples per class, score each with eval.gfid against a reference, and keep the best.

    python -m eval.sweep --generator results/maskgit_lo --tokenizer flowmo_lo --out sweep_lo/ --per-class 10 \
        --reference VIRTUAL_imagenet256_labeled.npz --cfg 4,5.5,6.7,8 --temperature 6.5,8.5,10.5

Each setting is an eval.generate run into OUT/cfg_<c>_temperature_<t>/ (token shards, PNGs, samples.npz; every
other flag of eval.generate applies to all of them, e.g. --steps, --cfg-power, --decode-steps), then eval.gfid of
its samples.npz (gfid.json beside it; the reference's statistics are computed once and cached). Writes:

- OUT/sweep.jsonl: a line per finished setting: cfg, temperature, fid, sfid, inception_score, precision, recall,
  the sample count, its folder and the seconds it took (generation, decoding and scoring);
- OUT/sweep.png: FID and Inception Score against cfg, a line per temperature, the best setting marked;
- OUT/best.json and one line on stdout: the setting of lowest FID.

Resumable: a setting with a line in sweep.jsonl is not sampled again, an interrupted one continues where its
eval.generate stopped, and a rerun with more --cfg / --temperature values runs only the new ones. What all
settings share (generator, tokenizer, reference, samples per class, seed, the other sampler settings) is recorded
in OUT/sweep.json; a rerun with other shared settings is refused (use a new --out). The sweep runs as one process
on one device (`python -m eval.sweep`): its settings are small runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from eval import generate, gfid, weights
from eval.fidelity import NEIGHBOURS
from eval.history import append_line, check_or_record_settings, complete_lines
from eval.rfid import write_json
from flowmo_fast import flags
from flowmo_fast.formats.checkpoint import atomic_write, file_sha256
from flowmo_fast.maskgit.pretrained import weights_file

TABLE = "sweep.jsonl"
SHARED = "sweep.json"
PLOT = "sweep.png"
BEST = "best.json"
METRICS = ("fid", "sfid", "inception_score", "inception_score_std", "precision", "recall")
DEFAULT_CFGS = "4,5.5,6.7,8"  # around MaskBit's tuned 5.7 + 1 (its other token sizes: 6.7-8.1 in our convention)
DEFAULT_TEMPERATURES = "6.5,8.5,10.5"  # around MaskBit's 8.5 (its other token sizes: 7.5-10.5)
GRID_VALUES = flags.comma_list(flags.non_negative_float, unique=True)  # --cfg, --temperature: numbers >= 0


@dataclass(frozen=True)
class SweepSettings:
    """One sweep: the grid, and what every setting shares (its eval.generate and eval.gfid settings, whose
    output folder, sample file and cfg / temperature each setting replaces)."""

    out: str
    cfgs: tuple[float, ...]
    temperatures: tuple[float, ...]
    generation: generate.GenerateSettings
    scoring: gfid.GfidSettings

    def grid(self) -> list[tuple[float, float]]:
        return [(c, t) for t in self.temperatures for c in self.cfgs]

    def folder(self, cfg: float, temperature: float) -> str:
        return os.path.join(self.out, f"cfg_{cfg:g}_temperature_{temperature:g}")


def log(message: str) -> None:
    print(f"sweep: {message}", file=sys.stderr, flush=True)


def shared_record(s: SweepSettings) -> dict:
    """What every setting of the sweep shares: a rerun must share it too."""
    g, r = s.generation, s.scoring
    path = weights_file(g.generator_ckpt)  # a checkpoint, or a model folder's weights
    options = dataclasses.asdict(g.options)
    for swept in ("cfg", "temperature"):
        options.pop(swept)
    return {
        "generator": {"path": os.path.abspath(path), "sha256": file_sha256(path), "which": g.which},
        "tokenizer": {"path": os.path.abspath(g.tokenizer), "sha256": file_sha256(g.tokenizer)},
        "per_class": g.per_class, "classes": g.classes, "seed": g.seed, "options": options,
        "decode": dataclasses.asdict(g.decode),
        "reference": {"path": os.path.abspath(r.reference), "index": r.reference_index, "neighbours": r.neighbours},
    }


def read_table(path: str) -> list[dict]:
    """The finished settings, in the order they finished; a line torn by a crash mid-write is cut off."""
    return [json.loads(line) for line in complete_lines(path, log)]


def run_setting(s: SweepSettings, cfg: float, temperature: float) -> dict:
    """eval.generate and eval.gfid for one setting -> its table row."""
    began = time.perf_counter()
    folder = s.folder(cfg, temperature)
    options = s.generation.options.replace(cfg=cfg, temperature=temperature)
    generate.run(dataclasses.replace(s.generation, out=folder, options=options))
    samples = os.path.join(folder, generate.SAMPLES)
    result = gfid.measure(dataclasses.replace(s.scoring, samples=samples, out=os.path.join(folder, "gfid.json")))
    return {"cfg": cfg, "temperature": temperature, **{k: result["metrics"][k] for k in METRICS},
            "num_samples": result["num_samples"], "folder": os.path.abspath(folder),
            "seconds": round(time.perf_counter() - began, 1)}


def best_row(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: r["fid"])


def plot(path: str, rows: list[dict], best: dict) -> None:
    """sweep.png: FID and Inception Score against cfg, one line per temperature, the best setting starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.4, 3.4), layout="constrained")
    temperatures = sorted({r["temperature"] for r in rows})
    for axes, (key, title) in zip(figure.subplots(1, 2), (("fid", "FID (lower is better)"),
                                                           ("inception_score", "Inception Score (higher is better)"))):
        for t in temperatures:
            line = sorted((r["cfg"], r[key]) for r in rows if r["temperature"] == t)
            axes.plot([c for c, _ in line], [v for _, v in line], marker="o", markersize=3, label=f"temperature {t:g}")
        axes.plot([best["cfg"]], [best[key]], "*", color="tab:red", markersize=12,
                  label=f"best FID: cfg {best['cfg']:g}, temperature {best['temperature']:g}")
        axes.set_title(title)
        axes.set_xlabel("cfg")
        axes.legend(fontsize="small")
    png = io.BytesIO()
    FigureCanvasAgg(figure).print_png(png)
    atomic_write(path, lambda f: f.write(png.getvalue()))


def best_line(best: dict, count: int, out: str) -> str:
    return (f"best of {count} settings: --cfg {best['cfg']:g} --temperature {best['temperature']:g}  "
            f"gFID {best['fid']:.4f}  sFID {best['sfid']:.4f}  IS {best['inception_score']:.2f}  "
            f"precision {best['precision']:.4f}  recall {best['recall']:.4f} ({best['num_samples']} samples) | "
            f"table {os.path.join(out, TABLE)}, plot {os.path.join(out, PLOT)}")


def run(settings: SweepSettings) -> dict:
    """Every setting of the grid not yet in the table, then the plot and the best setting; returns the best row."""
    s = settings
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("eval.sweep runs as one process (python -m eval.sweep --device cuda:N); for one large run "
                         "use torchrun with eval.generate")
    os.makedirs(s.out, exist_ok=True)
    check_or_record_settings(os.path.join(s.out, SHARED), shared_record(s), "a sweep of other shared settings")
    table = os.path.join(s.out, TABLE)
    done = {(r["cfg"], r["temperature"]) for r in read_table(table)}
    todo = [g for g in s.grid() if g not in done]
    log(f"{len(s.grid())} settings ({len(s.cfgs)} cfg x {len(s.temperatures)} temperature): "
        f"{len(s.grid()) - len(todo)} done, {len(todo)} to run, {s.generation.per_class} samples per class each")
    began = time.perf_counter()
    for k, (cfg, temperature) in enumerate(todo, 1):
        log(f"[{k}/{len(todo)}] cfg {cfg:g}, temperature {temperature:g}")
        append_line(table, json.dumps(run_setting(s, cfg, temperature)))
        each = (time.perf_counter() - began) / k
        log(f"[{k}/{len(todo)}] done; {each:.0f} s per setting, {math.ceil(each * (len(todo) - k) / 60)} min left")
    rows = read_table(table)
    best = best_row(rows)
    plot(os.path.join(s.out, PLOT), rows, best)
    write_json(best, os.path.join(s.out, BEST))
    print(best_line(best, len(rows), s.out), flush=True)
    return best


# ---- the command: flags -> one settings object -> run ----------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """eval.generate's flags (its parser as the parent), --cfg and --temperature as lists, and eval.gfid's."""
    p = argparse.ArgumentParser(prog="python -m eval.sweep", description=__doc__, conflict_handler="resolve",
                                parents=[generate.build_parser(add_help=False)],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the sweep's folder: a folder per setting, table, plot (reused by a "
                   "rerun)")
    p.add_argument("--per-class", type=flags.positive_int, default=10, help="samples per class and setting "
                   "(default 10: 10,000 for ImageNet)")
    p.add_argument("--tokenizer", required=True, help="FlowMo checkpoint (file, or flowmo_lo / flowmo_hi) to decode "
                   "the rows with")
    grid = p.add_argument_group("the grid (every cfg with every temperature)")
    grid.add_argument("--cfg", dest="cfgs", type=GRID_VALUES, default=GRID_VALUES(DEFAULT_CFGS),
                      help=f"guidance scales (default {DEFAULT_CFGS}; MaskBit's tuned 18-bit value is 6.7 here)")
    grid.add_argument("--temperature", dest="temperatures", type=GRID_VALUES, default=GRID_VALUES(DEFAULT_TEMPERATURES),
                      help=f"Gumbel temperatures (default {DEFAULT_TEMPERATURES}; MaskBit's 8.5)")
    score = p.add_argument_group("scoring (eval.gfid)")
    score.add_argument("--reference", required=True, metavar="REF", help="ADM reference batch (.npz), a folder of "
                       "images, or the ImageNet tar (with --reference-index)")
    score.add_argument("--reference-index", metavar="J", help="upstream's JSON index of the ImageNet tar")
    score.add_argument("--cache-dir", metavar="DIR", help="reference statistics (default: ~/.cache/flowmo_fast/gfid)")
    score.add_argument("--inception-batch-size", type=flags.positive_int, default=50,
                       help="images per Inception call (default 50)")
    score.add_argument("--num-workers", type=flags.non_negative_int, default=flags.default_workers(),
                       help="image decoding processes of the reference (default: the CPUs beside this one, at most 8)")
    score.add_argument("--neighbours", type=flags.positive_int, default=NEIGHBOURS, help="k of precision / recall "
                       "(default 3)")
    score.add_argument(weights.INCEPTION.flag, metavar="PATH", help="pt_inception-2015-12-05-6726825d.pth (or "
                       f"${weights.INCEPTION.env}; default: torch hub cache)")
    return p


def settings_from(args: argparse.Namespace) -> SweepSettings:
    scoring = gfid.GfidSettings(samples="", reference=args.reference, reference_index=args.reference_index,
                                cache_dir=args.cache_dir, batch_size=args.inception_batch_size,
                                num_workers=args.num_workers, device=args.device,
                                inception_weights=args.inception_weights, neighbours=args.neighbours)
    return SweepSettings(args.out, args.cfgs, args.temperatures, generate.settings_from(args), scoring)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    with flags.one_line_errors("eval.sweep", also=(weights.WeightsUnavailable,)):
        return run(settings_from(args))


if __name__ == "__main__":
    main()
