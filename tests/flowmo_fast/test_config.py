"""Config: upstream keys and defaults, dotlist overrides, presets, and errors naming key and allowed values."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from flowmo_fast import load_config
from flowmo_fast.config import ALLOWED, UPSTREAM_KEYS_REPLACED, Config, config_from_dict

ROOT = Path(__file__).resolve().parents[2]

# Every key of upstream flowmo/configs/base.yaml with its default.
UPSTREAM_BASE = {
    "global_seed": 0,
    "data.batch_size": 16, "data.eval_batch_size": 5, "data.image_size": 256, "data.num_workers": 8,
    "data.imagenet_train_index": "imagenet_train_index_overall.json",
    "data.imagenet_train_tar": "ILSVRC2012_img_train.tar",
    "data.imagenet_val_index": "imagenet_val_index_overall.json",
    "data.imagenet_val_tar": "ILSVRC2012_img_val.tar",
    "model.enable_mup": True, "model.patch_size": 4, "model.mup_width": 6, "model.enc_mup_width": 4,
    "model.fix_initial_norms": True, "model.fix_norm_mode": "l2", "model.quantization_type": "lfq",
    "model.code_length": 256, "model.context_dim": 18, "model.codebook_size_for_entropy": 9,
    "model.entropy_loss_weight": 0.0025, "model.commit_loss_weight": 0.000625, "model.enc_depth": 8,
    "model.dec_depth": 16, "model.enable_cfg": True, "model.ema_decay": 0.9999,
    "model.posttrain_sample": False, "model.posttrain_sample_enable_cfg": False, "model.posttrain_sample_k": 8,
    "opt.lr": 1.0e-4, "opt.n_grad_acc": 2, "opt.schedule": "fat_lognormal", "opt.freeze_encoder": False,
    "opt.freeze_encoder_after": 200000, "opt.weight_decay": 0.0, "opt.log_norms": True, "opt.lpips_weight": 0.1,
    "opt.lpips_mode": "vgg", "opt.beta1": 0.9, "opt.beta2": 0.95,
    "trainer.enable_bfloat16": True, "trainer.log_every": 100, "trainer.checkpoint_every": 5000,
    "trainer.max_steps": 10000000000000, "trainer.keep_every": 200000, "trainer.gs_checkpoint_bucket": "",
    "eval.reconstruction": True, "eval.state_dict_key": "model_ema_state_dict", "eval.eval_dir": "",
    "eval.eval_baseline": "", "eval.continuous": True, "eval.force_ckpt_path": None, "eval.subsample_rate": 1,
    "eval.sampling.sample_steps": 25, "eval.sampling.schedule": "pow_0.25", "eval.sampling.cfg": 1.5,
    "eval.sampling.mode": "rf", "eval.sampling.cfg_interval": "(.17,1.02)",
}


def get(config, key):
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_upstream_keys_and_defaults():
    config = load_config()
    for key, value in UPSTREAM_BASE.items():
        assert get(config, key) == value, key
        assert type(get(config, key)) is type(value), key


def test_upstream_seed_command_overrides_work_as_written():
    config = load_config(["model.context_dim=18", "model.codebook_size_for_entropy=9", "trainer.max_steps=1300000",
                          "opt.lr=5e-5", "model.enable_cfg=False"])
    assert config.trainer.max_steps == 1300000 and config.opt.lr == 5e-5 and isinstance(config.opt.lr, float)
    assert config.model.enable_cfg is False


@pytest.mark.parametrize(
    "key, value, flag",
    [
        ("continuous", False, "python -m eval.watch RUN_DIR"),
        ("eval_dir", "results/run", "python -m eval.watch RUN_DIR"),
        ("force_ckpt_path", "flowmo_lo.pth", "python -m eval.rfid --ckpt PATH"),
        ("subsample_rate", 10, "--subsample N"),
        ("state_dict_key", "model_state_dict", "--which ema|model"),
        ("reconstruction", False, "--no-lpips"),
        ("eval_baseline", "sdxl", "not part of flowmo-fast"),
        ("data.eval_batch_size", 4, "--batch-size of eval.rfid / eval.watch"),
    ],
)
def test_upstream_evaluator_keys_are_refused_naming_their_replacement(key, value, flag):
    """Upstream's evaluator keys do nothing here: a value other than the default is an error that names the
    command or flag in its place; stored in an older checkpoint's config, they are passed over."""
    key = key if "." in key else f"eval.{key}"
    with pytest.raises(ValueError, match=rf"{re.escape(key)}=.*does not read.*{re.escape(flag)}"):
        load_config([f"{key}={value}"])
    stored = load_config().to_dict()
    section, leaf = key.split(".")
    stored[section][leaf] = value
    assert config_from_dict(stored) == load_config()


def test_presets():
    assert load_config(preset="flowmo_hi").model.context_dim == 56
    assert load_config(preset="flowmo_hi").model.codebook_size_for_entropy == 14
    kl = load_config(preset="flowmo_hi_kl").model
    assert (kl.quantization_type, kl.context_dim, kl.code_length) == ("kl", 768, 128)
    tiny = load_config(preset="tiny")
    assert tiny.model.mup_width == 2 and tiny.data.image_size == 32
    # overrides apply on top of the preset
    assert load_config(["model.dec_depth=3"], preset="tiny").model.dec_depth == 3


def test_round_trip_through_dict():
    config = load_config(["model.dec_depth=3", "eval.sampling.cfg_interval=none"], preset="tiny")
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "overrides, preset, message",
    [
        (["model.contxt_dim=18"], None, r"unknown config key 'model.contxt_dim'.*context_dim"),
        (["modle.context_dim=18"], None, r"unknown config key 'modle.context_dim'.*top level.*model"),
        (["model.context_dim"], None, "section.key=value"),
        (["model.context_dim=abc"], None, r"model.context_dim='abc': expected a int"),
        (["model.quantization_type=vq"], None, "allowed: lfq, kl, noop"),
        (["model.context_dim=20"], None, r"codebook_size_for_entropy=9 must divide model.context_dim=20; allowed: \[1, 2, 4, 5, 10, 20\]"),
        (["model.mup_width=3"], None, r"model.mup_width=3: RoPE axes \(6, 21, 21\) must all be even"),
        (["data.image_size=30"], None, "data.image_size=30 is not divisible by model.patch_size=4"),
        (["eval.sampling.schedule=cosine"], None, "allowed are 'linear' and 'pow_P'"),
        (["opt.schedule=cosine"], None, "allowed: lognormal, fat_lognormal, uniform"),
        (["data.batch_size=7"], None, "opt.n_grad_acc=2"),
        ([], "huge", "unknown preset 'huge'; allowed: flowmo_lo"),
        (["trainer.gs_checkpoint_bucket=my-bucket"], None, "gs_checkpoint_bucket='my-bucket'.*uploads nothing"),
    ],
)
def test_bad_settings_raise_value_error_naming_key_and_allowed_values(overrides, preset, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides, preset=preset)


# Every config key does something: some module of the library or the commands reads it (flowmo_fast/config.py's
# own checks do not count), or UPSTREAM_KEYS_REPLACED refuses it, or ALLOWED pins it to its one value.
SOURCES = ("flowmo_fast", "train", "eval")
CONFIG_MODULE = "flowmo_fast/config.py"
# Keys read through a computed attribute name, with the code that reads them (checked to still be there).
READ_BY_COMPUTED_NAME = {
    "data.imagenet_train_tar": ("flowmo_fast/formats/data.py", 'f"imagenet_{split}_tar"'),
    "data.imagenet_val_tar": ("flowmo_fast/formats/data.py", 'f"imagenet_{split}_tar"'),
    "data.imagenet_train_index": ("flowmo_fast/formats/data.py", 'f"imagenet_{split}_index"'),
    "data.imagenet_val_index": ("flowmo_fast/formats/data.py", 'f"imagenet_{split}_index"'),
}


def config_keys(node=None, prefix: str = "") -> list[str]:
    """Every dotted key of the config dataclasses, e.g. "model.enable_mup", "eval.sampling.cfg"."""
    node = Config() if node is None else node
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        keys += config_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return keys


def attribute_reads(tree: ast.Module) -> set[str]:
    """Names a module reads as attributes (`x.name`, `getattr(x, "name")`), not counting those read from an
    imported module (`torch.compile`), `self` or argparse's `args`: a config key is read by its name."""
    skip = {"self", "args"} | {
        (alias.asname or alias.name).split(".")[0]
        for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names
    }
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            if not (isinstance(node.value, ast.Name) and node.value.id in skip):
                names.add(node.attr)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2:
            if isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                names.add(node.args[1].value)
    return names


def unread_keys(keys) -> list[str]:
    files = [p for folder in SOURCES for p in sorted((ROOT / folder).rglob("*.py")) if "__pycache__" not in p.parts]
    read = set().union(*(attribute_reads(ast.parse(p.read_text())) for p in files if p != ROOT / CONFIG_MODULE))
    pinned = {key for key, allowed in ALLOWED.items() if len(allowed) == 1}
    accounted = set(UPSTREAM_KEYS_REPLACED) | pinned | set(READ_BY_COMPUTED_NAME)
    return [key for key in keys if key not in accounted and key.rsplit(".", 1)[-1] not in read]


def test_every_config_key_is_read_or_refused():
    """A key no module reads and no table refuses would be accepted and silently ignored (as model.enable_mup
    and data.eval_batch_size were): it must be read, or refused in UPSTREAM_KEYS_REPLACED with its replacement."""
    for key, (path, code) in READ_BY_COMPUTED_NAME.items():
        assert code in (ROOT / path).read_text(), f"{key}: {path} no longer reads it as {code}"
    assert unread_keys(["model.no_such_key"]) == ["model.no_such_key"]  # the walker sees an unread key
    unread = unread_keys(config_keys())
    assert not unread, f"config keys no module reads: {unread}; use them, or refuse them in UPSTREAM_KEYS_REPLACED"
