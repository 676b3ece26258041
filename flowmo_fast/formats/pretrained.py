"""FlowMo models by name, folder or Hugging Face repository, and saved for sharing.

`from_pretrained` takes:
- "flowmo_lo" / "flowmo_hi": upstream's `flowmo_lo.pth` / `flowmo_hi.pth` in the Hugging Face repository
  ksarge/FlowMo, fetched once into the Hugging Face cache (HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE=1 uses only
  what is cached);
- a checkpoint file (upstream's or ours, `load_checkpoint`);
- a model folder of `save_pretrained` (`flowmo_fast.formats.model_folder`: model.safetensors, config.json,
  README.md), or a Hugging Face repository holding one (`user/repo`: fetched once into the same cache).
A local path wins over a name. `resolve_checkpoint` is the commands' resolver of `--ckpt` / `--resume-from-ckpt`:
checkpoint files and the published names.

`save_pretrained(model, folder)` writes the weights it is given (a module: its state dict as it is; a checkpoint
path: its EMA weights, or those `card.which` names) and a model card of what is known: from a checkpoint, its steps,
recipe, data and the metrics eval.watch / eval.rfid recorded for it (`card_facts`). `push_to_hub` uploads the
same folder as one commit.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterable, Optional, Sequence, Union

from flowmo_fast.config import PRESETS, Config, DataConfig, TrainerConfig, config_from_dict, load_config
from flowmo_fast.formats.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    checkpoint_config,
    file_sha256,
    load_checkpoint,
    model_from_state,
    model_records,
    read_checkpoint,
    select_state_dict,
)
from flowmo_fast.formats.hub import HubUpload, hub_file, hub_folder, is_hub_id, upload_folder
from flowmo_fast.formats.model_card import HISTORY, RFID_JSON, CardFacts, CardText, collect_metrics, render_card
from flowmo_fast.formats.model_folder import (
    CONFIG,
    WEIGHTS,
    is_model_folder,
    read_config_json,
    read_weights,
    write_model_folder,
)

HF_REPO = "ksarge/FlowMo"
PUBLISHED = {"flowmo_lo": "flowmo_lo.pth", "flowmo_hi": "flowmo_hi.pth"}  # name -> file in HF_REPO
PathLike = Union[str, os.PathLike]
KIND = "tokenizer"
INFERRED = "the config was inferred from the weights' shapes (an upstream checkpoint): training settings not recorded"


def not_found(path: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"checkpoint not found: {path} (give {what}, or a published checkpoint by name: "
                             f"{', '.join(PUBLISHED)})")


def resolve_checkpoint(name_or_path: PathLike) -> str:
    """The local file of a checkpoint: a published name -> its file in the Hugging Face cache (downloaded on
    first use); an existing path as it is (a file of that name wins over the published one, as in transformers)."""
    path = os.fspath(name_or_path)
    if is_model_folder(path):
        raise CheckpointError(f"{path} is a model folder of save_pretrained, not a checkpoint file: load it in Python "
                              "with flowmo_fast.from_pretrained (commands take checkpoint files)")
    if os.path.exists(path):
        return path
    if path in PUBLISHED:
        return hub_file(HF_REPO, PUBLISHED[path])
    raise not_found(path, "a checkpoint file" + (" (a Hugging Face repository of save_pretrained loads in Python, "
                                                  "with flowmo_fast.from_pretrained)" if is_hub_id(path) else ""))


def locate(name_or_path: PathLike) -> str:
    """A local checkpoint file or model folder: an existing path as it is, a published name -> its file in the
    Hugging Face cache, `user/repo` -> its snapshot folder in that cache (each downloaded on first use)."""
    path = os.fspath(name_or_path)
    if os.path.exists(path):
        return path
    if path in PUBLISHED:
        return hub_file(HF_REPO, PUBLISHED[path])
    if is_hub_id(path):
        return hub_folder(path, (CONFIG, WEIGHTS))
    raise not_found(path, "a checkpoint file, a model folder of save_pretrained, a Hugging Face repository user/repo")


def from_pretrained(
    name_or_path: PathLike, which: Optional[str] = None, device: Any = "cpu",
    overrides: Optional[Iterable[str]] = None,
):
    """A FlowMo model in eval mode on `device` (see the module docstring for what `name_or_path` may be).
    `which`: "ema" or "model" weights of a checkpoint (None: "ema"); a model folder holds one set, and None
    takes it."""
    path = locate(name_or_path)
    if os.path.isdir(path):
        return load_folder(path, which, device, overrides)
    return load_checkpoint(path, which=which or "ema", device=device, overrides=overrides)


def load_folder(folder: str, which: Optional[str] = None, device: Any = "cpu",
                overrides: Optional[Iterable[str]] = None):
    weights = read_weights(folder, KIND, which)
    return model_from_state(weights.records, folder_config(folder, overrides or ()), weights.tensors, weights.path,
                            device)


def folder_config(folder: str, overrides: Sequence[str] = ()) -> Config:
    stored = read_config_json(folder)
    try:
        config = config_from_dict(stored)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{os.path.join(folder, CONFIG)} is not a FlowMo config ({e}): is this a tokenizer's "
                              "folder? Download or copy it again, or save it again with save_pretrained") from None
    return config_from_dict(stored, overrides) if overrides else config


# ---- saving ---------------------------------------------------------------------------------------------------


def save_pretrained(model, folder: PathLike, card: Optional[CardFacts] = None) -> str:
    """Write `folder` (model.safetensors, config.json, README.md; see the module docstring) and return it.
    `model`: a FlowMo (its weights as they are, float32) or a checkpoint file / published name (its EMA weights,
    or `card.which`'s; the card then defaults to `card_facts` of it)."""
    model, card = sharable(model, card)
    write_folder(model, os.fspath(folder), card, os.fspath(folder))
    return os.fspath(folder)


def push_to_hub(model, repo_id: str, card: Optional[CardFacts] = None, upload: HubUpload = HubUpload()) -> str:
    """`save_pretrained` into a temporary folder, uploaded as one commit to the Hub's `repo_id` (created if
    missing); returns the commit's URL. Needs a login (`hf auth login`) or `upload.token`."""
    model, card = sharable(model, card)
    with tempfile.TemporaryDirectory(prefix="flowmo-push-") as staged:
        write_folder(model, staged, card, repo_id)
        return upload_folder(staged, repo_id, upload)


def sharable(model, card: Optional[CardFacts]):
    """(FlowMo module, card facts) of what save_pretrained was given."""
    if isinstance(model, (str, os.PathLike)):
        path = resolve_checkpoint(model)
        ckpt = read_checkpoint(path)  # once, for the card and the weights
        card = card if card is not None else checkpoint_facts(ckpt, path)
        state_dict = select_state_dict(ckpt, card.which or "ema", path)
        return model_from_state(ckpt, checkpoint_config(ckpt, state_dict), state_dict, path, "cpu"), card
    return model, card if card is not None else CardFacts()


def write_folder(model, folder: str, card: CardFacts, name: str) -> None:
    text = tokenizer_card_text(model, name)
    files = [(WEIGHTS, "the state dict in float32, keys as in upstream's flowmo_lo.pth (encoder.*, decoder.*)"),
             (CONFIG, "the whole flowmo-fast config (`Config.to_dict()`)")]
    write_model_folder(folder, model.state_dict(), KIND, card.which, model_records(model.config),
                       model.config.to_dict(), render_card(text, card, files))


# ---- the card -------------------------------------------------------------------------------------------------


def card_facts(checkpoint: PathLike, which: str = "ema", evaluations: Sequence[PathLike] = ()) -> CardFacts:
    """What a training checkpoint says of its `which` weights: steps, sha256, recipe, data, and the metrics of
    `evaluations` (eval.watch's history.jsonl, eval.rfid's metrics.json: each must have measured this file) and of
    those found beside it: RUN/eval/history.jsonl, metrics.json in its folder, eval_results/<name>/metrics.json."""
    path = resolve_checkpoint(checkpoint)
    return checkpoint_facts(read_checkpoint(path), path, which, evaluations)


def checkpoint_facts(ckpt: dict, path: str, which: str = "ema", evaluations: Sequence[PathLike] = ()) -> CardFacts:
    """`card_facts` of a checkpoint already read (`ckpt`, from `path`)."""
    state_dict = select_state_dict(ckpt, which, path)  # refuses weights the file lacks
    stored = isinstance(ckpt.get("config"), dict)
    config = checkpoint_config(ckpt, state_dict) if stored else None  # inferred ones are not described
    folder = os.path.dirname(os.path.abspath(path))
    run = os.path.dirname(folder)
    found = [os.path.join(folder, RFID_JSON),
             os.path.join("eval_results", os.path.splitext(os.path.basename(path))[0], RFID_JSON)]
    if os.path.basename(folder) in (CHECKPOINT_DIR, "eval"):  # a run's checkpoint, or eval.watch's best.pth
        found.append(os.path.join(run, "eval", HISTORY))
    sha256 = file_sha256(path)
    steps = ckpt.get("total_steps")
    return CardFacts(
        which=which, total_steps=int(steps) if steps is not None else None, checkpoint=os.path.basename(path),
        sha256=sha256, data=describe_data(config.data) if stored else None,
        recipe=recipe_lines(config, ckpt.get("world_size")) if stored else (INFERRED,),
        metrics=collect_metrics([os.fspath(e) for e in evaluations], found, sha256, which),
    )


def describe_data(data: DataConfig) -> str:
    if data.data_dir:
        return f"`data.data_dir={data.data_dir}`"
    return (f"ImageNet train, `{data.imagenet_train_tar}` (or the bundled sample photos, where that file was absent at "
            f"its default path); {data.image_size} px crops")


def matching_preset(config: Config) -> Optional[str]:
    """The preset whose model section (the architecture and its objective) this config has, if any."""
    return next((name for name in PRESETS if load_config(preset=name).model == config.model), None)


def recipe_lines(config: Config, world_size: Optional[int]) -> tuple[str, ...]:
    o, t, m = config.opt, config.trainer, config.model
    preset = matching_preset(config)
    per_step = f" x {world_size} processes" if world_size else ""
    return (
        f"preset: `{preset}` (its model section)" if preset else "preset: none (a model section of its own)",
        f"batch: {config.data.batch_size} images per process x opt.n_grad_acc={o.n_grad_acc}{per_step}",
        f"optimizer: AdamW, lr {o.lr:g}, betas ({o.beta1:g}, {o.beta2:g}), weight decay {o.weight_decay:g}; "
        f"warm-up {o.warmup_steps} steps, decay {o.lr_decay}; "
        + (f"trainer.max_steps={t.max_steps}" if t.max_steps != TrainerConfig.max_steps else "no trainer.max_steps"),
        f"objective: rectified flow (time schedule {o.schedule}), LPIPS weight {o.lpips_weight:g}, "
        + ("post-training through the sampler" if m.posttrain_sample else "pre-training"),
        f"EMA decay {m.ema_decay:g}; bf16 autocast {'on' if t.enable_bfloat16 else 'off'}",
    )


def tokenizer_card_text(model, name: str) -> CardText:
    c = model.config
    m, size = c.model, c.data.image_size
    params = sum(t.numel() for t in model.state_dict().values()) / 1e6  # the LLM of the LLM type is not saved
    lfq = m.quantization_type == "lfq"
    code = (f"{m.code_length} tokens of {m.context_dim} bits ({m.code_length * m.context_dim / size**2:.3g} bits per "
            f"pixel): {m.token_ids_per_image} token ids of "
            f"{m.codebook_size_for_entropy} bits per image" if lfq else
            f"a continuous code of {m.code_length} x {m.context_dim} (`{m.quantization_type}`)")
    summary = (f"A FlowMo image tokenizer ([Flow to the Mode](https://arxiv.org/abs/2503.11056)), a diffusion "
               f"autoencoder: {size}x{size} images to {code}; a transformer decoder samples the image back by "
               f"rectified flow. Encoder {m.enc_depth} blocks, decoder {m.dec_depth} blocks, patch {m.patch_size}; "
               f"{params:.1f}M parameters.")
    usage = f'import flowmo_fast\n\nmodel = flowmo_fast.from_pretrained("{name}")\n'
    if lfq:
        usage += ('tokenizer = flowmo_fast.Tokenizer(model)\nids = tokenizer.encode("photo.jpg")  # [1, n_tokens]\n'
                  "images = tokenizer.decode(ids)  # [1, 3, S, S] in [-1, 1]\n")
    else:
        usage += "code = model.encode(images)  # images [B, 3, S, S] in [-1, 1]\n"
    tags = ("image-tokenizer", "flowmo", "diffusion-autoencoder", "lfq" if lfq else m.quantization_type.split("_")[0])
    return CardText(f"FlowMo tokenizer: {os.path.basename(name.rstrip('/')) or name}", summary, usage, tags)
