"""load_config: DeepSpeed's keys and defaults, and a clear ConfigError for every mistake."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from fp16_triton.config import (
    IGNORED_DEEPSPEED_KEYS,
    BF16Config,
    ConfigError,
    EngineConfig,
    FP16Config,
    OptimizerConfig,
    SchedulerConfig,
    load_config,
)


def raises(message_part):
    """pytest.raises(ConfigError) matching a literal piece of the message."""
    return pytest.raises(ConfigError, match=re.escape(message_part))


# ------------------------------------------------------------------------------------- defaults


def test_defaults_are_deepspeeds():
    cfg = load_config()
    assert cfg == load_config({}) == EngineConfig()
    assert cfg.fp16 == FP16Config(
        enabled=False,
        loss_scale=0.0,
        initial_scale_power=16,
        loss_scale_window=1000,
        hysteresis=2,
        consecutive_hysteresis=False,
        min_loss_scale=1.0,
        auto_cast=False,
    )
    assert cfg.bf16 == BF16Config(enabled=False)
    assert cfg.optimizer is None and cfg.scheduler is None
    assert cfg.gradient_clipping == 0.0
    assert cfg.gradient_accumulation_steps == 1
    assert cfg.train_batch_size is None and cfg.train_micro_batch_size_per_gpu is None
    assert cfg.steps_per_print == 10
    assert cfg.dtype == torch.float32
    assert cfg.fp16.dynamic_loss_scale and cfg.fp16.initial_loss_scale == 2.0**16


def test_every_key():
    raw = {
        "fp16": {
            "enabled": True,
            "loss_scale": 128,
            "initial_scale_power": 12,
            "loss_scale_window": 500,
            "hysteresis": 3,
            "consecutive_hysteresis": True,
            "min_loss_scale": 0.25,
            "auto_cast": True,
        },
        "bf16": {"enabled": False},
        "gradient_clipping": 1,
        "gradient_accumulation_steps": 4,
        "steps_per_print": 50,
        "train_batch_size": 64,
        "train_micro_batch_size_per_gpu": 8,
        "optimizer": {
            "type": "SGD",
            "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "flat_buffers": True},
        },
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
    }
    cfg = load_config(raw, world_size=2)
    assert cfg.fp16 == FP16Config(True, 128.0, 12, 500, 3, True, 0.25, True)
    assert not cfg.fp16.dynamic_loss_scale and cfg.fp16.initial_loss_scale == 128.0
    assert cfg.dtype == torch.float16
    assert isinstance(cfg.gradient_clipping, float) and cfg.gradient_clipping == 1.0
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu) == (64, 8)
    assert (cfg.gradient_accumulation_steps, cfg.world_size, cfg.steps_per_print) == (4, 2, 50)
    assert cfg.optimizer == OptimizerConfig(
        type="SGD",
        params={
            "lr": 0.1,
            "momentum": 0.9,
            "dampening": 0.0,
            "weight_decay": 0.0,
            "nesterov": True,
            "maximize": False,
            "state_dtype": torch.float32,  # ours: the buffer's storage (compact state)
            "stochastic_rounding": False,  # ours (compact state)
            "seed": None,
            "master_weights": True,  # ours: True, False or "remainder"
        },
        flat_buffers=True,
    )
    assert cfg.scheduler.type == "WarmupLR"
    assert cfg.scheduler.params["warmup_num_steps"] == 10
    assert cfg.scheduler.params["warmup_max_lr"] == 0.001
    assert raw["fp16"]["loss_scale"] == 128  # the caller's dict is not modified


@pytest.mark.parametrize("name", ["bf16", "bfloat16"])
def test_bf16_and_its_alias(name):
    cfg = load_config({name: {"enabled": True}})
    assert cfg.bf16.enabled and cfg.dtype == torch.bfloat16
    with raises(f"unknown config key '{name}.enable'; did you mean '{name}.enabled'?"):
        load_config({name: {"enable": True}})


def test_fp16_and_bf16_both_enabled():
    with raises("fp16.enabled and bf16.enabled cannot both be true"):
        load_config({"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    with raises("fp16.enabled and bfloat16.enabled cannot both be true"):
        load_config({"fp16": {"enabled": True}, "bfloat16": {"enabled": True}})
    with raises("only one of 'bf16' and its older alias 'bfloat16'"):
        load_config({"bf16": {"enabled": False}, "bfloat16": {"enabled": False}})


def test_to_dict_round_trips_through_json():
    cfg = load_config(
        {
            "bf16": {"enabled": True},
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 3,
            "optimizer": {"type": "adam", "params": {"betas": [0.8, 0.95], "adam_w_mode": False}},
            "scheduler": {
                "type": "WarmupDecayLR",
                "params": {"total_num_steps": 100, "warmup_min_lr": [0.0, 0.1]},
            },
            "wall_clock_breakdown": True,
        },
        world_size=4,
    )
    text = json.dumps(cfg.to_dict())
    again = load_config(json.loads(text), world_size=4)
    assert again == cfg
    assert again.optimizer.effective_type == "Adam"
    assert cfg.ignored_keys == ("wall_clock_breakdown",) and again.ignored_keys == ()


# ---------------------------------------------------------------------------- misspelled keys


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"fp16": {"loss_scale_windw": 10}},
            "'fp16.loss_scale_windw'; did you mean 'fp16.loss_scale_window'?",
        ),
        ({"gradient_cliping": 1.0}, "'gradient_cliping'; did you mean 'gradient_clipping'?"),
        ({"FP16": {}}, "'FP16'; did you mean 'fp16'?"),
        ({"train_batch_sizes": 8}, "'train_batch_sizes'; did you mean 'train_batch_size'?"),
        (
            {"optimizer": {"type": "Adam", "param": {}}},
            "'optimizer.param'; did you mean 'optimizer.params'?",
        ),
        (
            {"optimizer": {"type": "Adam", "params": {"weight_decy": 0.1}}},
            "'optimizer.params.weight_decy'; did you mean 'optimizer.params.weight_decay'?",
        ),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 5}}},
            "'scheduler.params.warmup_num_step'; did you mean 'scheduler.params.warmup_num_steps'?",
        ),
        # A real key at the wrong level points to where it belongs.
        ({"loss_scale": 0}, "'loss_scale'; did you mean 'fp16.loss_scale'?"),
        (
            {"fp16": {"gradient_clipping": 1.0}},
            "'fp16.gradient_clipping'; did you mean 'gradient_clipping'?",
        ),
    ],
)
def test_misspelled_keys_name_the_closest(raw, message):
    with raises(f"unknown config key {message}"):
        load_config(raw)


def test_unknown_key_without_close_match_lists_valid_keys():
    with raises("unknown config key 'amp'; valid keys at the top level: bf16, bfloat16,"):
        load_config({"amp": {"enabled": True}})
    with raises("unknown config key 'fp16.zzz'; valid keys under 'fp16': auto_cast,"):
        load_config({"fp16": {"zzz": 1}})
    with raises("config keys must be strings"):
        load_config({1: 2})


# --------------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"fp16": {"enabled": 1}}, "'fp16.enabled' expects a bool (true/false), got 1 (int)"),
        ({"fp16": {"enabled": "true"}}, "'fp16.enabled' expects a bool (true/false), got 'true'"),
        (
            {"fp16": {"loss_scale_window": True}},
            "'fp16.loss_scale_window' expects an int, got True (bool)",
        ),
        ({"fp16": {"hysteresis": 2.0}}, "'fp16.hysteresis' expects an int, got 2.0 (float)"),
        ({"fp16": {"loss_scale": "0"}}, "'fp16.loss_scale' expects a number, got '0' (str)"),
        ({"gradient_clipping": False}, "'gradient_clipping' expects a number, got False (bool)"),
        ({"steps_per_print": 10.5}, "'steps_per_print' expects an int, got 10.5 (float)"),
        ({"fp16": True}, "'fp16' expects an object (dict), got True (bool)"),
        ({"optimizer": "Adam"}, "'optimizer' expects an object (dict), got 'Adam' (str)"),
        ({"optimizer": {"type": 3}}, "'optimizer.type' expects a string, got 3 (int)"),
        (
            {"optimizer": {"type": "Adam", "params": {"betas": 0.9}}},
            "'optimizer.params.betas' expects a list of two numbers [beta1, beta2], got 0.9",
        ),
        (
            {"optimizer": {"type": "Adam", "params": {"amsgrad": "no"}}},
            "'optimizer.params.amsgrad' expects a bool",
        ),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "10"}}},
            "'scheduler.params.warmup_num_steps' expects an int, got '10' (str)",
        ),
        (
            {"train_batch_size": "auto"},
            "'train_batch_size' expects an int, got 'auto' (str); "
            "'auto' is a Hugging Face Trainer placeholder",
        ),
    ],
)
def test_wrong_types_name_key_type_and_value(raw, message):
    with raises(f"config key {message}"):
        load_config(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"fp16": {"loss_scale": -1}}, "'fp16.loss_scale' must be >= 0.0, got -1.0"),
        ({"fp16": {"loss_scale": float("inf")}}, "'fp16.loss_scale' must be finite"),
        ({"fp16": {"min_loss_scale": 0}}, "'fp16.min_loss_scale' must be > 0"),
        ({"fp16": {"loss_scale_window": 0}}, "'fp16.loss_scale_window' must be >= 1, got 0"),
        ({"fp16": {"hysteresis": 0}}, "'fp16.hysteresis' must be >= 1, got 0"),
        ({"fp16": {"initial_scale_power": 200}}, "'fp16.initial_scale_power' must be <= 127"),
        ({"gradient_clipping": -0.5}, "'gradient_clipping' must be >= 0.0"),
        ({"steps_per_print": 0}, "'steps_per_print' must be >= 1, got 0"),
        ({"gradient_accumulation_steps": 0}, "'gradient_accumulation_steps' must be >= 1"),
        (
            {"optimizer": {"type": "Adam", "params": {"lr": -1e-3}}},
            "'optimizer.params.lr' must be >= 0.0",
        ),
        (
            {"optimizer": {"type": "Adam", "params": {"betas": [0.9, 1.0]}}},
            "'optimizer.params.betas[1]' must be in [0, 1), got 1.0",
        ),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}},
            "'scheduler.params.warmup_type' must be 'log' or 'linear', got 'cosine'",
        ),
    ],
)
def test_out_of_range_values(raw, message):
    with raises(f"config key {message}"):
        load_config(raw)


def test_fp16_bounds_are_those_of_the_loss_scaler():
    # One fp16 validator (config.parse_fp16) for load_config and get_loss_scaler: the float32
    # range of the scale, and the same refusal, word for word, from either entry point.
    from fp16_triton.loss_scaler import get_loss_scaler

    lowest = {"initial_scale_power": -149, "min_loss_scale": 2.0**-149}  # smallest subnormal
    assert load_config({"fp16": lowest}).fp16.initial_loss_scale == 2.0**-149
    assert get_loss_scaler(lowest).loss_scale == 2.0**-149
    for bad in (
        {"initial_scale_power": -150},
        {"min_loss_scale": 2.0**17},  # above the initial 2**16
        {"loss_scale": 1e39},  # inf in float32
        {"min_loss_scale": 1e-46},  # 0 in float32
    ):
        with pytest.raises(ConfigError) as from_config:
            load_config({"fp16": {"enabled": True, **bad}})
        with pytest.raises(ConfigError) as from_scaler:
            get_loss_scaler(bad)
        assert str(from_config.value) == str(from_scaler.value)
    # A section that is not used (fp16 off; a bf16 scaler) is checked for keys and types only,
    # so a bf16 or fp32 run may carry a leftover fp16 section, as with DeepSpeed.
    leftover = {"enabled": False, "min_loss_scale": 2.0**17}
    assert load_config({"fp16": leftover, "bf16": {"enabled": True}}).dtype == torch.bfloat16
    assert get_loss_scaler({"min_loss_scale": 2.0**17}, torch.bfloat16).loss_scale == 1.0


def test_ints_are_accepted_for_floats():
    cfg = load_config({"fp16": {"loss_scale": 1024, "min_loss_scale": 2}})
    assert cfg.fp16.loss_scale == 1024.0 and isinstance(cfg.fp16.loss_scale, float)
    assert cfg.fp16.min_loss_scale == 2.0 and isinstance(cfg.fp16.min_loss_scale, float)


# ----------------------------------------------------------------------------------- JSON files


def test_json_file_path(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"fp16": {"enabled": True}, "train_batch_size": 16}))
    for source in (path, str(path)):
        cfg = load_config(source)
        assert cfg.fp16.enabled and cfg.train_batch_size == 16
        assert cfg.train_micro_batch_size_per_gpu == 16


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with raises(f"config file '{path}' does not exist"):
        load_config(path)
    with raises(f"config path '{tmp_path}' is not a file"):
        load_config(tmp_path)


def test_invalid_json_gives_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "fp16": {\n    "enabled": true,\n  }\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"config file '{path}' is not valid JSON" in message
    assert "line 4, column 3" in message


def test_json_file_edge_cases(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with raises("must hold a JSON object, got list"):
        load_config(path)
    path = tmp_path / "dup.json"
    path.write_text('{"steps_per_print": 1, "steps_per_print": 2}')
    with raises("has the key 'steps_per_print' twice"):
        load_config(path)
    path = tmp_path / "typo.json"
    path.write_text('{"fp16": {"hysteris": 2}}')
    with raises("did you mean 'fp16.hysteresis'?"):
        load_config(path)
    with raises("looks like a JSON string"):
        load_config('{"fp16": {}}')
    with pytest.raises(TypeError, match="dict, a path"):
        load_config(42)


# ------------------------------------------------------------------------------ batch arithmetic


@pytest.mark.parametrize(
    ("given", "world_size", "expected"),
    [
        # (train_batch_size, micro, grad_accum) given (None = absent) -> all three derived
        ((32, 4, None), 2, (32, 4, 4)),
        ((32, None, 2), 2, (32, 8, 2)),
        ((None, 4, 2), 2, (16, 4, 2)),
        ((32, 4, 4), 2, (32, 4, 4)),
        ((32, None, None), 4, (32, 8, 1)),
        ((None, 4, None), 3, (12, 4, 1)),
        ((None, None, 8), 1, (None, None, 8)),
        ((None, None, None), 1, (None, None, 1)),
    ],
)
def test_batch_arithmetic(given, world_size, expected):
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    raw = {k: v for k, v in zip(keys, given) if v is not None}
    cfg = load_config(raw, world_size=world_size)
    got = (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu)
    assert (*got, cfg.gradient_accumulation_steps) == expected


def test_batch_inconsistent_and_not_divisible():
    with raises("32 != 4 * 2 * 2 = 16"):
        load_config(
            {
                "train_batch_size": 32,
                "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": 2,
            },
            world_size=2,
        )
    with raises(
        "train_batch_size 30 is not divisible by train_micro_batch_size_per_gpu * "
        "world_size = 4 * 2 = 8"
    ):
        load_config({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, world_size=2)
    with raises(
        "train_batch_size 30 is not divisible by gradient_accumulation_steps * "
        "world_size = 4 * 1 = 4"
    ):
        load_config({"train_batch_size": 30, "gradient_accumulation_steps": 4})
    with raises("train_batch_size 10 is not divisible by world_size 4"):
        load_config({"train_batch_size": 10}, world_size=4)
    for bad in (0, True, 1.0):
        with raises("world_size must be an int >= 1"):
            load_config({}, world_size=bad)


def test_null_batch_key_counts_as_absent():
    # DeepSpeed reads these with a None default, so an explicit null is "not given".
    cfg = load_config({"train_batch_size": None, "train_micro_batch_size_per_gpu": 4})
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps) == (4, 1)


# ------------------------------------------------------------------------------------ optimizer


@pytest.mark.parametrize(
    ("given", "canonical"),
    [("adam", "Adam"), ("ADAM", "Adam"), ("AdamW", "AdamW"), ("adamw", "AdamW"), ("sgd", "SGD")],
)
def test_optimizer_type_is_case_insensitive(given, canonical):
    assert load_config({"optimizer": {"type": given}}).optimizer.type == canonical


def test_optimizer_defaults_and_torch_kwargs():
    cfg = load_config({"optimizer": {"type": "AdamW"}})
    assert cfg.optimizer.params == {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,  # DeepSpeed FusedAdam's default, not torch AdamW's 0.01
        "amsgrad": False,
        "maximize": False,
        "state_dtype": torch.float32,  # ours (bf16 moments), not torch's
        "stochastic_rounding": False,  # ours too
        "seed": None,  # ours: the stochastic rounding's seeds, torch.initial_seed() if None
        "master_weights": True,  # ours: True, False or "remainder" (bf16 params)
    }
    # params are valid keyword arguments of the torch optimizer of the effective type, but
    # for ours (state_dtype, stochastic_rounding, seed, master_weights).
    for raw in (
        {"type": "Adam", "params": {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}},
        {"type": "Adam", "params": {"adam_w_mode": False, "maximize": True}},
        {"type": "SGD", "params": {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-4}},
    ):
        opt_cfg = load_config({"optimizer": raw}).optimizer
        cls = getattr(torch.optim, opt_cfg.effective_type)
        ours = ("state_dtype", "stochastic_rounding", "seed", "master_weights")
        params = {k: v for k, v in opt_cfg.params.items() if k not in ours}
        opt = cls([torch.nn.Parameter(torch.zeros(2))], **params)
        for key, value in params.items():
            assert opt.param_groups[0][key] == value


def test_adam_takes_stochastic_rounding_and_an_integer_seed():
    config = {"optimizer": {"type": "AdamW", "params": {"stochastic_rounding": True, "seed": 7}}}
    params = load_config(config).optimizer.params
    assert params["stochastic_rounding"] is True and params["seed"] == 7
    for bad in ("7", 1.5, True):
        with pytest.raises(ConfigError, match="optimizer.params.seed"):
            load_config({"optimizer": {"type": "Adam", "params": {"seed": bad}}})


def test_deepspeed_adam_means_adamw():
    # DeepSpeed: effective_adam_w_mode = (name == "adamw") or params.get("adam_w_mode", True).
    plain = load_config({"optimizer": {"type": "Adam", "params": {"weight_decay": 0.1}}})
    assert plain.optimizer.adam_w_mode is True
    assert plain.optimizer.effective_type == "AdamW"
    assert "adam_w_mode" not in plain.optimizer.params

    l2 = load_config({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}})
    assert (l2.optimizer.adam_w_mode, l2.optimizer.effective_type) == (False, "Adam")

    adamw = load_config({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}})
    assert adamw.optimizer.effective_type == "AdamW" and adamw.optimizer.torch_adam is True

    with pytest.warns(UserWarning, match="adam_w_mode = false has no effect"):
        ignored = load_config({"optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}})
    assert ignored.optimizer.effective_type == "AdamW"

    sgd = load_config({"optimizer": {"type": "SGD"}})
    assert sgd.optimizer.adam_w_mode is None and sgd.optimizer.effective_type == "SGD"


def test_optimizer_validation_errors():
    from fp16_triton.config import SUPPORTED_OPTIMIZERS

    assert {"Adam", "AdamW", "SGD"} <= set(SUPPORTED_OPTIMIZERS)  # and every registered class
    with raises(
        "unsupported optimizer type 'Adagrad' at 'optimizer.type'; supported "
        f"(case-insensitive): {', '.join(SUPPORTED_OPTIMIZERS)}"
    ):
        load_config({"optimizer": {"type": "Adagrad"}})
    with raises("did you mean 'AdamW'?"):
        load_config({"optimizer": {"type": "AdamWW"}})
    with raises("'optimizer.type' is required"):
        load_config({"optimizer": {"params": {"lr": 0.1}}})
    # Every algorithm that takes the key is named (Muon and SGD take momentum).
    with raises(
        "'optimizer.params.momentum' is not a parameter of AdamW (it is one of Muon's and SGD's)"
    ):
        load_config({"optimizer": {"type": "AdamW", "params": {"momentum": 0.9}}})
    with raises("'optimizer.params.betas' is not a parameter of SGD (it is one of Adam's and "):
        load_config({"optimizer": {"type": "SGD", "params": {"betas": [0.9, 0.99]}}})
    with raises("use the top-level 'gradient_clipping'"):
        load_config({"optimizer": {"type": "Adam", "params": {"max_grad_norm": 1.0}}})
    with raises("bias_correction' = false is not supported"):
        load_config({"optimizer": {"type": "Adam", "params": {"bias_correction": False}}})
    with raises("nesterov' requires momentum > 0 and dampening 0"):
        load_config({"optimizer": {"type": "SGD", "params": {"nesterov": True}}})
    with raises("unknown config key 'optimizer.params.foreach'"):
        load_config({"optimizer": {"type": "Adam", "params": {"foreach": True}}})
    # bias_correction: true (DeepSpeed's default) is accepted and dropped; params: null is {}.
    cfg = load_config({"optimizer": {"type": "Adam", "params": {"bias_correction": True}}})
    assert "bias_correction" not in cfg.optimizer.params
    assert load_config({"optimizer": {"type": "SGD", "params": None}}).optimizer.params["lr"]


# ------------------------------------------------------------------------------------ scheduler


def test_scheduler_validation():
    cfg = load_config({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 9}}})
    assert cfg.scheduler == SchedulerConfig(
        type="WarmupDecayLR",
        params={
            "total_num_steps": 9,
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 0.001,
            "warmup_num_steps": 1000,
            "warmup_type": "log",
            "last_batch_iteration": -1,
        },
    )
    with raises("'scheduler.params.total_num_steps' is required for WarmupDecayLR"):
        load_config({"scheduler": {"type": "WarmupDecayLR"}})
    with raises(
        "scheduler type 'OneCycle' (a DeepSpeed scheduler) is not supported by "
        "fp16_triton; supported: WarmupLR, WarmupDecayLR"
    ):
        load_config({"scheduler": {"type": "OneCycle", "params": {}}})
    with raises(
        "unsupported scheduler type 'StepLR' at 'scheduler.type'; "
        "supported: WarmupLR, WarmupDecayLR"
    ):
        load_config({"scheduler": {"type": "StepLR"}})
    with raises("did you mean 'WarmupLR'?"):
        load_config({"scheduler": {"type": "warmuplr"}})
    with raises("unknown config key 'scheduler.params.total_num_steps'"):
        load_config({"scheduler": {"type": "WarmupLR", "params": {"total_num_steps": 5}}})
    lists = load_config(
        {
            "scheduler": {
                "type": "WarmupLR",
                "params": {"warmup_min_lr": [0, 0.1], "warmup_max_lr": None},
            }
        }
    )
    assert lists.scheduler.params["warmup_min_lr"] == [0.0, 0.1]
    assert lists.scheduler.params["warmup_max_lr"] is None
    with raises("'scheduler.params.warmup_min_lr[1]' expects a number"):
        load_config({"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": [0, "x"]}}})


# --------------------------------------------------------------------------------- ignored keys


def test_ignored_deepspeed_keys():
    raw = {
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": 0, "overlap_comm": True},
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "zero_allow_untested_optimizer": True,
        "communication_data_type": "fp32",
        "dump_state": False,
    }
    assert set(raw) == set(IGNORED_DEEPSPEED_KEYS)
    cfg = load_config(raw)
    assert cfg == EngineConfig()
    assert set(cfg.ignored_keys) == set(IGNORED_DEEPSPEED_KEYS)
    assert load_config({"zero_optimization": False}).ignored_keys == ("zero_optimization",)
    assert load_config({"zero_optimization": {}}) == EngineConfig()  # stage defaults to 0


@pytest.mark.parametrize("zero", [{"stage": 1}, {"stage": 3, "offload_param": {}}, True])
def test_zero_stages_above_zero_point_to_torch_distributed(zero):
    with raises("ZeRO sharding is done via torch.distributed (FSDP2 for stage 3"):
        load_config({"zero_optimization": zero})


def test_invalid_zero_section():
    with raises("'zero_optimization.stage' must be <= 3"):
        load_config({"zero_optimization": {"stage": 4}})
    with raises("'zero_optimization' expects an object (dict)"):
        load_config({"zero_optimization": 0})


def test_no_warnings_for_a_typical_deepspeed_config(tmp_path):
    # A config in the shape DeepSpeed's docs use loads cleanly.
    raw = {
        "train_batch_size": 32,
        "gradient_accumulation_steps": 2,
        "steps_per_print": 100,
        "gradient_clipping": 1.0,
        "fp16": {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "optimizer": {
            "type": "Adam",
            "params": {"lr": 0.00015, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7},
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000},
        },
        "zero_optimization": {"stage": 0},
        "wall_clock_breakdown": False,
    }
    path = Path(tmp_path) / "ds.json"
    path.write_text(json.dumps(raw, indent=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(path)
    assert cfg.train_micro_batch_size_per_gpu == 16
    assert cfg.optimizer.effective_type == "AdamW"


def test_numpy_scalars_are_numbers_and_bools_stay_bools():
    """numpy numbers (a config built with numpy) are accepted as get_loss_scaler always took
    them; bools, Python's or numpy's, are never numbers."""
    import numpy as np

    from fp16_triton.loss_scaler import get_loss_scaler

    scaler = get_loss_scaler(
        {"initial_scale_power": np.int64(8), "min_loss_scale": np.float32(0.5),
         "consecutive_hysteresis": np.True_}
    )  # fmt: skip
    assert (scaler.loss_scale, scaler.min_scale) == (256.0, 0.5)
    assert load_config({"fp16": {"initial_scale_power": np.int32(4)}}).fp16.initial_scale_power == 4
    with raises("'fp16.hysteresis' expects an int"):
        load_config({"fp16": {"hysteresis": np.True_}})


def test_adam_state_dtype_takes_strings_and_round_trips_through_json():
    config = {"optimizer": {"type": "AdamW", "params": {"state_dtype": "bf16"}}}
    cfg = load_config(config)
    assert cfg.optimizer.params["state_dtype"] == torch.bfloat16
    assert load_config(json.loads(json.dumps(cfg.to_dict()))).optimizer == cfg.optimizer
    for bad in ("int4", "fp16", 3):
        with pytest.raises(ConfigError, match="optimizer.params.state_dtype"):
            load_config({"optimizer": {"type": "Adam", "params": {"state_dtype": bad}}})
    int8 = load_config({"optimizer": {"type": "AdamW", "params": {"state_dtype": "int8"}}})
    assert int8.optimizer.params["state_dtype"] == "int8"
    assert load_config(json.loads(json.dumps(int8.to_dict()))).optimizer == int8.optimizer
    with pytest.raises(ConfigError, match="optimizer.params.state_dtype"):  # Adam's only
        load_config({"optimizer": {"type": "Lion", "params": {"state_dtype": "int8"}}})
    assert load_config({"optimizer": {"type": "Adam", "params": {"state_dtype": "INT8"}}})


@pytest.mark.parametrize(
    "precision, params, keys",
    [
        ("fp16", {"master_weights": "remainder"}, "optimizer.params.master_weights"),
        ("bf16", {"state_dtype": "int8", "amsgrad": True}, "optimizer.params.amsgrad"),
    ],
)
def test_combinations_the_optimizer_refuses_are_config_errors(precision, params, keys):
    """Refused by the config, not by the optimizer's constructor: ``initialize`` casts the
    model before it builds the optimizer, so a later error would leave the model cast."""
    import fp16_triton

    config = {precision: {"enabled": True}, "optimizer": {"type": "AdamW", "params": params}}
    with pytest.raises(ConfigError, match=re.escape(keys)):
        load_config(config)
    model = torch.nn.Linear(8, 8)
    with pytest.raises(ConfigError):
        fp16_triton.initialize(model=model, config=config, backend="torch")
    assert model.weight.dtype == torch.float32
    valid = {"bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": params}}
    if precision == "fp16":  # the same options with bf16 params are fine
        assert load_config(valid).optimizer.params["master_weights"] == "remainder"
