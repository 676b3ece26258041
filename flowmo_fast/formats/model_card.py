"""The model card (`README.md` of a model folder): YAML front matter the Hugging Face Hub reads (library_name,
tags), what the model is, how to load it, how it was trained and what it measured.

What the card says of the weights' origin comes from `CardFacts` (the training checkpoint's steps, which weights,
its sha256, the run's recipe and data) and the metrics from the evaluators' own result files, taken only when they
measured these very weights (their recorded sha256 is the checkpoint's):

- eval.watch's `RUN/eval/history.jsonl` (the newest good line of the checkpoint),
- eval.rfid's `metrics.json`,
- eval.gfid's `gfid.json` (its samples' manifest names the generator that made them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

LIBRARY = "flowmo-fast"
REPOSITORY = "https://github.com/kylesargent/FlowMo"  # the paper's code; ours reproduces it
PAPER = "https://arxiv.org/abs/2503.11056"
HISTORY, RFID_JSON, GFID_JSON = "history.jsonl", "metrics.json", "gfid.json"


@dataclass(frozen=True)
class Metric:
    name: str  # as the evaluator writes it: rfid, psnr, ..., fid, inception_score, ...
    value: Optional[float]  # None: not defined (e.g. rFID of one image)
    images: Optional[int]  # how many images (or samples) it was measured on
    data: str  # on what: the data set, or the reference batch
    source: str  # the result file it was read from


@dataclass(frozen=True)
class CardFacts:
    """What a card says of where its weights came from, beyond the model's config (all optional: a model saved
    from memory knows only its config)."""

    which: Optional[str] = None  # "ema" | "model": which weights of the run; None: not known
    total_steps: Optional[int] = None
    checkpoint: Optional[str] = None  # the training checkpoint's file name
    sha256: Optional[str] = None  # of that file
    data: Optional[str] = None  # what it was trained on, described
    recipe: tuple[str, ...] = ()  # lines: the training settings that matter
    metrics: tuple[Metric, ...] = ()


@dataclass(frozen=True)
class CardText:
    """The model's own part of its card."""

    title: str
    summary: str  # a paragraph: what it is
    usage: str  # a Python snippet that loads it
    tags: tuple[str, ...]


def render_card(text: CardText, facts: CardFacts, files: Sequence[tuple[str, str]]) -> str:
    """The card: front matter, title, summary, use, training, evaluation, files ([(name, what it holds)])."""
    from huggingface_hub import ModelCardData

    front = ModelCardData(library_name=LIBRARY, tags=[LIBRARY, *text.tags]).to_yaml()
    parts = [f"---\n{front}\n---\n", f"# {text.title}\n", text.summary + "\n",
             "## Use\n", f"```python\n{text.usage.strip()}\n```\n",
             "## Training\n", "\n".join(f"- {line}" for line in training_lines(facts)) + "\n",
             "## Evaluation\n", evaluation_table(facts.metrics) + "\n",
             "## Files\n", "\n".join(f"- `{name}`: {what}" for name, what in files) + "\n",
             f"FlowMo: [arXiv 2503.11056]({PAPER}) ([code]({REPOSITORY})); saved with `{LIBRARY}`'s save_pretrained.\n"]
    return "\n".join(parts)


def training_lines(facts: CardFacts) -> list[str]:
    weights = {"ema": "the EMA weights", "model": "the raw (non-EMA) weights"}.get(facts.which or "", "weights")
    origin = f"{weights} of `{facts.checkpoint}`" if facts.checkpoint else f"{weights} saved from memory"
    lines = [origin + (f" (sha256 `{facts.sha256[:16]}...`)" if facts.sha256 else "")]
    lines.append(f"steps: {facts.total_steps:,}" if facts.total_steps is not None else "steps: not recorded")
    lines.append(f"data: {facts.data}" if facts.data else "data: not recorded")
    return lines + list(facts.recipe)


def evaluation_table(metrics: Sequence[Metric]) -> str:
    if not metrics:
        return "Not evaluated (no evaluator's result file recorded these weights)."
    rows = ["| metric | value | images | on | from |", "| --- | --- | --- | --- | --- |"]
    for m in metrics:
        value = "n/a" if m.value is None else f"{m.value:.4g}"
        rows.append(f"| {m.name} | {value} | {m.images if m.images is not None else '?'} | {m.data} | `{m.source}` |")
    return "\n".join(rows)


# ---- the evaluators' result files ----------------------------------------------------------------------------


def read_json_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable evaluation result ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not an evaluation result (a JSON {type(d).__name__})")
    return d


def metrics_of(values: dict, images: Optional[int], data: str, source: str) -> tuple[Metric, ...]:
    return tuple(Metric(k, None if v is None else float(v), images, data, source) for k, v in values.items())


def from_history(path: str, sha256: str, which: Optional[str]) -> Optional[tuple[Metric, ...]]:
    """The newest good line of eval.watch's history for these weights (a torn last line is skipped)."""
    found = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if d.get("sha256") == sha256 and d.get("status") == "ok" and (which is None or d.get("which") == which):
                found = d
    if found is None:
        return None
    return metrics_of(found.get("metrics") or {}, found.get("num_images"),
                      (found.get("data") or {}).get("dataset", "?"), f"eval.watch {os.path.basename(path)}")


def from_rfid(path: str, sha256: str, which: Optional[str]) -> Optional[tuple[Metric, ...]]:
    d = read_json_file(path)
    ckpt = d.get("checkpoint") or {}
    if ckpt.get("sha256") != sha256 or (which is not None and ckpt.get("which") != which):
        return None
    return metrics_of(d.get("metrics") or {}, d.get("num_images"), (d.get("data") or {}).get("dataset", "?"),
                      f"eval.rfid {os.path.basename(path)}")


def from_gfid(path: str, sha256: str, which: Optional[str]) -> Optional[tuple[Metric, ...]]:
    """eval.gfid's result, when its samples were made by these weights (their folder's manifest.json says)."""
    d = read_json_file(path)
    samples = (d.get("samples") or {}).get("path") or ""
    folder = samples if os.path.isdir(samples) else os.path.dirname(samples)
    manifest = os.path.join(folder, "manifest.json")
    generation = read_json_file(manifest).get("generation") or {} if os.path.isfile(manifest) else {}
    made_by = generation.get("generator") or {}
    if made_by.get("sha256") != sha256 or (which is not None and made_by.get("which") != which):
        return None
    ref = d.get("reference") or {}
    data = f"{ref.get('kind', '?')} {os.path.basename(ref.get('path') or '?')} ({ref.get('num_images', '?')} images)"
    return metrics_of(d.get("metrics") or {}, d.get("num_samples"), data, f"eval.gfid {os.path.basename(path)}")


READERS = {HISTORY: from_history, RFID_JSON: from_rfid, GFID_JSON: from_gfid}


def read_evaluation(path: str, sha256: str, which: Optional[str]) -> Optional[tuple[Metric, ...]]:
    """The metrics an evaluator's result file holds for the weights of file hash `sha256` (None: it measured
    other weights). The reader is chosen by the file's name: history.jsonl, metrics.json or gfid.json."""
    reader = READERS.get(os.path.basename(path))
    if reader is None:
        raise ValueError(f"{path}: not an evaluation result; give eval.watch's {HISTORY}, eval.rfid's {RFID_JSON} "
                         f"or eval.gfid's {GFID_JSON}")
    return reader(path, sha256, which)


def collect_metrics(given: Sequence[str], found: Sequence[str], sha256: str,
                    which: Optional[str]) -> tuple[Metric, ...]:
    """Metrics of the files `given` (each must have measured these weights) and of the files `found` beside the
    checkpoint that did (the others are someone else's)."""
    metrics: list[Metric] = []
    for path in given:
        got = read_evaluation(os.fspath(path), sha256, which)
        if got is None:
            raise ValueError(f"{path} measured other weights than these (sha256 {sha256[:12]}, {which or 'any'}): "
                             "give the evaluation of this checkpoint")
        metrics += got
    for path in found:
        if os.path.isfile(path) and os.fspath(path) not in map(os.fspath, given):
            metrics += read_evaluation(path, sha256, which) or ()
    return tuple(metrics)
