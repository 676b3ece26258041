"""Token generators by file, run, model folder or Hugging Face repository, and saved for sharing: the generator's
side of `flowmo_fast.formats.pretrained`, in the same model folder (`flowmo_fast.formats.model_folder`).

`from_pretrained` takes a checkpoint of train.generator, its run folder (the newest checkpoint), a model folder of
`save_pretrained`, or a Hugging Face repository holding one (`user/repo`, fetched once into the Hugging Face
cache; HF_HUB_OFFLINE=1 reads only the cache). A local path wins over a repository of the same name.

The folder's config.json is {"model": GeneratorConfig, "tokens": the token record of its checkpoint (the
tokenizer that made the training tokens, its config, the token layout, the class names)}: all that sampling and
decoding need. Its weights are the ones `save_pretrained` is given: a `LoadedGenerator`'s as they are, or a
checkpoint's EMA weights (`card.which`'s when given).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional, Sequence, Union

from flowmo_fast.formats.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    file_sha256,
    list_checkpoints,
    read_checkpoint,
)
from flowmo_fast.formats.hub import HubUpload, hub_folder, is_hub_id, upload_folder
from flowmo_fast.formats.model_card import CardFacts, CardText, collect_metrics, render_card
from flowmo_fast.formats.model_folder import (
    CONFIG,
    WEIGHTS,
    is_model_folder,
    read_config_json,
    read_weights,
    write_model_folder,
)
from flowmo_fast.maskgit.model import (
    LoadedGenerator,
    generator_from_checkpoint,
    generator_from_state,
    generator_records,
    load_generator,
)

KIND = "generator"
STEPS = "total_steps"  # the folder's record of the training steps (safetensors metadata)
PathLike = Union[str, os.PathLike]


def locate_generator(name_or_path: PathLike) -> str:
    """A local checkpoint file or model folder: a file or model folder as it is; a run folder (or its
    checkpoints folder): its newest checkpoint; `user/repo`: its snapshot folder in the Hugging Face cache."""
    path = os.fspath(name_or_path)
    if os.path.isfile(path) or is_model_folder(path):
        return path
    if os.path.isdir(path):
        base = os.path.basename(path.rstrip(os.sep))
        found = list_checkpoints(os.path.dirname(path.rstrip(os.sep)) if base == CHECKPOINT_DIR else path)
        if not found:
            raise FileNotFoundError(f"{path} is a folder without checkpoints/<step>.pth or {WEIGHTS}: give a generator "
                                    "checkpoint file, its run folder, or a model folder of save_pretrained")
        return found[-1]
    if is_hub_id(path):
        return hub_folder(path, (CONFIG, WEIGHTS))
    raise FileNotFoundError(f"generator not found: {path} (give a checkpoint of train.generator, its run folder, a "
                            "model folder of save_pretrained, or a Hugging Face repository user/repo)")


def weights_file(name_or_path: PathLike) -> str:
    """The file whose sha256 names a generator (what eval.generate records): a checkpoint, or a folder's weights."""
    path = locate_generator(name_or_path)
    return os.path.join(path, WEIGHTS) if os.path.isdir(path) else path


def from_pretrained(name_or_path: PathLike, which: Optional[str] = None, device: Any = "cpu") -> LoadedGenerator:
    """The generator in eval mode on `device`, with its token record (see the module docstring for what
    `name_or_path` may be). `which`: "ema" or "model" weights of a checkpoint (None: "ema"); a model folder holds
    one set, and None takes it."""
    path = locate_generator(name_or_path)
    if os.path.isdir(path):
        return load_folder(path, which, device)
    return load_generator(path, which or "ema", device)


def load_folder(folder: str, which: Optional[str] = None, device: Any = "cpu") -> LoadedGenerator:
    weights = read_weights(folder, KIND, which)
    stored, path = read_config_json(folder), os.path.join(folder, CONFIG)
    config, source = generator_records(stored.get("model"), stored.get("tokens"), path, f"{path} is not a token "
                                       "generator's config (no model.groups and tokens record): is this a generator's "
                                       "folder? Download or copy it again, or save it again with save_pretrained")
    model = generator_from_state(config, weights.tensors, weights.path, device)
    return LoadedGenerator(model, source, int(weights.records.get(STEPS, 0)), weights.path)


# ---- saving ---------------------------------------------------------------------------------------------------


def save_pretrained(model: Union[LoadedGenerator, PathLike], folder: PathLike,
                    card: Optional[CardFacts] = None) -> str:
    """Write `folder` (model.safetensors, config.json, README.md) and return it. `model`: a LoadedGenerator
    (its weights as they are, float32) or a checkpoint / run folder (its EMA weights, or `card.which`'s; the card
    then defaults to `card_facts` of it)."""
    loaded, card = sharable(model, card)
    write_folder(loaded, os.fspath(folder), card, os.fspath(folder))
    return os.fspath(folder)


def push_to_hub(model: Union[LoadedGenerator, PathLike], repo_id: str, card: Optional[CardFacts] = None,
                upload: HubUpload = HubUpload()) -> str:
    """`save_pretrained` into a temporary folder, uploaded as one commit to the Hub's `repo_id` (created if
    missing); returns the commit's URL. Needs a login (`hf auth login`) or `upload.token`."""
    loaded, card = sharable(model, card)
    with tempfile.TemporaryDirectory(prefix="flowmo-push-") as staged:
        write_folder(loaded, staged, card, repo_id)
        return upload_folder(staged, repo_id, upload)


def sharable(model: Union[LoadedGenerator, PathLike], card: Optional[CardFacts]):
    """(LoadedGenerator, card facts) of what save_pretrained was given (a model folder's card: its steps)."""
    loaded = model
    if isinstance(model, (str, os.PathLike)):
        path = locate_generator(model)
        if os.path.isdir(path):
            loaded = from_pretrained(path, card.which if card is not None else None)
        else:  # a checkpoint, read once for its card and its weights
            ckpt = read_checkpoint(path)
            card = card if card is not None else checkpoint_facts(ckpt, path)
            loaded = generator_from_checkpoint(ckpt, path, card.which or "ema")
    return loaded, card if card is not None else CardFacts(total_steps=loaded.total_steps or None)


def write_folder(loaded: LoadedGenerator, folder: str, card: CardFacts, name: str) -> None:
    files = [(WEIGHTS, "the TokenGenerator state dict in float32"),
             (CONFIG, '{"model": the GeneratorConfig, "tokens": its tokenizer, that tokenizer\'s config, the token '
                      "layout, the class names}")]
    config = {"model": loaded.model.config.to_dict(), "tokens": loaded.source.to_record()}
    write_model_folder(folder, loaded.model.state_dict(), KIND, card.which, {STEPS: loaded.total_steps},
                       config, render_card(generator_card_text(loaded, name), card, files))


# ---- the card -------------------------------------------------------------------------------------------------


def card_facts(checkpoint: PathLike, which: str = "ema", evaluations: Sequence[PathLike] = ()) -> CardFacts:
    """What a generator checkpoint (or its run folder) says of its `which` weights: steps, sha256, recipe, the
    tokens it learned, and the metrics of `evaluations` (eval.gfid's gfid.json of samples it made)."""
    path = locate_generator(checkpoint)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a model folder: card facts come from the training checkpoint it was saved "
                              "from (give that checkpoint, or CardFacts of your own)")
    return checkpoint_facts(read_checkpoint(path), path, which, evaluations)


def checkpoint_facts(ckpt: dict, path: str, which: str = "ema", evaluations: Sequence[PathLike] = ()) -> CardFacts:
    """`card_facts` of a checkpoint already read (`ckpt`, from `path`)."""
    sha256 = file_sha256(path)
    steps = ckpt.get("total_steps")
    return CardFacts(
        which=which, total_steps=int(steps) if steps is not None else None, checkpoint=os.path.basename(path),
        sha256=sha256, data=describe_tokens(ckpt.get("tokens") or {}), recipe=recipe_lines(ckpt),
        metrics=collect_metrics([os.fspath(e) for e in evaluations], (), sha256, which),
    )


def describe_tokens(tokens: dict) -> Optional[str]:
    made_by = tokens.get("checkpoint") or {}
    if not made_by:
        return None
    names = tokens.get("class_names")
    classes = f"{len(names)} classes" if names else "no classes (unconditional)"
    return (f"token shards of the tokenizer `{os.path.basename(str(made_by.get('path', '?')))}` (sha256 "
            f"`{str(made_by.get('sha256', '?'))[:16]}...`, its {made_by.get('which', '?')} weights); {classes}")


def recipe_lines(ckpt: dict) -> tuple[str, ...]:
    sections = ckpt.get("config") or {}
    data, opt, trainer = (sections.get(k) or {} for k in ("data", "opt", "trainer"))
    if not opt:
        return ()
    world = f" x {ckpt['world_size']} processes" if ckpt.get("world_size") else ""
    return (
        f"batch: {data.get('batch_size', '?')} rows per process x opt.n_grad_acc={opt.get('n_grad_acc', '?')}{world}",
        f"optimizer: AdamW, lr {opt.get('lr')}, betas ({opt.get('beta1')}, {opt.get('beta2')}), weight decay "
        f"{opt.get('weight_decay')}; warm-up {opt.get('warmup_steps')} steps, decay {opt.get('lr_decay')}; "
        f"trainer.max_steps={trainer.get('max_steps')}",
        f"EMA decay {trainer.get('ema_decay')}; bf16 autocast {'on' if trainer.get('enable_bfloat16') else 'off'}",
    )


def tokenizer_hint(loaded: LoadedGenerator) -> str:
    """What to pass as --tokenizer: the published name when the tokens came from one, else a placeholder."""
    stem = os.path.splitext(os.path.basename(str(loaded.source.checkpoint.get("path", ""))))[0]
    return stem if stem in ("flowmo_lo", "flowmo_hi") else "TOKENIZER_CKPT"


def generator_card_text(loaded: LoadedGenerator, name: str) -> CardText:
    c = loaded.model.config
    params = sum(t.numel() for t in loaded.model.state_dict().values()) / 1e6
    conditioning = f"class-conditional ({c.num_classes} classes)" if c.num_classes else "unconditional"
    made_by = loaded.source.checkpoint
    tokenizer = f"`{os.path.basename(str(made_by.get('path', '?')))}` (sha256 `{str(made_by.get('sha256', '?'))[:16]}`)"
    summary = (f"A {conditioning} token generator of the MaskGiT family (a bidirectional transformer, iterative "
               f"parallel decoding) over FlowMo LFQ tokens: {c.code_length} positions x {c.groups} groups of {c.bits} "
               f"bits ({c.vocab_size}-way heads); width {c.width}, depth {c.depth}, {c.heads} heads; {params:.1f}M "
               f"parameters. Its tokens decode into images with the FlowMo tokenizer they came from: {tokenizer}.")
    usage = (f'from flowmo_fast.maskgit import from_pretrained\n\ngenerator = from_pretrained("{name}")  # .model, '
             f".source (its tokenizer, classes)\n# or, from the shell:\n# python -m eval.generate --generator {name} "
             f"--out gen/ --per-class 50 --tokenizer {tokenizer_hint(loaded)}\n")
    tags = ("maskgit", "token-generator", "image-generation", "flowmo")
    return CardText(f"FlowMo token generator: {os.path.basename(name.rstrip('/')) or name}", summary, usage, tags)
