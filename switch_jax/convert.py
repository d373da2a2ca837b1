"""`python -m switch_jax.convert` / `switch-convert`: released weights in and out of a MODEL_DIR.

    switch-convert --from=hf --source=DIR --model_dir=OUT [--scan_layers]  # HF save_pretrained
    switch-convert --from=t5x --source=CKPT --model_dir=OUT --gin_file=models/switch_base_8.gin
    switch-convert --to=hf --model_dir=IN --output=DIR [--expert_capacity=64]

HF directories carry their config.json; a T5X checkpoint does not, so its model comes from our
gin files (every shape is checked against the checkpoint; ModelConfig.scan_layers there picks
the stacked tree). --to=hf reads IN/config.gin, scanned or not.
"""

from __future__ import annotations

import os

from absl import flags

from switch_jax import cli
from switch_jax.models.config import ConfigError
from switch_jax.store import model_dir as model_dir_lib

_FROM = cli.define_flag(
    flags.DEFINE_enum, "from", None, ["hf", "t5x"], "import: the source checkpoint's format"
)
_TO = cli.define_flag(
    flags.DEFINE_enum, "to", None, ["hf"], "export: write MODEL_DIR's checkpoint in this format"
)
_SOURCE = cli.define_flag(
    flags.DEFINE_string, "source", None, "import: HF directory or T5X checkpoint_<step> dir"
)
_MODEL_DIR = cli.define_flag(
    flags.DEFINE_string, "model_dir", None, "import: MODEL_DIR to create; export: input"
)
_OUTPUT = cli.define_flag(flags.DEFINE_string, "output", None, "export: the HF directory to create")
_CAPACITY = cli.define_flag(
    flags.DEFINE_integer,
    "expert_capacity",
    64,
    "export: HF's fixed per-sequence expert capacity (config.json)",
    lower_bound=1,
)
_SCAN = cli.define_flag(
    flags.DEFINE_bool, "scan_layers", False, "--from=hf: write the tree of scan_layers=True"
)
_MAX_SHARD_GB = cli.define_flag(
    flags.DEFINE_float,
    "max_shard_gb",
    5.0,
    "export: safetensors shard size limit",
    lower_bound=0.001,
)


def _require(value, flag: str, why: str):
    if not value:
        raise ConfigError(f"--{flag} is required {why}")
    return value


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {list(argv[1:])}; use --source= / --model_dir=")
    from switch_jax.formats import convert

    if bool(_FROM.value) == bool(_TO.value):
        raise ConfigError("give exactly one of --from=hf|t5x (import) or --to=hf (export)")
    model_dir = _require(_MODEL_DIR.value, "model_dir", "(the MODEL_DIR to write or read)")
    if _FROM.value:
        source = _require(_SOURCE.value, "source", "with --from")
        if not os.path.isdir(source):
            raise ConfigError(f"--source={source} is not a directory")
        if _FROM.value == "hf":
            cfg = convert.import_hf(source, model_dir, scan_layers=_SCAN.value)
        else:
            if not flags.FLAGS.gin_file:
                raise ConfigError(
                    "--from=t5x needs the model gin file, e.g. --gin_file=models/switch_base_8.gin"
                )
            cli.parse_gin()
            cfg = convert.import_t5x(source, model_dir, cli.configs().model)
        print(f"wrote {model_dir} ({_describe(cfg)}) from {source}", flush=True)
        return
    output = _require(_OUTPUT.value, "output", "with --to=hf")
    gin_file = os.fspath(model_dir_lib.config_file(model_dir))
    if not os.path.exists(gin_file):
        near = model_dir_lib.near_run(model_dir)
        raise ConfigError(f"--model_dir={model_dir} has no {model_dir_lib.CONFIG_GIN}{near}")
    cli.parse_gin([gin_file])
    cfg = cli.configs().model
    convert.export_hf(
        model_dir,
        output,
        cfg,
        expert_capacity=_CAPACITY.value,
        max_shard_bytes=int(_MAX_SHARD_GB.value * 2**30),
    )
    print(f"wrote {output} ({_describe(cfg)}) from {model_dir}", flush=True)


def _describe(cfg) -> str:
    from switch_jax.models.size import count_params

    total, _ = count_params(cfg)
    kind = f"Switch, {cfg.moe.num_experts} experts" if cfg.moe else "dense T5"
    return f"{kind}, {total:,} parameters"


console_main = cli.entry(main, gin=False, hosts=False)  # console script `switch-convert`

if __name__ == "__main__":
    console_main()
