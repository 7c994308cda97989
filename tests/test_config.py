import dataclasses
import math
import typing
from pathlib import Path

import pytest

from lmlab.config import (PRESET_POS_EMB, PRESETS, BaseModelConfig, ClassifyConfig, ClassifyDataConfig, DataConfig,
                          LoraConfig, ModelConfig, RunConfig, ServeConfig, SftConfig, SftDataConfig, TrainConfig,
                          describe_config, from_dict, load_config, save_config)
from lmlab.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SECTIONS = [ModelConfig, DataConfig, TrainConfig, LoraConfig, BaseModelConfig, ClassifyDataConfig, SftDataConfig,
            ServeConfig]


def refused(overrides, cls=RunConfig) -> str:
    """The message of the ConfigError that load_config raises for ``overrides``, checked to be one line."""
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, cls)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 3\ntrain:\n  lr: 0.01\n  min_lr: 1e-4\n")
    cfg = load_config(path, ["model.d_model=64", "train.lr=3e-4", "train.max_minutes=null", "train.compile=true"])
    assert cfg.model.n_layer == 3 and cfg.model.d_model == 64
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.max_minutes is None and cfg.train.compile is True
    assert cfg.train.min_lr == pytest.approx(1e-4)  # PyYAML reads 1e-4 (no dot) as a string
    path.write_text("model:\n  n_layer: 3\ntrain:\n  lr: 0.01\nmodel:\n  n_layer: 4\n")  # PyYAML would keep the last
    with pytest.raises(ConfigError, match=r"'model' is given twice in one mapping \(line 5\)"):
        load_config(path)
    path.write_text("train:\n  lr: 0.01\n  lr: 0.02\n")
    with pytest.raises(ConfigError, match="'lr' is given twice"):
        load_config(path)


def test_int_widens_to_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    assert isinstance(load_config(None, ["train.lr=1"]).train.lr, float)


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(None, ["model.n_head=8", "data.path=x"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("cls", [RunConfig, ClassifyConfig, SftConfig])
def test_saved_defaults_load_for_every_command(cls, tmp_path):
    save_config(cls(), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", cls=cls) == cls()


@pytest.mark.parametrize("override, message", [
    ("model.n_layers=3", "unknown config key 'model.n_layers' (did you mean 'model.n_layer'?)"),
    ("train.lr=abc", "train.lr expects float, got 'abc'"),
    ("model.n_layer=2.5", "model.n_layer expects int"),
    ("model.n_layer='3'", "model.n_layer expects int, got '3'"),
    ("model.n_layer=true", "model.n_layer expects int, got True"),
    ("train.lr=true", "train.lr expects float, got True"),
    ("train.compile=maybe", "train.compile expects bool"),
    ("train.compile=1", "train.compile expects bool"),
    ("data.path=3", "data.path expects str"),
    ("train.threads=x", "train.threads expects int or null"),
    ("nonsense", "must look like section.key=value"),
    ("bogus.key=1", "unknown config key 'bogus'"),
    ("model=3", "model must be a mapping"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    assert message in refused([override])


@pytest.mark.parametrize("override, message", [
    ("train.lr_schedule=cosin",
     "train.lr_schedule 'cosin' is not one of cosine, linear, constant, step (did you mean 'cosine'?)"),
    ("train.precision=bf61", "train.precision 'bf61' is not one of auto, fp32, bf16, fp16 (did you mean 'bf16'?)"),
    ("train.optimizer=adam", "(did you mean 'adamw'?)"),
    ("train.batching=sequentail", "(did you mean 'sequential'?)"),
    ("train.device=cdua", "train.device 'cdua' is not one of auto, cpu, cuda, cuda:N, mps (did you mean 'cuda'?)"),
    ("model.family=lstn", "model.family 'lstn' is not one of gpt, rnn, lstm, gru, encoder, seq2seq, rnn_seq2seq, "
                          "word2vec (did you mean 'lstm'?)"),
    ("model.preset=lama", "(did you mean 'llama'?)"),
    ("model.pos_emb=rotary", "model.pos_emb 'rotary' is not one of learned, rope, null"),
    ("model.norm=rms_norm", "(did you mean 'rmsnorm'?)"),
    ("model.mlp=swiglue", "(did you mean 'swiglu'?)"),
    ("model.rope_scaling=llama", "(did you mean 'llama3'?)"),
])
def test_a_choice_outside_its_choices_lists_them_and_suggests_the_nearest(override, message):
    assert message in refused([override])


@pytest.mark.parametrize("override", [
    # enumerated fields with a typo
    "model.family=gtp", "model.preset=gpt3", "model.pos_emb=rotary", "model.norm=batchnorm", "model.mlp=relu",
    "model.rope_scaling=ntk", "train.lr_schedule=cosin", "train.precision=fp8", "train.optimizer=lion",
    "train.batching=shuffle", "train.device=gpu", "train.device=cuda:x",
    # ranges
    "train.batch_size=0", "train.grad_accum=0", "train.max_steps=0", "train.eval_interval=0", "train.eval_batches=0",
    "train.eval_batch_size=0", "train.log_interval=0", "train.checkpoint_interval=0", "train.keep_checkpoints=-1",
    "train.warmup_steps=-1", "train.lr=0", "train.lr=-1", "train.min_lr=-0.1", "train.beta1=1", "train.beta2=2",
    "train.beta2=-0.1", "train.eps=0", "train.grad_clip=-1", "train.ema_decay=1", "train.ema_decay=-0.5",
    "train.weight_decay=-0.1", "train.momentum=1", "train.lr_decay=0", "train.lr_decay=1.5", "train.lr_decay_every=0",
    "train.lr_decay_start=-1", "train.epochs=0", "train.epochs=-1", "train.max_minutes=0", "train.threads=0",
    "train.seed=-1", "train.out_dir=''",
    "model.block_size=0", "model.n_layer=0", "model.d_model=0", "model.n_head=0", "model.n_kv_head=0",
    "model.d_ff=0", "model.vocab_size=0", "model.dropout=1", "model.dropout=-0.1", "model.norm_eps=0",
    "model.init_std=0", "model.rope_theta=0", "data.train_split=''",
    # NaN and infinity, however written
    "train.lr=nan", "train.lr=.nan", "train.lr=inf", "train.lr=.inf", "train.lr=-.inf", "train.lr=1e999",
    "train.grad_clip=nan", "train.epochs=inf", "model.dropout=nan",
])
def test_bad_values_are_refused_naming_the_key(override):
    key, value = override.split("=", 1)
    message = refused([override])
    assert message.startswith(key + " "), message


@pytest.mark.parametrize("override, cls", [
    ("lora.r=-1", ClassifyConfig), ("lora.alpha=0", ClassifyConfig), ("lora.dropout=1", ClassifyConfig),
    ("lora.targets=''", ClassifyConfig), ("model.pooling=max", ClassifyConfig), ("model.dropout=1", ClassifyConfig),
    ("model.head_lr=0", ClassifyConfig), ("model.layer_lr_decay=0", ClassifyConfig), ("model.rdrop=-1", ClassifyConfig),
    ("data.max_length=0", ClassifyConfig), ("data.text_field=''", ClassifyConfig),
    ("data.val_fraction=0", SftConfig), ("data.val_fraction=1", SftConfig), ("data.max_examples=0", SftConfig),
    ("train.lr=nan", SftConfig),
])
def test_bad_finetune_values_are_refused_naming_the_key(override, cls):
    key = override.split("=", 1)[0]
    assert refused([override], cls).startswith(key + " ")


def test_range_messages_say_the_range():
    assert refused(["train.batch_size=0"]) == "train.batch_size must be >= 1, got 0"
    assert refused(["train.beta2=2"]) == "train.beta2 must be in [0, 1), got 2"
    assert refused(["train.lr=-1"]) == "train.lr must be > 0, got -1"
    assert refused(["train.lr=nan"]) == "train.lr must be a finite number, got nan"


def fields_of(*kinds):
    """(class, field name) of every scalar field whose base type is one of ``kinds``."""
    out = []
    for cls in SECTIONS:
        for name, ftype in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(ftype) or (ftype,) if a is not type(None)]
            if any(a in kinds for a in args):
                out.append((cls, name))
    return out


@pytest.mark.parametrize("cls, name", fields_of(float), ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf"])
def test_every_float_refuses_nan_and_infinity(cls, name, value):
    with pytest.raises(ConfigError, match=f"^x.{name} must be a finite number"):
        from_dict(cls, {name: value}, "x.")


@pytest.mark.parametrize("cls, name", fields_of(int), ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("value", [True, "1", 1.0])
def test_every_int_refuses_bools_strings_and_floats(cls, name, value):
    with pytest.raises(ConfigError, match=f"^x.{name} expects int"):
        from_dict(cls, {name: value}, "x.")


@pytest.mark.parametrize("cls, name", fields_of(bool), ids=lambda x: getattr(x, "__name__", x))
def test_every_bool_refuses_ints_and_strings(cls, name):
    for value in (1, "yes"):
        with pytest.raises(ConfigError, match=f"^x.{name} expects bool"):
            from_dict(cls, {name: value}, "x.")


@pytest.mark.parametrize("overrides, message", [
    (["model.d_model=130"], "model.d_model 130 is not divisible by model.n_head 4"),
    (["model.n_kv_head=3"], "model.n_head 4 is not divisible by model.n_kv_head 3"),
    (["model.n_kv_head=8"], "model.n_head 4 is not divisible by model.n_kv_head 8"),
    (["model.preset=llama", "model.n_head=4", "model.d_model=12"], "model.pos_emb rope needs an even head size"),
    (["model.pos_emb=rope", "model.n_head=2", "model.d_model=6"], "model.pos_emb rope needs an even head size"),
    (["model.rope_scaling=linear"], "model.rope_scaling needs rotary positions"),
    (["model.preset=llama", "model.pos_emb=learned", "model.rope_scaling=linear"], "model.rope_scaling needs rotary"),
    (["model.rope_theta=500000"], "model.rope_theta needs rotary positions"),
    (["model.preset=llama", "model.rope_scaling=llama3", "model.rope_high_freq_factor=0.5"],
     "model.rope_high_freq_factor must be above model.rope_low_freq_factor"),
    (["model.preset=bert"], "model.preset 'bert' is not a gpt preset; choose gpt2 or llama"),
    (["model.family=lstm", "model.tie_embeddings=true", "model.d_ff=64"], "model.tie_embeddings needs model.d_ff (64)"),
    (["mlm.mask_prob=0.2"], "mlm.mask_prob applies to masked-LM pretraining (model.family encoder) only, not gpt"),
    (["model.family=lstm", "mlm.whole_word=true"], "mlm.whole_word applies to masked-LM pretraining"),
    (["train.min_lr=0.01"], "train.min_lr 0.01 is above train.lr 0.001"),
    (["train.warmup_steps=2000"], "train.warmup_steps 2000 must be less than train.max_steps 2000"),
    (["train.max_steps=50"], "train.warmup_steps 100 must be less than train.max_steps 50"),
    (["model.family=lstm", "train.carry_state=true"],
     "train.carry_state needs train.batching=sequential and train.grad_accum=1"),
    (["model.family=lstm", "train.carry_state=true", "train.batching=sequential", "train.grad_accum=2"],
     "train.carry_state needs train.batching=sequential and train.grad_accum=1"),
    (["train.carry_state=true", "train.batching=sequential"], "train.carry_state needs a model that carries a state"),
])
def test_cross_field_rules(overrides, message):
    assert message in refused(overrides)


@pytest.mark.parametrize("overrides", [
    ["model.preset=llama", "model.n_head=6", "model.n_kv_head=2", "model.d_model=192", "model.rope_scaling=llama3"],
    ["model.pos_emb=rope", "model.rope_theta=500000"],
    ["model.family=lstm", "model.tie_embeddings=true"],
    ["model.family=gru", "model.tie_embeddings=true", "model.d_ff=128"],
    ["model.family=rnn", "model.d_model=650"],  # 650 is not divisible by the (unused) default n_head
    ["train.epochs=1", "train.max_steps=10"],  # epochs decide the step count: the warmup is not compared
    ["train.min_lr=0.001", "train.lr_schedule=linear"],
    ["model.family=lstm", "train.carry_state=true", "train.batching=sequential", "model.reset_token=-1"],
])
def test_valid_combinations_load(overrides):
    load_config(None, overrides)


@pytest.mark.parametrize("overrides, field, families", [
    (["model.init_range=0.1"], "model.init_range", "rnn, lstm, gru, rnn_seq2seq"),
    (["model.reset_token=0"], "model.reset_token", "rnn, lstm, gru"),
    (["model.type_vocab_size=2"], "model.type_vocab_size", "encoder"),
    (["model.family=lstm", "model.n_head=8"], "model.n_head", "gpt, encoder, seq2seq"),
    (["model.family=lstm", "model.n_kv_head=2"], "model.n_kv_head", "gpt, encoder, seq2seq"),
    (["model.family=gru", "model.preset=llama"], "model.preset", "gpt, encoder, seq2seq"),
    (["model.family=rnn", "model.pos_emb=rope"], "model.pos_emb", "gpt, encoder, seq2seq"),
    (["model.family=rnn", "model.rope_theta=500000"], "model.rope_theta", "gpt, encoder, seq2seq"),
    (["model.pre_norm=true"], "model.pre_norm", "encoder"),
    (["model.family=lstm", "model.rope_scaling=linear"], "model.rope_scaling", "gpt"),
    (["model.family=lstm", "model.norm_eps=1e-6"], "model.norm_eps", "gpt, encoder, seq2seq"),
    (["model.family=lstm", "model.type_vocab_size=2"], "model.type_vocab_size", "encoder"),
])
def test_a_model_field_set_for_another_family_is_an_error(overrides, field, families):
    family = dict(o.split("=") for o in overrides).get("model.family", "gpt")
    assert refused(overrides) == f"{field} applies to model.family {families} only, not {family}"


@pytest.mark.parametrize("overrides", [
    ["model.init_range=null", "model.reset_token=null", "model.type_vocab_size=null"],  # None is not set
    ["model.family=lstm", "model.n_head=4", "model.rope_theta=10000", "model.norm_eps=1e-5"],  # nor are defaults
    ["model.family=lstm", "model.init_range=0.05", "model.reset_token=0"],
])
def test_unset_or_default_fields_of_other_families_are_fine(overrides):
    load_config(None, overrides)


def test_classify_only_fields_are_refused_by_sft():
    assert refused(["model.pooling=mean"], SftConfig) == "model.pooling applies to lmlab finetune classify only"
    assert "model.head_lr" in refused(["model.head_lr=0.01"], SftConfig)
    assert load_config(None, ["model.pooling=mean", "model.head_lr=0.01"], ClassifyConfig).model.pooling == "mean"


def saved_model_configs():
    """Model configs as checkpoints of earlier versions hold them: every field, presets resolved, and the
    trainer's reset_token recorded whatever the family."""
    from lmlab.models.registry import build_model

    configs = {"defaults": dataclasses.asdict(ModelConfig())}
    for name, cfg in {
        "gpt2": ModelConfig(preset="gpt2", n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=20, reset_token=0),
        "llama": ModelConfig(preset="llama", n_layer=1, n_head=4, n_kv_head=2, d_model=32, block_size=8, vocab_size=20,
                             rope_scaling="llama3", rope_factor=8.0, rope_original_context=4, reset_token=0),
        "lstm": ModelConfig(family="lstm", n_layer=1, d_model=650, block_size=8, vocab_size=20, reset_token=0),
        "encoder": ModelConfig(family="encoder", n_layer=1, n_head=2, d_model=16, block_size=8, vocab_size=20),
    }.items():
        configs[name] = dataclasses.asdict(build_model(cfg).config)
    return configs


@pytest.mark.parametrize("name", ["defaults", "gpt2", "llama", "lstm", "encoder"])
def test_saved_full_model_configs_still_load(name):
    saved = saved_model_configs()[name]
    assert dataclasses.asdict(from_dict(ModelConfig, saved, "model.")) == saved


def test_a_saved_full_model_section_loads_as_a_user_config(tmp_path):
    import yaml

    model = dataclasses.asdict(ModelConfig(family="lstm", d_model=650, d_ff=650, tie_embeddings=False, init_range=0.05))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": model}))
    assert load_config(tmp_path / "c.yaml").model.init_range == 0.05


def recipe_class(path: Path) -> type:
    return ClassifyConfig if path.name.startswith("sst2") else SftConfig if "sft" in path.name else RunConfig


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(path):
    cfg = load_config(path, cls=recipe_class(path))
    assert isinstance(cfg, recipe_class(path))


def test_serve_config_limits():
    assert from_dict(ServeConfig, {"port": 8080}).port == 8080
    for bad, key in [({"port": 0}, "port"), ({"port": 65536}, "port"), ({"max_queue": 0}, "max_queue"),
                     ({"request_timeout": 0}, "request_timeout"), ({"max_prompt_tokens": 0}, "max_prompt_tokens"),
                     ({"default_max_tokens": 2048}, "default_max_tokens")]:
        with pytest.raises(ConfigError, match=f"^{key} "):
            from_dict(ServeConfig, bad)


def test_describe_config_lists_defaults_types_choices_ranges_and_families():
    text = describe_config()
    assert "  train.lr_schedule = 'cosine'  (cosine | linear | constant | step)" in text
    assert "  train.batch_size = 12  (int >= 1)" in text
    assert "  train.beta2 = 0.99  (float in [0, 1))" in text
    assert "  train.eval_batch_size = None  (int >= 1 or null)" in text
    assert "  train.threads = None  (int in [1, 4096] or null)" in text
    assert "  train.device = 'auto'  (auto | cpu | cuda | cuda:N | mps)" in text
    assert "    train.dp.accountant = 'prv'  (prv | rdp)" in text
    assert "  model.pos_emb = None  (learned | rope | null; gpt, encoder, seq2seq only)" in text
    assert "  model.init_range = None  (float > 0 or null; rnn, lstm, gru, rnn_seq2seq only)" in text
    assert "  model.family = 'gpt'  (gpt | rnn | lstm | gru | encoder | seq2seq | rnn_seq2seq | word2vec)" in text
    assert "model.pooling = None  (cls | mean | last | null; classify only)" in describe_config(SftConfig)
    assert "data.val_fraction = 0.02  (float in (0, 1))" in describe_config(SftConfig)
    for cls in (RunConfig, ClassifyConfig, SftConfig):
        lines = describe_config(cls).splitlines()
        sections = typing.get_type_hints(cls)
        assert sum(" = " in line for line in lines) == sum(_leaf_fields(t) for t in sections.values())


def _leaf_fields(cls) -> int:
    """The fields of a config section, those of its own sections (train.dp) counted one by one."""
    hints = typing.get_type_hints(cls)
    return sum(_leaf_fields(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else 1
               for f in dataclasses.fields(cls))


def test_presets_agree_with_the_models():
    from lmlab.models import encoder, gpt, seq2seq

    assert set(PRESETS["gpt"]) == set(gpt.PRESETS) and set(PRESETS["encoder"]) == set(encoder.PRESETS)
    assert set(PRESETS["seq2seq"]) == set(seq2seq.PRESETS) and PRESETS["seq2seq"][0] == "gpt2"
    assert PRESETS["gpt"][0] == "gpt2"  # gpt's resolve_config default
    for presets in (gpt.PRESETS, encoder.PRESETS):
        assert all(PRESET_POS_EMB[name] == fields["pos_emb"] for name, fields in presets.items())


def test_the_cli_prints_config_errors_as_one_line(tmp_path, capsys):
    from lmlab.cli import main

    (tmp_path / "c.yaml").write_text("train:\n  lr_schedule: cosin\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("error: train.lr_schedule 'cosin' is not one of cosine, linear, constant, step "
                           "(did you mean 'cosine'?)")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_defaults_are_a_runconfig():
    assert isinstance(load_config(None), RunConfig)
